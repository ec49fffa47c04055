"""Training diffusion models: EMA weights, progress, periodic checkpoints and exact resume."""

from diffquant.training.ema import ExponentialMovingAverage
from diffquant.training.trainer import TrainConfig, train_model

__all__ = ["ExponentialMovingAverage", "TrainConfig", "train_model"]

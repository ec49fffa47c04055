"""Evaluation: the protocol, the shipped feature network and the metrics on it."""

from diffquant.evaluation.agreement import psnr, ssim
from diffquant.evaluation.metrics import (
    GaussianStats,
    class_accuracy,
    frechet_distance,
    inception_score,
    precision_recall,
)
from diffquant.evaluation.protocol import (
    PROTOCOLS,
    EvalProtocol,
    EvalReport,
    Scorer,
    agreement,
    cached_samples,
    data_floors,
    evaluate,
    get_protocol,
)

__all__ = [
    "PROTOCOLS",
    "EvalProtocol",
    "EvalReport",
    "GaussianStats",
    "Scorer",
    "agreement",
    "cached_samples",
    "class_accuracy",
    "data_floors",
    "evaluate",
    "frechet_distance",
    "get_protocol",
    "inception_score",
    "precision_recall",
    "psnr",
    "ssim",
]

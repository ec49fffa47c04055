"""Exponential moving average of model weights, with the usual warm-up of the decay."""

from __future__ import annotations

import torch


class ExponentialMovingAverage:
    """Shadow copy of a model's floating-point parameters and buffers.

    The decay warms up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by
    the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach(), 1.0 - decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the averaged weights into `model` (its non-float buffers stay)."""
        model.load_state_dict(self.shadow, strict=False)

"""Check a calibration set against the model it is about to calibrate, before any work is done.

A set that does not fit the model fails late with a framework traceback (wrong channels, class labels
for an unconditional model); a set that fits but is wrong gives a broken model with no error at all (one
value of 1e30 makes every sample NaN, a constant set or timesteps outside the noise schedule cost
20-25 dB). Each check here refuses with one line naming the problem and the fix.
"""

from __future__ import annotations

import inspect
import warnings

import torch

from diffquant.calibration.dataset import CalibrationSet
from diffquant.errors import DiffquantError
from diffquant.model import DiffusionModel

OUTLIER_FACTOR = 1e3
"""A value further from the median than this many times the robust spread of the set is refused."""
SPREAD_QUANTILE = 0.99
"""The robust spread: this quantile of |x - median| (insensitive to up to 1 % of extreme values)."""
_MAX_STAT_VALUES = 1 << 20


def validate_for_model(calibration: CalibrationSet, model: DiffusionModel) -> None:
    """Raise a DiffquantError when `calibration` does not belong to `model` or is statistically broken."""
    _check_identity(calibration, model)
    _check_shape(calibration, model)
    _check_conditioning(calibration, model)
    _check_timesteps(calibration, model)
    check_statistics(calibration)


def _check_identity(calibration: CalibrationSet, model: DiffusionModel) -> None:
    recorded = calibration.meta.get("model")
    if recorded is not None and recorded != model.info.name:
        raise DiffquantError(
            f"This calibration set was recorded on '{recorded}' but the model is '{model.info.name}'; record one "
            f"on this model (diffquant calibrate --model {model.info.name}), or delete 'model' from its "
            "calibration.json if the two really are the same network."
        )
    digest = calibration.meta.get("model_digest")
    if digest is not None:
        from diffquant.cache import model_digest

        if digest != model_digest(model.denoiser):
            warnings.warn(
                f"The calibration set was recorded on other weights of '{model.info.name}' (digest {digest}); "
                "its inputs may not match this checkpoint's trajectories. Re-record it if the weights changed much.",
                stacklevel=3,
            )


def _expected_channels(model: DiffusionModel) -> int | None:
    channels = getattr(getattr(model.denoiser, "config", None), "in_channels", None)
    return channels if isinstance(channels, int) else None


def _check_shape(calibration: CalibrationSet, model: DiffusionModel) -> None:
    sample = calibration.sample
    expected = tuple(model.info.image_shape)
    if not sample.is_floating_point():
        raise DiffquantError(f"Calibration 'sample' must be floating point, got {sample.dtype}.")
    packed = tuple(model.adapter.pack(torch.zeros(1, *expected)).shape[1:])
    if packed != expected:  # token-packed families (Flux, Qwen-Image) take any number of tokens
        if sample.ndim != len(packed) + 1 or sample.shape[-1] != packed[-1]:
            raise DiffquantError(
                f"Calibration samples have shape {tuple(sample.shape[1:])} but '{model.info.name}' takes packed "
                f"tokens of {packed[-1]} features; record the set on this model."
            )
        return
    channels = _expected_channels(model) or expected[0]
    if sample.ndim == len(expected) + 1 and sample.shape[1] != channels:
        raise DiffquantError(
            f"Calibration samples have {sample.shape[1]} channels but '{model.info.name}' takes {channels} "
            f"(samples of shape {expected}); record the set on this model."
        )
    if sample.ndim != len(expected) + 1:
        raise DiffquantError(
            f"Calibration samples have shape {tuple(sample.shape[1:])} but '{model.info.name}' takes "
            f"{len(expected)}-dimensional samples like {expected}; record the set on this model."
        )
    if getattr(model.denoiser.config, "sample_size", None) is None:  # the config fixes no size (Wan video)
        return
    if tuple(sample.shape[1:]) != expected:
        raise DiffquantError(
            f"Calibration samples have shape {tuple(sample.shape[1:])} but '{model.info.name}' generates "
            f"{expected}; record the set on this model."
        )


def _forward_parameters(model: DiffusionModel) -> set[str] | None:
    try:
        parameters = inspect.signature(model.denoiser.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def _check_conditioning(calibration: CalibrationSet, model: DiffusionModel) -> None:
    conditioning = calibration.conditioning
    accepted = _forward_parameters(model)
    if accepted is not None:
        unknown = sorted(set(conditioning) - accepted)
        if unknown:
            raise DiffquantError(
                f"The calibration set conditions on {', '.join(unknown)}, which '{model.info.name}' "
                f"({type(model.denoiser).__name__}) does not take; record the set on this model."
            )
    labels = conditioning.get("class_labels")
    classes = model.info.num_classes
    if labels is not None and classes is None:
        raise DiffquantError(
            f"The calibration set has class labels but '{model.info.name}' is unconditional; record the set "
            "on this model (it was recorded on a class-conditional one)."
        )
    if labels is None and classes is not None and not conditioning.keys() - {"class_labels"}:
        raise DiffquantError(
            f"'{model.info.name}' is class-conditional ({classes} classes) but the calibration set has no "
            "class_labels; record the set on this model."
        )
    if labels is not None:
        if labels.is_floating_point() or labels.ndim != 1:
            raise DiffquantError(f"Calibration class_labels must be a 1-D integer tensor, got {labels.dtype}.")
        # label `classes` is the null (unconditional) label of classifier-free guidance
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > classes):
            raise DiffquantError(
                f"Calibration class_labels span [{int(labels.min())}, {int(labels.max())}] but "
                f"'{model.info.name}' has classes 0-{classes - 1} (and {classes} for no class)."
            )


def _check_timesteps(calibration: CalibrationSet, model: DiffusionModel) -> None:
    horizon = int(model.scheduler_config.get("num_train_timesteps", 1000))
    # flow-matching schedulers use t = 1000 * sigma, so the pure-noise end t = num_train_timesteps is valid
    flow = model.adapter.flow_matching or "FlowMatch" in str(model.scheduler_config.get("_class_name", ""))
    last = horizon if flow else horizon - 1
    timestep = calibration.timestep
    low, high = float(timestep.min()), float(timestep.max())
    if low < 0 or high > last:
        raise DiffquantError(
            f"Calibration timesteps span [{low:g}, {high:g}] but '{model.info.name}' is trained on 0-{last} "
            "(num_train_timesteps of its scheduler); record the set with this model's scheduler."
        )
    steps = calibration.step_index
    out_of_range = steps.numel() and (int(steps.min()) < 0 or int(steps.max()) >= calibration.num_steps)
    if steps.is_floating_point() or out_of_range:
        raise DiffquantError(
            f"Calibration step_index must be integers in [0, {calibration.num_steps}) (num_steps); got "
            f"{steps.dtype} values in [{steps.min().item()}, {steps.max().item()}]."
        )


def _values_for_statistics(sample: torch.Tensor) -> torch.Tensor:
    flat = sample.detach().reshape(-1).double()
    if flat.numel() > _MAX_STAT_VALUES:  # a deterministic stride keeps the quantiles cheap
        flat = flat[:: flat.numel() // _MAX_STAT_VALUES + 1]
    return flat


def check_statistics(calibration: CalibrationSet) -> None:
    """Refuse samples that are non-finite, constant, or hold values far outside the rest of the set."""
    sample = calibration.sample
    if not torch.isfinite(sample).all():
        raise DiffquantError(
            "Calibration samples hold NaN or Inf; re-record them from a model that samples finite images."
        )
    per_entry = sample.detach().reshape(len(sample), -1).double()
    if bool((per_entry.amax(1) == per_entry.amin(1)).all()):
        raise DiffquantError(
            f"Every calibration sample is constant (e.g. all {per_entry[0, 0].item():g}): there is nothing to "
            "calibrate ranges on. Record real denoiser inputs (diffquant calibrate)."
        )
    values = _values_for_statistics(sample)
    median = values.median()
    spread = torch.quantile((values - median).abs(), SPREAD_QUANTILE).item()
    if spread == 0.0:
        raise DiffquantError(
            f"{SPREAD_QUANTILE:.0%} of the calibration values equal {median.item():g}: the set is nearly "
            "constant and would calibrate degenerate ranges. Record real denoiser inputs (diffquant calibrate)."
        )
    deviation = (sample.detach().reshape(len(sample), -1).float() - median.float()).abs()
    if deviation.max().item() > OUTLIER_FACTOR * spread:
        entry = int(deviation.amax(1).argmax())
        value = sample.reshape(len(sample), -1)[entry][deviation[entry].argmax()]
        raise DiffquantError(
            f"Calibration sample {entry} holds {value.item():.3g}, more than {OUTLIER_FACTOR:g}x the spread of the "
            f"other values ({spread:.3g} around {median.item():.3g}); remove that entry or re-record the set."
        )


TEXT_CONDITIONING = "encoder_hidden_states"


def require_text_input(model: DiffusionModel, method: str) -> None:
    """One clear error, before any recording, when a text-conditioning method meets a model without text."""
    if TEXT_CONDITIONING not in model.adapter.conditioning:
        raise DiffquantError(
            f"'{method}' quantizes the text conditioning of a text-to-image model, but '{model.info.name}' "
            f"({model.adapter.name}) has no text input ('{TEXT_CONDITIONING}'). Use a text-conditioned pipeline, e.g. "
            "'fmnist-t2i', or a method for any model (naive, svdquant, viditq)."
        )


def text_token_count(calibration: CalibrationSet, method: str) -> int:
    """Tokens of the prompt embedding in `calibration`; one clear error when the model has no text input.

    Methods about the text conditioning (MixDQ, DGQ) need a text-to-image model.
    """
    text = calibration.conditioning.get(TEXT_CONDITIONING)
    if not torch.is_tensor(text) or text.ndim != 3:
        raise DiffquantError(
            f"'{method}' quantizes the text conditioning of a text-to-image model, but this model has no text "
            f"input (its calibration conditioning is {sorted(calibration.conditioning) or 'empty'}; a "
            f"(batch, tokens, channels) '{TEXT_CONDITIONING}' is needed). Use a text-conditioned pipeline such as "
            "'fmnist-t2i', or a method for any model (naive, svdquant, viditq)."
        )
    return text.shape[1]

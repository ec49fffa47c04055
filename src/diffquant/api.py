"""The Python API: `quantize`, `save`, `load`, `record_calibration`, and LoRA on a quantized model."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffquant.cache import cache_dir, json_digest, model_digest, safe_name
from diffquant.calibration import AllocatedSteps, CalibrationSet, record_trajectories
from diffquant.calibration.validation import require_text_input, validate_for_model
from diffquant.errors import ConfigError, DiffquantError
from diffquant.methods import MethodConfig, make_config, method_for_config
from diffquant.modules import quant_layers
from diffquant.modules.lora import adapter_names
from diffquant.modules.policy import check_patterns
from diffquant.pipelines import (
    is_pipeline,
    model_from_pipeline,
    quantize_component,
    record_pipeline_calibration,
    save_pipeline,
)
from diffquant.profiling import measure_resources
from diffquant.quant import require_valid_step_sizes
from diffquant.runtime import load_quantized, save_quantized
from diffquant.runtime.lora import load_lora, loaded_adapters, set_adapters, set_lora_scale, unload_lora
from diffquant.runtime.storage import guard_inputs
from diffquant.zoo import DiffusionModel, load_model


def record_calibration(
    model: DiffusionModel, config: MethodConfig, progress: bool = True, use_cache: bool = True
) -> CalibrationSet:
    """Record the calibration data a method's config asks for, from the full-precision model.

    Sets are cached on disk by model weights and calibration settings, so methods that ask for the
    same data share one recording.
    """
    settings = config.calibration
    settings.validate()
    digest = model_digest(model.denoiser)
    # the model's name comes from a file the user may not control: never let it steer the path
    key = f"{safe_name(model.info.name)}-{digest}-{json_digest(asdict(settings))}"
    path = cache_dir() / "calibration" / key
    if use_cache and path.is_dir():
        return CalibrationSet.load(path)
    if use_cache and not _cache_has_room(path, model, settings):
        use_cache = False  # known before minutes of recording: warn now, record anyway
    policy = settings.timestep_policy(model)
    # TDAC allocates `trajectories` samples over the steps; each step's samples need their own runs
    runs = max(policy.counts) if isinstance(policy, AllocatedSteps) else settings.trajectories
    calibration = record_trajectories(model, runs, settings.sampler(), policy, settings.seed, progress=progress)
    calibration.meta["model_digest"] = digest
    if use_cache:
        try:
            calibration.save(path, overwrite=True)
        except DiffquantError as error:  # a cache that cannot be written costs a re-recording, not the run
            warnings.warn(f"Calibration data not cached: {error}", stacklevel=2)
    return calibration


def _cache_has_room(path: Path, model: DiffusionModel, settings) -> bool:
    """At most every step of every trajectory (both guidance branches) is kept: that bounds the set's size."""
    from diffquant.fileio import ensure_free_space

    values = 1
    for size in model.info.image_shape:
        values *= size
    bound = settings.trajectories * settings.steps * values * 4 * (2 if model.info.conditional else 1)
    try:
        ensure_free_space(path.parent, bound, "the calibration cache")
    except DiffquantError as error:
        warnings.warn(f"Calibration data will not be cached: {error}", stacklevel=3)
        return False
    return True


def quantize(
    model: DiffusionModel | Any,
    config: MethodConfig | str,
    calibration: CalibrationSet | None = None,
    progress: bool = True,
    inplace: bool = False,
    prompts: list[str] | str | Path | None = None,
    components: tuple[str, ...] = ("denoiser",),
    **options: Any,
) -> DiffusionModel:
    """Quantize `model` with a method's config (or a method name plus options) and return the result.

    `model` may be a diffusers `DiffusionPipeline` (or a model loaded from a pipeline directory): its
    denoiser is quantized and the result keeps the pipeline. Without `calibration`, the data is
    recorded from `model` as the config's calibration settings say - for a pipeline, by running the
    pipeline itself on `prompts` (a list, or a file with one prompt per line), both CFG branches; a
    reference pipeline with class prompts (fmnist-t2i) records the method's own calibration set from them.
    `components` names what is quantized: "denoiser" (the method), plus e.g. "text_encoder" (weight-only
    round-to-nearest at the method's weight bits).
    The returned model's layers hold frozen integer codes; `save` writes it, `load` reads it back.
    """
    if is_pipeline(model):
        model = model_from_pipeline(model)
    if isinstance(config, str):
        config = make_config(config, **options)
    elif options:
        raise ConfigError("Pass options either in the config object or as keyword arguments with a method name.")
    if not isinstance(config, MethodConfig):
        raise ConfigError(f"config must be a method config or a method name, got {type(config).__name__}.")
    config.validate()
    if model.quantization is not None:
        raise DiffquantError("This model is already quantized; quantize its full-precision original instead.")
    entry = method_for_config(config)
    # layer patterns that match nothing fail now, not after minutes of recording (shapes are checked by the
    # method, after its own skip list: SVDQuant keeps layers too narrow for NVFP4's 16-blocks in float)
    check_patterns(model.denoiser, config.layer_policy())
    if config.needs_text:
        require_text_input(model, config.name)

    recording_time = 0.0
    if calibration is None:
        started = time.perf_counter()
        if model.pipeline is not None and (prompts is not None or not model.info.class_prompts):
            if prompts is None:
                raise ConfigError("Quantizing a pipeline records calibration data from prompts: pass prompts=[...].")
            settings = config.calibration
            calibration = record_pipeline_calibration(model, prompts, settings.steps, seed=settings.seed)
        else:
            calibration = record_calibration(model, config, progress)
        recording_time = time.perf_counter() - started
    elif not isinstance(calibration, CalibrationSet):
        raise ConfigError(f"calibration must be a CalibrationSet, got {type(calibration).__name__}.")
    calibration.validate()
    validate_for_model(calibration, model)

    quantized = model if inplace else copy.deepcopy(model)  # a pipeline's copy shares the copied denoiser
    with measure_resources() as usage:
        details = entry.apply(quantized.denoiser, calibration, config, progress) or {}
        require_valid_step_sizes(quantized.denoiser, f"Quantizing with '{config.name}'")
        for _, layer in quant_layers(quantized.denoiser):
            layer.freeze()
    quantized.denoiser.eval()
    guard_inputs(quantized.denoiser)
    extra = {}
    for name in components:
        if name == "denoiser":
            continue
        if quantized.pipeline is None:
            raise ConfigError(f"Component '{name}' needs a pipeline; a bare denoiser has only 'denoiser'.")
        extra[name] = quantize_component(quantized.pipeline, name, config.wbits)
    quantized.quantization = {
        "method": config.name,
        "setting": config.setting,
        "config": config.to_json(),
        "source_model": model.info.name,
        "calibration": {**calibration.meta, "samples": len(calibration), "recording_s": round(recording_time, 2)},
        # a resumed run also counts the finished work of the processes before it
        "calibration_wall_time_s": round(usage.wall_time_s + details.get("earlier_runs_s", 0.0), 2),
        "calibration_peak_rss_mb": round(usage.peak_rss_mb, 1),
        "calibration_peak_increase_mb": round(usage.peak_increase_mb, 1),
        "details": details,
        **({"components": extra} if extra else {}),
    }
    return quantized


def save(model: DiffusionModel, directory: str | Path, overwrite: bool = False) -> Path:
    """Save a quantized model directory (packed weights; atomic). An existing `directory` that is not a
    quantized model (and not empty) is refused unless `overwrite=True`."""
    if model.quantization is None:
        raise DiffquantError("save() writes quantized models; use diffquant.zoo.save_model for float ones.")
    if adapter_names(model.denoiser):  # a LoRA stays its own file: the saved model is the quantized one alone
        raise DiffquantError(
            f"This model has LoRA adapters loaded ({', '.join(adapter_names(model.denoiser))}); call "
            "diffquant.unload_lora(model) before save() and load the LoRA file again after diffquant.load()."
        )
    if model.pipeline is not None:
        return save_pipeline(model, directory, overwrite=overwrite)
    return save_quantized(model, directory, overwrite=overwrite)


def load(name_or_path: str | Path) -> DiffusionModel:
    """Load a reference model by name, a float model directory or a quantized directory."""
    return load_model(name_or_path)


__all__ = [
    "load",
    "load_lora",
    "load_quantized",
    "loaded_adapters",
    "quantize",
    "record_calibration",
    "save",
    "set_adapters",
    "set_lora_scale",
    "unload_lora",
]

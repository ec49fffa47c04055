"""The `diffquant` command line."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import typer

from diffquant.errors import DiffquantError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Quantize diffusion models and evaluate them.")


def _version(value: bool) -> None:
    if value:
        from diffquant import __version__

        typer.echo(f"diffquant {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Quantize diffusion models and evaluate them."""


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _set_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise DiffquantError(f"--threads must be a positive number of threads, got {threads}.")
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command()
def train(
    model: str = typer.Option(
        ..., help="Reference architecture to train: fmnist-unet, fmnist-dit, fmnist-t2i or fmnist-vq (tokens)."
    ),
    steps: int = typer.Option(8000, help="Total optimisation steps (resumes up to this count)."),
    run_dir: Path = typer.Option(None, help="Where checkpoints and the final model go (default runs/MODEL)."),
    batch_size: int = typer.Option(128),
    learning_rate: float = typer.Option(5e-4),
    checkpoint_every: int = typer.Option(500),
    seed: int = typer.Option(0),
    threads: int = typer.Option(None, help="torch threads (1 is fastest when the machine is shared)."),
    data_dir: Path = typer.Option(None, help="Fashion-MNIST IDX folder (default: the Debian package's)."),
) -> None:
    """Train a reference model with EMA weights, progress bar, periodic checkpoints and resume."""
    try:
        _set_threads(threads)
        from diffquant.data import load_fashion_mnist
        from diffquant.sampling import SamplerConfig, sample, save_image_grid
        from diffquant.training import TrainConfig, train_model
        from diffquant.zoo import build_reference_model

        run_dir = run_dir or Path("runs") / model
        if model == "fmnist-t2i":  # a pipeline (autoencoder, text encoders, MMDiT): its own trainer
            from diffquant.zoo.t2i import T2ITrainConfig, train_t2i

            config_t2i = T2ITrainConfig(
                steps=steps,
                batch_size=batch_size,
                learning_rate=learning_rate,
                checkpoint_every=checkpoint_every,
                seed=seed,
            )
            command = "diffquant " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            data_t2i = load_fashion_mnist("train", data_dir)
            facts = train_t2i(data_t2i, run_dir, config_t2i, command=command, log=typer.echo)
            typer.echo(f"trained fmnist-t2i: {json.dumps(facts['flow'])}; pipeline in {run_dir / 'pipeline'}")
            return
        if model == "fmnist-vq":  # tokenizer, then token denoiser, `steps` each (`diffquant tokens train`: budgets)
            from diffquant.tokens.recipe import train_generator
            from diffquant.tokens.training import DenoiserTraining, TokenizerTraining

            command = "diffquant " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            path, _ = train_generator(
                run_dir,
                command,
                tokenizer_training=TokenizerTraining(steps=steps, batch_size=batch_size, seed=seed),
                denoiser_training=DenoiserTraining(
                    steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed
                ),
                data_dir=data_dir,
                log=typer.echo,
            )
            typer.echo(f"trained fmnist-vq: {steps} steps per stage; generator in {path}")
            return
        bundle = build_reference_model(model)
        data = load_fashion_mnist("train", data_dir)
        config = TrainConfig(
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            checkpoint_every=checkpoint_every,
            seed=seed,
        )

        def preview(current, step: int) -> None:
            images = sample(current, 64, SamplerConfig("ddim", 25), seed=0, progress=False).images
            save_image_grid(images, run_dir / "previews" / f"step-{step:06d}.png", columns=8)

        command = "diffquant " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        result = train_model(bundle, data, config, run_dir, command=command, on_checkpoint=preview)
        typer.echo(
            f"trained {model}: {result.steps} steps, {result.wall_time_s / 60:.1f} min, "
            f"{result.parameters / 1e6:.2f} M parameters, final loss {result.final_loss:.4f}; "
            f"model in {run_dir / 'model'}"
        )
    except DiffquantError as error:
        _fail(error)


@app.command("train-features")
def train_features(
    epochs: int = typer.Option(6, help="Training epochs over the 60,000 training images."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(None, help="torch threads."),
    data_dir: Path = typer.Option(None, help="Fashion-MNIST IDX folder (default: the Debian package's)."),
) -> None:
    """Train the shipped Fashion-MNIST feature network used by every metric."""
    try:
        _set_threads(threads)
        from diffquant.data import load_fashion_mnist
        from diffquant.evaluation.feature_net import train_feature_network

        card = train_feature_network(
            load_fashion_mnist("train", data_dir), load_fashion_mnist("test", data_dir), epochs=epochs, seed=seed
        )
        typer.echo(f"feature network: test accuracy {card['test_accuracy']:.4f} ({card['train_wall_time_s']:.0f} s)")
    except DiffquantError as error:
        _fail(error)


LORA_HELP = "A diffusers/peft LoRA file or directory as PATH[:SCALE], run as a 16-bit branch (repeatable)."


def _parse_lora(value: str) -> tuple[Path, float]:
    """`PATH[:SCALE]` -> (path, scale); a path whose last ':' part is no number is taken whole."""
    path, _, tail = value.rpartition(":")
    try:
        return (Path(path), float(tail)) if path else (Path(value), 1.0)
    except ValueError:
        return Path(value), 1.0


def _load(name: str, backend: str | None = None, compile: bool = False, loras: list[str] | None = None):
    """A model by name or directory, with LoRAs attached (before any export: fused kernels skip them),
    moved onto a real-kernel backend when one is asked for."""
    from diffquant.zoo import load_model

    model = load_model(name)
    if loras:
        from diffquant.runtime.lora import load_lora

        for value in loras:
            path, scale = _parse_lora(value)
            adapter = load_lora(model, path, scale=scale)
            typer.echo(f"LoRA '{adapter}' from {path} at scale {scale:g}")
    if backend and backend != (model.quantization or {}).get("backend", "fake"):
        if model.quantization is None:
            raise DiffquantError(f"--backend {backend} needs a quantized model; '{name}' is full precision.")
        from diffquant.runtime.export import export_model

        _require_compile(backend, compile)
        model = export_model(model, backend, compile=compile)
    return model


def _require_compile(backend: str, compile: bool) -> None:
    """A backend whose kernels inductor lowers has them only under torch.compile: refuse the slow float emulation."""
    from diffquant.runtime.backends import needs_compile

    if not compile and needs_compile(backend):
        raise DiffquantError(
            f"The {backend} backend's int8 kernels exist only compiled (inductor lowers them); add --compile, "
            "or use --backend onednn."
        )


def _sampler_config(scheduler: str, steps: int, guidance: float | None):
    from diffquant.sampling import SamplerConfig

    config = SamplerConfig(scheduler, steps, guidance)
    config.validate()
    return config


@app.command("sample")
def sample_command(
    model: str = typer.Option(..., help="Reference model name or a model directory."),
    out: Path = typer.Option(Path("samples"), help="Output folder for samples.png and samples.npz."),
    num_samples: int = typer.Option(64, "--num-samples", "-n"),
    scheduler: str = typer.Option(
        None, help="ddpm, ddim (default), dpm++, deis or euler; for a token generator maskgit, fhs or vqdiffusion."
    ),
    steps: int = typer.Option(None, help="Sampling steps (default 50; a token generator's own)."),
    guidance: float = typer.Option(None, help="Classifier-free guidance scale (default: the model's)."),
    label: list[int] = typer.Option(None, help="Class label(s) for a conditional model, repeated to fill N."),
    prompt: list[str] = typer.Option(None, help="Prompt(s) for a pipeline directory, repeated to fill N."),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(64),
    backend: str = typer.Option(
        None,
        help="Run a quantized model on real kernels: onednn (CPU int8), inductor (CPU int8 lowered as for PT2E; "
        "needs --compile), cuda or openvino (OpenVINO's CPU runtime).",
    ),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (with --backend)."),
    lora: list[str] = typer.Option(None, help=LORA_HELP),
    threads: int = typer.Option(None),
) -> None:
    """Sample a model with a diffusers scheduler (a token generator with its sampler); a fixed seed gives
    identical images."""
    try:
        _set_threads(threads)
        from diffquant.zoo.registry import token_generator_path

        if (tokens := token_generator_path(model)) is not None:
            from diffquant.cli_tokens import refuse_options, sample_generator, token_sampler
            from diffquant.tokens.generator import TokenGenerator

            refuse_options(model, prompt=prompt, backend=backend, compile=compile, lora=lora)
            sampler = token_sampler(TokenGenerator.load(tokens), scheduler, steps, guidance)
            sample_generator(tokens, out, num_samples, sampler, label, seed, batch_size)
            return
        from diffquant.sampling import sample, save_image_grid, save_samples

        bundle = _load(model, backend, compile, lora)
        labels = None
        if label:
            labels = [label[i % len(label)] for i in range(num_samples)]
        if bundle.pipeline is not None and not (prompt or bundle.info.class_prompts):
            raise DiffquantError(f"{model} is a pipeline: give --prompt (repeat it for several prompts).")
        # a pipeline runs itself (its scheduler, text encoders and decoder) on the prompts or class prompts
        result = sample(
            bundle,
            num_samples,
            _sampler_config(scheduler or "ddim", steps or 50, guidance),
            seed=seed,
            batch_size=batch_size,
            labels=labels,
            prompts=prompt or None,
        )
        out.mkdir(parents=True, exist_ok=True)
        save_image_grid(result.images, out / "samples.png")
        save_samples(result, out / "samples.npz")
        typer.echo(f"wrote {num_samples} samples to {out / 'samples.png'} and {out / 'samples.npz'}")
    except DiffquantError as error:
        _fail(error)


@app.command("eval")
def eval_command(
    model: list[str] = typer.Option(..., help="Model name(s) or directories; repeat to score several."),
    protocol: str = typer.Option("quick", help="smoke (N=200), quick (N=1000) or standard (N=5000)."),
    num_samples: int = typer.Option(None, "--num-samples", "-n", help="Override the protocol's N."),
    scheduler: str = typer.Option(
        None, help="Override the protocol's scheduler (a token generator's sampler: maskgit, fhs, vqdiffusion)."
    ),
    steps: int = typer.Option(None, help="Override the protocol's step count (a token generator's steps)."),
    against: str = typer.Option(None, help="Reference model for PSNR/SSIM agreement on the same seeds."),
    floors: bool = typer.Option(False, help="Also score N real training images (the data floor)."),
    out: Path = typer.Option(None, help="Write the results as JSON here."),
    inception_weights: Path = typer.Option(None, help="Local Inception-v3 weights for torch-fidelity FID."),
    backend: str = typer.Option(
        None,
        help="Run quantized models on real kernels: onednn (CPU int8), inductor (CPU int8 lowered as for PT2E; "
        "needs --compile), cuda or openvino (OpenVINO's CPU runtime).",
    ),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the models (with --backend)."),
    lora: list[str] = typer.Option(None, help=LORA_HELP + " Attached to every model and to the PSNR/SSIM reference."),
    threads: int = typer.Option(None),
) -> None:
    """Evaluate models under one protocol and print (and optionally write) the table."""
    try:
        _set_threads(threads)
        from dataclasses import asdict

        from diffquant.cli_tokens import evaluate_generator, refuse_options
        from diffquant.evaluation import Scorer, cached_samples, data_floors, evaluate, get_protocol
        from diffquant.evaluation.protocol import protocol_samples
        from diffquant.reporting import print_eval_table
        from diffquant.sampling import SamplerConfig
        from diffquant.zoo import load_model
        from diffquant.zoo.registry import token_generator_path

        tokens = {name: path for name in model if (path := token_generator_path(name)) is not None}
        for name in tokens:
            refuse_options(name, backend=backend, compile=compile, lora=lora)
        chosen = get_protocol(protocol, num_samples=num_samples)
        # a token generator keeps the protocol's N, seed and scorer but samples with its own sampler
        if (scheduler or steps) and len(tokens) < len(model):
            chosen = type(chosen)(
                **{
                    **chosen.__dict__,
                    "sampler": SamplerConfig(
                        scheduler or chosen.sampler.scheduler,
                        steps or chosen.sampler.steps,
                        chosen.sampler.guidance_scale,
                    ),
                }
            )
            chosen.validate()
        scorer = Scorer.load(chosen.reference)
        rows = []
        if floors:
            rows.append({"model": "real train images (floor)", "metrics": data_floors(chosen, scorer)})
        for name in model:
            if name in tokens:
                options = {"scheduler": scheduler, "steps": steps, "guidance": None}
                report, sampler = evaluate_generator(name, tokens[name], chosen, scorer, options, against)
                _add_inception(report, chosen, inception_weights)
                rows.append({**report.to_json(), "sampler": asdict(sampler)})
                typer.echo(f"{name}: token generator sampled with {sampler.sampler} {sampler.steps} steps")
                continue
            candidate = _load(name, backend, compile, lora)
            # a quantized model is compared with its full-precision source on the same seeds by default
            reference = against or (candidate.quantization or {}).get("source_model")
            reference_images = None
            if reference and lora:  # the same LoRAs on the reference; not cached (its key does not see the scale)
                reference_images = protocol_samples(_load(reference, loras=lora), chosen).images
            elif reference:
                reference_images = cached_samples(load_model(reference), chosen)
            report = evaluate(candidate, chosen, scorer, reference_images)
            report.model = name
            _add_inception(report, chosen, inception_weights)
            rows.append(report.to_json())
        print_eval_table(rows, chosen.describe())
        if out is not None:
            from diffquant.fileio import write_json

            write_json(out, {"protocol": chosen.to_json(), "rows": rows})
            typer.echo(f"wrote {out}")
    except DiffquantError as error:
        _fail(error)


def _add_inception(report, protocol, weights: Path | None) -> None:
    """Inception FID (torch-fidelity) of a report's samples when the user has the weights."""
    if weights is None:
        return
    from diffquant.evaluation.inception import inception_fid
    from diffquant.evaluation.reference import load_reference_images

    real = load_reference_images(protocol.reference).images
    report.metrics["inception_fid"] = inception_fid(report.images, real, weights)


@app.command("ship")
def ship_command(
    model: str = typer.Option(..., help="Reference model name (fmnist-unet or fmnist-dit)."),
    run_dir: Path = typer.Option(None, help="The training run to ship (default runs/MODEL)."),
    protocol: str = typer.Option("standard", help="Protocol for the model card's numbers (N=5000)."),
    threads: int = typer.Option(None),
) -> None:
    """Copy a trained run into the package with its sample grid, metrics and model card."""
    try:
        _set_threads(threads)
        from diffquant.evaluation import get_protocol
        from diffquant.zoo.shipping import ship_model

        payload = ship_model(model, run_dir or Path("runs") / model, get_protocol(protocol))
        typer.echo(json.dumps(payload["metrics"], indent=2))
    except DiffquantError as error:
        _fail(error)


def _parse_abits(value: str) -> int | None:
    if value.lower() in ("none", "fp", "float"):
        return None
    try:
        return int(value)
    except ValueError:
        raise DiffquantError(f"--abits must be a bit width (1-16), 16/32 or 'none' for float; got '{value}'.") from None


def parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise DiffquantError(f"--option takes KEY=VALUE, got '{pair}'.")
        try:
            options[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = raw
    return options


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


@app.command("quantize")
def quantize_command(
    model: str = typer.Option(..., help="Reference model name or a model directory."),
    method: str = typer.Option("naive", help="Quantization method (see `diffquant methods`)."),
    preset: str = typer.Option(None, help="Method preset: 'fast' (default where available) or 'paper'."),
    wbits: int = typer.Option(None, help="Weight bits (1-16; default 8)."),
    abits: str = typer.Option(None, help="Activation bits (1-16), or 16/32/none for float activations (default 8)."),
    out: Path = typer.Option(..., help="Output directory for the quantized model."),
    calibration: Path = typer.Option(None, help="A calibration directory from `diffquant calibrate`."),
    trajectories: int = typer.Option(None, help="Override the method's number of calibration trajectories."),
    keep_fp: list[str] = typer.Option(None, help="Module-name pattern to keep in full precision (repeatable)."),
    option: list[str] = typer.Option(None, help="Any method option as KEY=VALUE (JSON values), repeatable."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it holds something else."),
    threads: int = typer.Option(None),
) -> None:
    """Quantize a model with a method and save it as a packed directory.

    Under `torchrun` / `accelerate launch` the ranks record the calibration set together and reconstruction
    runs data-parallel; rank 0 saves the model."""
    try:
        _set_threads(threads)
        from diffquant.fileio import check_output
        from diffquant.process_group import init_from_environment, leave

        check_output(out, "quantization.json", overwrite)  # before minutes of calibration, not after
        rank, world_size = init_from_environment()
        import diffquant
        from diffquant.calibration import CalibrationSet
        from diffquant.methods import make_config
        from diffquant.reporting import print_quantization_summary

        options = parse_options(option)
        given = {}  # flags the user typed, checked against --option so neither is dropped silently
        if wbits is not None:
            given["wbits"] = (f"--wbits {wbits}", wbits)
        if abits is not None:
            given["abits"] = (f"--abits {abits}", _parse_abits(abits))
        if keep_fp:
            given["keep_fp"] = (f"--keep-fp {' '.join(keep_fp)}", tuple(keep_fp))
        for key, (flag, value) in given.items():
            if key in options and _plain(options[key]) != _plain(value):
                raise DiffquantError(
                    f"{flag} and --option {key}={json.dumps(options[key])} disagree; give the setting once."
                )
            options[key] = value
        options.setdefault("wbits", 8)
        options.setdefault("abits", 8)
        nested = options.get("calibration")
        nested_trajectories = nested.get("trajectories") if isinstance(nested, dict) else None
        if trajectories is not None and nested_trajectories not in (None, trajectories):
            raise DiffquantError(
                f"--trajectories {trajectories} and --option calibration={json.dumps(nested)} disagree; "
                "give the setting once."
            )
        config = make_config(method, preset, **options)
        if trajectories is not None:
            config.calibration.trajectories = trajectories
            config.validate()
        source = diffquant.load(model)
        _check_space_for(out, source)
        calibration_set = CalibrationSet.load(calibration) if calibration else None
        recorded_s = None
        if calibration_set is None and world_size > 1:
            from diffquant.distributed import distributed_record_calibration

            started = time.perf_counter()
            calibration_set = distributed_record_calibration(source, config)
            recorded_s = time.perf_counter() - started
        quantized = diffquant.quantize(source, config, calibration_set, progress=rank == 0)
        if recorded_s is not None:  # recorded here, not inside `quantize`: its time is reported all the same
            quantized.quantization["calibration"]["recording_s"] = round(recorded_s, 2)
        if rank == 0:  # the ranks hold the same model
            diffquant.save(quantized, out, overwrite=overwrite)
            print_quantization_summary(quantized, out)
        leave()
    except DiffquantError as error:
        _fail(error)


def _check_space_for(out: Path, source) -> None:
    """A quantized model is at most as large as its float original: refuse a disk that cannot hold that."""
    from diffquant.fileio import ensure_free_space

    size = sum(t.numel() * t.element_size() for t in source.denoiser.state_dict().values())
    ensure_free_space(out.parent, size, f"the quantized model ({out})")


@app.command("calibrate")
def calibrate_command(
    model: str = typer.Option(..., help="Reference model name or a model directory."),
    out: Path = typer.Option(..., help="Output directory for the calibration set."),
    method: str = typer.Option("naive", help="Use this method's default calibration settings."),
    trajectories: int = typer.Option(None, help="Number of full-precision trajectories."),
    policy: str = typer.Option(None, help="uniform, all or ndtc."),
    scheduler: str = typer.Option(None),
    steps: int = typer.Option(None),
    seed: int = typer.Option(None),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it holds something else."),
    threads: int = typer.Option(None),
) -> None:
    """Record calibration data along full-precision sampling trajectories and save it."""
    try:
        _set_threads(threads)
        from diffquant.fileio import check_output

        check_output(out, "calibration.json", overwrite)
        import diffquant
        from diffquant.methods import make_config

        config = make_config(method)
        for key, value in (
            ("trajectories", trajectories),
            ("policy", policy),
            ("scheduler", scheduler),
            ("steps", steps),
            ("seed", seed),
        ):
            if value is not None:
                setattr(config.calibration, key, value)
        config.calibration.validate()
        calibration = diffquant.record_calibration(diffquant.load(model), config, use_cache=False)
        calibration.save(out, overwrite=overwrite)
        typer.echo(f"recorded {len(calibration)} calibration inputs ({calibration.meta['policy']}) to {out}")
    except DiffquantError as error:
        _fail(error)


@app.command("methods")
def methods_command() -> None:
    """List the quantization methods and their paper defaults."""
    from diffquant.methods import METHODS

    for name, entry in METHODS.items():
        defaults = entry.config_class.from_preset()
        presets = ", ".join(entry.config_class.PRESETS) or "default"
        typer.echo(
            f"{name:11s} {entry.summary}  [default {defaults.setting}; presets: {presets}; "
            f"calibration {defaults.calibration.policy} x {defaults.calibration.trajectories}]"
        )


@app.command("demo")
def demo_command(
    model: list[str] = typer.Option(["fmnist-unet", "fmnist-dit"], help="Models to quantize (repeatable)."),
    method: str = typer.Option("ptq4dm", help="Quantization method."),
    wbits: int = typer.Option(8),
    abits: str = typer.Option("8"),
    protocol: str = typer.Option("smoke", help="Evaluation protocol: smoke, quick or standard."),
    samples: int = typer.Option(None, help="Override the protocol's number of samples N (>= 10)."),
    trajectories: int = typer.Option(64, help="Calibration trajectories (fewer than the paper's for speed)."),
    out: Path = typer.Option(Path("runs/demo"), help="Where quantized models, pictures and report.json go."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="Time compiled int8 vs compiled fp32."),
    speed_batch: int = typer.Option(64, help="Batch of the timed denoiser calls."),
    threads: int = typer.Option(None),
) -> None:
    """The main job: quantize the shipped models, run them on int8 kernels, print quality, size and speedup."""
    try:
        _set_threads(threads)
        from diffquant.demo import DemoSettings, run_demo

        settings = DemoSettings(
            tuple(model), method, wbits, _parse_abits(abits), protocol, samples, trajectories, out, compile, speed_batch
        )
        run_demo(settings)
    except DiffquantError as error:
        _fail(error)


@app.command("export")
def export_command(
    model: str = typer.Option(..., help="A quantized model directory."),
    backend: str = typer.Option(
        "onednn",
        help="onednn (CPU int8 on oneDNN), inductor (the same kernels lowered by inductor as for PT2E; needs "
        "--compile), cuda (GPU int8/fp8), openvino (the whole denoiser on OpenVINO's CPU runtime, also written "
        "as OpenVINO IR) or fake.",
    ),
    out: Path = typer.Option(..., help="Output directory of the exported model."),
    compile: bool = typer.Option(False, "--compile", help="Load it under torch.compile."),
    weight_only_mode: str = typer.Option(
        "packed", help="Weight-only layers: packed (<= 4-bit kept packed, bf16 GEMM), at-load, on-the-fly, int4-kernel."
    ),
    compute_dtype: str = typer.Option(
        "float32",
        help="What runs around the int8 kernels: float32 (the simulation's numerics) or bfloat16 (faster on CPUs "
        "with AMX/AVX512-BF16, about 1e-2 relative away).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it holds something else."),
    threads: int = typer.Option(None),
    format: str = typer.Option("kernels", "--format", help="kernels (a deployed directory), gguf or diffusers."),
    gguf_type: str = typer.Option(None, help="GGUF: block type for float linears (q8_0, q5_0, q5_1, q4_0, q4_1)."),
    layout: str = typer.Option("auto", help="GGUF tensor names: auto, original (SD3/Flux) or diffusers."),
) -> None:
    """Export a quantized model to real kernels (or a GGUF file / diffusers directory), check it, and save it."""
    try:
        _set_threads(threads)
        if format != "kernels":
            from diffquant.runtime.file_formats import export_file

            for line in export_file(model, out, format, gguf_type, layout):
                typer.echo(line)
            return
        from diffquant.runtime.deploy import export_directory

        _require_compile(backend, compile)
        report = export_directory(
            model, out, backend, compile, weight_only_mode, overwrite=overwrite, compute_dtype=compute_dtype
        )
        for kernel, count in sorted(report["kernels"].items()):
            typer.echo(f"  {count:3d} x {kernel}")
        agreement = report["agreement"]
        typer.echo(
            f"exported to {out} ({backend}); vs the simulation: max relative error "
            f"{agreement['max_relative_error']:.2e}, relative MSE {agreement['relative_mse']:.2e}"
        )
    except DiffquantError as error:
        _fail(error)


@app.command("bench")
def bench_command(
    preset: str = typer.Option("smoke", help="smoke (CI-sized, minutes) or full (the committed report)."),
    out: Path = typer.Option(None, help="Results folder (default benchmarks/results/PRESET)."),
    report: Path = typer.Option(None, help="Markdown report to write (default: BENCHMARKS.md for full)."),
    model: list[str] = typer.Option(
        None, help="Restrict to these models (repeatable); a token generator (fmnist-vq or a directory) too."
    ),
    method: list[str] = typer.Option(
        None,
        help="Restrict to these methods (repeatable); NAME@PRESET picks a preset, e.g. qdiffusion@paper; "
        "weight-vq: 2-bit codebook weights (token generators); --method none: peers only.",
    ),
    setting: list[str] = typer.Option(None, help="Restrict to these settings, e.g. W4A8 (repeatable)."),
    peer: list[str] = typer.Option(None, help="Restrict to these peers (repeatable); --peer none for no peers."),
    num_samples: int = typer.Option(None, help="Override the protocol's N."),
    latency: bool = typer.Option(None, "--latency/--no-latency", help="Measure real-kernel speedups."),
    threads: int = typer.Option(None),
    report_only: bool = typer.Option(False, help="Only rewrite the report from the finished rows in --out."),
    refresh_latency: bool = typer.Option(
        False, help="Re-time the finished rows' speedups with the current kernels (no re-sampling; quiet machine)."
    ),
) -> None:
    """Run (or resume) the benchmark matrix and write the report, CSV/JSON, plots and sample grids."""
    try:
        _set_threads(threads)
        from dataclasses import replace

        from diffquant.bench import BENCH_PRESETS, run_bench
        from diffquant.bench.report import write_report
        from diffquant.process_group import leave, world

        if preset not in BENCH_PRESETS:
            raise DiffquantError(f"Unknown bench preset '{preset}'. Presets: {', '.join(BENCH_PRESETS)}.")
        chosen = BENCH_PRESETS[preset]
        changes = {}
        for field, values in (("models", model), ("methods", method), ("settings", setting)):
            if values:
                changes[field] = () if values == ["none"] else tuple(values)
        if peer:
            changes["peers"] = () if peer == ["none"] else tuple(peer)
        if latency is not None:
            changes["latency"] = latency
        chosen = replace(chosen, **changes)
        out = out or Path("benchmarks/results") / preset
        # under torchrun / accelerate launch the ranks share the rows out; rank 0 writes the report
        rows = run_bench(chosen, out, num_samples, run_rows=not report_only, refresh_latency=refresh_latency)
        report = report or (Path("BENCHMARKS.md") if preset == "full" else out / "BENCHMARKS.md")
        failed = [r for r in rows if str(r.get("status", "")).startswith("failed")]
        if world()[0] == 0:
            protocol = json.loads((out / "results.json").read_text())["protocol"]
            rerun_flags = ("--report-only", "--refresh-latency")
            command = "diffquant " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a not in rerun_flags)
            write_report(rows, chosen.name, protocol, out, report, command)
            typer.echo(f"{len(rows)} rows ({len(failed)} failed); report in {report}, data in {out}")
        leave()
        if failed:
            raise typer.Exit(code=1)
    except DiffquantError as error:
        _fail(error)


@app.command("models")
def models_command() -> None:
    """List the shipped reference models with their parameter counts and evaluation numbers."""
    from diffquant.reporting import print_model_table

    print_model_table()


from diffquant.cli_tokens import register as _register_token_commands  # noqa: E402

_register_token_commands(app)  # `diffquant tokens ...`, `compress`, `decompress`


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""CLI for the token pillar: `diffquant tokens train|sample|eval|ladder` and `diffquant compress|decompress`."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import typer

from diffquant.errors import DiffquantError

tokens_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Token-space generation (VQ pillar).")


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _resolve(model: str) -> Path:
    """A generator or tokenizer directory, or a shipped name (fmnist-vq)."""
    from diffquant.zoo.registry import WEIGHTS_DIR

    path = Path(model)
    if path.is_dir():
        return path
    if (WEIGHTS_DIR / model).is_dir():
        return WEIGHTS_DIR / model
    raise DiffquantError(f"'{model}' is neither a directory nor a shipped token model (try fmnist-vq).")


def _load_tokenizer(model: str):
    from diffquant.tokens.storage import load_token_model

    path = _resolve(model)
    return load_token_model(path / "tokenizer" if (path / "tokenizer").is_dir() else path)


def _sampler(sampler: str, steps: int, guidance: float, truncation: float):
    from diffquant.tokens.samplers import TokenSamplerConfig

    config = TokenSamplerConfig(sampler=sampler, steps=steps, guidance_scale=guidance, truncation=truncation)
    config.validate()
    return config


@tokens_app.command("train")
def train_command(
    out: Path = typer.Option(Path("runs/fmnist-vq"), help="Run folder; the generator lands in OUT/model."),
    quantizer: str = typer.Option("vq", help="vq (EMA + k-means init + restarts), simvq, fsq or rvq."),
    codebook_size: int = typer.Option(256),
    tokenizer_minutes: float = typer.Option(22.0, help="Wall-time budget of the tokenizer."),
    denoiser_minutes: float = typer.Option(30.0, help="Wall-time budget of the token denoiser."),
    tokenizer_width: int = typer.Option(32, help="Tokenizer channels at 14x14 (2x at 7x7)."),
    denoiser_width: int = typer.Option(128, help="Token denoiser width."),
    denoiser_depth: int = typer.Option(4, help="Token denoiser transformer layers."),
    threads: int = typer.Option(1),
    data_dir: Path = typer.Option(None, help="Fashion-MNIST IDX folder (default: the Debian package's)."),
) -> None:
    """Train a tokenizer and a class-conditional token denoiser on Fashion-MNIST (time-budgeted)."""
    try:
        _threads(threads)
        from diffquant.tokens.recipe import train_generator
        from diffquant.tokens.tokenizer import TokenizerConfig
        from diffquant.tokens.training import DenoiserTraining, TokenizerTraining

        started = time.perf_counter()
        train_generator(
            out,
            "diffquant " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            tokenizer_config=TokenizerConfig(quantizer=quantizer, codebook_size=codebook_size, width=tokenizer_width),
            tokenizer_training=TokenizerTraining(
                steps=20000, batch_size=64, max_minutes=tokenizer_minutes, log_every=50
            ),
            denoiser_training=DenoiserTraining(
                steps=20000, batch_size=128, learning_rate=8e-4, ema_decay=0.995, max_minutes=denoiser_minutes
            ),
            denoiser_width=denoiser_width,
            denoiser_depth=denoiser_depth,
            data_dir=data_dir,
            log=lambda line: typer.echo(line),
        )
        typer.echo(f"trained in {(time.perf_counter() - started) / 60:.1f} min; generator in {out / 'model'}")
    except DiffquantError as error:
        _fail(error)


@tokens_app.command("sample")
def sample_command(
    model: str = typer.Option("fmnist-vq", help="Generator directory or shipped name."),
    out: Path = typer.Option(Path("samples/tokens.png"), help="PNG grid to write."),
    num_samples: int = typer.Option(64, "--num-samples", "-n"),
    sampler: str = typer.Option("maskgit", help="vqdiffusion, maskgit or fhs."),
    steps: int = typer.Option(8),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale with the learned null class."),
    truncation: float = typer.Option(1.0, help="VQ-Diffusion truncation rate r (1 = off)."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1),
) -> None:
    """Sample class-balanced images from a token generator into a PNG grid."""
    try:
        _threads(threads)
        from diffquant.sampling import save_image_grid
        from diffquant.tokens.generator import TokenGenerator

        generator = TokenGenerator.load(_resolve(model))
        images, _ = generator.generate(num_samples, _sampler(sampler, steps, guidance, truncation), seed=seed)
        save_image_grid(images, out, columns=10)
        typer.echo(f"{num_samples} samples -> {out}")
    except DiffquantError as error:
        _fail(error)


@tokens_app.command("eval")
def eval_command(
    model: str = typer.Option("fmnist-vq", help="Generator directory or shipped name."),
    sampler: str = typer.Option("maskgit"),
    steps: int = typer.Option(8),
    guidance: float = typer.Option(1.0),
    truncation: float = typer.Option(1.0),
    num_samples: int = typer.Option(1000, "--num-samples", "-n"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="Write the scores as JSON here."),
    threads: int = typer.Option(1),
) -> None:
    """FID (shipped feature network), IS, precision/recall and class accuracy of a token generator."""
    try:
        _threads(threads)
        from diffquant.fileio import write_json
        from diffquant.tokens.generator import TokenGenerator, score_generator

        generator = TokenGenerator.load(_resolve(model))
        result = score_generator(generator, _sampler(sampler, steps, guidance, truncation), num_samples, seed)
        if out:
            write_json(out, result)
        typer.echo(json.dumps(result["metrics"], indent=2))
    except DiffquantError as error:
        _fail(error)


@tokens_app.command("ladder")
def ladder_command(
    model: str = typer.Option("fmnist-vq", help="Generator or tokenizer directory, or a shipped name."),
    out: Path = typer.Option(Path("runs/ladder"), help="Folder for the tokenizer rungs, rd.json and rd.png."),
    bits: str = typer.Option("4,5,6,7,8,9,10,11,12", help="Codebook sizes as powers of two."),
    num_images: int = typer.Option(2000, help="Test images scored per rung."),
    coder: str = typer.Option("arithmetic", help="arithmetic or lzma."),
    threads: int = typer.Option(1),
) -> None:
    """k-means codebook ladder (K = 2^bits): rate (bpp before/after entropy coding) vs PSNR/SSIM/FID."""
    try:
        _threads(threads)
        from diffquant.data import load_fashion_mnist
        from diffquant.tokens.ladder import codebook_ladder

        tokenizer = _load_tokenizer(model)
        train = load_fashion_mnist("train")
        test = load_fashion_mnist("test").subset(num_images)
        sizes = [2 ** int(b) for b in bits.split(",")]
        rows = codebook_ladder(tokenizer, train.images, test.images, sizes, out, coder, log=typer.echo)
        typer.echo(f"{len(rows)} rungs; table in {out / 'rd.json'}, plot in {out / 'rd.png'}")
    except DiffquantError as error:
        _fail(error)


def _read_images(source: str):
    """Images in [-1, 1] from a .npy file (uint8 or float) or `fashion-mnist-test[:N]`."""
    import numpy as np
    import torch

    from diffquant.data import load_fashion_mnist, to_unit_range

    if source.startswith("fashion-mnist-"):
        split, _, count = source.removeprefix("fashion-mnist-").partition(":")
        data = load_fashion_mnist(split)
        return data.images[: int(count)] if count else data.images
    path = Path(source)
    if path.suffix != ".npy" or not path.is_file():
        raise DiffquantError(f"'{source}' is not a .npy image array or fashion-mnist-SPLIT[:N].")
    array = np.load(path)
    if array.ndim == 3:
        array = array[:, None]
    images = to_unit_range(array) if array.dtype == np.uint8 else torch.as_tensor(array, dtype=torch.float32)
    if images.ndim != 4:
        raise DiffquantError(f"{path} holds shape {array.shape}; expected (N, 28, 28) or (N, 1, 28, 28).")
    return images


def compress_command(
    source: str = typer.Argument(
        ..., help="A .npy image array (uint8, or float in [-1, 1]) or fashion-mnist-test[:N]."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The .dqt token stream to write."),
    tokenizer: str = typer.Option("fmnist-vq", help="Tokenizer (or generator) directory, or a shipped name."),
    coder: str = typer.Option("arithmetic", help="arithmetic (adaptive) or lzma."),
    threads: int = typer.Option(1),
) -> None:
    """Compress images to a token stream; prints the rate in bits per pixel (counted on the file)."""
    try:
        _threads(threads)
        import torch

        from diffquant.tokens.codec import encode_tokens, raw_bpp

        model = _load_tokenizer(tokenizer)
        images = _read_images(source)
        tokens = torch.cat([model.encode(images[i : i + 1000]) for i in range(0, len(images), 1000)])
        encoded = encode_tokens(tokens, model.codebook_size, coder)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(encoded.data)
        pixels = images[0].numel() * len(images)
        typer.echo(
            f"{len(images)} images -> {out} ({len(encoded.data)} bytes): {encoded.total_bits / pixels:.4f} bpp "
            f"(payload {encoded.payload_bits / pixels:.4f} bpp, raw indices "
            f"{raw_bpp(model.codebook_size, tokens[0].numel(), images[0].numel()):.4f} bpp)"
        )
    except DiffquantError as error:
        _fail(error)


def decompress_command(
    source: Path = typer.Argument(..., help="A .dqt token stream written by `diffquant compress`."),
    out: Path = typer.Option(..., "--out", "-o", help="A .npy (uint8 images) or .png (grid) to write."),
    tokenizer: str = typer.Option("fmnist-vq", help="The tokenizer the stream was written with."),
    threads: int = typer.Option(1),
) -> None:
    """Decode a token stream back to images."""
    try:
        _threads(threads)
        import numpy as np
        import torch

        from diffquant.data import to_uint8
        from diffquant.sampling import save_image_grid
        from diffquant.tokens.codec import decode_tokens

        if not source.is_file():
            raise DiffquantError(f"{source} does not exist; write one with `diffquant compress`.")
        model = _load_tokenizer(tokenizer)
        tokens = decode_tokens(source.read_bytes())
        if int(tokens.max()) >= model.codebook_size:
            raise DiffquantError(
                f"the stream uses codes up to {int(tokens.max())} but the tokenizer has K={model.codebook_size}; "
                "pass the tokenizer it was compressed with."
            )
        images = torch.cat([model.decode(tokens[i : i + 1000]) for i in range(0, len(tokens), 1000)])
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".png":
            save_image_grid(images[:100], out, columns=10)
        else:
            np.save(out, to_uint8(images)[:, 0].numpy())
        typer.echo(f"{len(images)} images -> {out}")
    except DiffquantError as error:
        _fail(error)


# the top-level `diffquant sample` and `diffquant eval` hand token generators to these ------------------
def refuse_options(model: str, **given: object) -> None:
    """One clear error for a top-level option that has no meaning for a token generator."""
    for flag, value in given.items():
        if value:
            raise DiffquantError(
                f"--{flag.replace('_', '-')} does not apply to the token generator '{model}' (it runs "
                "diffusion-model pipelines, LoRAs and real-kernel exports); drop it or use a diffusion model."
            )


def token_sampler(generator, scheduler: str | None, steps: int | None, guidance: float | None):
    """The generator's own sampler with the options the user gave (`--scheduler` names a token sampler)."""
    from dataclasses import replace

    config = generator.sampler
    changes = {"sampler": scheduler, "steps": steps, "guidance_scale": guidance}
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    config.validate()
    return config


def sample_generator(
    path: Path,
    out: Path,
    num_samples: int,
    sampler,
    labels: list[int] | None,
    seed: int,
    batch_size: int,
) -> None:
    """`diffquant sample` for a token generator: OUT/samples.png and OUT/samples.npz, like a diffusion model."""
    import torch

    from diffquant.sampling import save_image_grid
    from diffquant.tokens.evaluation import save_token_samples
    from diffquant.tokens.generator import TokenGenerator

    generator = TokenGenerator.load(path)
    chosen = torch.tensor([labels[i % len(labels)] for i in range(num_samples)]) if labels else None
    images, classes = generator.generate(num_samples, sampler, chosen, seed=seed, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid(images, out / "samples.png")
    save_token_samples(images, classes, sampler, seed, out / "samples.npz")
    typer.echo(
        f"wrote {num_samples} samples ({sampler.sampler} {sampler.steps} steps, CFG {sampler.guidance_scale:g}) "
        f"to {out / 'samples.png'} and {out / 'samples.npz'}"
    )


def evaluate_generator(name: str, path: Path, protocol, scorer, sampler_options: dict, against: str | None):
    """`diffquant eval` for a token generator: (EvalReport, sampler) under the protocol's N, seed and Scorer,
    sampled with its own sampler (changed by the options given)."""
    from diffquant.tokens.evaluation import cached_token_samples, evaluate_token_generator
    from diffquant.tokens.generator import TokenGenerator
    from diffquant.zoo.registry import token_generator_path

    generator = TokenGenerator.load(path)
    sampler = token_sampler(generator, **sampler_options)
    reference = None
    if against:
        reference_path = token_generator_path(against)
        if reference_path is None:
            raise DiffquantError(f"--against {against}: a token generator is compared with another token generator.")
        reference = cached_token_samples(TokenGenerator.load(reference_path), protocol, sampler)
    report = evaluate_token_generator(generator, protocol, scorer, reference, sampler)
    report.model = name
    return report, sampler


def register(app: typer.Typer) -> None:
    """Hook the token commands into the main `diffquant` app."""
    app.add_typer(tokens_app, name="tokens")
    app.command("compress")(compress_command)
    app.command("decompress")(decompress_command)

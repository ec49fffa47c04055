"""Score the fmnist-t2i pipeline (FID, prompt accuracy) and ship it with a sample grid and a model card."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from diffquant.data.fashion_mnist import load_fashion_mnist
from diffquant.data.images import ImageSet
from diffquant.errors import DiffquantError
from diffquant.evaluation import Scorer
from diffquant.fileio import atomic_directory, write_json
from diffquant.sampling import save_image_grid
from diffquant.zoo.registry import WEIGHTS_DIR
from diffquant.zoo.shipping import reproducing_command
from diffquant.zoo.t2i import (
    CLASS_WORDS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    StableDiffusion3Pipeline,
    generate,
    parameter_counts,
    pipeline_from_checkpoints,
    prompt_for,
    save_pipeline,
)

NAME = "fmnist-t2i"
GRID_FILE = "samples.png"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"


def score_pipeline(
    pipe: StableDiffusion3Pipeline,
    num_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 250,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    scorer: Scorer | None = None,
) -> dict[str, float]:
    """FID & co. on the shipped feature network; `prompt_accuracy`: it names the prompted class.

    Sample i is prompted with class i mod 10 (canonical prompt 'a photo of a ...').
    """
    scorer = scorer or Scorer.load()
    labels = torch.arange(num_samples) % len(CLASS_WORDS)
    started = time.perf_counter()
    images = generate(pipe, labels, seed, batch_size, steps, guidance_scale)
    elapsed = time.perf_counter() - started
    metrics = scorer.score(images, labels)
    metrics["prompt_accuracy"] = metrics.pop("class_accuracy")
    metrics["sampling_s"] = elapsed
    metrics["ms_per_image"] = 1000 * elapsed / num_samples
    return metrics


def ship_t2i(
    run_dir: str | Path,
    num_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 250,
    data: ImageSet | None = None,
    target: Path | None = None,
    scorer: Scorer | None = None,
) -> dict[str, Any]:
    """Ship a run's latest checkpoints (EMA weights; the run may still be training) as WEIGHTS_DIR/fmnist-t2i.

    Writes the pipeline directory with metrics.json, samples.png (10x10 grid) and README.md.
    """
    run_dir = Path(run_dir)
    vae_meta, flow_meta = run_dir / "vae_checkpoint" / "state.json", run_dir / "checkpoint" / "state.json"
    if not (vae_meta.is_file() and flow_meta.is_file()):
        raise DiffquantError(f"{run_dir} holds no fmnist-t2i checkpoints yet (vae_checkpoint/ and checkpoint/).")
    vae_training, flow_training = json.loads(vae_meta.read_text()), json.loads(flow_meta.read_text())
    data = data or load_fashion_mnist("train")
    pipe, step = pipeline_from_checkpoints(run_dir, data)
    scorer = scorer or Scorer.load()
    metrics = score_pipeline(pipe, num_samples, seed, batch_size, scorer=scorer)
    # the data floor: N real training images scored the same way (the best any model can do at this N)
    real = data.subset(num_samples, seed=seed)
    floors = scorer.score(real.images, real.labels)
    grid = generate(pipe, torch.arange(100) % 10, seed=0, batch_size=100)
    history = flow_training["history"]
    payload = {
        "model": NAME,
        "parameters": parameter_counts(pipe),
        "protocol": {
            "num_samples": num_samples,
            "seed": seed,
            "batch_size": batch_size,
            "sampler": "FlowMatchEulerDiscreteScheduler",
            "steps": DEFAULT_STEPS,
            "guidance_scale": DEFAULT_GUIDANCE,
            "prompts": [prompt_for(label) for label in range(len(CLASS_WORDS))],
            "reference": "fashion-mnist-test",
        },
        "metrics": metrics,
        "floors": floors,
        "training": {
            "command": reproducing_command(flow_training.get("command", ""), step),
            "architecture": flow_training.get("architecture", {}),
            "config": flow_training["config"],
            "vae_steps": vae_training["step"],
            "vae_wall_time_s": round(vae_training["wall_time_s"], 1),
            "vae_final_loss": vae_training["history"][-1]["loss"] if vae_training["history"] else None,
            "steps": step,
            "wall_time_s": round(flow_training["wall_time_s"], 1),
            "final_loss": history[-1]["loss"] if history else None,
            "loss_history": history[:: max(1, len(history) // 20)],
        },
    }
    target = target or WEIGHTS_DIR / NAME
    with atomic_directory(target) as scratch:
        save_pipeline(pipe, scratch / "pipeline")
        for item in (scratch / "pipeline").iterdir():
            shutil.move(str(item), scratch / item.name)
        (scratch / "pipeline").rmdir()
        save_image_grid(grid, scratch / GRID_FILE, columns=10)
        write_json(scratch / METRICS_FILE, payload)
        (scratch / CARD_FILE).write_text(model_card(payload))
    return payload


def model_card(payload: dict[str, Any]) -> str:
    training, metrics, protocol = payload["training"], payload["metrics"], payload["protocol"]
    floors = payload["floors"]
    config, params = training["config"], payload["parameters"]
    total_s = training["vae_wall_time_s"] + training["wall_time_s"]
    prompts = ", ".join(f"'{p}'" for p in protocol["prompts"])
    return f"""# {payload["model"]}

A tiny SD3-style text-to-image pipeline trained by us from scratch on Fashion-MNIST (Debian package
`dataset-fashion-mnist`, 60,000 training images) on CPU. It is a standard diffusers
`StableDiffusion3Pipeline` directory: two tiny `CLIPTextModelWithProjection` encoders with a
word-level tokenizer built from the caption vocabulary, no T5 encoder, an `AutoencoderKL`
(28x28x1 pixels <-> 14x14x4 latents), an `SD3Transformer2DModel` (MMDiT) trained with rectified flow
and classifier-free guidance (10% empty captions), and `FlowMatchEulerDiscreteScheduler` (shift 1).
Captions: 12 templates x class synonyms ("a photo of a sneaker", "sneaker, studio shot", ...).

```python
from diffquant.zoo.t2i import load_reference_pipeline
pipe = load_reference_pipeline()          # FmnistT2IPipeline: SD3 with this model's defaults
image = pipe("a photo of a sneaker").images[0]
# or plain diffusers: the T5 slot must be passed empty and the model is trained without T5 tokens
# StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)(
#     prompt, max_sequence_length=0, guidance_scale={DEFAULT_GUIDANCE}, num_inference_steps={DEFAULT_STEPS})
```

| | |
|---|---|
| parameters | transformer {params["transformer"]:,}, vae {params["vae"]:,}, text encoders \
{params["text_encoder"]:,} + {params["text_encoder_2"]:,} |
| autoencoder training | {training["vae_steps"]:,} steps (batch {config["vae_batch_size"]}, lr \
{config["vae_learning_rate"]}, KL weight {config["kl_weight"]}), {training["vae_wall_time_s"] / 60:.1f} min, \
final loss {training["vae_final_loss"]:.4f} |
| MMDiT + text-encoder training | {training["steps"]:,} steps (batch {config["batch_size"]}, AdamW lr \
{config["learning_rate"]}, warm-up {config["warmup_steps"]}, EMA {config["ema_decay"]}), \
{training["wall_time_s"] / 60:.1f} min, final loss {training["final_loss"]:.4f} (velocity MSE) |
| total training wall time | {total_s / 60:.1f} min on 1 torch thread of a shared 2-core CPU |

Exact training command (resumable; rerun it to continue from the last checkpoint):

```bash
{training["command"]}
```

## Evaluation

{protocol["num_samples"]:,} samples, {protocol["steps"]} Euler flow-matching steps, guidance \
{protocol["guidance_scale"]}, seed {protocol["seed"]} (batch b seeded seed + b, batch \
{protocol["batch_size"]}); sample i
is prompted with class i mod 10 using {prompts}. Metrics on the shipped Fashion-MNIST feature network
against the test set. Prompt accuracy: the share of samples the feature network's classifier assigns
to the prompted class.

| metric | model | floor (N real train images) |
|---|---|---|
| FID | {metrics["fid"]:.2f} | {floors["fid"]:.2f} |
| sFID | {metrics["sfid"]:.2f} | {floors["sfid"]:.2f} |
| IS (classifier) | {metrics["is"]:.2f} | {floors["is"]:.2f} |
| precision | {metrics["precision"]:.3f} | {floors["precision"]:.3f} |
| recall | {metrics["recall"]:.3f} | {floors["recall"]:.3f} |
| prompt accuracy | {metrics["prompt_accuracy"]:.3f} | {floors["class_accuracy"]:.3f} (labels) |
| sampling | {metrics["ms_per_image"]:.1f} ms/image (CPU, CFG doubles the batch) |

Reproduce: `python -m diffquant.zoo.t2i_ship RUN_DIR --num-samples {protocol["num_samples"]}` (re-scores and re-ships).

## Samples

![samples]({GRID_FILE})

100 samples, seed 0: column c is prompted with class c ({", ".join(w[0] for w in CLASS_WORDS)}).
"""


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Score and ship a trained fmnist-t2i run.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload = ship_t2i(args.run_dir, args.num_samples, args.seed)
    print(json.dumps(payload["metrics"], indent=2))


if __name__ == "__main__":
    main()

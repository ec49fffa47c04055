"""Many processes: sampling for evaluation split across ranks (torch.distributed, gloo on CPU).

Calibration recording splits the same way (`distributed_record_calibration`): each rank records the
denoiser inputs of its whole batches of trajectories and the sets are joined in rank order, which is the
order one process records them in.

Launch with `torchrun --nproc-per-node 2 -m diffquant.distributed --model fmnist-dit` (or
`accelerate launch`): each rank samples a contiguous run of whole batches of the protocol's seeds and
the images are gathered in order. Because a rank's batches are exactly the batches one process would
run (same x_T, same labels, same per-batch step generators, same batch shapes), the gathered samples
are bit-identical to single-process sampling, and so are FID and every other metric.

Elsewhere under a launcher: `diffquant quantize` records with `distributed_record_calibration` and
reconstructs data-parallel (engines/reconstruction.py, collectives in process_group.py), rank 0 saving the
model; `diffquant bench` (or `python -m diffquant.bench`) shares the rows out (bench/runner.py).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffquant.errors import DiffquantError
from diffquant.process_group import init_from_environment, world
from diffquant.sampling import SamplerConfig, sample


@dataclass(frozen=True)
class Shard:
    """This rank's share of a sample set: samples [first, first + count)."""

    first: int
    count: int


def shard(num_samples: int, batch_size: int, rank: int, world_size: int) -> Shard:
    """A contiguous run of whole batches for `rank` (batch boundaries as in one process)."""
    batches = -(-num_samples // batch_size)
    begin, end = rank * batches // world_size, (rank + 1) * batches // world_size
    first = begin * batch_size
    return Shard(first, max(0, min(num_samples, end * batch_size) - first))


def gather_in_order(local: torch.Tensor | None) -> list[torch.Tensor]:
    """Every rank's tensor (None for an empty share), in rank order, on every rank."""
    _, world_size = world()
    if world_size == 1:
        return [] if local is None else [local]
    parts: list[torch.Tensor | None] = [None] * world_size
    dist.all_gather_object(parts, local)
    return [part for part in parts if part is not None]


def distributed_sample(
    model, num_samples: int, config: SamplerConfig, seed: int = 0, batch_size: int = 64, progress: bool = False
):
    """`sampling.sample` split across the process group; every rank gets the whole, ordered result."""
    from diffquant.sampling.sampler import SampleResult, default_labels

    rank, world_size = world()
    share = shard(num_samples, batch_size, rank, world_size)
    local = None
    if share.count:
        local = sample(model, share.count, config, seed, batch_size, progress=progress, first_index=share.first).images
    parts = gather_in_order(local)
    images = torch.cat(parts)
    if len(images) != num_samples:
        raise DiffquantError(f"Gathered {len(images)} samples instead of {num_samples}: a rank failed to sample.")
    return SampleResult(images, default_labels(model, num_samples), config, seed)


def distributed_evaluate(model, protocol, scorer=None, reference_images: torch.Tensor | None = None):
    """`evaluation.evaluate` with the sampling split across the process group (scores on every rank)."""
    from diffquant.evaluation.protocol import EvalReport, Scorer, agreement

    protocol.validate()
    scorer = scorer or Scorer.load(protocol.reference)
    started = time.perf_counter()
    result = distributed_sample(model, protocol.num_samples, protocol.sampler, protocol.seed, protocol.batch_size)
    seconds = time.perf_counter() - started
    metrics = scorer.score(result.images, result.labels, protocol.precision_recall_k)
    metrics["sampling_s"] = seconds
    metrics["ms_per_image"] = 1000 * seconds / protocol.num_samples
    if reference_images is not None:
        metrics.update(agreement(result.images, reference_images))
    return EvalReport(model.info.name, protocol, metrics, result.images, result.labels)


def distributed_record_calibration(model, config, batch_size: int = 128):
    """`api.record_calibration` (without the disk cache) split across the process group; every rank
    gets the whole calibration set, identical to a single-process recording."""
    from diffquant.calibration import AllocatedSteps, CalibrationSet, record_trajectories

    settings = config.calibration
    settings.validate()
    policy = settings.timestep_policy(model)
    runs = max(policy.counts) if isinstance(policy, AllocatedSteps) else settings.trajectories
    rank, world_size = world()
    share = shard(runs, batch_size, rank, world_size)
    local = None
    if share.count:
        local = record_trajectories(
            model, runs, settings.sampler(), policy, settings.seed, batch_size, False, share.first, share.count
        )
    parts = [part for part in _gather_objects(local) if part is not None]
    if not parts:
        raise DiffquantError("No process recorded any calibration data: record more trajectories.")
    keys = parts[0].conditioning.keys()
    return CalibrationSet(
        torch.cat([p.sample for p in parts]),
        torch.cat([p.timestep for p in parts]),
        torch.cat([p.step_index for p in parts]),
        {key: torch.cat([p.conditioning[key] for p in parts]) for key in keys},
        num_steps=parts[0].num_steps,
        meta=parts[0].meta,
    )


def _gather_objects(local):
    _, world_size = world()
    if world_size == 1:
        return [local]
    parts = [None] * world_size
    dist.all_gather_object(parts, local)
    return parts


def main(argv: list[str] | None = None) -> None:
    """Evaluate a model with sampling split over the launched processes; rank 0 prints the metrics."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="fmnist-dit")
    parser.add_argument("--protocol", default="smoke")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="Write rank 0's metrics JSON here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world_size = init_from_environment()
    import diffquant
    from diffquant.evaluation import get_protocol

    overrides = {"num_samples": args.samples, "batch_size": args.batch_size}
    protocol = get_protocol(args.protocol, **overrides)
    report = distributed_evaluate(diffquant.load(args.model), protocol)
    if rank == 0:
        payload = {"model": args.model, "processes": world_size, "protocol": protocol.describe(), **report.metrics}
        print(json.dumps(payload), flush=True)
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(payload, handle, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

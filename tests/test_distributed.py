"""Distributed sampling: 2 gloo processes give the samples and FID of one process, bit for bit."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffquant
from diffquant.calibration import record_trajectories
from diffquant.distributed import distributed_evaluate, distributed_record_calibration, distributed_sample, shard
from diffquant.evaluation import Scorer, evaluate, get_protocol
from diffquant.methods import make_config
from diffquant.sampling import SamplerConfig, sample

SAMPLER = SamplerConfig("ddim", 4)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = diffquant.load("fmnist-dit")
        images = distributed_sample(model, 10, SAMPLER, seed=3, batch_size=3).images
        protocol = get_protocol("smoke", num_samples=10, batch_size=4, sampler=SAMPLER)
        report = distributed_evaluate(model, protocol)
        calibration = distributed_record_calibration(model, _calibration_config(), batch_size=2)
        if rank == 0:
            torch.save(
                {
                    "images": images,
                    "fid": report.metrics["fid"],
                    "eval_images": report.images,
                    "calibration": (calibration.sample, calibration.timestep, calibration.conditioning),
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def _calibration_config():
    return make_config("naive", calibration={"trajectories": 5, "steps": 4, "uniform_steps": 2})


def test_shards_cover_whole_batches_in_order():
    shares = [shard(10, 3, rank, 3) for rank in range(3)]
    assert [(s.first, s.count) for s in shares] == [(0, 3), (3, 3), (6, 4)]
    assert [shard(2, 4, rank, 2).count for rank in range(2)] == [0, 2]  # more ranks than batches


@pytest.mark.slow  # two processes each load torch and diffusers (~20 s on a busy machine)
def test_two_processes_give_the_samples_and_fid_of_one(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    gathered = torch.load(out)
    model = diffquant.load("fmnist-dit")
    single = sample(model, 10, SAMPLER, seed=3, batch_size=3, progress=False).images
    assert torch.equal(gathered["images"], single)
    protocol = get_protocol("smoke", num_samples=10, batch_size=4, sampler=SAMPLER)
    report = evaluate(model, protocol, Scorer.load(protocol.reference), progress=False)
    assert torch.equal(gathered["eval_images"], report.images)
    # the images are bit-identical; FID's matrix square root differs in the 8th digit with the BLAS thread count
    assert gathered["fid"] == pytest.approx(report.metrics["fid"], rel=1e-6)
    single_set = record_trajectories(
        model, 5, SamplerConfig("ddim", 4), _calibration_config().calibration.timestep_policy(model), 1234, 2, False
    )
    sample_, timestep, conditioning = gathered["calibration"]
    assert torch.equal(sample_, single_set.sample) and torch.equal(timestep, single_set.timestep)
    assert torch.equal(conditioning["class_labels"], single_set.conditioning["class_labels"])


def test_single_process_recording_equals_the_recorder():
    model = diffquant.load("fmnist-dit")
    config = _calibration_config()
    ours = distributed_record_calibration(model, config, batch_size=2)
    policy = config.calibration.timestep_policy(model)
    theirs = record_trajectories(model, 5, SamplerConfig("ddim", 4), policy, 1234, 2, False)
    assert torch.equal(ours.sample, theirs.sample) and len(ours) == 2 * 5  # 2 steps x 5 trajectories


def test_single_process_falls_back_to_plain_sampling():
    model = diffquant.load("fmnist-dit")
    assert torch.equal(
        distributed_sample(model, 4, SAMPLER, seed=1, batch_size=2).images,
        sample(model, 4, SAMPLER, seed=1, batch_size=2, progress=False).images,
    )

"""Distributed sampling: 2 gloo processes give the samples and FID of one process, bit for bit."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffquant
import diffquant.bench.runner as bench_runner
from diffquant.bench import BENCH_PRESETS, run_bench
from diffquant.bench.runner import BenchRunner
from diffquant.calibration import CalibrationSet, record_trajectories
from diffquant.distributed import distributed_evaluate, distributed_record_calibration, distributed_sample, shard
from diffquant.engines import ReconstructionConfig, Reconstructor
from diffquant.engines.store import TensorStore
from diffquant.errors import ConfigError
from diffquant.evaluation import Scorer, evaluate, get_protocol
from diffquant.methods import make_config
from diffquant.process_group import DataParallel, leave
from diffquant.runtime.export import export_model
from diffquant.sampling import SamplerConfig, sample
from tests.conftest import needs_fmnist, relative_error, tiny_unet_model

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


# data-parallel reconstruction ---------------------------------------------------------------------------

RECONSTRUCT = {"wbits": 4, "abits": 8, "reconstruction": {"weight_iters": 24, "act_iters": 8, "batch_size": 16}}


def _reconstruct_worker(rank: int, world_size: int, port: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = tiny_unet_model()
        model.denoiser.load_state_dict(torch.load(f"{directory}/unet.pt"))
        calibration = CalibrationSet.load(f"{directory}/calibration")
        shards = []
        original = Reconstructor.__init__

        def remember_shard(self, *args, **kwargs):
            original(self, *args, **kwargs)
            shards.append(self.calibration.sample)

        Reconstructor.__init__ = remember_shard  # in this spawned process only
        quantized = diffquant.quantize(
            model, "qdiffusion", calibration, progress=False, checkpoint_dir=f"{directory}/checkpoints", **RECONSTRUCT
        )
        if rank == 0:
            diffquant.save(quantized, f"{directory}/model")
        torch.save({"state": quantized.denoiser.state_dict(), "shard": shards[0]}, f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rows_of(shard: torch.Tensor, whole: torch.Tensor) -> list[int]:
    """Which rows of `whole` the shard holds (each shard row matches exactly one row)."""
    flat = whole.flatten(1)
    return [int(torch.nonzero((flat == row).all(1)).flatten()[0]) for row in shard.flatten(1)]


@pytest.mark.slow  # two processes each load torch and diffusers, then reconstruct (about a minute on a busy machine)
def test_two_process_reconstruction_gives_both_ranks_one_model_as_good_as_one_process(
    trained_unet, calibration, held_out, tmp_path
):
    calibration = calibration.subset(torch.arange(0, len(calibration), 2))  # 16 trajectories x 5 steps
    torch.save(trained_unet.denoiser.state_dict(), tmp_path / "unet.pt")
    calibration.save(tmp_path / "calibration")
    mp.spawn(_reconstruct_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # gradients averaged before every step: the ranks hold bit-identical quantizer parameters
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    assert all(torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]) for key in ranks[0]["state"])
    # each rank reconstructed from its own half of the calibration set, every step represented in each half
    rows = [_rows_of(rank["shard"], calibration.sample) for rank in ranks]
    assert not set(rows[0]) & set(rows[1]) and sorted(rows[0] + rows[1]) == list(range(len(calibration)))
    for part in rows:
        assert set(calibration.step_index[part].tolist()) == set(calibration.steps)
    # rank 0 saved the model; on fresh inputs it is about as close to full precision as one process's
    parallel = diffquant.load(tmp_path / "model")
    single = diffquant.quantize(trained_unet, "qdiffusion", calibration, progress=False, **RECONSTRUCT)
    naive = diffquant.quantize(trained_unet, "naive", calibration, progress=False, wbits=4, abits=8)
    errors = [relative_error(trained_unet, model, held_out) for model in (parallel, single, naive)]
    assert errors[0] < 1.5 * errors[1] and errors[0] < 0.6 * errors[2], errors


def test_data_parallel_shards_are_disjoint_cover_the_set_and_hold_every_step():
    steps = torch.tensor([0, 1, 2] * 5 + [2, 2])  # 17 rows, step 2 has the odd ones out
    shards = [DataParallel(rank, 3).shard(steps) for rank in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(17))
    for part in shards:
        assert set(steps[part].tolist()) == {0, 1, 2} and 5 <= len(part) <= 6
    assert torch.equal(DataParallel(1, 3).shard(steps), shards[1])  # deterministic
    assert [DataParallel(rank, 3).batch_share(32) for rank in range(3)] == [10, 11, 11]
    assert DataParallel().batch_share(32) == 32 and DataParallel().seed(7) == 7
    with pytest.raises(ConfigError, match="cannot be split over 3 processes"):
        DataParallel(0, 3).batch_share(2)
    with pytest.raises(ConfigError, match="record more calibration data or launch fewer processes"):
        DataParallel(0, 3).shard(steps[:2])


def test_ranks_draw_one_step_per_minibatch_and_rows_of_their_own():
    whole = torch.tensor([0, 1, 2, 3] * 6)
    draws = []
    for rank in range(2):
        parallel = DataParallel(rank, 2)
        store = TensorStore(12)
        store.append({"step": whole[parallel.shard(whole)]})
        engine = SimpleNamespace(
            parallel=parallel, calibration_steps=whole.sort().values, config=ReconstructionConfig(batch_size=6)
        )
        draws.append(list(Reconstructor._batches(engine, SimpleNamespace(store=store), 30, 5, per_step=True)))
        for step, index in draws[-1]:
            assert len(index) == 3 and (store.columns["step"][index] == step).all()
    assert [step for step, _ in draws[0]] == [step for step, _ in draws[1]]
    assert len({step for step, _ in draws[0]}) == 4  # the step still varies from minibatch to minibatch


# benchmark rows across processes ------------------------------------------------------------------------

TINY_BENCH = replace(
    BENCH_PRESETS["smoke"], methods=("naive",), settings=("W8A8", "W4A16", "W4A8"), peers=(), latency=False
)


def _simulated(quantized):
    """The bench scores rows on compiled oneDNN kernels; the fake-quant simulation (no compile) keeps this test
    short and scores every process's rows the same way."""
    return export_model(quantized, "fake")


def _bench_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    # what torchrun puts in the environment: run_bench joins the group itself, as under `torchrun -m diffquant.bench`
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    bench_runner.deployed_model = _simulated  # in this spawned process only
    original = BenchRunner.run_row

    def logged_row(self, spec):
        with open(f"{out}/ran-by-rank{rank}.txt", "a") as log:
            log.write(spec.key + "\n")
        return original(self, spec)

    BenchRunner.run_row = logged_row
    try:
        run_bench(TINY_BENCH, out, num_samples=20, progress=False)
    finally:
        leave()


@pytest.mark.slow  # two processes, each loading torch and diffusers, then three rows and one reference row
@needs_fmnist
def test_two_processes_share_the_bench_rows_and_score_them_as_one_process(tmp_path, monkeypatch):
    parallel, single = tmp_path / "two", tmp_path / "one"
    parallel.mkdir()
    mp.spawn(_bench_worker, args=(2, _free_port(), str(parallel)), nprocs=2, join=True)
    keys = [spec.key for spec in TINY_BENCH.rows()]
    # round-robin by index: rank 0 runs rows 0 and 2, rank 1 row 1; the reference row was rank 0's, before them
    assert (parallel / "ran-by-rank0.txt").read_text().split() == keys[0::2]
    assert (parallel / "ran-by-rank1.txt").read_text().split() == keys[1::2]
    monkeypatch.setattr(bench_runner, "deployed_model", _simulated)
    run_bench(TINY_BENCH, single, num_samples=20, progress=False)
    rows = {}
    for name, folder in (("two", parallel), ("one", single)):
        found = json.loads((folder / "results.json").read_text())["rows"]
        rows[name] = {(row["method"], row["setting"]): row for row in found}
    assert rows["two"].keys() == rows["one"].keys() and len(rows["one"]) == 4  # fp32 and the three settings
    for key, row in rows["one"].items():
        assert row["status"] == "ok" and rows["two"][key]["status"] == "ok"
        for metric, value in row["metrics"].items():
            if not metric.endswith("_s") and metric != "ms_per_image":  # timings differ; the numbers do not
                assert rows["two"][key]["metrics"][metric] == pytest.approx(value, rel=1e-6), (key, metric)

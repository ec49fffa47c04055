"""The GPU speed suite's code path on the CPU (CI has no GPU): the cuda backend's int8 (`_int_mm`) and fp8
(`_scaled_mm`) kernels placed on the CPU, tiny models, every row measured and written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffquant.modules.layers import QuantLinear
from diffquant.quant import QuantSpec
from diffquant.runtime.backends.base import BACKEND_CLASSES
from diffquant.runtime.backends.cuda import CudaBackend
from diffquant.runtime.kernels import IntMMLinear, ScaledMMFloat8Linear, int_mm
from diffquant.runtime.kernels_int4 import bf16_matmul_supported

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gpu_speed  # noqa: E402


class CudaKernelsOnCpu(CudaBackend):
    """The cuda backend's conversions, left on the CPU (both GEMMs also run there)."""

    name = "cuda-kernels-on-cpu"
    device = "cpu"

    def check_available(self) -> None:
        """Always available: both GEMMs (`_int_mm`, `_scaled_mm`) also run on the CPU, which is all CI has."""


@pytest.fixture
def cpu_cuda_backend(monkeypatch):
    monkeypatch.setitem(BACKEND_CLASSES, CudaKernelsOnCpu.name, CudaKernelsOnCpu)
    return CudaKernelsOnCpu.name


def test_gpu_suite_times_int8_and_fp8_rows_against_bf16(cpu_cuda_backend, tmp_path):
    args = ["--tiny", "--device", "cpu", "--backend", cpu_cuda_backend, "--compile", "none", "--models", "pixart"]
    # bf16 around the GEMMs as on the GPU where this CPU has bf16 matrix units (export refuses it elsewhere)
    args += ["--compute-dtype", "bfloat16" if bf16_matmul_supported() else "float32"]
    args += ["--variants", "bf16-eager", "bf16-compiled", "diffquant-int8", "diffquant-fp8", "--batches", "2"]
    args += ["--fuse-int8-epilogue"]  # inductor's CUDA-only fusion: recorded, and harmless on the CPU
    results = gpu_speed.main([*args, "--repeats", "1", "--steps", "2", "--out", str(tmp_path / "gpu")])
    assert (
        results["fused_int8_epilogue"] and "fused with their dequantizing multiply" in (tmp_path / "gpu.md").read_text()
    )
    rows = results["models"]["pixart"]["rows"]
    assert json.loads((tmp_path / "gpu.json").read_text())["models"]["pixart"]["rows"].keys() == rows.keys()
    table = [line for line in (tmp_path / "gpu.md").read_text().splitlines() if line.startswith("|")]
    assert table[2].startswith("| diffquant-int8 |") and len({line.count("|") for line in table}) == 1
    int8, fp8, bf16 = rows["diffquant-int8"], rows["diffquant-fp8"], rows["bf16-compiled"]
    assert "linear: aten::_int_mm x" in int8["notes"][0] and "linear: aten::_scaled_mm (e4m3) x" in fp8["notes"][0]
    for row in (int8, fp8, bf16, rows["bf16-eager"]):
        assert row["call_ms"]["2"] > 0 and row["sampling_2_steps_ms"] > 0
        assert row["speedup_vs_bf16-compiled"]["2"] == pytest.approx(
            bf16["call_ms"]["2"] / row["call_ms"]["2"], abs=1e-3
        )
    # quantized rows differ from fp32 by their grids, bf16 by rounding only
    assert 0 < bf16["relative_error_vs_fp32"] < 0.02 < int8["relative_error_vs_fp32"] < 0.15
    assert 0.02 < fp8["relative_error_vs_fp32"] < 0.15
    assert all(0 < row["resident_fraction_of_fp32"] <= 0.5 for row in (int8, fp8, bf16))


def test_gpu_suite_stops_starting_work_after_its_deadline(cpu_cuda_backend, tmp_path):
    args = ["--tiny", "--device", "cpu", "--backend", cpu_cuda_backend, "--compile", "none", "--deadline", "0"]
    results = gpu_speed.main([*args, "--out", str(tmp_path / "gpu")])
    assert all(model["skipped"].startswith("not run: the 0 s deadline") for model in results["models"].values())
    assert "### pixart: not run: the 0 s deadline had passed" in (tmp_path / "gpu.md").read_text()


def test_regional_compilation_compiles_every_repeated_block_and_refuses_a_model_without_them():
    import realsize_speed

    case = realsize_speed.build_pixart(tiny=True)
    gpu_speed.compile_as(case.denoiser, "regional")
    blocks = [m for m in case.denoiser.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    with pytest.raises(SystemExit, match="use --compile full"):
        gpu_speed.compile_as(nn.Sequential(nn.Linear(4, 4)), "regional")


def test_gpu_suite_refuses_bad_counts_and_a_missing_gpu(capsys):
    with pytest.raises(SystemExit):
        gpu_speed.parse_args(["--repeats", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="No CUDA GPU here"):
            gpu_speed.main(["--tiny"])


def test_int_mm_pads_few_rows_to_what_cublas_takes_without_changing_the_result():
    torch.manual_seed(0)
    codes = torch.randint(-128, 128, (3, 32), dtype=torch.int8)
    weight_t = torch.randint(-128, 128, (24, 32), dtype=torch.int8).t()
    exact = codes.int() @ weight_t.int()
    assert torch.equal(int_mm(codes, weight_t, min_rows=32), exact)
    assert torch.equal(int_mm(codes, weight_t), exact)


@pytest.mark.parametrize("kernel", [IntMMLinear, ScaledMMFloat8Linear])
def test_gemm_kernels_write_bfloat16_in_a_bfloat16_model(kernel):
    torch.manual_seed(0)
    fmt = "e4m3" if kernel is ScaledMMFloat8Linear else "int8"
    layer = QuantLinear(nn.Linear(32, 48), QuantSpec(fmt, granularity="per_channel"), QuantSpec(fmt, symmetric=True))
    layer.calibrate_weight()
    layer.input_quantizer.start_observing()
    layer(torch.randn(64, 32))
    layer.input_quantizer.finish_observing()
    layer.freeze()
    real = kernel(layer)
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        reference = real(x)
        real.out_dtype = torch.bfloat16
        out = real(x.to(torch.bfloat16))
    assert reference.dtype == torch.float32 and out.dtype == torch.bfloat16 and out.shape == (2, 40, 48)
    assert ((out.float() - reference).norm() / reference.norm()).item() < 1e-2

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffquant.cli import app
from diffquant.zoo import save_model
from tests.conftest import tiny_dit_model

runner = CliRunner()


@pytest.fixture
def tiny_dir(tmp_path):
    return save_model(tiny_dit_model(), tmp_path / "tiny-dit")


def test_methods_and_models_list():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "ptq4dm" in result.output and "naive" in result.output
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "fmnist-unet" in result.output and "fmnist-dit" in result.output


def test_sample_writes_grid_and_npz(tiny_dir, tmp_path):
    out = tmp_path / "samples"
    result = runner.invoke(
        app, ["sample", "--model", str(tiny_dir), "--out", str(out), "-n", "6", "--steps", "3", "--label", "4"]
    )
    assert result.exit_code == 0, result.output
    payload = np.load(out / "samples.npz")
    assert payload["images"].shape == (6, 1, 8, 8) and set(payload["labels"].tolist()) == {4}
    assert (out / "samples.png").stat().st_size > 0


def test_quantize_then_sample_the_saved_directory(tiny_dir, tmp_path):
    out = tmp_path / "w4a8"
    result = runner.invoke(
        app,
        [
            "quantize",
            "--model",
            str(tiny_dir),
            "--method",
            "naive",
            "--wbits",
            "4",
            "--abits",
            "8",
            "--out",
            str(out),
            "--trajectories",
            "4",
            "--option",
            "calibration.steps=10",
        ],
    )
    assert result.exit_code == 2 and "no option" in result.output  # nested options are not flat keys
    result = runner.invoke(
        app,
        [
            "quantize",
            "--model",
            str(tiny_dir),
            "--method",
            "naive",
            "--wbits",
            "4",
            "--abits",
            "8",
            "--out",
            str(out),
            "--trajectories",
            "4",
            "--keep-fp",
            "proj_out_2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "naive W4A8" in result.output
    record = json.loads((out / "quantization.json").read_text())
    assert record["setting"] == "W4A8" and "proj_out_2" not in record["structure"]["layers"]
    result = runner.invoke(
        app, ["sample", "--model", str(out), "--out", str(tmp_path / "s"), "-n", "2", "--steps", "2"]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--method", "qdiff"], "Unknown method 'qdiff'"),
        (["--abits", "eight"], "--abits must be a bit width"),
        (["--wbits", "0"], "wbits must be an integer between 1 and 16"),
        (["--keep-fp", "nope.*"], "matches no quantizable module"),
    ],
)
def test_quantize_errors_are_one_clear_line(tiny_dir, tmp_path, arguments, message):
    result = runner.invoke(
        app, ["quantize", "--model", str(tiny_dir), "--out", str(tmp_path / "q"), "--trajectories", "2", *arguments]
    )
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "q").exists()


def test_unknown_model_name_suggests_close_names():
    result = runner.invoke(app, ["sample", "--model", "fmnist-unte"])
    assert result.exit_code == 2 and "Did you mean fmnist-unet" in result.output

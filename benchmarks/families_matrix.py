"""Every method x {W8A8, W4A8} x tiny seeded random instance of each model family, as a markdown table.

    PYTHONPATH=src:. python benchmarks/families_matrix.py > benchmarks/results/families_matrix.md

Columns: quantized layers / all Linear+Conv layers; relative MSE of the denoiser output against full
precision on fresh inputs (not the calibration inputs); save -> load bit-identical; relative MSE of
the oneDNN int8 export against the fake-quant simulation. Reconstruction methods run 4 weight and 2
activation iterations: the table checks that everything runs and round-trips, not method quality.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.family_models import BUILDERS, METHODS, SETTINGS, matrix_row  # noqa: E402


def main(families: list[str]) -> None:
    torch.set_num_threads(1)
    print("| family | method | setting | runs | quantized / Linear+Conv | rel. error vs fp | reload identical "
          "| onednn vs simulation | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family in families:
        for method in METHODS:
            for setting in SETTINGS:
                started = time.perf_counter()
                try:
                    with tempfile.TemporaryDirectory() as scratch:
                        row = matrix_row(family, method, setting, Path(scratch) / "q")
                    cells = (
                        "yes",
                        f"{row['quantized']} / {row['total']}",
                        f"{row['rel_error']:.2e}",
                        "yes" if row["reload_identical"] else "NO",
                        f"{row['export_rel_error']:.1e}",
                    )
                except Exception as error:  # a failing row is reported, not hidden
                    cells = (f"no: {type(error).__name__}: {str(error)[:80]}", "", "", "", "")
                seconds = time.perf_counter() - started
                print(f"| {family} | {method} | {setting} | " + " | ".join(cells) + f" | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(BUILDERS))  # optional: the families to run, in order

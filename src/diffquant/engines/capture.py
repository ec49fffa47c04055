"""Cache a unit's inputs (from the quantized model) and targets (from the full-precision model).

BRECQ's "asym" mode: the quantized model, with every earlier unit already quantized, produces the
unit's inputs, while the full-precision model produces the output the unit must reproduce. Forward
passes stop as soon as the unit has run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffquant.calibration import CalibrationSet, call_denoiser
from diffquant.engines.store import TensorStore
from diffquant.errors import DiffquantError
from diffquant.families import adapter_for


class _StopForward(Exception):
    """Raised by a hook once the unit of interest has run."""


def unit_output(model: nn.Module, module: nn.Module, output: Any) -> torch.Tensor:
    """The image-stream tensor of a unit's output, as `model`'s family adapter defines it (a joint
    block returns (text, image) streams; the image stream is what the unit must reproduce)."""
    try:
        return adapter_for(model).block_output(module, output)
    except TypeError as error:
        raise DiffquantError(f"cannot reconstruct a module whose output is {type(output).__name__}") from error


@dataclass
class UnitData:
    """Cached rows: `in.<i>`/`in.<key>` inputs, `out` targets, `layer.<name>` full-precision layer
    outputs (for fine-grained losses), `step` indices; plus the non-tensor call arguments."""

    store: TensorStore
    arg_names: list[str]
    kwarg_names: list[str]
    constant_args: dict[int, Any] = field(default_factory=dict)
    constant_kwargs: dict[str, Any] = field(default_factory=dict)
    timesteps: dict[int, float] = field(default_factory=dict)

    def call_inputs(self, rows: dict[str, torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
        count = len(self.arg_names) + len(self.constant_args)
        args = [self.constant_args[i] if i in self.constant_args else rows[f"in.{i}"] for i in range(count)]
        kwargs = dict(self.constant_kwargs)
        kwargs.update({k: rows[f"in.{k}"] for k in self.kwarg_names})
        return args, kwargs

    def close(self) -> None:
        self.store.close()


def _split_inputs(
    args: tuple, kwargs: dict, batch: int
) -> tuple[dict[str, torch.Tensor], dict[int, Any], dict[str, Any]]:
    """Batched tensors become cached rows; anything else (rotary tables, None, flags) is a constant."""
    tensors, constant_args, constant_kwargs = {}, {}, {}
    batched = lambda value: torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch  # noqa: E731
    for i, value in enumerate(args):
        if batched(value):
            tensors[f"in.{i}"] = value.detach()
        else:
            constant_args[i] = value
    for key, value in kwargs.items():
        if batched(value):
            tensors[f"in.{key}"] = value.detach()
        else:
            constant_kwargs[key] = value
    return tensors, constant_args, constant_kwargs


def capture_unit(
    quantized: nn.Module,
    full_precision: nn.Module,
    unit_name: str,
    calibration: CalibrationSet,
    batch_size: int = 64,
    inner_layers: list[str] = (),
    asym: bool = True,
    spill_dir: Path | None = None,
) -> UnitData:
    """Run the calibration set through both models and cache the unit's inputs and targets."""
    store = TensorStore(len(calibration), spill_dir)
    fp_unit = full_precision.get_submodule(unit_name)
    q_unit = quantized.get_submodule(unit_name)
    captured: dict[str, Any] = {}

    def grab_inputs(_module, args, kwargs):
        captured["inputs"] = _split_inputs(args, kwargs, captured["batch"])
        raise _StopForward

    def grab_fp_inputs(_module, args, kwargs):
        captured["inputs"] = _split_inputs(args, kwargs, captured["batch"])

    def grab_output(module, _args, output):
        captured["out"] = unit_output(full_precision, module, output).detach()
        raise _StopForward

    def grab_layer(name):
        def hook(_module, _args, output):
            captured[f"layer.{name}"] = output.detach()

        return hook

    layer_handles = [full_precision.get_submodule(n).register_forward_hook(grab_layer(n)) for n in inner_layers]
    template = None
    try:
        for batch in calibration.batches(batch_size):
            captured.clear()
            captured["batch"] = batch.size
            if asym:
                handle = q_unit.register_forward_pre_hook(grab_inputs, with_kwargs=True)
                try:
                    call_denoiser(quantized, batch)
                except _StopForward:
                    pass
                finally:
                    handle.remove()
            handles = [fp_unit.register_forward_hook(grab_output)]
            if not asym:
                handles.append(fp_unit.register_forward_pre_hook(grab_fp_inputs, with_kwargs=True))
            try:
                call_denoiser(full_precision, batch)
            except _StopForward:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            if "inputs" not in captured or "out" not in captured:
                raise DiffquantError(f"Unit '{unit_name}' did not run on a calibration batch.")
            tensors, constant_args, constant_kwargs = captured["inputs"]
            if template is None:
                template = (sorted(k for k in tensors), constant_args, constant_kwargs)
            row = dict(tensors)
            row["out"] = captured["out"]
            row.update({k: v for k, v in captured.items() if k.startswith("layer.")})
            row["step"] = torch.full((batch.size,), batch.step_index, dtype=torch.long)
            store.append(row)
    finally:
        for handle in layer_handles:
            handle.remove()
    names, constant_args, constant_kwargs = template
    arg_names = [n for n in names if n[3:].isdigit()]
    kwarg_names = [n[3:] for n in names if not n[3:].isdigit()]
    timesteps = {s: float(calibration.timestep[calibration.step_index == s][0]) for s in calibration.steps}
    return UnitData(store, arg_names, kwarg_names, constant_args, constant_kwargs, timesteps)

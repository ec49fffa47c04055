"""Block and layer reconstruction (BRECQ / AdaRound / QDrop), shared by Q-Diffusion, TFMQ-DM and EDA-DM.

Two passes over the units, in execution order, as in Q-Diffusion:
  1. weights - activation quantization off; AdaRound variables of each unit's layers are optimised
     against the full-precision unit output (Lp loss, p = 2) plus the rounding regulariser with beta
     annealed 20 -> 2 after a 20 % warm-up; the rounding is then fixed to hard;
  2. activations - activation quantization on, ranges initialised by the observers; each unit's
     activation step sizes are learned (LSQ, Lp loss with p = 2.4, cosine learning rate).
`joint=True` (EDA-DM) instead optimises rounding and step sizes together in one pass without the
rounding regulariser; `layer_loss_weight` adds EDA-DM's per-layer output losses to the block loss.

Every unit ends with a checkpoint (the whole quantized state plus progress), so a killed run resumes
at the next unit and reproduces the uninterrupted result.

Data-parallel: under a torch.distributed process group of several ranks (`diffquant.process_group`),
each rank captures and draws rows from its own disjoint shard of the calibration set, takes its share of
each minibatch (`batch_size` is the whole minibatch over all ranks), and the gradients of every learned
parameter are averaged over the ranks before each optimiser step, so every rank ends with the same
parameters; rank 0 writes the checkpoints. In one process nothing of this runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffquant.calibration import CalibrationSet
from diffquant.engines.capture import UnitData, capture_unit, unit_output
from diffquant.engines.units import ReconstructionUnit
from diffquant.errors import ConfigError, DiffquantError
from diffquant.fileio import atomic_directory
from diffquant.modules.attention import QuantAttnProcessor
from diffquant.modules.kinds import is_kind, kind_owner
from diffquant.modules.layers import QuantLayer
from diffquant.modules.surgery import set_activation_quantization
from diffquant.process_group import DataParallel, agree
from diffquant.quant import Quantizer, require_valid_step_sizes, step_context
from diffquant.quant.adaround import TemperatureDecay


@dataclass
class ReconstructionConfig:
    """Hyper-parameters of the reconstruction engine (defaults: Q-Diffusion's)."""

    weight_iters: int = 20000
    """AdaRound iterations per unit."""
    act_iters: int = 5000
    """Activation step-size iterations per unit."""
    batch_size: int = 32
    """Rows per minibatch (over all ranks together when data-parallel)."""
    weight_lr: float = 1e-3
    """Adam learning rate of the AdaRound variables."""
    act_lr: float = 4e-5
    """Adam learning rate of the activation step sizes, learned in log space so they stay positive (cosine
    schedule): about the relative change of a step size per iteration."""
    round_weight: float = 0.01
    """Weight of the rounding regulariser."""
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    weight_p: float = 2.0
    """Lp norm of the weight-phase loss."""
    act_p: float = 2.4
    """Lp norm of the activation-phase loss."""
    qdrop_prob: float = 0.0
    """QDrop: probability of keeping an activation in full precision while reconstructing."""
    asym: bool = True
    """Inputs from the quantized model, targets from the full-precision one (BRECQ's asym)."""
    float_lr: float = 0.0
    """Adam learning rate of the float parameters a layer kind offers (SVDQuant's 16-bit low-rank branch),
    trained beside the rounding; 0 keeps them fixed."""
    joint: bool = False
    """Optimise rounding and step sizes together, without the rounding regulariser (EDA-DM)."""
    joint_round_loss: bool = False
    """Joint pass only: add AdaRound's rounding regulariser (EDA-DM's official joint pass has none)."""
    layer_loss_weight: float = 0.0
    """Weight of the summed per-layer output losses added to a block's loss (EDA-DM's FBR)."""
    capture_batch_size: int = 64
    spill_mb: float = 4096.0
    """Cache unit inputs/outputs on disk (memory-mapped) when they would exceed this many MB."""
    seed: int = 0

    def validate(self) -> None:
        for name in ("weight_iters", "act_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}.")
        if self.float_lr < 0:
            raise ConfigError(f"float_lr must be >= 0, got {self.float_lr}.")
        if not 0.0 <= self.qdrop_prob < 1.0:
            raise ConfigError(f"qdrop_prob must be in [0, 1), got {self.qdrop_prob}.")


def lp_loss(prediction: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's reconstruction loss: |x - y|^p summed over channels, averaged over the rest."""
    difference = (prediction - target).abs().pow(p)
    return difference.sum(1).mean() if difference.ndim > 1 else difference.mean()


def unit_activation_quantizers(model: nn.Module, unit: ReconstructionUnit) -> list[Quantizer]:
    """Input quantizers of the unit's layers and the matmul quantizers of attention inside it."""
    quantizers = []
    for name in unit.layers:
        layer = model.get_submodule(name)
        if layer.input_quantizer is not None and not layer.input_quantizer.spec.dynamic:
            quantizers.append(layer.input_quantizer)
    for module in model.get_submodule(unit.name).modules():
        if isinstance(module, QuantAttnProcessor):
            quantizers.extend(q for q in module.quantizers() if not q.spec.dynamic)
    return quantizers


def output_layers(model: nn.Module, unit: ReconstructionUnit) -> list[str]:
    """Modules whose outputs the fine-grained loss compares: the unit's layers, with the parts of a layer
    kind (the halves of a split conv) replaced by the kind's module (full precision has only the whole conv)."""
    names: list[str] = []
    for name in unit.layers:
        name = kind_owner(model, name)
        if name not in names:
            names.append(name)
    return names


class ReconstructionCheckpoint:
    """Progress and the full quantized state after each finished unit, in one directory."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def load(self, model: nn.Module) -> dict:
        progress_file = self.directory / "progress.json"
        if not progress_file.is_file():
            return {"done": [], "adaround": []}
        progress = json.loads(progress_file.read_text())
        if progress.get("fingerprint") != self.fingerprint:
            raise DiffquantError(
                f"The checkpoint in {self.directory} belongs to another run (different model, data or "
                "settings). Delete it or choose another checkpoint directory."
            )
        for name in progress["adaround"]:
            layer = model.get_submodule(name)
            if layer.rounding is None:
                layer.start_adaround()
            layer.rounding.soft = False
        for name in progress.get("learnable", []):
            model.get_submodule(name).set_learnable(True)
        # activation ranges not calibrated yet at checkpoint time are legitimately absent
        missing, unexpected = model.load_state_dict(load_file(str(self.directory / "state.safetensors")), strict=False)
        if unexpected or any(not key.endswith(".scale") for key in missing):
            raise DiffquantError(
                f"The checkpoint in {self.directory} does not fit this model ({(unexpected + missing)[:3]}). Delete it."
            )
        for name in progress.get("learnable", []):
            model.get_submodule(name).set_learnable(False)
        return progress

    def save(self, model: nn.Module, progress: dict) -> None:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if v is not None}
        with atomic_directory(self.directory) as scratch:
            save_file(state, str(scratch / "state.safetensors"))
            (scratch / "progress.json").write_text(json.dumps({**progress, "fingerprint": self.fingerprint}, indent=1))


class Reconstructor:
    """Runs the reconstruction passes over a list of units."""

    def __init__(
        self,
        quantized: nn.Module,
        full_precision: nn.Module,
        calibration: CalibrationSet,
        config: ReconstructionConfig,
        checkpoint: ReconstructionCheckpoint | None = None,
        progress: bool = True,
        frozen_layers: Iterable[str] = (),
    ) -> None:
        config.validate()
        self.parallel = DataParallel.current()
        self.parallel.batch_share(config.batch_size)  # a minibatch too small to split is refused now
        # every rank draws the same sampling step from the whole set's steps (sorted: one process's capture order)
        self.calibration_steps = calibration.step_index.sort().values
        if self.parallel.active:
            calibration = calibration.subset(self.parallel.shard(calibration.step_index))
        self.model, self.fp, self.calibration, self.config = quantized, full_precision, calibration, config
        self.checkpoint, self.progress_bar = checkpoint, progress
        self.frozen_layers = set(frozen_layers)
        self.state = checkpoint.load(quantized) if checkpoint else {"done": [], "adaround": []}
        # work finished by earlier, interrupted processes: counted so a resumed run reports its full cost
        self.resumed_units = len(self.state["done"])
        self.earlier_runs_s = float(self.state.get("elapsed_s", 0.0))
        self._started = time.perf_counter()
        self.spill_dir = checkpoint.directory.parent if checkpoint else None
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        agree()  # no rank starts (or a finished run's rank 0 deletes the checkpoint) before all have read it

    # bookkeeping ------------------------------------------------------------------------------
    def done(self, key: str) -> bool:
        return key in self.state["done"]

    def mark_done(self, key: str) -> None:
        # never checkpoint (or later save) a model whose learned step sizes left the positive reals
        require_valid_step_sizes(self.model, f"After reconstructing '{key}'")
        self.state["done"].append(key)
        self.state["elapsed_s"] = round(self.earlier_runs_s + time.perf_counter() - self._started, 2)
        if self.checkpoint and self.parallel.rank == 0:  # the ranks hold identical parameters
            self.checkpoint.save(self.model, self.state)

    def run_once(self, key: str, action: Callable[[], None]) -> None:
        """Run a non-unit step (e.g. range initialisation) once across resumes."""
        if not self.done(key):
            action()
            self.mark_done(key)

    # data -------------------------------------------------------------------------------------
    def _capture(self, unit: ReconstructionUnit, with_layers: bool) -> UnitData:
        inner = output_layers(self.model, unit) if with_layers and unit.kind == "block" else []
        estimate = self._estimate_mb(unit)
        spill = self.spill_dir if estimate > self.config.spill_mb else None
        return capture_unit(
            self.model,
            self.fp,
            unit.name,
            self.calibration,
            self.config.capture_batch_size,
            inner,
            self.config.asym,
            spill,
        )

    def _estimate_mb(self, unit: ReconstructionUnit) -> float:
        return len(self.calibration) * self.calibration.sample[0].numel() * 4 * 8 / 2**20

    def _batches(self, data: UnitData, iterations: int, seed: int, per_step: bool):
        """(step, row indices) per iteration. One process draws steps and rows from one generator; ranks
        share the step generator (one step per minibatch over all ranks) and draw rows from their own."""
        steps = data.store.rows(torch.arange(len(data.store)), ["step"])["step"]
        rows_generator = torch.Generator().manual_seed(self.parallel.seed(seed))
        steps_generator = torch.Generator().manual_seed(seed) if self.parallel.active else rows_generator
        drawn_from = self.calibration_steps if self.parallel.active else steps
        batch = self.parallel.batch_share(self.config.batch_size)
        for _ in range(iterations):
            if per_step:  # per-step quantizers need one sampling step per batch
                step = int(drawn_from[torch.randint(len(drawn_from), (1,), generator=steps_generator)])
                pool = torch.nonzero(steps == step).flatten()
                index = pool[torch.randperm(len(pool), generator=rows_generator)[:batch]]
                yield step, index
            else:
                yield None, torch.randperm(len(steps), generator=rows_generator)[:batch]

    # optimisation -----------------------------------------------------------------------------
    def _optimize(
        self,
        unit: ReconstructionUnit,
        data: UnitData,
        groups: list[dict],
        iterations: int,
        p: float,
        rounding_layers: list[QuantLayer],
        use_round_loss: bool,
        cosine: bool,
        description: str,
        unit_index: int,
    ) -> float:
        module = self.model.get_submodule(unit.name)
        optimizer = torch.optim.Adam(groups)
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0) if cosine else None
        )
        decay = TemperatureDecay(iterations, self.config.warmup, self.config.beta_start, self.config.beta_end)
        seed = self.config.seed * 100_003 + unit_index
        torch.manual_seed(seed)  # QDrop masks
        parameters = [parameter for group in groups for parameter in group["params"]]
        per_step = any(q.spec.per_step and q.enabled for q in unit_activation_quantizers(self.model, unit))
        layer_outputs: dict[str, torch.Tensor] = {}
        hooks = []
        if self.config.layer_loss_weight > 0 and unit.kind == "block":
            for name in output_layers(self.model, unit):
                hooks.append(
                    self.model.get_submodule(name).register_forward_hook(
                        lambda _m, _i, out, name=name: layer_outputs.__setitem__(name, out)
                    )
                )
        last = float("nan")
        bar = tqdm(total=iterations, desc=description, leave=False, disable=not self.progress_bar)
        try:
            for iteration, (step, index) in enumerate(self._batches(data, iterations, seed, per_step)):
                optimizer.zero_grad(set_to_none=True)
                loss = None
                if len(index):  # a rank whose shard lacks the drawn step adds nothing to this minibatch
                    loss = self._loss(module, data, step, index, p, layer_outputs)
                    if use_round_loss and iteration >= self.config.warmup * iterations:
                        beta = decay(iteration)
                        loss = loss + self.config.round_weight * sum(
                            layer.rounding.regularizer(beta) for layer in rounding_layers
                        )
                    loss.backward()
                if self.parallel.active:
                    last = self.parallel.average_gradients(parameters, loss, len(index))
                else:
                    last = loss.item()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if not torch.isfinite(torch.tensor(last)):
                    raise DiffquantError(
                        f"Reconstruction of '{unit.name}' diverged (loss {last}); lower the learning rate."
                    )
                bar.update(1)
                if iteration % 50 == 0:
                    bar.set_postfix(loss=f"{last:.4g}")
        finally:
            bar.close()
            for hook in hooks:
                hook.remove()
        return last

    def _loss(
        self,
        module: nn.Module,
        data: UnitData,
        step: int | None,
        index: torch.Tensor,
        p: float,
        layer_outputs: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The unit's Lp loss on rows `index` (plus the per-layer losses the hooks collected)."""
        rows = data.store.rows(index)
        args, kwargs = data.call_inputs(rows)
        if step is not None:
            with step_context(step, data.timesteps[step], self.calibration.num_steps):
                output = unit_output(self.model, module, module(*args, **kwargs))
        else:
            output = unit_output(self.model, module, module(*args, **kwargs))
        loss = lp_loss(output, rows["out"], p)
        for name, value in layer_outputs.items():
            loss = loss + self.config.layer_loss_weight * lp_loss(value, rows[f"layer.{name}"], p)
        return loss

    def _trainable_layers(self, unit: ReconstructionUnit) -> list[QuantLayer]:
        layers = []
        for name in unit.layers:
            layer = self.model.get_submodule(name)
            if name in self.frozen_layers or layer.weight_quantizer is None or layer.frozen:
                continue
            layers.append(layer)
        return layers

    def _start_rounding(self, unit: ReconstructionUnit) -> list[QuantLayer]:
        layers = self._trainable_layers(unit)
        for layer in layers:
            if layer.rounding is None:
                layer.start_adaround()
            layer.rounding.soft = True
            layer.rounding.alpha.requires_grad_(True)
        return layers

    def _finish_rounding(self, unit: ReconstructionUnit, layers: list[QuantLayer]) -> None:
        for layer in layers:
            layer.rounding.soft = False
            layer.rounding.alpha.requires_grad_(False)
        names = [n for n in unit.layers if n not in self.frozen_layers and self.model.get_submodule(n).rounding]
        self.state["adaround"] = sorted(set(self.state["adaround"]) | set(names))

    def _start_float_training(self, unit: ReconstructionUnit) -> list[nn.Module]:
        """The unit's layer kinds with float parameters to train (none unless `float_lr` is set)."""
        if self.config.float_lr <= 0:
            return []
        owners = dict.fromkeys(kind_owner(self.model, name) for name in unit.layers if name not in self.frozen_layers)
        kinds = [self.model.get_submodule(name) for name in owners]
        kinds = [kind for kind in kinds if is_kind(kind) and kind.trainable_float_parameters()]
        for parameter in (p for kind in kinds for p in kind.trainable_float_parameters()):
            parameter.requires_grad_(True)
        return kinds

    def _finish_float_training(self, kinds: list[nn.Module]) -> None:
        for kind in kinds:
            for parameter in kind.trainable_float_parameters():
                parameter.requires_grad_(False)
            kind.finish_float_training()

    def _start_step_sizes(self, unit: ReconstructionUnit) -> list[Quantizer]:
        quantizers = [q for q in unit_activation_quantizers(self.model, unit) if q.enabled and q.scale is not None]
        for quantizer in quantizers:
            quantizer.set_learnable(True)
            quantizer.drop_prob = self.config.qdrop_prob
        return quantizers

    def _finish_step_sizes(self, quantizers: list[Quantizer]) -> None:
        for quantizer in quantizers:
            quantizer.set_learnable(False)
            quantizer.drop_prob = 0.0

    # passes -----------------------------------------------------------------------------------
    def _reconstruct_units(
        self,
        units: list[ReconstructionUnit],
        phase: str,
        rounding: bool,
        step_sizes: bool,
        round_loss: bool,
        seed_offset: int,
    ) -> None:
        """One pass over the units, learning rounding and/or step sizes; checkpointed per unit.

        Passes that learn rounding follow the weight schedule (iterations, loss exponent), the others
        the activation schedule.
        """
        iterations = self.config.weight_iters if rounding else self.config.act_iters
        p = self.config.weight_p if rounding else self.config.act_p
        for index, unit in enumerate(tqdm(units, desc=f"reconstruct {phase}", disable=not self.progress_bar)):
            key = f"{phase}:{unit.name}"
            if self.done(key) or iterations == 0:
                continue
            has_rounding = rounding and bool(self._trainable_layers(unit))
            has_steps = step_sizes and any(
                q.enabled and q.scale is not None for q in unit_activation_quantizers(self.model, unit)
            )
            if not (has_rounding or has_steps):
                continue
            data = self._capture(unit, with_layers=self.config.layer_loss_weight > 0)
            try:
                layers = self._start_rounding(unit) if rounding else []
                quantizers = self._start_step_sizes(unit) if step_sizes else []
                kinds = self._start_float_training(unit) if rounding else []
                groups = []
                if layers:
                    groups.append({"params": [layer.rounding.alpha for layer in layers], "lr": self.config.weight_lr})
                if kinds:
                    floats = [p for kind in kinds for p in kind.trainable_float_parameters()]
                    groups.append({"params": floats, "lr": self.config.float_lr})
                if quantizers:
                    groups.append(
                        {"params": [p for q in quantizers for p in q.trainable_step_sizes()], "lr": self.config.act_lr}
                    )
                # step sizes follow a cosine schedule (Q-Diffusion); pure AdaRound keeps Adam's rate
                self._optimize(
                    unit, data, groups, iterations, p, layers, round_loss, step_sizes, unit.name, seed_offset + index
                )
                if rounding:
                    self._finish_rounding(unit, layers)
                    self._finish_float_training(kinds)
                if step_sizes:
                    self._finish_step_sizes(quantizers)
            finally:
                data.close()
            self.mark_done(key)

    def weight_pass(self, units: list[ReconstructionUnit], with_activations: bool = False) -> None:
        """AdaRound each unit with activation quantization off, or on (`with_activations`: for dynamic
        activations, which have no step sizes to learn but whose error the rounding can compensate)."""
        set_activation_quantization(self.model, with_activations)
        try:
            self._reconstruct_units(
                units,
                "weights",
                rounding=True,
                step_sizes=False,
                round_loss=True,
                seed_offset=0,
            )
        finally:
            set_activation_quantization(self.model, True)

    def activation_pass(self, units: list[ReconstructionUnit]) -> None:
        """Learn the activation step sizes of each unit (activation quantization on)."""
        self._reconstruct_units(
            units,
            "activations",
            rounding=False,
            step_sizes=True,
            round_loss=False,
            seed_offset=1000,
        )

    def joint_pass(self, units: list[ReconstructionUnit]) -> None:
        """EDA-DM: rounding and step sizes together, activation quantization on (regulariser optional)."""
        self._reconstruct_units(
            units,
            "joint",
            rounding=True,
            step_sizes=True,
            round_loss=self.config.joint_round_loss,
            seed_offset=0,
        )


def fingerprint(*parts) -> str:
    """A digest of whatever identifies a run (model state, calibration, settings)."""
    import hashlib

    digest = hashlib.sha256()
    for part in parts:
        if torch.is_tensor(part):
            digest.update(part.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(part, dict) and part and all(torch.is_tensor(v) for v in part.values()):
            for key in sorted(part):
                digest.update(key.encode())
                digest.update(part[key].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


__all__ = ["ReconstructionCheckpoint", "ReconstructionConfig", "Reconstructor", "asdict", "fingerprint", "lp_loss"]

"""TFMQ-DM's temporal-information-aware reconstruction (TIAR).

The temporal information block - every layer whose input depends only on the timestep and the
conditioning (time-embedding MLP, each block's time projection, adaLN modulation) - is reconstructed
as one unit: AdaRound of all its layers, against the full-precision temporal features (the outputs
of those layers). Since temporal features do not depend on the sample, the forward passes run on a
tiny spatial input when the architecture allows it.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.calibration import CalibrationSet, flatten_conditioning, select_rows, unflatten_conditioning
from diffquant.engines.reconstruction import Reconstructor, lp_loss
from diffquant.engines.store import TensorStore
from diffquant.families import denoise
from diffquant.modules.layers import QuantLayer
from diffquant.modules.surgery import set_activation_quantization
from diffquant.quant.adaround import TemperatureDecay


def _collect(model: nn.Module, layers: list[str], run) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out))
        for n in layers
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _probe_sample(model: nn.Module, fp: nn.Module, calibration: CalibrationSet, layers: list[str]) -> torch.Tensor:
    """The smallest spatial input (8x8) if it reproduces the temporal features, else a full-size one."""
    full = calibration.sample[:2]
    t, cond = calibration.timestep[:2], select_rows(calibration.conditioning, slice(0, 2))
    with torch.no_grad():
        reference = _collect(fp, layers, lambda: denoise(fp, full, t, cond))
        tiny = torch.zeros(2, full.shape[1], 8, 8)
        try:
            candidate = _collect(fp, layers, lambda: denoise(fp, tiny, t, cond))
        except Exception:  # the architecture needs its native resolution
            return torch.zeros_like(full[:1])
    if all(torch.allclose(reference[n], candidate[n], atol=1e-6) for n in layers):
        return tiny[:1]
    return torch.zeros_like(full[:1])


def reconstruct_temporal(reconstructor: Reconstructor, layers: list[str]) -> None:
    """AdaRound the temporal layers jointly against the full-precision temporal features."""
    key = "temporal"
    config = reconstructor.config
    if reconstructor.done(key) or not layers or config.weight_iters == 0:
        return
    model, fp, calibration = reconstructor.model, reconstructor.fp, reconstructor.calibration
    probe = _probe_sample(model, fp, calibration, layers)
    store = TensorStore(len(calibration))
    with torch.no_grad():
        for start in range(0, len(calibration), config.capture_batch_size):
            index = torch.arange(start, min(start + config.capture_batch_size, len(calibration)))
            t = calibration.timestep[index]
            cond = select_rows(calibration.conditioning, index)
            sample = probe.expand(len(t), *probe.shape[1:])
            targets = _collect(fp, layers, lambda t=t, cond=cond, sample=sample: denoise(fp, sample, t, cond))
            flat = flatten_conditioning(cond)
            store.append({"t": t, **{f"c.{k}": v for k, v in flat.items()}, **{f"out.{n}": targets[n] for n in layers}})

    trainable = [
        module
        for module in (model.get_submodule(n) for n in layers)
        if isinstance(module, QuantLayer) and module.weight_quantizer is not None
    ]
    for layer in trainable:
        if layer.rounding is None:
            layer.start_adaround()
        layer.rounding.soft = True
        layer.rounding.alpha.requires_grad_(True)
    parameters = [layer.rounding.alpha for layer in trainable]
    optimizer = torch.optim.Adam(parameters, lr=config.weight_lr)
    decay = TemperatureDecay(config.weight_iters, config.warmup, config.beta_start, config.beta_end)
    parallel = reconstructor.parallel  # data-parallel: this rank's rows (its shard) and share of each minibatch
    generator = torch.Generator().manual_seed(parallel.seed(config.seed * 100_003 + 7))
    batch = parallel.batch_share(config.batch_size)
    set_activation_quantization(model, False)
    try:
        for iteration in tqdm(
            range(config.weight_iters),
            desc="reconstruct temporal block",
            leave=False,
            disable=not reconstructor.progress_bar,
        ):
            rows = store.rows(torch.randperm(len(store), generator=generator)[:batch])
            cond = unflatten_conditioning({k[2:]: v for k, v in rows.items() if k.startswith("c.")})
            t = rows["t"]
            sample = probe.expand(len(t), *probe.shape[1:])
            outputs = _collect(model, layers, lambda t=t, cond=cond, sample=sample: denoise(model, sample, t, cond))
            loss = sum(lp_loss(outputs[n], rows[f"out.{n}"], config.weight_p) for n in layers)
            if iteration >= config.warmup * config.weight_iters:
                beta = decay(iteration)
                loss = loss + config.round_weight * sum(layer.rounding.regularizer(beta) for layer in trainable)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if parallel.active:
                parallel.average_gradients(parameters, loss, len(t))
            optimizer.step()
    finally:
        set_activation_quantization(model, True)
    for layer in trainable:
        layer.rounding.soft = False
        layer.rounding.alpha.requires_grad_(False)
    names = [n for n in layers if getattr(model.get_submodule(n), "rounding", None) is not None]
    reconstructor.state["adaround"] = sorted(set(reconstructor.state["adaround"]) | set(names))
    reconstructor.mark_done(key)

"""What a benchmark run covers: presets of models, methods, settings, peers and the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffquant.bench.report import file_stem
from diffquant.errors import ConfigError
from diffquant.methods import make_config

SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A16": (4, None), "W4A4": (4, 4), "W8A16": (8, None), "W2A16": (2, None)}
CODEBOOK_METHODS = {"weight-vq": "W2A16"}
"""Weight vector quantization (VQ4DiT codebooks, d=4, K=256): its bit width is the codebook's, so it runs
once per model at this setting whatever the preset's settings are."""


def reference_key(model: str) -> str:
    """The file stem of a model's full-precision row (a model given as a directory path stays one name)."""
    return file_stem(f"{model}__fp32")


def split_method(method: str) -> tuple[str, str | None]:
    """`qdiffusion@paper` -> ("qdiffusion", "paper"); a bare name has no preset."""
    name, _, preset = method.partition("@")
    return name, preset or None


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row: a model quantized by a diffquant method (`name` or `name@preset`, e.g.
    `qdiffusion@paper`) or a peer library at a setting."""

    model: str
    method: str
    setting: str
    family: str = "diffquant"  # or "peer"

    @property
    def key(self) -> str:
        return file_stem(f"{self.model}__{self.method}__{self.setting}")

    @property
    def bits(self) -> tuple[int, int | None]:
        return SETTINGS[self.setting]

    @property
    def method_name(self) -> str:
        """The method without its `@preset` suffix."""
        return split_method(self.method)[0]

    @property
    def method_preset(self) -> str | None:
        """The preset named after `@`, or None for the bench preset's own method options."""
        return split_method(self.method)[1]


@dataclass(frozen=True)
class BenchPreset:
    """A benchmark configuration; `smoke` runs in CI in minutes, `full` is the committed report."""

    name: str
    protocol: str
    models: tuple[str, ...]
    methods: tuple[str, ...]
    settings: tuple[str, ...]
    peers: tuple[str, ...]
    method_options: dict[str, dict] = field(default_factory=dict)
    latency: bool = True
    """Measure real-kernel latency ratios (compiles each int8 model: minutes per row)."""
    latency_repeats: int = 9

    def rows(self) -> list[RowSpec]:
        for method in self.methods:  # an unknown method or preset fails now, not hours later as a failed row
            if method not in CODEBOOK_METHODS:
                make_config(*split_method(method))
        for setting in self.settings:
            if setting not in SETTINGS:
                raise ConfigError(f"Unknown setting '{setting}'. Settings: {', '.join(SETTINGS)}.")
        rows = []
        for model in self.models:
            for setting in self.settings:
                rows += [RowSpec(model, m, setting) for m in self.methods if m not in CODEBOOK_METHODS]
                rows += [RowSpec(model, peer, setting, "peer") for peer in self.peers]
            rows += [RowSpec(model, m, CODEBOOK_METHODS[m]) for m in self.methods if m in CODEBOOK_METHODS]
        return rows


_SMOKE_OPTIONS = {
    "naive": {"calibration": {"trajectories": 16, "steps": 20, "uniform_steps": 5}},
    "ptq4dm": {"calibration": {"trajectories": 64, "steps": 20}},
    "qdiffusion": {
        "calibration": {"trajectories": 8, "steps": 20, "uniform_steps": 5},
        "reconstruction": {"weight_iters": 20, "act_iters": 10},
    },
    "tfmq": {
        "calibration": {"trajectories": 4, "steps": 20},
        "reconstruction": {"weight_iters": 20},
        "weight_steps": 5,
    },
    "edadm": {"calibration": {"trajectories": 40, "steps": 20}, "reconstruction": {"weight_iters": 20}},
}

BENCH_PRESETS: dict[str, BenchPreset] = {
    "smoke": BenchPreset(
        name="smoke",
        protocol="smoke",
        models=("fmnist-unet",),
        methods=("naive", "ptq4dm", "qdiffusion"),
        settings=("W8A8", "W4A16"),
        peers=("quanto",),
        method_options=_SMOKE_OPTIONS,
        latency=False,
    ),
    "full": BenchPreset(
        name="full",
        protocol="standard",
        models=("fmnist-unet", "fmnist-dit", "fmnist-t2i"),
        methods=("naive", "ptq4dm", "qdiffusion", "tfmq", "edadm", "svdquant", "viditq", "mixdq", "dgq"),
        settings=("W8A8", "W4A8", "W4A16", "W4A4"),
        peers=("quanto", "torchao", "modelopt", "pt2e"),
    ),
}

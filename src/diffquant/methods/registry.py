"""The method registry: each method file binds its `apply` to its config class with `@register_method`
(torchao's `register_quantize_module_handler`, our own way), so `methods/__init__.py` only imports them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffquant.errors import ConfigError, DiffquantError
from diffquant.methods.base import MethodConfig


@dataclass(frozen=True)
class MethodEntry:
    config_class: type[MethodConfig]
    apply: Callable
    summary: str


METHODS: dict[str, MethodEntry] = {}
"""Method name -> entry, in registration order (the order the CLI and the benchmark list them)."""


def register_method(config_class: type[MethodConfig], name: str | None = None, summary: str = "") -> Callable:
    """Decorator for a method's `apply(denoiser, calibration, config, progress)`: registers it under `name`
    (default: the config's `name`) for configs of `config_class`."""
    name = name or config_class.name
    if not (isinstance(config_class, type) and issubclass(config_class, MethodConfig)):
        raise DiffquantError(f"register_method needs a MethodConfig subclass, got {config_class!r}.")
    if name in METHODS:
        raise DiffquantError(
            f"A method named '{name}' is already registered (config {METHODS[name].config_class.__name__}); "
            "register yours under another name."
        )

    def register(apply: Callable) -> Callable:
        METHODS[name] = MethodEntry(config_class, apply, summary)
        return apply

    return register


def get_method(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ConfigError(f"Unknown method '{name}'. Available methods: {', '.join(METHODS)}.")
    return METHODS[name]


def method_for_config(config: MethodConfig) -> MethodEntry:
    """The entry registered for `config`'s class (or the nearest registered base class)."""
    for cls in type(config).__mro__:
        for entry in METHODS.values():
            if entry.config_class is cls:
                return entry
    raise ConfigError(f"No method is registered for {type(config).__name__}; decorate its apply with @register_method.")


def make_config(name: str, preset: str | None = None, **values) -> MethodConfig:
    """A method's config: the preset's defaults ('fast' where a method has one), changed by `values`.

    Nested settings (`calibration`, `reconstruction`) may be given as dicts of the fields to change.
    """
    config = get_method(name).config_class.from_preset(preset, **values)
    config.validate()
    return config

"""The fake backend: the simulation itself (every method, every format, every layer kind)."""

from __future__ import annotations

from diffquant.runtime.backends.base import Backend, register_backend


@register_backend
class FakeBackend(Backend):
    """Converts nothing: each quantized layer keeps computing with its fake-quantized weight and inputs."""

    name = "fake"
    integer_attention = False

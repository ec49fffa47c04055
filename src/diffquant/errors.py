"""The one exception type diffquant raises for bad input, with a message that names the fix."""

from __future__ import annotations


class DiffquantError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class DataNotFoundError(DiffquantError, FileNotFoundError):
    """A dataset's files are not where diffquant looked for them."""


class ConfigError(DiffquantError, ValueError):
    """A configuration value is out of range or inconsistent."""

"""The package version, in a bottom-layer module any layer may import."""

__version__ = "0.1.0"

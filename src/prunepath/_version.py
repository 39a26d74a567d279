"""The package version (its own module so that checkpoints can record it without importing the front door)."""

__version__ = "0.1.0"

"""The errors an entry point reports as one line, and their exit codes (``ptycho.cli``)."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "Interrupted", "TrainingDiverged"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix (exit 2)."""


class DataError(ValueError):
    """Data that cannot be used: wrong N or probe size for the model, bad checkpoint (exit 1)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (exit 1); the last good checkpoint is kept."""


class Interrupted(Exception):
    """Training was interrupted (Ctrl-C); the message says how to resume (exit 130)."""

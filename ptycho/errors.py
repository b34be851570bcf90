"""The errors an entry point reports as one line, their exit codes (``ptycho.cli``), and
the one way an options class checks its values (:func:`require`)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

__all__ = [
    "ConfigError",
    "DataError",
    "Interrupted",
    "TrainingDiverged",
    "WorkerLost",
    "choice",
    "require",
]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix (exit 2)."""


class DataError(ValueError):
    """Data that cannot be used: wrong N or probe size for the model, bad checkpoint (exit 1)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (exit 1); the last good checkpoint is kept."""


class WorkerLost(RuntimeError):
    """Another worker of a multi-worker run stopped answering (exit 1); the message names
    it (:func:`ptycho.distribute.lost_worker`)."""


class Interrupted(Exception):
    """Training was interrupted (Ctrl-C); the message says how to resume (exit 130)."""


def require(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise ``ValueError(message)`` for the first ``(ok, message)`` that is not ok.

    The options classes list their rules as ``("field=value: must be ...")`` pairs;
    :mod:`ptycho.config` prefixes the section (``refine.iterations=0: must be >= 1``)."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def choice(name: str, value, choices: type[Enum]) -> tuple[bool, str]:
    """The rule "``name`` is one of ``choices``" as a :func:`require` pair (a composed
    configuration has been checked by Hydra already; this serves the library's users)."""
    allowed = [member.value for member in choices]
    return value in allowed, f"{name}={value}: must be one of {', '.join(allowed)}"

"""Writing a run's files atomically: nothing half-written, nothing clobbered on failure.

Every writer here writes to a temporary file beside the target and renames it over the
target only once the write has completed (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "atomic_path",
    "save_model",
    "save_reconstruction",
    "write_json",
]


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    ``suffix`` lets writers that check file endings (Keras wants ``.keras``) accept it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def write_json(data: dict, path: Path) -> Path:
    """Write ``data`` as indented JSON (numpy scalars converted; inf/nan as strings)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")
    return Path(path)


def save_model(model, path: Path) -> Path:
    """``model.save`` to a temporary ``.keras`` file, then rename over ``path``."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
    return Path(path)


def save_reconstruction(
    obj: np.ndarray,
    mask: np.ndarray,
    path: Path,
    *,
    xcoords: np.ndarray | None = None,
    ycoords: np.ndarray | None = None,
    probe: np.ndarray | None = None,
) -> Path:
    """``reconstruction.npz``: ``obj`` complex64, ``mask`` bool, ``amplitude``, ``phase``;
    ``xcoords``, ``ycoords`` (float64, the positions used, in the scan's order) and
    ``probe`` (complex64, when refined) when given."""
    obj = np.asarray(obj, np.complex64)
    arrays = {
        "obj": obj,
        "mask": np.asarray(mask, bool),
        "amplitude": np.abs(obj),
        "phase": np.angle(obj),
    }
    if xcoords is not None and ycoords is not None:
        arrays["xcoords"] = np.asarray(xcoords, np.float64)
        arrays["ycoords"] = np.asarray(ycoords, np.float64)
    if probe is not None:
        arrays["probe"] = np.asarray(probe, np.complex64)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)

"""A run's checkpoints: where they are, writing them, resuming from them.

``<run>/checkpoints/last.keras`` holds the model and its optimizer (Adam's moments and
step count) after the last completed epoch; ``state.json`` beside it the epoch and the
per-epoch history. Both are written atomically, the model first, so the state never
names an epoch whose model is not on disk. ``refine.npz`` holds an unfinished
refinement (:class:`ptycho.refine.RefineState`: its variables and a JSON header), also
written atomically, and is removed once the run's results are written. A run folder that
holds a checkpoint is continued only on request (``resume=true``). A trained
``model.keras`` is loaded for reconstruction by :func:`load_trained`, which says in one
line why a file is refused.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from ptycho.errors import ConfigError, DataError
from ptycho.layers import set_translate_backend
from ptycho.model import load_model
from ptycho.outputs import atomic_path, save_model, write_json
from ptycho.refine import RefineOptions, RefineState, StateMismatch, check_options

__all__ = [
    "CHECKPOINT",
    "FOLDER",
    "REFINEMENT",
    "STATE",
    "Resumed",
    "checkpoint_path",
    "clear_refinement",
    "load_trained",
    "refinement",
    "refinement_path",
    "resume",
    "save",
    "save_refinement",
]

log = logging.getLogger(__name__)

FOLDER = "checkpoints"
CHECKPOINT = "last.keras"
STATE = "state.json"
REFINEMENT = "refine.npz"


def checkpoint_path(run_dir: Path) -> Path:
    """The model checkpoint of a run folder."""
    return Path(run_dir) / FOLDER / CHECKPOINT


@dataclass
class Resumed:
    """What a run continues from: the last completed epoch and its history."""

    run_dir: Path
    epoch: int
    history: list = field(default_factory=list)

    def load_model(self, backend: str) -> keras.Model:
        """The checkpoint's model (with its optimizer), its warp set to ``backend``."""
        model = keras.saving.load_model(checkpoint_path(self.run_dir), safe_mode=True)
        set_translate_backend(model, backend)
        return model


def resume(run_dir: Path, requested: bool) -> Resumed | None:
    """The checkpoint to continue from, or None to start afresh.

    A folder holding a checkpoint is refused unless ``requested`` (ConfigError naming
    ``resume=true``); a request without a checkpoint starts afresh with a warning."""
    run_dir = Path(run_dir)
    checkpoint, state = checkpoint_path(run_dir), run_dir / FOLDER / STATE
    if not requested:
        if checkpoint.exists():
            raise ConfigError(
                f"{run_dir} already holds a training checkpoint: pass resume=true to continue "
                "it, or choose a new hydra.run.dir"
            )
        return None
    if not (checkpoint.exists() and state.exists()):
        log.warning("resume=true but %s has no checkpoint yet: starting from scratch", run_dir)
        return None
    saved = json.loads(state.read_text())
    log.info("resuming from epoch %d", int(saved["epoch"]))
    return Resumed(run_dir, int(saved["epoch"]), list(saved.get("history", [])))


def save(model: keras.Model, folder: Path, epoch: int, history: list) -> None:
    """Checkpoint ``model`` (with its optimizer) after ``epoch`` into ``folder``."""
    folder = Path(folder)
    save_model(model, folder / CHECKPOINT)
    write_json({"epoch": epoch, "history": history}, folder / STATE)


def refinement_path(run_dir: Path) -> Path:
    """The unfinished refinement of a run folder."""
    return Path(run_dir) / FOLDER / REFINEMENT


def save_refinement(run_dir: Path, state: RefineState) -> None:
    """Write ``state`` into ``run_dir`` atomically: its arrays and a JSON header."""
    header = {
        "iteration": state.iteration,
        "seconds": state.seconds,
        "history": state.history,
        "rng": state.rng,
        "key": state.key,
    }
    text = json.dumps(header, default=float)  # NumPy scalars; NaN as JSON's NaN
    with atomic_path(refinement_path(run_dir), suffix=".npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, header=np.array(text), **state.arrays)
    log.debug("refinement checkpoint: iteration %d", state.iteration)


def refinement(run_dir: Path, requested: bool, options: RefineOptions) -> RefineState | None:
    """The unfinished refinement to continue, or None to start afresh.

    A folder holding one is refused unless ``requested`` (ConfigError naming
    ``resume=true``), and so is one written with other ``options``
    (:func:`ptycho.refine.check_options`); an unreadable file raises DataError."""
    path = refinement_path(run_dir)
    if not path.exists():
        return None
    if not requested:
        raise ConfigError(
            f"{run_dir} holds an unfinished refinement ({FOLDER}/{REFINEMENT}): pass "
            "resume=true to continue it, or choose a new hydra.run.dir"
        )
    try:
        with np.load(path, allow_pickle=False) as saved:
            header = json.loads(str(saved["header"]))
            arrays = {name: saved[name] for name in saved.files if name != "header"}
        state = RefineState(
            int(header["iteration"]),
            float(header["seconds"]),
            list(header["history"]),
            header["rng"],
            arrays,
            header["key"],
        )
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint
        raise DataError(
            f"{path}: cannot read the refinement checkpoint ({type(error).__name__}: "
            f"{error}); delete it to start the refinement afresh"
        ) from error
    try:
        check_options(state.key["options"], options)
    except StateMismatch as error:
        raise ConfigError(
            f"{path}: cannot continue this refinement: {error}; resume with the same "
            "refine settings, or choose a new hydra.run.dir"
        ) from error
    log.info("continuing the refinement after iteration %d", state.iteration)
    return state


def clear_refinement(run_dir: Path) -> None:
    """Remove the refinement checkpoint of a run whose results are written."""
    refinement_path(run_dir).unlink(missing_ok=True)


def load_trained(path: str | Path, backend: str) -> keras.Model:
    """A trained model (``model.keras``, loaded with ``safe_mode``), its warp set to
    ``backend``; a file Keras refuses raises :class:`DataError` with one short line
    naming the file, what is wrong and the fix (Keras's own message goes to the debug
    log)."""
    try:
        return load_model(path, translate_backend=backend)
    except Exception as error:  # noqa: BLE001 - any load failure is a bad checkpoint
        log.debug("checkpoint=%s: %s: %s", path, type(error).__name__, error)
        raise DataError(f"checkpoint={path}: {_load_failure(error)}") from error


def _load_failure(error: Exception) -> str:
    text = str(error)
    if "Lambda" in text and "safe_mode" in text:
        return "contains a Lambda layer (arbitrary code): refused; re-save the model without it"
    unknown = re.search(r"[Cc]ould not (?:locate|deserialize) class '?([\w.]+)", text)
    if unknown:
        return (
            f"uses a layer class this version does not know ({unknown.group(1)}); "
            "use a model.keras written by train.py"
        )
    first = text.split(". ")[0].splitlines()[0] if text else type(error).__name__
    return f"cannot load the model ({first[:100]}); use a model.keras written by train.py"

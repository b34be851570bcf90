"""A training run's checkpoints: where they are, writing them, resuming from them.

``<run>/checkpoints/last.keras`` holds the model and its optimizer (Adam's moments and
step count) after the last completed epoch; ``state.json`` beside it the epoch and the
per-epoch history. Both are written atomically, the model first, so the state never
names an epoch whose model is not on disk. A run folder that holds a checkpoint is
continued only on request (``resume=true``). A trained ``model.keras`` is loaded for
reconstruction by :func:`load_trained`, which says in one line why a file is refused.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import keras

from ptycho.errors import ConfigError, DataError
from ptycho.layers import set_translate_backend
from ptycho.model import load_model
from ptycho.outputs import save_model, write_json

__all__ = [
    "CHECKPOINT",
    "FOLDER",
    "STATE",
    "Resumed",
    "checkpoint_path",
    "load_trained",
    "resume",
    "save",
]

log = logging.getLogger(__name__)

FOLDER = "checkpoints"
CHECKPOINT = "last.keras"
STATE = "state.json"


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

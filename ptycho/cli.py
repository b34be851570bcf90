"""Running an app function from an entry point: one clear line on failure, exit codes.

Exit codes: 2 for a configuration problem (a typo, a wrong type, an impossible
combination, a missing file or checkpoint: :class:`ptycho.config.ConfigError`); 1 for a
failure while running (unreadable or invalid data, a diverged training); 130 after
Ctrl-C. The message is one line on stderr starting with ``error:``; the full traceback
is printed only with ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ptycho.errors import ConfigError, Interrupted

__all__ = ["initialise_devices", "precheck", "run_job"]

log = logging.getLogger("ptycho")

CONFIG_EXIT = 2
RUNTIME_EXIT = 1
INTERRUPT_EXIT = 130


def run_job(function, *args):
    """Call ``function(*args)``; turn failures into one line on stderr and an exit code.

    With ``verbose=true`` in the configuration (``args[0]``) the ``ptycho`` loggers
    show debug messages. TensorFlow's devices are initialised first, with its native
    start-up notices filtered (:mod:`ptycho.quiet`)."""
    cfg = args[0] if args else None
    if getattr(cfg, "verbose", False):
        logging.getLogger("ptycho").setLevel(logging.DEBUG)
    try:
        initialise_devices(cfg)
        return function(*args)
    except ConfigError as error:
        _fail(error, CONFIG_EXIT)
    except Interrupted as error:
        _fail(error, INTERRUPT_EXIT, prefix="interrupted")
    except KeyboardInterrupt:  # outside training's own handling (setup, final outputs)
        _fail(
            Interrupted("Ctrl-C before the job finished; every file it wrote is complete"),
            INTERRUPT_EXIT,
            prefix="interrupted",
        )
    except Exception as error:  # noqa: BLE001 - reported as one line, code 1
        _fail(error, RUNTIME_EXIT)


def initialise_devices(cfg=None) -> None:
    """Find TensorFlow's devices now, where the ``failed call to cuInit`` notice of a
    machine without a GPU can be filtered, rather than at the first operation.

    With a ``distribute`` section, the CPU is split first (``distribute.cpu_devices``:
    only possible before the devices are initialised) and the strategy is created
    right after (a multi-worker strategy sets up its collectives before any other work).
    """
    from ptycho.quiet import native_notices_filtered

    section = getattr(cfg, "distribute", None)
    with native_notices_filtered():
        import tensorflow as tf

        if section is not None:
            from ptycho.distribute import configure_devices, make_distribution

            configure_devices(section.cpu_devices)
            strategy = section.strategy
            make_distribution(getattr(strategy, "value", strategy), section.cpu_devices)
        tf.config.list_logical_devices()


def _one_line(text: str) -> str:
    """A multi-line message (Hydra's, OmegaConf's) joined into one; "" when empty."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type="))]
    return "; ".join(lines)


def _fail(error: BaseException, code: int, prefix: str = "error") -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    message = f"{prefix}: {_one_line(error) or type(error).__name__}"
    if logging.getLogger().handlers:  # inside a Hydra job: also into train.log
        log.error(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def precheck(config_dir: Path, config_name: str, argv: list[str]) -> None:
    """Compose the configuration of a single run before Hydra starts it.

    Hydra reports a bad override with several lines and exit code 1; this reports it
    as one line with exit code 2, and refuses a run folder (``hydra.run.dir``, given or
    the default ``outputs/...`` under the current folder) that cannot be written.
    Sweeps (``-m``) and Hydra's own flags are left to Hydra.
    """
    if any(arg.startswith("-") for arg in argv):
        return
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
            default_dir = str(cfg.hydra.run.dir)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        _fail(error, CONFIG_EXIT)
    explicit = [arg.split("=", 1)[1] for arg in argv if arg.startswith("hydra.run.dir=")]
    _check_writable(Path(explicit[-1] if explicit else default_dir), default=not explicit)


def _check_writable(folder: Path, default: bool = False) -> None:
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        where = f"the default run folder {folder.absolute()}" if default else f"{folder}"
        _fail(
            ConfigError(
                f"hydra.run.dir: cannot create or write {where}; "
                "set hydra.run.dir=<a writable folder>"
            ),
            CONFIG_EXIT,
        )

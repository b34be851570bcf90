"""The entry points: ``python train.py`` and ``python infer.py`` are ``main("train")`` and
``main("infer")``.

``main`` composes ``conf/<name>.yaml`` with Hydra, converts it once into the typed
configuration (:mod:`ptycho.config`), makes the process's devices and distribution, and
runs the application (:mod:`ptycho.app`) in the run folder. Failures end with one line on
stderr starting with ``error:`` and an exit code: 2 for a configuration problem (a typo,
a wrong type, an impossible combination, a missing file or checkpoint:
:class:`~ptycho.errors.ConfigError`); 1 for a failure while running (unreadable or invalid
data, a diverged training); 130 after Ctrl-C. ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import tensorflow as tf

from ptycho import app
from ptycho.config import register_configs, renamed_key_hint, rollback_overrides, typed
from ptycho.distribute import lost_worker, make_distribution
from ptycho.errors import ConfigError, Interrupted, WorkerLost
from ptycho.quiet import native_notices_filtered

__all__ = ["CONF", "initialise_devices", "label_worker_logs", "main", "precheck", "run_job"]

log = logging.getLogger("ptycho")

CONF = Path(__file__).resolve().parents[1] / "conf"
CONFIG_EXIT = 2
RUNTIME_EXIT = 1
INTERRUPT_EXIT = 130
TRUE_WORDS = ("true", "yes", "on", "1")  # what OmegaConf reads as true, any case


def main(name: str) -> None:
    """Run the application ``name`` ("train" or "infer") on the command line's overrides."""
    import hydra

    _show_everything_if_verbose(sys.argv)
    register_configs()
    sys.argv += rollback_overrides(sys.argv[1:], os.environ)
    precheck(CONF, name, sys.argv[1:])
    job = {"train": _train_job, "infer": _infer_job}[name]
    hydra.main(version_base="1.3", config_path=str(CONF), config_name=name)(job)()


def _train_job(cfg) -> None:
    _job(cfg, "train")


def _infer_job(cfg) -> None:
    _job(cfg, "infer")


def _job(cfg, name: str) -> None:
    """One Hydra job: the typed configuration, the devices (and for training the
    distribution), the application in the job's run folder."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)

    def run():
        config = typed(cfg)
        distribution = initialise_devices(config.distribute)
        label_worker_logs(distribution)
        if name == "train":
            return app.train(config, run_dir, distribution)
        return app.infer(config, run_dir, distribution)

    run_job(run, verbose=bool(cfg.verbose))


def _show_everything_if_verbose(argv: list[str]) -> None:
    """With ``verbose=true`` (any spelling OmegaConf reads as true), restart the process
    with ``PTYCHO_VERBOSE=1`` unless it is set: TensorFlow's native start-up notices are
    filtered when the package is imported, before the command line is parsed."""
    verbose = any(
        arg.split("=", 1)[0] == "verbose" and arg.split("=", 1)[1].lower() in TRUE_WORDS
        for arg in argv[1:]
        if "=" in arg
    )
    if verbose and os.environ.get("PTYCHO_VERBOSE") != "1":
        os.environ["PTYCHO_VERBOSE"] = "1"
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def run_job(function, *, verbose: bool = False):
    """Call ``function()``; turn failures into one line on stderr and an exit code.

    With ``verbose`` the ``ptycho`` loggers show debug messages, and TensorFlow's Python
    logger its information messages (a multi-worker strategy logs every collective it
    sets up); without, its warnings and errors only."""
    if verbose:
        logging.getLogger("ptycho").setLevel(logging.DEBUG)
    else:
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    try:
        return function()
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
        lost = lost_worker(error)
        _fail(error if lost is None else WorkerLost(lost), RUNTIME_EXIT)


def initialise_devices(options=None):
    """Find TensorFlow's devices now, where the ``failed call to cuInit`` notice of a
    machine without a GPU can be filtered, rather than at the first operation.

    With ``distribute`` options the CPU is split first (only possible before the devices
    are initialised) and the distribution made right after (a multi-worker strategy sets
    up its collectives before any other work); it is returned, else None.
    """
    with native_notices_filtered():
        distribution = None if options is None else make_distribution(options)
        tf.config.list_logical_devices()
    return distribution


class _WorkerFormatter(logging.Formatter):
    """A handler's own format, its lines starting with ``[worker K]``."""

    def __init__(self, inner: logging.Formatter | None, worker: int):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        return f"[worker {self.worker}]{self.inner.format(record)}"


def label_worker_logs(distribution) -> None:
    """With several workers, every line of this process's logs names its worker: the
    workers of one run append to the run folder's ``<job>.log`` (and a cluster's
    launcher often merges their terminals)."""
    if distribution is None or distribution.workers < 2:
        return
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, _WorkerFormatter):
            handler.setFormatter(_WorkerFormatter(handler.formatter, distribution.worker))


def _one_line(text: str) -> str:
    """A multi-line message (Hydra's, OmegaConf's) joined into one; "" when empty."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type="))]
    return "; ".join(lines)


def _fail(error: BaseException, code: int, prefix: str = "error") -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    message = f"{prefix}: {_one_line(error) or type(error).__name__}"
    if logging.getLogger().handlers:  # inside a Hydra job: also into the job's log
        log.error(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def precheck(config_dir: Path, config_name: str, argv: list[str]) -> None:
    """Compose and check the configuration of a single run before Hydra starts it.

    Hydra reports a bad override with several lines and exit code 1; this reports it
    as one line with exit code 2 (naming the new key of a renamed one), and refuses a
    run folder (``hydra.run.dir``, given or the default ``outputs/...`` under the
    current folder) that cannot be written. Sweeps (``-m``) and Hydra's own flags are
    left to Hydra.
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
        hint = renamed_key_hint(overrides)
        _fail(ConfigError(hint) if hint else error, CONFIG_EXIT)
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

"""The configuration of a run: typed sections composed by Hydra, converted once.

Each section is a dataclass owned by the module that uses it, with its defaults, a
docstring under each field and a ``check()`` of its own values:

=================  ======================================  ===================================
section            class                                   used by
=================  ======================================  ===================================
``translate``      ``warp.TranslateOptions``               every warp (model, stitcher, refine)
``compile``        ``hardware.CompileOptions``             ``hardware.resolve_compile``
``data``           ``data.DataOptions``                    ``data.load_scans``
``model``          ``model.ModelConfig``                   ``model.build_model``
``train``          ``stages.fit.FitOptions``               ``stages.fit``
``reconstruct``    ``inference.ReconstructOptions``        ``inference.reconstruct``
``metrics``        ``scoring.MetricsOptions``              ``scoring.Scorer``
``refine``         ``refine.RefineOptions``                ``refine.Refiner``
``distribute``     ``distribute.DistributeOptions``        ``distribute.make_distribution``
=================  ======================================  ===================================

This module composes them into :class:`TrainConfig` and :class:`InferConfig`, registers
those as the schemas of ``conf/train.yaml`` and ``conf/infer.yaml`` (a misspelt key, a
wrong type or an unknown choice is refused by Hydra when the configuration is composed),
converts a composed configuration into them once (:func:`typed`), and checks the rules
that span sections (:func:`check_train`, :func:`check_infer`), each failure one
:class:`ConfigError` naming the field and the fix. YAML files under ``conf/`` state only
what differs from these defaults; docs/configuration.md lists every key (generated from
these classes by ``docs/generate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ptycho.data.sources import DataOptions, DataSource
from ptycho.distribute import DistributeOptions, Strategy
from ptycho.errors import ConfigError
from ptycho.hardware import CompileOptions
from ptycho.inference import ReconstructOptions
from ptycho.model import ModelConfig
from ptycho.refine import RefineMode, RefineOptions
from ptycho.scoring import MetricsOptions
from ptycho.stages.fit import FitOptions
from ptycho.stages.write import OutputOptions
from ptycho.warp import LegacyBackendUnderXLAError, TranslateOptions, check_compilable

__all__ = [
    "RENAMED",
    "ConfigError",
    "InferConfig",
    "RunConfig",
    "TrainConfig",
    "check_batches",
    "check_infer",
    "check_train",
    "register_configs",
    "renamed_key_hint",
    "rollback_overrides",
    "typed",
]


@dataclass
class RunConfig:
    """The sections both applications have: the warp, the compile modes, the data, how
    the network reconstructs a scan, the metrics and the refinement."""

    translate: TranslateOptions = field(default_factory=TranslateOptions)
    compile: CompileOptions = field(default_factory=CompileOptions)
    data: DataOptions = field(default_factory=DataOptions)
    reconstruct: ReconstructOptions = field(default_factory=ReconstructOptions)
    metrics: MetricsOptions = field(default_factory=MetricsOptions)
    refine: RefineOptions = field(default_factory=RefineOptions)
    outputs: OutputOptions = field(default_factory=OutputOptions)
    distribute: DistributeOptions = field(default_factory=DistributeOptions)
    verbose: bool = False
    """Debug logs, TensorFlow's information messages and its native start-up notices."""
    resume: bool = False
    """Continue the run in ``hydra.run.dir`` from its ``checkpoints/``: training from its
    last epoch, an unfinished refinement from its last checkpoint."""


@dataclass
class TrainConfig(RunConfig):
    """``python train.py``: train the network, reconstruct the test scan, optionally refine."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: FitOptions = field(default_factory=FitOptions)


@dataclass
class InferConfig(RunConfig):
    """``python infer.py``: reconstruct a scan with a trained network and/or refinement."""

    checkpoint: str | None = None
    """A ``model.keras`` written by train.py (required unless ``refine`` is on)."""


# Keys of earlier versions and where they live now (docs/migrating.md).
RENAMED = {
    "infer_batch_size": "reconstruct.batch_size",
    "infer_groups": "reconstruct.groups",
    "align_phase": "reconstruct.align_phase",
    "n": "data.n",
}


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (``train_schema``, ``infer_schema``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="infer_schema", node=InferConfig)


def typed(cfg) -> RunConfig:
    """The composed configuration as its dataclasses (enums for choices), converted once."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)


def renamed_key_hint(overrides: list[str]) -> str | None:
    """The one-line fix for an override of a key that was renamed, if any."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in RENAMED:
            return f"{key} is now {RENAMED[key]}: pass {RENAMED[key]}=..."
    return None


def rollback_overrides(argv: list, environ: dict) -> list:
    """Overrides implied by the rollback switches when the command line is silent.

    ``USE_XLA_TRANSLATE=0`` selects ``translate=legacy`` and ``USE_XLA_COMPILE=0``
    selects ``compile=graph``, unless the arguments already choose them. Since the
    legacy warp cannot run under XLA, ``USE_XLA_TRANSLATE=0`` alone also selects
    ``compile=graph`` when the command line does not choose a compile mode.
    """
    extra = []
    chosen = {arg.lstrip("+~").split("=", 1)[0] for arg in argv if "=" in arg}
    compile_chosen = bool(chosen & {"compile", "compile.mode"})
    if environ.get("USE_XLA_TRANSLATE") == "0" and not chosen & {"translate", "translate.backend"}:
        extra.append("translate=legacy")
        if not compile_chosen:
            extra.append("compile=graph")
    graph_already = "compile=graph" in extra
    if environ.get("USE_XLA_COMPILE") == "0" and not compile_chosen and not graph_already:
        extra.append("compile=graph")
    return extra


# --------------------------------------------------------------------------------------
# Checks made before any work
# --------------------------------------------------------------------------------------


def _check_sections(config, names: tuple[str, ...]) -> None:
    """Each section's own ``check()``; its ValueError becomes a ConfigError naming the
    section (``refine.iterations=0: must be >= 1``)."""
    for name in names:
        try:
            getattr(config, name).check()
        except ValueError as error:
            raise ConfigError(f"{name}.{error}") from error


def _check_backend(config: RunConfig) -> None:
    """The warp's rules with the compile mode and the refinement, where they live
    (:func:`ptycho.warp.check_compilable`, :meth:`ptycho.refine.RefineOptions.check_backend`)."""
    backend = config.translate.backend
    try:
        check_compilable(backend, config.compile.mode)
        config.refine.check_backend(backend)
    except (LegacyBackendUnderXLAError, ValueError) as error:
        raise ConfigError(str(error)) from error


def check_train(config: TrainConfig) -> None:
    """Every check of a train configuration that needs no data and no TensorFlow (the
    batch against the samples and the devices: :func:`check_batches`, once the data are
    grouped)."""
    _check_sections(
        config, ("data", "model", "train", "reconstruct", "refine", "distribute", "outputs")
    )
    _check_backend(config)
    data, model = config.data, config.model
    if data.source == DataSource.simulate and None not in (data.n, model.n) and data.n != model.n:
        raise ConfigError(
            f"data.n={data.n} but model.n={model.n}: the network is built for the scans' "
            f"pattern size; set model.n={data.n} (data.n follows it)"
        )


def check_infer(config: InferConfig) -> None:
    """Every check of an infer configuration that needs no data and no TensorFlow."""
    _check_sections(config, ("data", "reconstruct", "refine", "distribute", "outputs"))
    _check_backend(config)
    if config.distribute.strategy == Strategy.mirrored:
        raise ConfigError(
            "distribute=mirrored: infer.py runs on one device (distribute=none) or across "
            "machines (distribute=multiworker), each worker reconstructing a share of the "
            "scan"
        )
    if not config.checkpoint and config.refine.mode == RefineMode.off:
        raise ConfigError(
            "checkpoint is required: infer.py checkpoint=outputs/<run>/model.keras, or "
            "refine=object for an iterative reconstruction without a network"
        )
    if config.checkpoint and not Path(config.checkpoint).is_file():
        raise ConfigError(f"checkpoint={config.checkpoint}: no such file")


def check_batches(config: TrainConfig, samples: int, replicas: int, jit_on_cpu: bool) -> None:
    """The rules between the batch, the training samples (groups) and the devices: a batch
    no larger than the samples, splitting evenly over the replicas, and no XLA over
    several CPU replicas (TensorFlow's XLA has no CPU collectives and places every
    compiled step on the first CPU device; GPUs are separate XLA devices)."""
    batch = config.train.batch_size
    if batch > samples:
        raise ConfigError(
            f"train.batch_size={batch} is larger than the {samples} training samples: "
            "lower train.batch_size or use more positions"
        )
    if batch % replicas:
        raise ConfigError(
            f"train.batch_size={batch} (the global batch) does not split evenly over "
            f"{replicas} replicas: use a multiple of {replicas}"
        )
    if jit_on_cpu and replicas > 1:
        raise ConfigError(
            f"distribute={config.distribute.strategy} over {replicas} CPU replicas cannot run "
            "compile=jit: TensorFlow's XLA has no CPU collectives and places every compiled "
            "step on the first CPU device (GPUs are separate XLA devices): use "
            "compile=graph or compile=auto"
        )

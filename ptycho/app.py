"""The two applications, each a script of named stages.

``train``: load data, build, fit, reconstruct, refine, write. ``infer``: load, reconstruct
(a trained network), refine, write. Each stage is a function with a typed result
(:class:`~ptycho.data.Scans`, a Keras model, :class:`~ptycho.stages.fit.Fitted`,
:class:`~ptycho.reconstruction.Reconstruction`); each takes its own section of the typed
configuration (:mod:`ptycho.config`) whole. Nothing here sees Hydra: the entry points
(:mod:`ptycho.cli`) compose and convert the configuration and pass it in. Configuration
problems raise :class:`~ptycho.errors.ConfigError` before any data are made or models
built; nothing is written before the inputs are accepted.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

import keras
import tensorflow as tf

from ptycho import __version__, checkpoints
from ptycho.config import (
    InferConfig,
    RunConfig,
    TrainConfig,
    check_batches,
    check_infer,
    check_train,
)
from ptycho.data import DataSource, Scan, Scans, load_scans, load_test_scan, save_scan
from ptycho.distribute import Distribution, make_distribution
from ptycho.errors import DataError
from ptycho.hardware import CompileStages, compile_hint, has_gpu, resolve_compile
from ptycho.inference import NetworkReconstruction, ScanMismatch, model_geometry
from ptycho.model import PATTERN_SIZES, ModelConfig
from ptycho.outputs import save_model
from ptycho.reconstruction import Reconstruction
from ptycho.refine import RefineMode, RefineResult, RefineState
from ptycho.scoring import Scorer
from ptycho.stages import fit, refine
from ptycho.stages.evaluate import NetworkEvaluation, log_evaluation, log_scalars
from ptycho.stages.write import headline, write_run

__all__ = ["infer", "train"]

log = logging.getLogger(__name__)


def train(config: TrainConfig, run_dir: Path, distribution: Distribution | None = None) -> dict:
    """Train on the configured data, reconstruct (and refine) the test scan, write the
    run's files into ``run_dir``; returns the metrics (also ``metrics.json``).

    ``distribution``: the process's (:func:`ptycho.distribute.make_distribution`, made
    at start-up by the entry point); None makes it from ``config.distribute``.
    """
    check_train(config)
    run_dir = Path(run_dir)
    resumed = checkpoints.resume(run_dir, config.resume)
    refinement = _unfinished_refinement(config, run_dir)
    distribution = distribution or make_distribution(config.distribute)
    stages = resolve_compile(config.compile.mode, config.translate.backend)
    keras.utils.set_random_seed(config.train.seed)
    started = time.perf_counter()

    scans = load_scans(config.data, config.model.n)
    _check_modes(config, scans.train)
    model_config = _model_config(config, scans, stages.train)
    groups = config.data.groups(scans.train, config.model.gridsize)
    jit_on_cpu = stages.train == "jit" and not has_gpu()
    check_batches(config, len(groups), distribution.replicas, jit_on_cpu)
    if config.data.source == DataSource.simulate and distribution.chief:
        _save_inputs(scans, run_dir)  # the inputs are accepted: keep what was simulated
    out_dir = distribution.output_dir(run_dir)  # the run folder on the chief
    with _writer(out_dir) as writer:
        _log_run(writer, config, model_config, run_dir.name)
        scans = _training_probe(config, scans, stages.refine, writer)
        scorer = Scorer(scans.test, config.metrics)
        evaluation = _evaluation(config, scorer, stages, writer, model_config.probe_trainable)
        model = fit.build(
            model_config,
            config.train,
            scans.train,
            backend=config.translate.backend,
            compile_mode=stages.train,
            steps_per_epoch=len(groups) // config.train.batch_size,
            distribution=distribution,
            resumed=resumed,
        )
        if hint := compile_hint(config.compile.mode):
            log.info(hint)
        fitted = fit.fit(
            model,
            scans.train,
            groups,
            config.train,
            writer=writer,
            # Evaluations on the chief only; the others wait at the next step's all-reduce.
            evaluate=evaluation if distribution.chief else None,
            distribution=distribution,
            resumed=resumed,
            run_dir=run_dir,
            out_dir=out_dir,
        )
        if not distribution.chief:  # the chief reconstructs and writes the run's files
            return _worker_done(distribution, fitted, out_dir, writer)
        reconstructed = time.perf_counter()
        network = evaluation(fitted.model, step=fitted.epochs, final=True)
        save_model(fitted.model, run_dir / "model.keras")  # before refining: kept if it fails
        refined = _refine(config, scorer, network, stages.refine, writer, run_dir, refinement)
        summary = {
            **_stage_metrics(network, refined),
            "seconds": time.perf_counter() - reconstructed,
            **_training_summary(fitted, config.train.batch_size),
            "wall_seconds": time.perf_counter() - started,
            "reconstruction_patterns_per_s": network.patterns_per_s,
            "precision": model_config.precision,
            "distribute": config.distribute.strategy,
            "replicas": distribution.replicas,
            **_run_summary(config, stages),
        }
        log_scalars(writer, "final", _speed(summary), fitted.epochs)
        final = refined or network
        write_run(run_dir, final, scorer, _label(config, final), summary, config.outputs)
        checkpoints.clear_refinement(run_dir)
    log.info("%s", headline(final, _label(config, final)))
    log.info("wrote %s (%.0f s)", run_dir, summary["wall_seconds"])
    return summary


def infer(config: InferConfig, run_dir: Path, distribution: Distribution | None = None) -> dict:
    """Reconstruct a scan with a trained model and/or the physics refinement; write the
    reconstruction and metrics into ``run_dir``.

    ``distribution``: the process's (made at start-up by the entry point; None: from
    ``config.distribute``). With several workers each reconstructs and refines its share
    of the scan (:func:`ptycho.inference.reconstruct`, :class:`ptycho.refine.Refiner`)
    and the chief writes the run."""
    check_infer(config)
    distribution = distribution or make_distribution(config.distribute)
    run_dir = Path(run_dir)
    refinement = _unfinished_refinement(config, run_dir)
    if config.resume and refinement is None:
        log.warning("resume=true but %s holds no unfinished refinement: starting afresh", run_dir)
    stages = resolve_compile(config.compile.mode, config.translate.backend)
    backend = config.translate.backend
    model = checkpoints.load_trained(config.checkpoint, backend) if config.checkpoint else None
    scan = load_test_scan(config.data, model_geometry(model)[0] if model else None)
    _check_modes(config, scan)
    started = time.perf_counter()
    scorer = Scorer(scan, config.metrics)
    network = None
    if model is not None:
        try:
            network = _evaluation(config, scorer, stages, distribution=distribution)(model)
        except ScanMismatch as error:
            raise DataError(f"{config.data.path or 'data'}: {error}") from error
    if not distribution.chief:  # the chief writes the run
        refined = _refine(
            config, scorer, network, stages.refine, None, None, refinement, distribution
        )
        log.info("worker %d: reconstruction done", distribution.worker)
        return {"worker": distribution.worker, **_stage_metrics(network, refined)}
    with _writer(run_dir) as writer:  # the inputs are accepted
        refined = _refine(
            config, scorer, network, stages.refine, writer, run_dir, refinement, distribution
        )
        summary = {
            **_stage_metrics(network, refined),
            "patterns": scan.n_positions,
            "seconds": time.perf_counter() - started,
            "checkpoint": config.checkpoint,
            "workers": distribution.workers,
            **_run_summary(config, stages),
        }
        if network is not None:
            summary.update(
                patterns_per_s=network.patterns_per_s,
                traces=network.traces,
                groups=network.groups,
                infer_groups=config.reconstruct.groups,
            )
            log_evaluation(writer, network, scorer, step=0, final=True)
        final = refined or network
        write_run(run_dir, final, scorer, _label(config, final), summary, config.outputs)
        checkpoints.clear_refinement(run_dir)
    log.info(
        "reconstructed %d patterns in %.1f s; %s",
        scan.n_positions,
        summary["seconds"],
        headline(final, _label(config, final)),
    )
    return summary


# --------------------------------------------------------------------------------------
# Pieces of the stages above
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _writer(folder: Path):
    """The run's one TensorBoard writer (``<folder>/tb``), closed on leaving."""
    writer = tf.summary.create_file_writer(str(Path(folder) / "tb"))
    try:
        yield writer
    finally:
        writer.close()


def _evaluation(
    config: RunConfig,
    scorer: Scorer,
    stages: CompileStages,
    writer=None,
    log_probe: bool = False,
    distribution: Distribution | None = None,
) -> NetworkEvaluation:
    """How a run judges a network on its scan (``scorer.scan``); evaluations given a step
    are logged to ``writer``."""
    return NetworkEvaluation(
        scorer.scan,
        config.reconstruct,
        scorer,
        compile_mode=stages.reconstruct,
        backend=config.translate.backend,
        grouping=config.data.grouping,
        group_step=config.data.group_step,
        writer=writer,
        log_probe=log_probe,
        distribution=distribution,
    )


def _save_inputs(scans: Scans, run_dir: Path) -> None:
    save_scan(scans.train, run_dir / "train_scan.npz")
    if scans.separate_test:
        save_scan(scans.test, run_dir / "test_scan.npz")


def _check_modes(config: RunConfig, scan: Scan) -> None:
    """The probe modes asked for against the data's probe (:class:`DataError`, one line,
    before anything is written): the network's (training) and the refinement's."""
    try:
        if isinstance(config, TrainConfig) and config.train.probe != fit.ProbeSource.refine:
            config.model.check_modes(scan.probe_modes)
        if config.refine.mode != RefineMode.off:
            config.refine.check_modes(scan.probe_modes)
    except ValueError as error:
        source = config.data.path or config.data.probe_path or "data"
        raise DataError(f"{source}: {error}") from error


def _model_config(config: TrainConfig, scans: Scans, compile_mode: str) -> ModelConfig:
    """The model section with its precision resolved and N the data's when unset."""
    n = scans.train.n
    if config.model.n is None and n not in PATTERN_SIZES:
        fits = [size for size in PATTERN_SIZES if size <= n]
        hint = f"data.crop={fits[-1]}" if fits else "frames of at least 64 pixels"
        raise DataError(
            f"data.path: the patterns are {n} x {n}; the network takes N = 64, 128 or 256: "
            f"cut or bin them ({hint}, or model.n)"
        )
    return config.model.resolved(compile_mode, n)


def _training_probe(config: TrainConfig, scans: Scans, compile_mode: str, writer) -> Scans:
    """The scans with the network's probe: as given, or refined first
    (``train.probe=refine``; the test scan takes it too when it is the training scan)."""
    if config.train.probe != fit.ProbeSource.refine:
        return scans
    train, _ = refine.refined_probe(
        scans.train,
        config.train.probe_iterations,
        modes=config.model.probe_modes,
        backend=config.translate.backend,
        compile_mode=compile_mode,
        writer=writer,
    )
    return Scans(train, scans.test if scans.separate_test else train)


def _log_run(writer, config: TrainConfig, model: ModelConfig, run_name: str) -> None:
    """The configuration as text and the HParams summary (sweeps compare in one table)."""
    from omegaconf import OmegaConf
    from tensorboard.plugins.hparams import api as hp

    data = config.data
    hparams = {
        "distribute": str(config.distribute.strategy),
        "translate": str(config.translate.backend),
        "compile": str(config.compile.mode),
        "n": model.n,
        "gridsize": model.gridsize,
        "filters": model.filters,
        "learning_rate": config.train.learning_rate,
        "batch_size": config.train.batch_size,
        "epochs": config.train.epochs,
        "data": str(data.object_kind) if data.source == DataSource.simulate else "file",
        "seed": config.train.seed,
    }
    with writer.as_default(step=0):
        text = OmegaConf.to_yaml(OmegaConf.structured(config))
        tf.summary.text("config", "```\n" + text + "\n```")
        hp.hparams(hparams, trial_id=run_name)


def _worker_done(distribution: Distribution, fitted: fit.Fitted, out_dir: Path, writer) -> dict:
    """A worker's end: its temporary folder (TensorBoard, checkpoints) removed."""
    writer.close()
    shutil.rmtree(out_dir, ignore_errors=True)
    log.info("worker %d: training done (%d epochs)", distribution.worker, fitted.epochs)
    return {"epochs": fitted.epochs, "worker": distribution.worker}


def _unfinished_refinement(config: RunConfig, run_dir: Path) -> RefineState | None:
    """The refinement ``resume=true`` continues (:func:`ptycho.checkpoints.refinement`:
    refused without it, or with other refine settings), read before anything is done."""
    if config.refine.mode == RefineMode.off:
        return None
    return checkpoints.refinement(run_dir, config.resume, config.refine)


def _refine(
    config: RunConfig,
    scorer: Scorer,
    network: NetworkReconstruction | None,
    compile_mode: str,
    writer,
    run_dir: Path | None,
    resume: RefineState | None = None,
    distribution: Distribution | None = None,
) -> RefineResult | None:
    """The refinement stage; ``run_dir``: the chief's run folder (the curves and the
    refinement's checkpoints go there), None on the other workers."""
    if config.refine.mode == RefineMode.off:
        return None
    return refine.run(
        scorer,
        config.refine,
        start=network,
        backend=config.translate.backend,
        compile_mode=compile_mode,
        writer=writer,
        curves=None if run_dir is None else run_dir / "refine.png",
        distribution=distribution,
        resume=resume,
        checkpoint_dir=run_dir,
    )


def _stage_metrics(network: Reconstruction | None, refined: RefineResult | None) -> dict:
    """The network's figures under their own names and the refinement's as ``refined_*``
    beside them; without a network the plain names are the refinement's (the only
    stage)."""
    out = dict(network.metrics) if network is not None else {}
    if refined is not None:
        if network is None:
            out.update(refined.metrics)
        out.update({f"refined_{key}": value for key, value in refined.metrics.items()})
        out.update(refine_iterations=refined.iterations, refine_seconds=refined.seconds)
    return out


def _training_summary(fitted: fit.Fitted, batch_size: int) -> dict:
    return {
        "epochs": fitted.epochs,
        "steps": fitted.steps,
        "final_loss": fitted.final_loss,
        "samples_per_s": fitted.samples_per_s,
        "steps_per_s": fitted.samples_per_s / batch_size,
        "fit_seconds": fitted.seconds,
    }


def _speed(summary: dict) -> dict:
    return {key: summary[key] for key in ("samples_per_s", "steps_per_s")}


def _run_summary(config: RunConfig, stages: CompileStages) -> dict:
    return {
        "translate": config.translate.backend,
        "compile": config.compile.mode,
        "compile_stages": stages.as_dict(),
        "ptycho_version": __version__,
    }


def _label(config: RunConfig, result: Reconstruction) -> str:
    return f"translate={config.translate.backend} compile={config.compile.mode} {result.stage}"

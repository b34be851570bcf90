"""The Hydra glue: a composed configuration in, plain library calls out.

``train.py`` and ``infer.py`` pass the composed config and their run directory here;
nothing else in the package sees Hydra. Configuration problems raise
:class:`ptycho.config.ConfigError` before any data are made or models built.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from enum import Enum
from pathlib import Path

import keras
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ptycho import __version__
from ptycho.callbacks import CHECKPOINT, STATE, TrainingMonitor, stop_on_interrupt
from ptycho.config import check_infer, check_train, refine_options
from ptycho.data import (
    Scan,
    group_positions,
    load_scan,
    make_dataset,
    normalisation_factor,
    save_scan,
    simulate,
)
from ptycho.distribute import dataset_options, make_distribution, prepare_fit
from ptycho.errors import ConfigError, DataError, Interrupted, TrainingDiverged
from ptycho.hardware import compile_hint, has_gpu, resolve_compile, resolve_precision
from ptycho.inference import Evaluation, ScanMismatch
from ptycho.layers import set_translate_backend
from ptycho.model import ModelConfig, build_model, compile_model, load_model
from ptycho.outputs import save_model, save_reconstruction, write_json

__all__ = ["infer", "train"]

log = logging.getLogger(__name__)


def _value(choice):
    return choice.value if isinstance(choice, Enum) else choice


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def simulate_scan(data: DictConfig, n: int, *, test: bool) -> Scan:
    """One simulated scan from the data section; the test scan is a different object,
    unless ``data.test_seed`` is null (then it is the training scan itself)."""
    test = test and data.test_seed is not None
    scan = simulate(
        n=n,
        n_positions=data.test_positions if test else data.n_positions,
        object_kind=_value(data.object_kind),
        amplitude_range=tuple(data.amplitude_range),
        phase_range=tuple(data.phase_range),
        images=tuple(data.test_images if test else data.images),
        correlation_length=data.correlation_length,
        line_blur=tuple(data.line_blur),
        line_blur_weights=None if data.line_blur_weights is None else tuple(data.line_blur_weights),
        probe=_value(data.probe),
        probe_radius=data.probe_radius,
        fresnel_number=data.fresnel_number,
        scan=_value(data.scan),
        step=data.step,
        jitter=data.jitter,
        nphotons=data.nphotons,
        seed=data.test_seed if test else data.seed,
    )
    return _with_position_errors(scan, data.position_error)


def _with_position_errors(scan: Scan, rms: float) -> Scan:
    """The scan with random errors of ``rms`` pixels (both axes together) in its stored
    positions, as an instrument's encoders make; the true positions are kept in
    ``metadata["true_positions"]`` for the metrics."""
    if not rms:
        return scan
    rng = np.random.default_rng([scan.seed or 0, 7])
    error = rng.normal(0.0, rms / math.sqrt(2.0), (scan.n_positions, 2))
    height, width = scan.object.shape
    return scan.replace(
        xcoords=np.clip(scan.xcoords + error[:, 0], 0, width - 1),
        ycoords=np.clip(scan.ycoords + error[:, 1], 0, height - 1),
        metadata={**scan.metadata, "true_positions": scan.positions},
    )


def _load(path: str, probe_path: str | None) -> Scan:
    probe = None
    if probe_path:
        probe = load_scan(probe_path).probe
    return load_scan(path, probe=probe)


def load_data(data: DictConfig, n: int) -> tuple[Scan, Scan]:
    """(train scan, test scan) from the data section; files must match N."""
    if _value(data.source) == "simulate":
        train_scan = simulate_scan(data, n, test=False)
        if data.test_seed is None:  # reconstruct the scan the network is trained on
            return train_scan, train_scan
        return train_scan, simulate_scan(data, n, test=True)
    train_scan = _load(data.path, data.probe_path)
    test_scan = _load(data.test_path, data.probe_path) if data.test_path else train_scan
    for name, scan in (("data.path", train_scan), ("data.test_path", test_scan)):
        if scan.n != n:
            raise DataError(
                f"{name}: patterns are {scan.n} x {scan.n} but model.n={n}; pass model.n={scan.n}"
            )
    return train_scan, test_scan


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _schedule(train: DictConfig, total_steps: int):
    kind = _value(train.schedule)
    if kind == "constant":
        return train.learning_rate
    ratio = train.final_learning_rate / train.learning_rate
    if kind == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            train.learning_rate, decay_steps=total_steps, alpha=ratio
        )
    return keras.optimizers.schedules.ExponentialDecay(
        train.learning_rate, decay_steps=total_steps, decay_rate=ratio
    )


def _model_config(model: DictConfig, compile_mode: str) -> ModelConfig:
    """The model section with ``precision=auto`` resolved for this machine and mode."""
    fields = OmegaConf.to_container(model)
    fields["precision"] = resolve_precision(fields["precision"], compile_mode)
    return ModelConfig(**fields)


def _groups(data: DictConfig, scan: Scan, gridsize: int):
    """The training samples: (G, C) groups of the scan's positions (``data.grouping``)."""
    method = _value(data.grouping)
    try:
        groups = group_positions(
            scan.xcoords,
            scan.ycoords,
            gridsize,
            method=method,
            n_groups=data.n_groups,
            seed=data.seed,
        )
    except ValueError as error:
        raise DataError(f"data.grouping={method}: {error}") from error
    log.info("data.grouping=%s: %d groups of %d positions", method, len(groups), gridsize**2)
    return groups


def compile_modes(cfg: DictConfig) -> dict:
    """The compile mode of each stage (``train``, ``reconstruct``, ``refine``): the
    configured one, or with ``compile=auto`` the fastest measured for this device
    (:func:`ptycho.hardware.resolve_compile`), logged."""
    mode, backend = _value(cfg.compile.mode), _value(cfg.translate.backend)
    modes = resolve_compile(mode, backend)
    if mode == "auto":
        where = "a GPU" if has_gpu() else "a CPU"
        chosen = ", ".join(f"{stage} {choice}" for stage, choice in modes.items())
        log.info("compile=auto on %s: %s", where, chosen)
    return modes


def _evaluation(cfg: DictConfig, scan: Scan, compile_mode: str) -> Evaluation:
    """How the run judges a model on ``scan`` (its test scan, or the scan to infer)."""
    return Evaluation(
        scan,
        batch_size=cfg.infer_batch_size,
        groups=_value(cfg.infer_groups),
        compile_mode=compile_mode,
        backend=_value(cfg.translate.backend),
        grouping=_value(cfg.data.grouping),
        align_phase=cfg.align_phase,
        register=cfg.metrics.register,
        remove_phase_ramp=cfg.metrics.remove_phase_ramp,
    )


def _hparams(cfg: DictConfig) -> dict:
    return {
        "distribute": _value(cfg.distribute.strategy),
        "translate": _value(cfg.translate.backend),
        "compile": _value(cfg.compile.mode),
        "n": cfg.model.n,
        "gridsize": cfg.model.gridsize,
        "filters": cfg.model.filters,
        "learning_rate": cfg.train.learning_rate,
        "batch_size": cfg.train.batch_size,
        "epochs": cfg.train.epochs,
        "data": _value(cfg.data.object_kind) if _value(cfg.data.source) == "simulate" else "file",
        "seed": cfg.train.seed,
    }


def _write_run_summaries(writer, cfg: DictConfig, run_name: str) -> None:
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    with writer.as_default(step=0):
        tf.summary.text("config", "```\n" + OmegaConf.to_yaml(cfg) + "\n```")
        hp.hparams(_hparams(cfg), trial_id=run_name)


def _resume_state(run_dir: Path, resume: bool) -> dict | None:
    checkpoint = run_dir / "checkpoints" / CHECKPOINT
    state_file = run_dir / "checkpoints" / STATE
    if not resume:
        if checkpoint.exists():
            raise ConfigError(
                f"{run_dir} already holds a training checkpoint: pass resume=true to continue "
                "it, or choose a new hydra.run.dir"
            )
        return None
    if not (checkpoint.exists() and state_file.exists()):
        log.warning("resume=true but %s has no checkpoint yet: starting from scratch", run_dir)
        return None
    import json

    return json.loads(state_file.read_text())


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train on the configured data, evaluate on the test scan, write the run's files.

    Returns the final metrics (also in ``metrics.json``).
    """
    check_train(cfg)
    run_dir = Path(run_dir)
    state = _resume_state(run_dir, cfg.resume)
    backend = _value(cfg.translate.backend)
    modes = compile_modes(cfg)
    mode = modes["train"]
    distribution = make_distribution(_value(cfg.distribute.strategy), cfg.distribute.cpu_devices)
    keras.utils.set_random_seed(cfg.train.seed)
    started = time.perf_counter()

    train_scan, test_scan = load_data(cfg.data, cfg.model.n)
    model_config = _model_config(cfg.model, mode)
    groups = _groups(cfg.data, train_scan, model_config.gridsize)
    batch = cfg.train.batch_size
    if batch > len(groups):
        raise ConfigError(
            f"train.batch_size={batch} is larger than the {len(groups)} training samples: "
            "lower train.batch_size or use more positions"
        )
    if batch % distribution.replicas:
        raise ConfigError(
            f"train.batch_size={batch} (the global batch) does not split evenly over "
            f"{distribution.replicas} replicas: use a multiple of {distribution.replicas}"
        )
    if mode == "jit" and distribution.replicas > 1 and not has_gpu():
        raise ConfigError(
            f"distribute={distribution.kind} over {distribution.replicas} CPU replicas cannot "
            "run compile=jit: TensorFlow's XLA has no CPU collectives and places every "
            "compiled step on the first CPU device (GPUs are separate XLA devices): use "
            "compile=graph or compile=auto"
        )
    out_dir = distribution.output_dir(run_dir)  # the run folder on the chief
    if _value(cfg.data.source) == "simulate" and distribution.chief:  # inputs accepted
        save_scan(train_scan, run_dir / "train_scan.npz")
        if test_scan is not train_scan:
            save_scan(test_scan, run_dir / "test_scan.npz")
    steps = len(groups) // batch
    epochs = cfg.train.epochs

    with distribution.strategy.scope():
        model, saved_optimizer, initial_epoch = _training_model(
            model_config, train_scan, state, run_dir, backend, epochs
        )
        compile_model(
            model,
            mode,
            learning_rate=_schedule(cfg.train, epochs * steps),
            poisson_weight=cfg.train.poisson_weight,
            mae_weight=cfg.train.mae_weight,
            optimizer_state=saved_optimizer,
        )
    factor = float(model.get_layer("normalise").factor)

    dataset = make_dataset(
        train_scan,
        groups,
        norm_factor=factor,
        batch_size=batch,
        shuffle=True,
        seed=cfg.train.seed,
        drop_remainder=True,
        epochs=None,
        start_epoch=initial_epoch,
    ).with_options(dataset_options())
    evaluation = _evaluation(cfg, test_scan, modes["reconstruct"])
    monitor = TrainingMonitor(
        run_dir=out_dir,
        evaluation=evaluation,
        epochs=epochs,
        samples_per_epoch=steps * batch,
        # Evaluations on the chief only; the others wait at the next step's all-reduce.
        eval_every=cfg.train.eval_every if distribution.chief else 0,
        log_every_steps=cfg.train.log_every_steps,
        max_minutes=cfg.train.max_minutes,
        eval_minutes=tuple(cfg.train.eval_minutes) if distribution.chief else (),
        log_probe=cfg.model.probe_trainable,
        agree=distribution.agree,
    )
    if state is not None:
        monitor.history = list(state.get("history", []))
    _write_run_summaries(monitor.writer, cfg, run_dir.name)
    log.info(
        "training %s: %d samples of %d x %d x %d, %d steps/epoch, translate=%s compile=%s "
        "precision=%s; %s",
        train_scan.source,
        len(groups),
        model_config.n,
        model_config.n,
        model_config.channels,
        steps,
        backend,
        mode,
        model_config.precision,
        distribution.describe(),
    )
    if hint := compile_hint(_value(cfg.compile.mode)):
        log.info(hint)
    prepare_fit(model, dataset, distribution)
    fit_start = time.perf_counter()
    if initial_epoch < epochs:
        with stop_on_interrupt(monitor):
            model.fit(
                dataset,
                epochs=epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps,
                callbacks=[monitor],
                verbose=0,
                shuffle=False,  # the dataset shuffles itself, by (seed, epoch)
            )
    epochs_done = monitor.history[-1]["epoch"] if monitor.history else initial_epoch
    if monitor.stop_requested and monitor.nan_at is None:
        where = (
            f"during epoch {epochs_done + 1}" if monitor.cut_short else f"after epoch {epochs_done}"
        )
        saved = (
            f"the checkpoint of epoch {epochs_done} is in {run_dir / 'checkpoints'}"
            if epochs_done
            else "no epoch had completed"
        )
        raise Interrupted(
            f"stopped {where}; {saved}. Continue with the same command "
            f"plus hydra.run.dir={run_dir} resume=true"
        )
    fit_seconds = time.perf_counter() - fit_start
    if monitor.nan_at is not None:
        epoch, step = monitor.nan_at
        raise TrainingDiverged(
            f"the loss became NaN at epoch {epoch}, step {step}; the last good checkpoint "
            f"({run_dir / 'checkpoints' / CHECKPOINT}) is intact. Lower train.learning_rate "
            "and rerun with resume=true"
        )
    if not distribution.chief:  # the chief reconstructs and writes the run's files
        monitor.writer.close()
        shutil.rmtree(out_dir, ignore_errors=True)
        log.info("worker %d: training done (%d epochs)", distribution.worker, epochs_done)
        return {"epochs": epochs_done, "worker": distribution.worker}

    reconstructed = time.perf_counter()
    result, values = network = evaluation(model)
    _log_final(monitor, values, epochs_done)
    save_model(model, run_dir / "model.keras")  # before refining: kept if that fails
    refined = _refine_stage(cfg, test_scan, network, run_dir, modes["refine"])
    trained = [h for h in monitor.history if h["epoch"] > initial_epoch]
    samples_per_s = float(np.median([h["samples_per_s"] for h in trained])) if trained else math.nan
    summary = {
        **_stage_metrics(network, refined),
        "seconds": time.perf_counter() - reconstructed,
        "epochs": epochs_done,
        "steps": int(model.optimizer.iterations.numpy()),
        "final_loss": monitor.history[-1]["loss"] if monitor.history else math.nan,
        "samples_per_s": samples_per_s,
        "steps_per_s": samples_per_s / batch,
        "fit_seconds": fit_seconds,
        "wall_seconds": time.perf_counter() - started,
        "reconstruction_patterns_per_s": result.patterns_per_s,
        "translate": backend,
        "compile": _value(cfg.compile.mode),
        "compile_stages": modes,
        "precision": model_config.precision,
        "distribute": _value(cfg.distribute.strategy),
        "replicas": distribution.replicas,
        "ptycho_version": __version__,
    }
    _log_speed(monitor, summary, epochs_done)
    title = _write_reconstruction(cfg, run_dir, test_scan, network, refined)
    write_json(summary, run_dir / "metrics.json")
    log.info("%s", title)
    log.info("wrote %s (%.0f s)", run_dir, summary["wall_seconds"])
    return summary


def _training_model(
    config: ModelConfig, scan: Scan, state, run_dir: Path, backend: str, epochs: int
):
    """``(model, optimizer of the checkpoint or None, first epoch)``: a new model, or
    the checkpoint's when resuming (call inside the strategy's scope)."""
    if state is None:
        factor = normalisation_factor(scan.diffraction)
        model, _ = build_model(
            config, probe=scan.probe, norm_factor=factor, translate_backend=backend
        )
        return model, None, 0
    model = keras.saving.load_model(run_dir / "checkpoints" / CHECKPOINT, safe_mode=True)
    set_translate_backend(model, backend)
    # The optimizer state (Adam moments, step count) comes from the checkpoint; the
    # learning rate follows the configuration, so a diverged run can resume lower.
    log.info("resuming from epoch %d of %d", int(state["epoch"]), epochs)
    return model, model.optimizer, int(state["epoch"])


def _log_final(monitor: TrainingMonitor, values: dict, epoch: int) -> None:
    import tensorflow as tf

    with monitor.writer.as_default(step=epoch):
        for key, value in values.items():
            if math.isfinite(value):
                tf.summary.scalar(f"test/{key}", value)
                tf.summary.scalar(f"final/{key}", value)
    monitor.writer.flush()


def _log_speed(monitor: TrainingMonitor, summary: dict, epoch: int) -> None:
    import tensorflow as tf

    with monitor.writer.as_default(step=epoch):
        for key in ("samples_per_s", "steps_per_s"):
            if math.isfinite(summary[key]):
                tf.summary.scalar(f"final/{key}", summary[key])
    monitor.writer.flush()


def _title(values: dict, backend: str, mode: str) -> str:
    parts = [f"translate={backend} compile={mode}", f"R-factor {values['r_factor']:.4f}"]
    for key in ("amp_ssim", "phase_ssim", "amp_psnr", "phase_psnr"):
        if key in values:
            parts.append(f"{key} {values[key]:.3f}")
    return "  ".join(parts)


# --------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------


def infer(cfg: DictConfig, run_dir: Path) -> dict:
    """Reconstruct a scan with a trained model and/or the physics refinement; write the
    reconstruction and metrics."""
    check_infer(cfg)
    run_dir = Path(run_dir)
    backend, mode = _value(cfg.translate.backend), _value(cfg.compile.mode)
    modes = compile_modes(cfg)
    model = _load_checkpoint(cfg.checkpoint, backend) if cfg.checkpoint else None
    if _value(cfg.data.source) == "simulate":
        n = int(model.get_layer("diffraction").output.shape[1]) if model else cfg.n
        scan = simulate_scan(cfg.data, n, test=True)
    else:
        scan = _load(cfg.data.path, cfg.data.probe_path)
    started = time.perf_counter()
    network = None
    if model is not None:
        try:
            network = _evaluation(cfg, scan, modes["reconstruct"])(model)
        except ScanMismatch as error:
            raise DataError(f"{cfg.data.path or 'data'}: {error}") from error
    refined = _refine_stage(cfg, scan, network, run_dir, modes["refine"])
    summary = {
        **_stage_metrics(network, refined),
        "patterns": scan.n_positions,
        "seconds": time.perf_counter() - started,
        "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None,
        "translate": backend,
        "compile": mode,
        "compile_stages": modes,
    }
    if network is not None:
        summary.update(
            patterns_per_s=network[0].patterns_per_s,
            traces=network[0].traces,
            groups=network[0].groups,
            infer_groups=_value(cfg.infer_groups),
        )
    title = _write_reconstruction(cfg, run_dir, scan, network, refined)
    write_json(summary, run_dir / "metrics.json")
    log.info("reconstructed %d patterns in %.1f s; %s", scan.n_positions, summary["seconds"], title)
    return summary


def _load_checkpoint(path: str, backend: str) -> keras.Model:
    try:
        return load_model(path, translate_backend=backend)
    except Exception as error:  # noqa: BLE001 - any load failure is a bad checkpoint
        log.debug("checkpoint=%s: %s: %s", path, type(error).__name__, error)
        raise DataError(f"checkpoint={path}: {_load_failure(error)}") from error


def _load_failure(error: Exception) -> str:
    """What is wrong with a checkpoint Keras refused, in a few words and the fix (the
    library's own message, often several sentences, goes to the debug log)."""
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


# --------------------------------------------------------------------------------------
# Physics refinement (ptycho/refine.py) after the network, or alone
# --------------------------------------------------------------------------------------


def _refine_stage(cfg: DictConfig, scan: Scan, network, run_dir: Path, compile_mode: str):
    """``(RefineResult, metrics)`` of ``refine=...`` started from the network's
    reconstruction (or flat without one); None with ``refine=off``. Progress goes to
    the terminal, TensorBoard (``refine/*`` in ``tb/``) and ``refine.png``."""
    options = refine_options(cfg.refine)
    if options.mode == "off":
        return None
    import tensorflow as tf

    from ptycho.refine import refine

    start = "the network's reconstruction" if network else "a flat object"
    log.info("refine=%s from %s: %d iterations at most", options.mode, start, options.iterations)
    writer = tf.summary.create_file_writer(str(run_dir / "tb"))
    try:
        return refine(
            scan,
            options,
            initial=network[0].obj if network else None,
            backend=_value(cfg.translate.backend),
            compile_mode=compile_mode,
            register=cfg.metrics.register,
            remove_phase_ramp=cfg.metrics.remove_phase_ramp,
            writer=writer,
            curves_path=run_dir / "refine.png",
        )
    except FloatingPointError as error:
        raise TrainingDiverged(str(error)) from error
    finally:
        writer.close()


def _stage_metrics(network, refined) -> dict:
    """The network's figures under their own names and the refinement's as
    ``refined_*`` beside them; without a network the plain names are the refinement's
    (the only stage)."""
    out = dict(network[1]) if network else {}
    if refined is not None:
        result, values = refined
        if network is None:
            out.update(values)
        out.update({f"refined_{key}": value for key, value in values.items()})
        out.update(refine_iterations=result.iterations, refine_seconds=result.seconds)
    return out


def _write_reconstruction(cfg: DictConfig, run_dir: Path, scan: Scan, network, refined) -> str:
    """``reconstruction.npz``, ``reconstruction.png`` (and ``frc.png`` with ground truth)
    of the last stage; returns the log line naming it."""
    from ptycho import figures
    from ptycho.stitch import illumination

    backend, mode = _value(cfg.translate.backend), _value(cfg.compile.mode)
    if refined is not None:
        result, values = refined
        positions = {"xcoords": result.xcoords, "ycoords": result.ycoords, "probe": result.probe}
        label = f"translate={backend} compile={mode} refine={result.mode}"
    else:
        result, values = network
        positions = {"xcoords": scan.xcoords, "ycoords": scan.ycoords}
        label = f"translate={backend} compile={mode} network"
    save_reconstruction(result.obj, result.mask, run_dir / "reconstruction.npz", **positions)
    comparison = coverage = None
    if scan.object is not None:
        comparison = figures.compare_scan(
            scan,
            result.obj,
            register=cfg.metrics.register,
            remove_phase_ramp=cfg.metrics.remove_phase_ramp,
        )
        figures.save_frc_png(comparison, run_dir / "frc.png", title=label)
    else:
        xcoords, ycoords = positions["xcoords"], positions["ycoords"]
        coverage = illumination(xcoords, ycoords, scan.probe, result.obj.shape)
    figures.save_reconstruction_png(
        result.obj,
        result.mask,
        run_dir / "reconstruction.png",
        title=label,
        values=values,
        comparison=comparison,
        coverage=coverage,
    )
    return _title(values, backend, mode) + ("" if refined is None else f"  refine={result.mode}")

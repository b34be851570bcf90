"""Training the network as a stage: its options (the ``train`` section), building the
model (new, or the checkpoint's when resuming), and fitting it with the monitor.

The model and its optimizer are built inside the distribution's scope; Keras's ``fit``
runs the epochs with :class:`ptycho.monitor.TrainingMonitor` between them. A stop
requested with Ctrl-C raises :class:`Interrupted`, a NaN loss :class:`TrainingDiverged`,
each saying what was kept and how to continue.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import keras
import numpy as np

from ptycho import checkpoints
from ptycho.checkpoints import Resumed
from ptycho.data import Scan, make_dataset, normalisation_factor
from ptycho.distribute import Distribution, dataset_options, fitting
from ptycho.errors import Interrupted, TrainingDiverged, choice, require
from ptycho.model import ModelConfig, build_model, compile_model
from ptycho.monitor import TrainingMonitor, stop_on_interrupt

__all__ = ["FitOptions", "Fitted", "ProbeSource", "Schedule", "build", "fit"]

log = logging.getLogger(__name__)


class Schedule(StrEnum):
    constant = "constant"
    cosine = "cosine"
    exponential = "exponential"


class ProbeSource(StrEnum):
    data = "data"
    refine = "refine"


@dataclass
class FitOptions:
    """The ``train`` section: optimisation, evaluations during training, when to stop."""

    epochs: int = 200
    """Epochs (passes over every training group)."""
    batch_size: int = 16
    """Groups per step (the global batch under ``distribute``)."""
    learning_rate: float = 1e-3
    """Adam's learning rate (the start of a schedule)."""
    schedule: Schedule = Schedule.constant
    """``constant``, ``cosine`` or ``exponential`` decay over every step of the run."""
    final_learning_rate: float = 1e-4
    """The end of the cosine / exponential schedule."""
    poisson_weight: float = 0.0
    """Weight of the Poisson NLL on intensities."""
    mae_weight: float = 1.0
    """Weight of the MAE on amplitudes (PtychoPINN's grid-lines setting)."""
    seed: int = 0
    """Initialisation and batch order (epoch e's order depends only on (seed, e))."""
    eval_every: int = 10
    """Epochs between test-scan evaluations (0: only the final one)."""
    log_every_steps: int = 10
    """Steps between per-step loss points in TensorBoard."""
    max_minutes: float | None = 9.0
    """Stop after the epoch that crosses this wall time (null: never)."""
    eval_minutes: list[float] = field(default_factory=list)
    """Also evaluate after the epochs that cross these wall times (minutes)."""
    probe: ProbeSource = ProbeSource.data
    """The network's probe: ``data`` (the scan's, or ``data.probe_path``'s) or ``refine``
    (found first by ``refine=full`` on the training scan from that one: for measured
    data, whose probe guess is rarely good enough for the network)."""
    probe_iterations: int = 30
    """Iterations of that refinement (``probe=refine``)."""

    def check(self) -> None:
        """``ValueError`` naming the first field out of range."""
        require(
            [
                (self.epochs >= 1, f"epochs={self.epochs}: must be >= 1"),
                (self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1"),
                (self.learning_rate > 0, f"learning_rate={self.learning_rate}: must be > 0"),
                (
                    self.final_learning_rate > 0,
                    f"final_learning_rate={self.final_learning_rate}: must be > 0",
                ),
                (
                    self.poisson_weight >= 0
                    and self.mae_weight >= 0
                    and self.poisson_weight + self.mae_weight > 0,
                    "poisson_weight and mae_weight: must be >= 0, not both 0",
                ),
                (self.eval_every >= 0, f"eval_every={self.eval_every}: must be >= 0"),
                choice("probe", self.probe, ProbeSource),
                (
                    self.probe_iterations >= 1,
                    f"probe_iterations={self.probe_iterations}: must be >= 1",
                ),
                (
                    self.max_minutes is None or self.max_minutes > 0,
                    f"max_minutes={self.max_minutes}: must be > 0 or null",
                ),
            ]
        )

    def learning_rate_schedule(self, total_steps: int):
        """The learning rate: a number, or a Keras schedule over ``total_steps``."""
        if self.schedule == Schedule.constant:
            return self.learning_rate
        ratio = self.final_learning_rate / self.learning_rate
        if self.schedule == Schedule.cosine:
            return keras.optimizers.schedules.CosineDecay(
                self.learning_rate, decay_steps=total_steps, alpha=ratio
            )
        return keras.optimizers.schedules.ExponentialDecay(
            self.learning_rate, decay_steps=total_steps, decay_rate=ratio
        )


@dataclass
class Fitted:
    """What training left: the model and how the epochs went."""

    model: keras.Model
    epochs: int
    """The last completed epoch (resumed runs count from the start)."""
    history: list
    """Per-epoch records of the whole run (``checkpoints/state.json``)."""
    steps: int
    seconds: float
    """Wall time of this process's ``fit``."""
    samples_per_s: float
    """Median over this process's epochs."""

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else math.nan


def build(
    config: ModelConfig,
    options: FitOptions,
    scan: Scan,
    *,
    backend: str,
    compile_mode: str,
    steps_per_epoch: int,
    distribution: Distribution,
    resumed: Resumed | None,
) -> keras.Model:
    """The model to train, compiled for ``compile_mode``: new (normalised to ``scan``, its
    probe), or the checkpoint's with its optimizer state when resuming (the learning
    rate follows ``options``, so a diverged run can resume lower)."""
    log.info(
        "model: N %d, C %d, filters %d, precision %s; translate=%s compile=%s",
        config.n,
        config.channels,
        config.filters,
        config.precision,
        backend,
        compile_mode,
    )
    with distribution.strategy.scope():
        if resumed is None:
            factor = normalisation_factor(scan.diffraction, background=scan.background)
            model, _ = build_model(
                config, probe=scan.probe, norm_factor=factor, translate_backend=backend
            )
            saved_optimizer = None
        else:
            model = resumed.load_model(backend)
            saved_optimizer = model.optimizer
        compile_model(
            model,
            compile_mode,
            learning_rate=options.learning_rate_schedule(options.epochs * steps_per_epoch),
            poisson_weight=options.poisson_weight,
            mae_weight=options.mae_weight,
            optimizer_state=saved_optimizer,
        )
    return model


def fit(
    model: keras.Model,
    scan: Scan,
    groups: np.ndarray,
    options: FitOptions,
    *,
    writer,
    evaluate: Callable | None,
    distribution: Distribution,
    resumed: Resumed | None,
    run_dir: Path,
    out_dir: Path,
) -> Fitted:
    """Train ``model`` on the ``groups`` of ``scan`` (from the ``resumed`` epoch), with a
    :class:`TrainingMonitor` writing to ``writer`` and checkpointing into ``out_dir``
    (the run folder ``run_dir`` on the chief) and calling ``evaluate(model, step=epoch)``
    when an evaluation is due (the chief's; None on the other workers)."""
    steps = len(groups) // options.batch_size
    initial_epoch = resumed.epoch if resumed else 0
    monitor = TrainingMonitor(
        checkpoint_dir=Path(out_dir) / checkpoints.FOLDER,
        writer=writer,
        evaluate=evaluate,
        epochs=options.epochs,
        samples_per_epoch=steps * options.batch_size,
        eval_every=options.eval_every,
        log_every_steps=options.log_every_steps,
        max_minutes=options.max_minutes,
        eval_minutes=tuple(options.eval_minutes),
        history=resumed.history if resumed else None,
        agree=distribution.agree,
        agree_every_step=distribution.workers > 1,
    )
    log.info(
        "training %s: %d samples of %d x %d x %d, %d steps/epoch; %s",
        scan.source,
        len(groups),
        scan.n,
        scan.n,
        groups.shape[1],
        steps,
        distribution.describe(),
    )
    dataset = make_dataset(
        scan,
        groups,
        norm_factor=float(model.get_layer("normalise").factor),
        batch_size=options.batch_size,
        shuffle=True,
        seed=options.seed,
        drop_remainder=True,
        epochs=None,
        start_epoch=initial_epoch,
    ).with_options(dataset_options())
    started = time.perf_counter()
    if initial_epoch < options.epochs:
        with fitting(model, dataset, distribution), stop_on_interrupt(monitor):
            model.fit(
                dataset,
                epochs=options.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps,
                callbacks=[monitor],
                verbose=0,
                shuffle=False,  # the dataset shuffles itself, by (seed, epoch)
            )
    seconds = time.perf_counter() - started
    epochs = monitor.history[-1]["epoch"] if monitor.history else initial_epoch
    _raise_if_stopped(monitor, epochs, run_dir)
    trained = [h for h in monitor.history if h["epoch"] > initial_epoch]
    samples_per_s = float(np.median([h["samples_per_s"] for h in trained])) if trained else math.nan
    return Fitted(
        model=model,
        epochs=epochs,
        history=monitor.history,
        steps=int(model.optimizer.iterations.numpy()),
        seconds=seconds,
        samples_per_s=samples_per_s,
    )


def _raise_if_stopped(monitor: TrainingMonitor, epochs: int, run_dir: Path) -> None:
    """Interrupted (Ctrl-C) or TrainingDiverged (NaN), saying what was kept."""
    if monitor.nan_at is not None:
        epoch, step = monitor.nan_at
        raise TrainingDiverged(
            f"the loss became NaN at epoch {epoch}, step {step}; the last good checkpoint "
            f"({checkpoints.checkpoint_path(run_dir)}) is intact. Lower train.learning_rate "
            "and rerun with resume=true"
        )
    if monitor.stop_requested:
        where = f"during epoch {epochs + 1}" if monitor.cut_short else f"after epoch {epochs}"
        saved = (
            f"the checkpoint of epoch {epochs} is in {run_dir / checkpoints.FOLDER}"
            if epochs
            else "no epoch had completed"
        )
        raise Interrupted(
            f"stopped {where}; {saved}. Continue with the same command "
            f"plus hydra.run.dir={run_dir} resume=true"
        )

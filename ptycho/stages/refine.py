"""The physics refinement as a stage: the solver (:mod:`ptycho.refine`) run from the
network's reconstruction (or a flat object) with progress on the terminal, ``refine/*``
scalars in TensorBoard, ``refine.png`` and ground-truth metrics when the scan has them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from ptycho import checkpoints, figures, probes
from ptycho.data.scan import Scan
from ptycho.errors import ConfigError, Interrupted, TrainingDiverged
from ptycho.monitor import stop_on_interrupt
from ptycho.progress import Progress
from ptycho.reconstruction import Reconstruction
from ptycho.refine import (
    RefineMode,
    RefineOptions,
    Refiner,
    RefineResult,
    RefineState,
    StateMismatch,
)
from ptycho.scoring import Scorer
from ptycho.stages.evaluate import log_scalars

__all__ = ["refined_probe", "run"]

log = logging.getLogger(__name__)


def run(
    scorer: Scorer,
    options: RefineOptions,
    *,
    start: Reconstruction | None,
    backend: str,
    compile_mode: str,
    writer=None,
    curves: Path | None = None,
    stream=None,
    tag: str = "refine",
    distribution=None,
    resume: RefineState | None = None,
    checkpoint_dir: Path | None = None,
) -> RefineResult:
    """Refine ``scorer.scan`` from ``start`` (None: a flat object; the amplitude of
    ``start`` with a flat phase unless ``options.network_phase``).

    Progress goes to ``stream`` (a bar on a terminal, lines otherwise) and, with a
    ``writer``, to TensorBoard (``refine/*`` per progress point); ``curves`` gets the
    PNG of the progress records. The result's ``metrics`` are the last progress
    point's: R-factor, Poisson NLL, ground truth (when known) and the position error
    (when the true positions are known). A diverged refinement raises
    :class:`TrainingDiverged`. ``distribution``: workers sharing every step
    (:class:`ptycho.refine.Refiner`). ``resume``: the state to continue from
    (:func:`ptycho.checkpoints.refinement`); ``checkpoint_dir``: the run folder whose
    ``checkpoints/refine.npz`` is written every ``options.checkpoint_seconds`` (None:
    none; the chief's alone). Ctrl-C raises :class:`Interrupted` naming the iteration
    a ``resume=true`` continues from; on one of several workers it stops every worker
    at the same step.
    """
    scan = scorer.scan
    initial, described = _start(start, options)
    log.info(
        "refine=%s from %s: %d iterations at most", options.mode, described, options.iterations
    )
    refiner = Refiner(
        scan,
        options,
        initial=initial,
        backend=backend,
        compile_mode=compile_mode,
        distribution=distribution,
    )
    progress = Progress(options.iterations, f"refine={options.mode}", stream=stream)

    def on_record(record: dict) -> None:
        progress.update(record["iteration"], _progress_text(record))
        if writer is not None:
            values = {k: v for k, v in record.items() if k != "iteration"}
            log_scalars(writer, tag, values, record["iteration"])
            if options.refines_probe or refiner.modes > 1:
                _log_modes(writer, tag, refiner.current_probe(), record["iteration"])

    saved = [resume.iteration if resume else None]

    def on_checkpoint(state: RefineState) -> None:
        checkpoints.save_refinement(checkpoint_dir, state)
        saved[0] = state.iteration

    # Several workers: a Ctrl-C on one is a request the next step shares (Refiner.
    # request_stop), so that all stop there; one worker: Ctrl-C interrupts at once.
    interrupts = stop_on_interrupt(refiner) if refiner.workers > 1 else contextlib.nullcontext()
    try:
        with interrupts:
            result = refiner.run(
                score=scorer.truth if scorer.has_truth else None,
                true_positions=scan.metadata.get("true_positions"),
                on_record=on_record,
                resume=resume,
                on_checkpoint=None if checkpoint_dir is None else on_checkpoint,
            )
    except StateMismatch as error:
        path = checkpoints.refinement_path(checkpoint_dir or ".")
        raise ConfigError(f"{path}: cannot continue this refinement: {error}") from error
    except FloatingPointError as error:
        raise TrainingDiverged(str(error)) from error
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(checkpoint_dir, saved[0], refiner)) from None
    finally:
        progress.close()
        if writer is not None:
            writer.flush()
    final = result.history[-1]
    result.metrics = {
        "r_factor": final["r_factor"],
        "poisson_nll": final["poisson_nll"],
        **{k: v for k, v in final.items() if k not in ("iteration", "seconds", "loss")},
    }
    if curves is not None:
        figures.save_curves(
            result.history, curves, title=f"refine={options.mode}", probe=result.probe
        )
    return result


def _interrupted(run_dir: Path | None, iteration: int | None, refiner: Refiner) -> str:
    """What a Ctrl-C during the refinement kept, and how to continue (``run_dir``: None
    on the workers other than the chief)."""
    several = refiner.workers > 1
    what = "Ctrl-C during the refinement"
    if several:
        who = "" if refiner.stop_requested else " on another worker"
        what = f"Ctrl-C{who} during the refinement: every worker stopped at the same step"
    if several and run_dir is None:
        return (
            f"{what}; restart every worker with the same command plus resume=true to "
            "continue from the chief's last refinement checkpoint"
        )
    if run_dir is None or iteration is None:
        return f"{what}, before the run's results were written: run it again"
    where = " on every worker" if several else ""
    return (
        f"{what}, before the run's results were written; {run_dir}/"
        f"{checkpoints.FOLDER}/{checkpoints.REFINEMENT} holds iteration {iteration}: "
        f"rerun the same command{where} plus hydra.run.dir={run_dir} resume=true to continue"
    )


def _start(start: Reconstruction | None, options: RefineOptions):
    """The refinement's initial object (None: flat) and what it is, for the log."""
    if start is None:
        return None, "a flat object"
    if options.network_phase:
        return start.obj, "the network's object"
    return np.abs(start.obj).astype(np.complex64), "the network's amplitude (flat phase)"


def _log_modes(writer, tag: str, probe, step: int) -> None:
    """``tag/probe_mode_k``: each probe mode's amplitude (the modes' power fractions are
    the records' ``mode_k_power`` scalars)."""
    with writer.as_default(step=step):
        for k, mode in enumerate(probes.as_modes(probe)):
            tf.summary.image(f"{tag}/probe_mode_{k}", figures.grey_image(np.abs(mode)))


def refined_probe(
    scan: Scan,
    iterations: int,
    *,
    modes: int | None = None,
    backend: str,
    compile_mode: str,
    writer=None,
    stream=None,
) -> tuple[Scan, RefineResult]:
    """``scan`` with the probe that ``refine=full`` (``iterations``, from a flat object
    and the scan's probe; ``modes`` probe modes, null: the probe's) finds on it: the
    network's probe for ``train.probe=refine``. Progress as :func:`run`'s, under
    ``probe/`` in TensorBoard."""
    options = RefineOptions(mode=RefineMode.full, iterations=iterations, probe_modes=modes)
    # The probe moves from a third of the way at the latest (short runs too).
    options.probe_start = min(options.probe_start, max(1, iterations // 3))
    log.info("train.probe=refine: refine=%s on the training scan first", options.mode)
    result = run(
        Scorer(scan),
        options,
        start=None,
        backend=backend,
        compile_mode=compile_mode,
        writer=writer,
        stream=stream,
        tag="probe",
    )
    log.info(
        "train.probe=refine: R-factor %.4f; the network uses the refined probe", result.r_factor
    )
    return scan.replace(probe=result.probe), result


def _progress_text(record: dict) -> str:
    parts = [f"{record['seconds']:.1f} s", f"R {record['r_factor']:.4f}"]
    for key, label in (("amp_ssim", "amp SSIM"), ("phase_ssim", "phase SSIM")):
        if key in record:
            parts.append(f"{label} {record[key]:.3f}")
    if "position_rmse" in record:
        parts.append(f"position error {record['position_rmse']:.2f} px")
    return ", ".join(parts)

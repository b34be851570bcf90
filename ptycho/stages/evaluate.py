"""The network's reconstruction of a scan as a stage: reconstruct, score, log.

One :class:`NetworkEvaluation` per run and scan serves the training monitor's periodic
evaluations and the run's final one, so they are the same computation and are logged
to TensorBoard the same way (:func:`log_evaluation`): scalars ``test/*`` (and ``final/*``
for the final one), the reconstruction's images, with ground truth the truth (once), the
errors and the FRC, without it the illumination coverage and measured / predicted
patterns, and the probe when it is trained.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from ptycho import figures, probes
from ptycho.data.scan import Scan
from ptycho.inference import NetworkReconstruction, ReconstructOptions, make_predict_fn, reconstruct
from ptycho.scoring import Scorer
from ptycho.stitch import illumination

__all__ = ["NetworkEvaluation", "log_evaluation", "log_scalars"]


class NetworkEvaluation:
    """How a run judges its network on ``scan``.

    Parameters
    ----------
    scan : Scan
        The test scan (training) or the scan to reconstruct (inference).
    options : ReconstructOptions
    scorer : Scorer
        Of ``scan``.
    compile_mode, backend, grouping : str
        The reconstruction stage's compile mode, the warp backend, the training's grouping.
    group_step : float, optional
        The training's ``data.group_step``.
    writer : tf.summary writer, optional
        Where evaluations with a ``step`` are logged.
    log_probe : bool
        Also log the model's probe (when it is trained).
    distribution : ptycho.distribute.Distribution, optional
        Workers sharing each reconstruction (infer.py ``distribute=multiworker``).
    """

    def __init__(
        self,
        scan: Scan,
        options: ReconstructOptions,
        scorer: Scorer,
        *,
        compile_mode: str,
        backend: str,
        grouping: str,
        group_step: float | None = None,
        writer=None,
        log_probe: bool = False,
        distribution=None,
    ):
        self.scan, self.options, self.scorer = scan, options, scorer
        self.compile_mode, self.backend, self.grouping = compile_mode, backend, grouping
        self.group_step = group_step
        self.writer, self.log_probe = writer, log_probe
        self.distribution = distribution
        self._predict = None  # (model, compiled predict function), reused across calls
        self._truth_logged = False

    def __call__(
        self, model: keras.Model, *, step: int | None = None, final: bool = False
    ) -> NetworkReconstruction:
        """Reconstruct and score ``scan`` with ``model``; with a ``step`` (and a writer)
        log it at that step (``final``: also as the run's ``final/*`` scalars)."""
        if self._predict is None or self._predict[0] is not model:
            self._predict = (model, make_predict_fn(model, self.compile_mode))
        result = reconstruct(
            model,
            self.scan,
            batch_size=self.options.batch_size,
            compile_mode=self.compile_mode,
            backend=self.backend,
            grouping=self.grouping,
            group_step=self.group_step,
            groups=self.options.groups,
            align_phase=self.options.align_phase,
            predict_fn=self._predict[1],
            distribution=self.distribution,
        )
        self.scorer.score(result)
        if self.writer is not None and step is not None:
            probe = model.get_layer("illumination").probe.numpy() if self.log_probe else None
            log_evaluation(
                self.writer,
                result,
                self.scorer,
                step,
                final=final,
                truth=not self._truth_logged,
                probe=probe,
            )
            self._truth_logged = True
        return result


def log_scalars(writer, prefix: str, values: dict, step: int) -> None:
    """``prefix/key`` scalars of the finite numbers in ``values`` at ``step``."""
    with writer.as_default(step=step):
        for key, value in values.items():
            if isinstance(value, int | float) and math.isfinite(value):
                tf.summary.scalar(f"{prefix}/{key}", value)


def log_evaluation(
    writer,
    result: NetworkReconstruction,
    scorer: Scorer,
    step: int,
    *,
    final: bool = False,
    truth: bool = True,
    probe: np.ndarray | None = None,
) -> None:
    """An evaluation in TensorBoard at ``step``: its metrics as ``test/*`` scalars (and
    ``final/*`` for the run's final one) and its images (``truth``: include the ground
    truth's own images, logged once per run)."""
    log_scalars(writer, "test", result.metrics, step)
    if final:
        log_scalars(writer, "final", result.metrics, step)
    with writer.as_default(step=step):
        for tag, image in _images(result, scorer, truth).items():
            tf.summary.image(tag, image)
        if probe is not None:  # one pair per mode: probe/amplitude, probe/amplitude_1, ...
            for k, mode in enumerate(probes.as_modes(probe)):
                suffix = f"_{k}" if k else ""
                tf.summary.image(f"probe/amplitude{suffix}", figures.grey_image(np.abs(mode)))
                tf.summary.image(f"probe/phase{suffix}", figures.grey_image(np.angle(mode)))
    writer.flush()


def _images(result: NetworkReconstruction, scorer: Scorer, truth: bool) -> dict:
    """The reconstruction; with ground truth the truth (``truth``), the errors on a
    symmetric scale and the FRC curves; without, the illumination coverage and measured /
    predicted patterns."""
    images = {
        "test/amplitude": figures.grey_image(np.abs(result.obj), result.mask),
        "test/phase": figures.grey_image(np.angle(result.obj), result.mask),
    }
    if not scorer.has_truth:
        coverage = illumination(result.xcoords, result.ycoords, result.probe, result.obj.shape)
        images["test/coverage"] = figures.grey_image(coverage)
        if result.diffraction_pairs:
            images["test/diffraction"] = figures.diffraction_image(result.diffraction_pairs)
        return images
    comparison = scorer.compare(result.obj)
    if truth:
        images["test/amplitude_truth"] = figures.grey_image(comparison["amplitude_truth"])
        images["test/phase_truth"] = figures.grey_image(comparison["phase_truth"])
    images["test/amplitude_error"] = figures.diverging_image(comparison["amplitude_error"])
    images["test/phase_error"] = figures.diverging_image(comparison["phase_error"])
    images["test/frc"] = figures.frc_image(comparison["frc"])
    return images

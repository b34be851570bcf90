"""Reconstructing a whole scan with a trained model: predict, stitch, score.

Patterns are predicted in fixed-size batches (the last one padded), so the predict
function is traced once whatever the scan length, and the patches are stitched as
they come (:class:`ptycho.stitch.Stitcher`), so memory does not grow with the scan.
"""

from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from scipy.spatial import cKDTree

from ptycho import metrics
from ptycho.data.grouping import group_offsets, group_positions, scan_step, tile_groups
from ptycho.data.scan import Scan
from ptycho.hardware import has_gpu
from ptycho.stitch import Stitcher, object_shape_for, place_patches, window_corners

__all__ = [
    "Evaluation",
    "Reconstruction",
    "ScanMismatch",
    "model_geometry",
    "reconstruct",
    "scan_region",
    "scored",
    "truth_metrics",
]


class ScanMismatch(ValueError):
    """The scan does not fit the model (pattern size, probe size, too few positions)."""


@dataclass
class Reconstruction:
    """A stitched object and the data-consistency figures of the prediction."""

    obj: np.ndarray  # (H, W) complex64, in the positions' pixel frame
    mask: np.ndarray  # (H, W) bool, covered pixels
    r_factor: float
    poisson_nll: float
    patterns: int
    seconds: float
    traces: int
    metrics: dict = field(default_factory=dict)
    # (measured, predicted) amplitudes of a few fixed positions (first, middle, last
    # group's first member), in the model's units: what the data-consistency looks like.
    diffraction_pairs: list = field(default_factory=list)
    groups: int = 0  # groups the network evaluated

    @property
    def patterns_per_s(self) -> float:
        return self.patterns / self.seconds if self.seconds > 0 else math.inf


def model_geometry(model: keras.Model) -> tuple[int, int]:
    """(N, gridsize) a model was built for, from its ``diffraction`` input."""
    shape = model.get_layer("diffraction").output.shape  # (None, N, N, C)
    return int(shape[1]), int(round(math.sqrt(int(shape[3]))))


def _check_scan(model: keras.Model, scan: Scan) -> tuple[int, int]:
    n, gridsize = model_geometry(model)
    if scan.n != n:
        raise ScanMismatch(
            f"the scan's patterns are {scan.n} x {scan.n} but the model was trained on "
            f"N = {n}; use a checkpoint trained at N = {scan.n}"
        )
    probe = model.get_layer("illumination").n
    if probe != scan.probe.shape[0]:
        raise ScanMismatch(
            f"the scan's probe is {scan.probe.shape}, the model's is ({probe}, {probe})"
        )
    if scan.n_positions < gridsize * gridsize:
        raise ScanMismatch(
            f"the scan has {scan.n_positions} positions, fewer than one group of "
            f"gridsize {gridsize} needs ({gridsize * gridsize})"
        )
    return n, gridsize


def reconstruct(
    model: keras.Model,
    scan: Scan,
    *,
    batch_size: int = 64,
    compile_mode: str = "jit",
    backend: str = "xla",
    grouping: str = "auto",
    groups: str = "all",
    align_phase: bool = True,
    shape: tuple[int, int] | None = None,
    predict_fn=None,
    overlap: bool | None = None,
) -> Reconstruction:
    """Reconstruct the object of ``scan`` with a trained (training) model.

    Positions are grouped in C = gridsize^2 neighbours; each group's C object patches
    (after the overlap constraint) are stitched at their global positions, weighted by
    the probe intensity. The R-factor and Poisson NLL compare the predicted far-field
    amplitudes with the measured ones (both normalised).

    Per batch, the model's prediction is one compiled call and the placement of its
    patches (sub-pixel warp, weights) with the data-consistency sums another (XLA with
    the xla backend); the host then adds the placed windows to the canvases, in order.

    Parameters
    ----------
    model : keras.Model
        The training model of :func:`ptycho.model.build_model` (or loaded from
        ``model.keras``): outputs ``amplitude`` and ``object``.
    scan : Scan
    batch_size : int
        Groups per predict call (fixed; the last batch is padded).
    compile_mode : {"jit", "graph", "eager"}
    backend : {"xla", "legacy"}
        Warp backend of the stitcher (the model's own is set on its layers).
    grouping : {"auto", "block", "nearest"}
        How positions are grouped (:func:`ptycho.data.group_positions`); use the
        training's choice.
    groups : {"all", "tile"}
        "all": every group of the grouping (on a raster each position is predicted in
        up to C groups and the predictions are averaged); "tile": a subset in which
        each position is predicted once where the groups allow it
        (:func:`ptycho.data.tile_groups`), about C times fewer network evaluations.
    align_phase : bool
        Phase-align each group to what is already stitched (:class:`Stitcher`): the
        network's output is only defined up to a constant phase per group.
    shape : (H, W), optional
        Object frame; default the ground truth's shape, or just large enough.
    predict_fn : callable, optional
        ``inputs -> {"amplitude", "object"}`` to use instead of the model (a compiled
        one reused across evaluations in training, or a stand-in in tests).
    overlap : bool, optional
        Predict the next batch on a worker thread while the host stitches this one.
        Default: with a GPU, which then computes while the host adds windows. On this
        2-core CPU it made no difference (alternating rounds, 1,000 patterns: jit 1.75
        s with it, 1.73 s without; graph bfloat16 1.06 s and 1.05 s): the network
        already keeps both cores busy.
    """
    n, gridsize = _check_scan(model, scan)
    start = time.perf_counter()
    chosen = group_positions(scan.xcoords, scan.ycoords, gridsize, method=grouping)
    if groups == "tile":
        chosen = tile_groups(chosen, scan.n_positions)
    elif groups != "all":
        raise ValueError(f"groups must be 'all' or 'tile', got {groups!r}")
    centres, offsets = group_offsets(scan.xcoords, scan.ycoords, chosen)
    positions = (centres[:, None, :] + offsets).reshape(-1, 2)  # every patch's [x, y]
    row0, col0, fractions = window_corners(positions[:, 0], positions[:, 1], n)
    factor = tf.constant(float(model.get_layer("normalise").factor), tf.float32)
    if shape is None:
        shape = (
            scan.object.shape
            if scan.object is not None
            else object_shape_for(scan.xcoords, scan.ycoords, n)
        )
    c = gridsize * gridsize
    stitcher = Stitcher(
        shape,
        n,
        probe=model.get_layer("illumination").probe.numpy(),
        backend=backend,
        batch_size=batch_size * c,
        align_phase=align_phase,
    )
    if predict_fn is None:
        predict_fn = make_predict_fn(model, compile_mode)
    finish = _batch_outputs(backend)
    shown = sorted({0, len(chosen) // 2, len(chosen) - 1})

    def predict(first: int):
        """Everything of one batch but the canvases (on the worker thread when overlapped)."""
        index = chosen[first : first + batch_size]
        size = len(index)
        amplitudes = np.zeros((batch_size, n, n, c), np.float32)
        amplitudes[:size] = np.moveaxis(scan.diffraction[index], 1, -1)
        inputs = {"diffraction": tf.constant(amplitudes)}
        if c > 1:
            shifts = np.zeros((batch_size, c, 2), np.float32)
            shifts[:size] = offsets[first : first + batch_size]
            inputs["offsets"] = tf.constant(shifts)
        outputs = predict_fn(inputs)
        where = np.zeros((batch_size * c, 2), np.float32)
        where[: size * c] = fractions[first * c : (first + size) * c]
        windows, sums = finish(
            outputs["object"],
            outputs["amplitude"],
            inputs["diffraction"],
            tf.constant(where),
            tf.constant(np.arange(batch_size) < size),
            stitcher.weight,
            factor,
        )
        pairs = [
            (
                amplitudes[g - first, ..., 0] * float(factor),
                np.asarray(outputs["amplitude"][g - first, ..., 0]),
            )
            for g in shown
            if first <= g < first + size
        ]
        count = size * c
        return first, count, windows.numpy()[:count], sums.numpy(), pairs

    if overlap is None:
        overlap = has_gpu()
    totals = np.zeros(3)
    pairs = []
    batches = range(0, len(chosen), batch_size)
    for first, count, windows, sums, shown_pairs in _pipelined(predict, batches, overlap):
        totals += sums.sum(axis=0, dtype=np.float64)
        pairs += shown_pairs
        patches = slice(first * c, first * c + count)
        stitcher.accumulate(windows, row0[patches], col0[patches], group_size=c)
    obj, mask = stitcher.result()
    abs_error, measured_sum, nll_sum = totals
    return Reconstruction(
        obj=obj,
        mask=mask,
        r_factor=abs_error / measured_sum if measured_sum > 0 else math.nan,
        poisson_nll=nll_sum / (len(chosen) * c * n * n),
        patterns=scan.n_positions,
        seconds=time.perf_counter() - start,
        traces=_tracing_count(predict_fn),
        diffraction_pairs=pairs,
        groups=len(chosen),
    )


@functools.cache
def _batch_outputs(backend: str):
    """The compiled second half of a batch: ``(objects (B, N, N, C) complex, predicted
    amplitudes (B, N, N, C), raw measured amplitudes (B, N, N, C), fractions (B C, 2),
    valid (B,) bool, weight (N + 1, N + 1), factor) -> (windows, sums)``: the
    patches placed for the stitcher (:func:`ptycho.stitch.place_patches`) and the sums
    of ``| p - a |``, ``a`` and the Poisson NLL of each group, (B, 3), zero for padded
    rows, with ``a`` = raw * factor."""

    def finish(objects, predicted, raw, fractions, valid, weight, factor):
        n = tf.shape(objects)[1]
        patches = tf.reshape(tf.transpose(objects, (0, 3, 1, 2)), (-1, n, n))
        windows = place_patches(tf.cast(patches, tf.complex64), fractions, weight, backend)
        # Per-group sums in float32 (16k terms each), added up in float64 on the host:
        # float64 arithmetic here would double the cost of this function.
        keep = tf.cast(valid, tf.float32)[:, None]
        predicted = tf.reshape(tf.cast(predicted, tf.float32), (tf.shape(objects)[0], -1))
        measured = tf.reshape(tf.cast(raw, tf.float32), tf.shape(predicted)) * factor
        rate = tf.square(predicted) + 1e-12
        sums = tf.stack(
            [
                tf.reduce_sum(tf.abs(predicted - measured) * keep, axis=1),
                tf.reduce_sum(measured * keep, axis=1),
                tf.reduce_sum((rate - tf.math.xlogy(tf.square(measured), rate)) * keep, axis=1),
            ],
            axis=1,
        )
        return windows, sums

    return tf.function(finish, jit_compile=(backend == "xla"), autograph=False)


def _pipelined(function, items, overlap: bool):
    """``function(item)`` for each item, in order. With ``overlap`` the next item's call
    runs on a worker thread while the caller uses this one's result."""
    if not overlap:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptycho-predict") as worker:
        pending = None
        for item in items:
            following = worker.submit(function, item)
            if pending is not None:
                yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()


def make_predict_fn(model: keras.Model, compile_mode: str):
    """``inputs -> outputs`` of the model for inference, compiled for ``compile_mode``."""

    def predict(inputs):
        outputs = model(inputs, training=False)
        return {"amplitude": outputs["amplitude"], "object": outputs["object"]}

    if compile_mode == "eager":
        return predict
    return tf.function(predict, jit_compile=(compile_mode == "jit"), autograph=False)


def _tracing_count(fn) -> int:
    counter = getattr(fn, "experimental_get_tracing_count", None)
    return int(counter()) if counter else 0


def scan_region(scan: Scan, reach: float = 2.0) -> tuple[slice, slice]:
    """The scored region: the largest axis-aligned rectangle inside the bounding box of
    the patch centres whose every pixel lies within ``reach`` scan steps of a patch
    centre. On a raster that is the whole box; on a Fermat spiral (a disk of positions)
    or any scan that does not fill its box, the unscanned corners stay out."""
    rows = slice(int(math.floor(scan.ycoords.min())), int(math.ceil(scan.ycoords.max())) + 1)
    cols = slice(int(math.floor(scan.xcoords.min())), int(math.ceil(scan.xcoords.max())) + 1)
    step = scan_step(scan.xcoords, scan.ycoords)
    yy, xx = np.mgrid[rows, cols]
    centres = cKDTree(np.stack([scan.xcoords, scan.ycoords], axis=1))
    distance, _ = centres.query(np.stack([xx.ravel(), yy.ravel()], axis=1))
    covered = (distance <= reach * max(step, 1.0)).reshape(xx.shape)
    inner_rows, inner_cols = metrics.largest_rectangle(covered)
    return (
        slice(rows.start + inner_rows.start, rows.start + inner_rows.stop),
        slice(cols.start + inner_cols.start, cols.start + inner_cols.stop),
    )


def scored(
    result: Reconstruction, scan: Scan, *, register: bool = True, remove_phase_ramp: bool = False
) -> dict:
    """Metrics of a reconstruction: data consistency always, ground truth when known."""
    out = {"r_factor": result.r_factor, "poisson_nll": result.poisson_nll}
    if scan.object is not None:
        out.update(
            truth_metrics(scan, result.obj, register=register, remove_phase_ramp=remove_phase_ramp)
        )
    result.metrics = out
    return out


def truth_metrics(
    scan: Scan,
    obj: np.ndarray,
    *,
    region: tuple[slice, slice] | None = None,
    register: bool = True,
    remove_phase_ramp: bool = False,
) -> dict:
    """Ground-truth metrics of an object of ``scan`` (which has one) on the scored
    region (:func:`scan_region`, or ``region`` when the caller has it already)."""
    return metrics.compare(
        scan.object,
        obj,
        region=scan_region(scan) if region is None else region,
        register=register,
        remove_phase_ramp=remove_phase_ramp,
    )


@dataclass(frozen=True)
class Evaluation:
    """How a model is judged on a scan: reconstruct it, then score it.

    One value carries the choices (batch, compile mode, warp backend, grouping, metric
    options), so the training monitor's evaluations and the final reconstruction of a
    run are the same computation.
    """

    scan: Scan
    batch_size: int = 64
    compile_mode: str = "jit"
    backend: str = "xla"
    grouping: str = "auto"
    groups: str = "all"
    align_phase: bool = True
    register: bool = True
    remove_phase_ramp: bool = False

    def __call__(self, model: keras.Model, predict_fn=None) -> tuple[Reconstruction, dict]:
        result = reconstruct(
            model,
            self.scan,
            batch_size=self.batch_size,
            compile_mode=self.compile_mode,
            backend=self.backend,
            grouping=self.grouping,
            groups=self.groups,
            align_phase=self.align_phase,
            predict_fn=predict_fn,
        )
        values = scored(
            result,
            self.scan,
            register=self.register,
            remove_phase_ramp=self.remove_phase_ramp,
        )
        return result, values

"""Reconstructing a whole scan with a trained model: predict, stitch, score.

Patterns are predicted in fixed-size batches (the last one padded), so the predict
function is traced once whatever the scan length, and the patches are stitched as
they come (:class:`ptycho.stitch.Stitcher`), so memory does not grow with the scan.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum

import keras
import numpy as np
import tensorflow as tf

from ptycho.data.grouping import group_offsets, group_positions, tile_groups
from ptycho.data.scan import Scan
from ptycho.errors import require
from ptycho.hardware import compiled, has_gpu, pipelined
from ptycho.reconstruction import Reconstruction
from ptycho.stitch import Stitcher, object_shape_for, place_patches, window_corners

__all__ = [
    "InferGroups",
    "NetworkReconstruction",
    "ReconstructOptions",
    "ScanMismatch",
    "make_predict_fn",
    "model_geometry",
    "reconstruct",
]


class ScanMismatch(ValueError):
    """The scan does not fit the model (pattern size, probe size, too few positions)."""


class InferGroups(StrEnum):
    all = "all"
    tile = "tile"


@dataclass
class ReconstructOptions:
    """The ``reconstruct`` section: how the network reconstructs a whole scan."""

    batch_size: int = 64
    """Groups per compiled predict call (fixed; the last batch is padded, so the call
    compiles once whatever the scan's length)."""
    groups: InferGroups = InferGroups.all
    """``all``: every group (each position predicted in up to C groups, averaged);
    ``tile``: each position once where the scan allows, about C times fewer network
    calls, at a small cost in quality."""
    align_phase: bool = True
    """Rotate each group by the constant phase that best matches what is already
    stitched (the network knows a group's phase only up to a constant)."""

    def check(self) -> None:
        require([(self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")])


@dataclass(kw_only=True)
class NetworkReconstruction(Reconstruction):
    """The network's :class:`~ptycho.reconstruction.Reconstruction` of a scan."""

    traces: int
    """Times the predict function was traced (1: one compilation for the whole scan)."""
    groups: int
    """Groups the network evaluated."""
    diffraction_pairs: list = field(default_factory=list)
    """(measured, predicted) amplitudes of a few fixed positions (first, middle, last
    group's first member), in the model's units: what the data consistency looks like."""


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
    if probe != scan.probe.shape[-1]:
        raise ScanMismatch(
            f"the scan's probe is {scan.probe.shape[-2:]}, the model's is ({probe}, {probe})"
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
    group_step: float | None = None,
    groups: str = "all",
    align_phase: bool = True,
    shape: tuple[int, int] | None = None,
    predict_fn=None,
    overlap: bool | None = None,
    distribution=None,
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
    grouping : {"auto", "block", "nearest", "lattice"}
        How positions are grouped (:func:`ptycho.data.group_positions`); use the
        training's choice.
    group_step : float, optional
        Spacing of ``lattice`` groups, fraction of N (the training's ``data.group_step``).
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
        Default: with a GPU, which then computes while the host adds windows; on a CPU
        the network already keeps every core busy (measured no faster:
        ``benchmarks/infer.py``, docs/benchmarks.md).
    distribution : ptycho.distribute.Distribution, optional
        Several workers (``distribute=multiworker``): each predicts and stitches its
        consecutive share of the groups, then the canvases are added on every worker
        (:meth:`Stitcher.combine`) and the sums of the scores too. Every worker calls
        this with the same arguments.

    Returns
    -------
    NetworkReconstruction
        In the frame ``shape``, with the scan's positions and the model's probe.
    """
    n, gridsize = _check_scan(model, scan)
    start = time.perf_counter()
    chosen = group_positions(
        scan.xcoords,
        scan.ycoords,
        gridsize,
        method=grouping,
        spacing=None if group_step is None else group_step * n,
    )
    if groups == "tile":
        chosen = tile_groups(chosen, scan.n_positions)
    elif groups != InferGroups.all:
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
    probe = model.get_layer("illumination").probe.numpy()
    stitcher = Stitcher(
        shape,
        n,
        probe=probe,
        backend=backend,
        batch_size=batch_size * c,
        align_phase=align_phase,
    )
    if predict_fn is None:
        predict_fn = make_predict_fn(model, compile_mode)
    finish = _batch_outputs(backend, scan.background is not None)
    background = tf.constant(0.0 if scan.background is None else scan.background[..., None])
    share = slice(0, len(chosen)) if distribution is None else distribution.share(len(chosen))
    shown = sorted({share.start, (share.start + share.stop) // 2, max(share.stop - 1, 0)})

    def predict(first: int):
        """Everything of one batch but the canvases (on the worker thread when overlapped)."""
        index = chosen[first : min(first + batch_size, share.stop)]
        size = len(index)
        amplitudes = np.zeros((batch_size, n, n, c), np.float32)
        amplitudes[:size] = np.moveaxis(scan.signal(index), 1, -1)
        inputs = {"diffraction": tf.constant(amplitudes)}
        measured, valid = inputs["diffraction"], None
        if scan.background is not None:  # scored against the counts as measured
            raw = np.zeros_like(amplitudes)
            raw[:size] = np.moveaxis(scan.diffraction[index], 1, -1)
            measured = raw
        if scan.masked:  # masked pixels marked -1: they count in no sum
            valid = np.ones((batch_size, n, n, c), bool)
            shown_valid = scan.valid_pixels(index.reshape(-1)).reshape(size, c, n, n)
            valid[:size] = np.moveaxis(shown_valid, 1, -1)
            measured = np.where(valid, measured, -1.0).astype(np.float32)
        measured = tf.convert_to_tensor(measured)
        if c > 1:
            shifts = np.zeros((batch_size, c, 2), np.float32)
            shifts[:size] = offsets[first : first + size]
            inputs["offsets"] = tf.constant(shifts)
        outputs = predict_fn(inputs)
        where = np.zeros((batch_size * c, 2), np.float32)
        where[: size * c] = fractions[first * c : (first + size) * c]
        windows, sums = finish(
            outputs["object"],
            outputs["amplitude"],
            measured,
            tf.constant(where),
            tf.constant(np.arange(batch_size) < size),
            stitcher.weight,
            factor,
            background,
        )
        pairs = [
            (
                amplitudes[g - first, ..., 0] * float(factor),
                np.asarray(outputs["amplitude"][g - first, ..., 0]),
                None if valid is None else valid[g - first, ..., 0],
            )
            for g in shown
            if first <= g < first + size
        ]
        count = size * c
        return first, count, windows.numpy()[:count], sums.numpy(), pairs

    if overlap is None:
        overlap = has_gpu()
    totals = np.zeros(4)
    pairs = []
    batches = range(share.start, share.stop, batch_size)
    for first, count, windows, sums, shown_pairs in pipelined(predict, batches, overlap):
        totals += sums.sum(axis=0, dtype=np.float64)
        pairs += shown_pairs
        patches = slice(first * c, first * c + count)
        stitcher.accumulate(windows, row0[patches], col0[patches], group_size=c)
    if distribution is not None and distribution.workers > 1:
        stitcher.combine(distribution)
        (totals,) = distribution.all_sum([totals])
    obj, mask = stitcher.result()
    abs_error, measured_sum, nll_sum, counted = totals
    return NetworkReconstruction(
        obj=obj,
        mask=mask,
        xcoords=np.array(scan.xcoords),
        ycoords=np.array(scan.ycoords),
        probe=probe.astype(np.complex64),
        r_factor=abs_error / measured_sum if measured_sum > 0 else math.nan,
        poisson_nll=nll_sum / counted if counted > 0 else math.nan,
        seconds=time.perf_counter() - start,
        stage="network",
        traces=_tracing_count(predict_fn),
        diffraction_pairs=pairs,
        groups=len(chosen),
    )


@functools.cache
def _batch_outputs(backend: str, with_background: bool = False):
    """The compiled second half of a batch: ``(objects (B, N, N, C) complex, predicted
    amplitudes (B, N, N, C), raw measured amplitudes (B, N, N, C), fractions (B C, 2),
    valid (B,) bool, weight (N + 1, N + 1), factor, background (N, N, 1) counts) ->
    (windows, sums)``: the patches placed for the stitcher
    (:func:`ptycho.stitch.place_patches`) and the sums of ``| p - a |``, ``a``, the
    Poisson NLL and the pixels counted of each group, (B, 4), zero for padded rows, with
    ``a`` = raw * factor; raw pixels below 0 (masked) count nowhere.
    ``with_background``: the prediction is ``sqrt(p^2 + background factor^2)``, compared
    with the counts as measured."""

    def finish(objects, predicted, raw, fractions, valid, weight, factor, background):
        n = tf.shape(objects)[1]
        patches = tf.reshape(tf.transpose(objects, (0, 3, 1, 2)), (-1, n, n))
        windows = place_patches(tf.cast(patches, tf.complex64), fractions, weight, backend)
        # Per-group sums in float32 (16k terms each), added up in float64 on the host:
        # float64 arithmetic here would double the cost of this function.
        predicted = tf.cast(predicted, tf.float32)
        if with_background:
            predicted = tf.sqrt(tf.square(predicted) + background * tf.square(factor))
        predicted = tf.reshape(predicted, (tf.shape(objects)[0], -1))
        raw = tf.reshape(tf.cast(raw, tf.float32), tf.shape(predicted))
        keep = tf.cast(valid, tf.float32)[:, None] * tf.cast(raw >= 0, tf.float32)
        measured = tf.maximum(raw, 0.0) * factor
        rate = tf.square(predicted) + 1e-12
        sums = tf.stack(
            [
                tf.reduce_sum(tf.abs(predicted - measured) * keep, axis=1),
                tf.reduce_sum(measured * keep, axis=1),
                tf.reduce_sum((rate - tf.math.xlogy(tf.square(measured), rate)) * keep, axis=1),
                tf.reduce_sum(keep, axis=1),
            ],
            axis=1,
        )
        return windows, sums

    return compiled(finish, "jit" if backend == "xla" else "graph")


def make_predict_fn(model: keras.Model, compile_mode: str):
    """``inputs -> outputs`` of the model for inference, compiled for ``compile_mode``."""

    def predict(inputs):
        outputs = model(inputs, training=False)
        return {"amplitude": outputs["amplitude"], "object": outputs["object"]}

    return compiled(predict, compile_mode)


def _tracing_count(fn) -> int:
    counter = getattr(fn, "experimental_get_tracing_count", None)
    return int(counter()) if counter else 0

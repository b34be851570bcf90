"""Object <-> patch geometry: cutting patches out of an object, stitching them back.

A patch j is the N x N window of the object covering rows ``[y_j - N/2, y_j + N/2)``
and columns ``[x_j - N/2, x_j + N/2)``, bilinear for sub-pixel positions, zero outside
the object (docs/design.md, section 3). Sub-pixel shifts go through the project's own
:func:`ptycho.warp.translate`, so the simulator and the model share one convention.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow as tf

from ptycho import probes
from ptycho.warp import translate

__all__ = [
    "Stitcher",
    "extract_patches",
    "illumination",
    "object_shape_for",
    "place_patches",
    "reassemble_patches",
    "stitch_patches",
    "weighted_channels",
    "window_corners",
]


def extract_patches(
    obj: np.ndarray,
    xcoords: np.ndarray,
    ycoords: np.ndarray,
    n: int,
    *,
    backend: str = "xla",
    batch_size: int = 256,
) -> np.ndarray:
    """Cut (M, N, N) patches out of an (H, W) object at patch centres (x, y).

    Parameters
    ----------
    obj : (H, W) complex or real array
    xcoords, ycoords : (M,) float
        Patch centres in object pixels (x = column, y = row).
    n : int
        Patch size N (even).
    backend : {"xla", "legacy"}
        Warp backend of the sub-pixel shift.
    batch_size : int
        Patches warped per call (bounds memory on long scans).

    Returns
    -------
    (M, N, N) array of ``obj``'s dtype (complex64 for complex input, float32 for real).
    """
    obj = np.asarray(obj)
    if obj.ndim != 2:
        raise ValueError(f"obj must be 2-D (H, W), got shape {obj.shape}")
    if n % 2:
        raise ValueError(f"patch size n must be even, got {n}")
    xcoords = np.asarray(xcoords, np.float64)
    ycoords = np.asarray(ycoords, np.float64)
    if xcoords.shape != ycoords.shape or xcoords.ndim != 1:
        raise ValueError(
            f"xcoords and ycoords must be 1-D of equal length, got {xcoords.shape} and "
            f"{ycoords.shape}"
        )
    dtype = np.complex64 if np.iscomplexobj(obj) else np.float32
    obj = obj.astype(dtype, copy=False)
    height, width = obj.shape
    # Window of N + 1 pixels starting at the integer part of the top-left corner, so the
    # bilinear taps of every output pixel lie inside it; pad so any window can be cut.
    top = ycoords - n / 2
    left = xcoords - n / 2
    row0 = np.floor(top).astype(np.int64)
    col0 = np.floor(left).astype(np.int64)
    pad_lo = int(max(0, -row0.min(initial=0), -col0.min(initial=0)))
    pad_hi = int(
        max(0, (row0 + n + 1 - height).max(initial=0), (col0 + n + 1 - width).max(initial=0))
    )
    padded = np.pad(obj, ((pad_lo, pad_hi), (pad_lo, pad_hi)))
    out = np.empty((len(xcoords), n, n), dtype)
    rows = np.arange(n + 1)
    for start in range(0, len(xcoords), batch_size):
        stop = min(start + batch_size, len(xcoords))
        r = (row0[start:stop, None] + pad_lo) + rows  # (b, N + 1)
        c = (col0[start:stop, None] + pad_lo) + rows
        windows = padded[r[:, :, None], c[:, None, :]]  # (b, N + 1, N + 1)
        # out(i, j) = window(i + fy, j + fx): a translation by [-fx, -fy].
        offsets = np.stack(
            [-(left[start:stop] - col0[start:stop]), -(top[start:stop] - row0[start:stop])], axis=1
        )
        shifted = translate(windows[..., None], offsets.astype(np.float32), backend=backend)
        out[start:stop] = shifted.numpy()[:, :n, :n, 0]
    return out


def illumination(
    xcoords: np.ndarray, ycoords: np.ndarray, probe: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """(H, W) summed probe intensity ``sum_j |P|^2`` of every position (windows placed
    at the nearest pixel; parts outside the frame dropped): how well each pixel is
    illuminated, the coverage a reconstruction rests on. A (K, N, N) probe counts
    its modes' summed intensity."""
    weight = probes.intensity(probe)
    n = weight.shape[0]
    height, width = int(shape[0]), int(shape[1])
    out = np.zeros((height + 2 * n, width + 2 * n))
    corners = np.rint(np.stack([ycoords, xcoords], 1) - n / 2).astype(np.int64) + n
    corners = np.clip(corners, 0, [height + n, width + n])
    for row, col in corners:
        out[row : row + n, col : col + n] += weight
    return out[n : n + height, n : n + width]


def object_shape_for(xcoords: np.ndarray, ycoords: np.ndarray, n: int) -> tuple[int, int]:
    """Smallest (H, W) frame that holds every patch (positions are patch centres)."""
    return (
        math.ceil(float(np.max(ycoords)) + n / 2) + 1,
        math.ceil(float(np.max(xcoords)) + n / 2) + 1,
    )


def place_patches(patches, fractions, weight, backend: str = "xla"):
    """Patches weighted by ``weight`` and shifted by their sub-pixel fractions.

    patches (B, N, N) complex64, fractions (B, 2) [fx, fy] in [0, 1), weight
    (N + 1, N + 1) float32 -> windows (B, N + 1, N + 1, 3) float32: the real and
    imaginary parts times the weight, and the weight, shifted into place (a window's
    corner is the integer part of the patch's top-left corner). One real tensor rather
    than a complex one and the weights: slicing the warped channels apart into those
    two outputs made the XLA function several times slower on the CPU
    (``benchmarks/infer.py``, docs/benchmarks.md).
    """
    padded = tf.pad(patches, [[0, 0], [0, 1], [0, 1]])
    return translate(weighted_channels(padded, weight), fractions, backend=backend)


def weighted_channels(patches, weight):
    """(B, H, W) complex and a weight broadcastable to it -> (B, H, W, 3) float32: real
    part times weight, imaginary part times weight, weight. The form in which patches
    are warped and summed, so one warp moves the values and the weights together."""
    real, imag = tf.math.real(patches), tf.math.imag(patches)
    weight = tf.broadcast_to(weight, tf.shape(real))
    return tf.stack([real * weight, imag * weight, weight], axis=-1)


@functools.cache
def placement_function(backend: str):
    """The compiled :func:`place_patches` of a backend (XLA for "xla").

    Shared by every :class:`Stitcher`, so reconstructing many scans with the same batch
    size traces it once.
    """

    def place(patches, fractions, weight):
        return place_patches(patches, fractions, weight, backend)

    return tf.function(place, jit_compile=(backend == "xla"), autograph=False)


def window_corners(xcoords, ycoords, n: int):
    """``(row0, col0, fractions)`` of patches centred at (x, y): the integer corner of
    each (N + 1) x (N + 1) window and the sub-pixel shift [fx, fy] (float32) that places
    the patch inside it."""
    top = np.asarray(ycoords, np.float64) - n / 2
    left = np.asarray(xcoords, np.float64) - n / 2
    row0, col0 = np.floor(top).astype(np.int64), np.floor(left).astype(np.int64)
    fractions = np.stack([left - col0, top - row0], axis=1).astype(np.float32)
    return row0, col0, fractions


class Stitcher:
    """Accumulates object patches into one object, batch by batch.

    Each patch is placed at its position with the project's translation (sub-pixel
    part) and a slice (integer part), weighted by the illumination ``|P|^2``; the
    object is the weighted sum divided by the summed weight. Memory is two
    object-sized canvases (complex64 and float32: single precision holds the sums of a
    few hundred weighted patches per pixel to ~1e-6, and the host's additions take 30%
    less time than in double) whatever the number of patches; the warp runs in
    fixed-size batches (the last one padded), so a compiled function is traced once.

    Parameters
    ----------
    shape : (H, W)
        Object frame; pixel (y, x) is object coordinate (y, x).
    n : int
        Patch size N.
    probe : (N, N) complex or (K, N, N) modes, optional
        Weights ``sum_k |P_k|^2``; None weights every patch pixel by 1.
    backend : {"xla", "legacy"}
        Warp backend; "xla" runs under XLA.
    batch_size : int
    weight_threshold : float
        Pixels whose summed weight is below this fraction of ``max |P|^2`` count as not
        covered: 0 in the object and False in the mask.
    align_phase : bool
        Rotate each group of patches (see :meth:`add`) by the constant phase that best
        matches what is already stitched where they overlap, before adding it. A network
        sees one group at a time and its diffraction data do not change when the group's
        object is multiplied by ``exp(i c)``, so each group's phase is only known up to
        such a constant; averaging groups with different constants would cancel
        amplitude and blur phase. The first group sets the reference.
    """

    def __init__(
        self,
        shape,
        n: int,
        *,
        probe=None,
        backend: str = "xla",
        batch_size: int = 256,
        weight_threshold: float = 1e-3,
        align_phase: bool = False,
    ):
        self.shape = (int(shape[0]), int(shape[1]))
        self.align_phase = bool(align_phase)
        self.n = int(n)
        self.batch_size = int(batch_size)
        weight = np.ones((n, n)) if probe is None else probes.intensity(probe)
        if weight.shape != (n, n):
            raise ValueError(f"probe must be ({n}, {n}), got {weight.shape}")
        self.threshold = weight_threshold * float(weight.max())
        # Patch (N x N) padded to the (N + 1) x (N + 1) window its bilinear shift needs.
        self.weight = tf.constant(np.pad(weight, ((0, 1), (0, 1))).astype(np.float32))
        self._numerator = np.zeros(self.shape, np.complex64)  # sum of weight * patch
        self._denominator = np.zeros(self.shape, np.float32)  # sum of weights
        self._place = placement_function(backend)
        self.backend = backend

    def add(
        self,
        patches: np.ndarray,
        xcoords: np.ndarray,
        ycoords: np.ndarray,
        *,
        group_size: int = 1,
    ) -> None:
        """Add (M, N, N) complex patches centred at (x, y).

        ``group_size``: every ``group_size`` consecutive patches are one group (the C
        patches a network predicted together), phase-aligned as one with
        ``align_phase``; M and the batch size must be multiples of it.
        """
        patches = np.asarray(patches, np.complex64)
        n = self.n
        if patches.ndim != 3 or patches.shape[1:] != (n, n) or len(patches) != len(xcoords):
            raise ValueError(
                f"patches must be (M, {n}, {n}) with one position each, got {patches.shape} "
                f"and {len(xcoords)} positions"
            )
        if len(patches) % group_size or self.batch_size % group_size:
            raise ValueError(
                f"{len(patches)} patches in batches of {self.batch_size} cannot be cut into "
                f"groups of {group_size}"
            )
        row0, col0, fractions = window_corners(xcoords, ycoords, n)
        for start in range(0, len(patches), self.batch_size):
            stop = min(start + self.batch_size, len(patches))
            count = stop - start
            batch = np.zeros((self.batch_size, n, n), np.complex64)
            shifts = np.zeros((self.batch_size, 2), np.float32)
            batch[:count], shifts[:count] = patches[start:stop], fractions[start:stop]
            windows = self._place(tf.constant(batch), tf.constant(shifts), self.weight)
            self.accumulate(
                windows.numpy()[:count],
                row0[start:stop],
                col0[start:stop],
                group_size=group_size,
            )

    def accumulate(
        self,
        windows: np.ndarray,
        row0: np.ndarray,
        col0: np.ndarray,
        *,
        group_size: int = 1,
    ) -> None:
        """Add placed windows (:func:`place_patches`, (M, N + 1, N + 1, 3)) whose
        corners are (row0, col0), group by group (phase-aligned as one with
        ``align_phase``)."""
        span = self.n + 1
        height, width = self.shape
        inside = (row0 >= 0) & (col0 >= 0) & (row0 + span <= height) & (col0 + span <= width)
        values = np.empty(windows.shape[:3], np.complex64)
        values.real, values.imag = windows[..., 0], windows[..., 1]
        weights = windows[..., 2]
        numerator, denominator = self._numerator, self._denominator
        for first in range(0, len(windows), group_size):
            members = range(first, first + group_size)
            places = [
                ((slice(row0[j], row0[j] + span), slice(col0[j], col0[j] + span)), ...)
                if inside[j]
                else self._clip(int(row0[j]), int(col0[j]))
                for j in members
            ]
            rotation = self._rotation(values, members, places) if self.align_phase else None
            for j, (where, part) in zip(members, places, strict=True):
                if where is None:
                    continue
                if rotation is None:
                    numerator[where] += values[j][part]
                else:
                    numerator[where] += rotation * values[j][part]
                denominator[where] += weights[j][part]

    def _clip(self, row: int, col: int):
        """(canvas slices, window slices) of a window whose corner is (row, col); (None,
        None) when it lies outside the frame."""
        height, width = self.shape
        span = self.n + 1
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + span, height), min(col + span, width)
        if r1 <= r0 or c1 <= c0:
            return None, None
        return (slice(r0, r1), slice(c0, c1)), (
            slice(r0 - row, r1 - row),
            slice(c0 - col, c1 - col),
        )

    def _rotation(self, values: np.ndarray, members, places) -> complex | None:
        """``exp(i phi)``, phi the phase of a group's weighted overlap with the stitched
        object so far (None when there is none)."""
        overlap = 0j
        for j, (where, part) in zip(members, places, strict=True):
            if where is not None:
                overlap += np.vdot(values[j][part], self._numerator[where])
        return overlap / abs(overlap) if abs(overlap) > 0 else None

    def combine(self, distribution) -> None:
        """Make the sums every worker's (``distribution``: :class:`ptycho.distribute.
        Distribution`, each worker having stitched its consecutive share of the groups):
        the workers' canvases added in worker order, each aligned as one group to those
        before it with ``align_phase``. A collective: every worker calls it."""
        if distribution is None or distribution.workers == 1:
            return
        local = np.stack([self._numerator.real, self._numerator.imag, self._denominator])
        parts = distribution.all_gather(local.astype(np.float32))
        numerator = (parts[0, 0] + 1j * parts[0, 1]).astype(np.complex64)
        for part in parts[1:]:
            values = (part[0] + 1j * part[1]).astype(np.complex64)
            overlap = np.vdot(values, numerator) if self.align_phase else 0j
            rotation = overlap / abs(overlap) if abs(overlap) > 0 else 1.0
            numerator += (rotation * values).astype(np.complex64)
        self._numerator = numerator
        self._denominator = parts[:, 2].sum(axis=0, dtype=np.float32)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(object, mask)``: (H, W) complex64 and bool (covered pixels)."""
        mask = self._denominator > self.threshold
        safe = np.where(mask, self._denominator, 1.0)
        return np.where(mask, self._numerator / safe, 0).astype(np.complex64), mask

    @property
    def traces(self) -> int:
        """Times the (shared) placement function has been traced: 1 per batch shape."""
        return self._place.experimental_get_tracing_count()


def stitch_patches(
    patches: np.ndarray,
    xcoords: np.ndarray,
    ycoords: np.ndarray,
    shape: tuple[int, int] | None = None,
    *,
    probe: np.ndarray | None = None,
    backend: str = "xla",
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Stitch (M, N, N) patches centred at (x, y) into one object; see :class:`Stitcher`.

    Returns ``(object (H, W) complex64, mask (H, W) bool)`` in the positions' frame.
    """
    patches = np.asarray(patches)
    n = patches.shape[-1]
    shape = object_shape_for(xcoords, ycoords, n) if shape is None else shape
    stitcher = Stitcher(shape, n, probe=probe, backend=backend, batch_size=batch_size)
    stitcher.add(patches, xcoords, ycoords)
    return stitcher.result()


def _support_mask(n, support: float) -> tf.Tensor:
    """(N, N) float32: 1 on the central ``support * N`` square."""
    index = tf.range(n, dtype=tf.float32) - tf.cast(n, tf.float32) / 2 + 0.5
    line = tf.cast(tf.abs(index) < support * tf.cast(n, tf.float32) / 2, tf.float32)
    return line[:, None] * line[None, :]


def reassemble_patches(patches, offsets, pad: int, support: float, backend: str = "xla"):
    """Make a group's C patches consistent: merge them into one object and cut them out.

    Each patch is placed on a canvas of N + 2 * ``pad`` pixels, translated by its
    offset from the group centre, summed and divided by the overlap count (a patch
    counts over its central ``support * N`` square, where it is predicted); C patches
    are cut back out by translating the merged canvas by minus the offsets and cropping
    the centre. Content moved beyond the canvas is lost: ``pad`` must cover the offsets
    (with ``support = 0.5``, offsets up to N/4 need no pad at all).

    Parameters
    ----------
    patches : (B, N, N, C) complex64
    offsets : (B, C, 2) float32, ``[dx, dy]`` pixels from the group centre
    pad : int
    support : float in (0, 1]
    backend : {"xla", "legacy"}

    Returns
    -------
    (B, N, N, C) complex64
    """
    shape = tf.shape(patches)
    batch, n, channels = shape[0], shape[1], shape[3]
    size = n + 2 * pad
    # Every patch is its own image: (B, N, N, C) -> (B * C, N, N) with a real and an
    # imaginary channel plus its weight, so placing patches and weights is one warp.
    flat = tf.reshape(tf.transpose(patches, (0, 3, 1, 2)), (-1, n, n))
    stacked = weighted_channels(flat, _support_mask(n, support))
    canvas = tf.pad(stacked, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    shifts = tf.reshape(offsets, (-1, 2))
    placed = translate(canvas, shifts, backend=backend)
    total = tf.reduce_sum(tf.reshape(placed, (batch, channels, size, size, 3)), axis=1)
    count = total[..., 2]
    covered = count > 1e-3
    safe = tf.where(covered, count, tf.ones_like(count))
    zero = tf.zeros_like(count)
    merged = tf.complex(
        tf.where(covered, total[..., 0] / safe, zero),
        tf.where(covered, total[..., 1] / safe, zero),
    )
    copies = tf.reshape(
        tf.broadcast_to(merged[:, None, :, :, None], (batch, channels, size, size, 1)),
        (-1, size, size, 1),
    )
    back = translate(copies, -shifts, backend=backend)[:, pad : pad + n, pad : pad + n, 0]
    return tf.transpose(tf.reshape(back, (batch, channels, n, n)), (0, 2, 3, 1))

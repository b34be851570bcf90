"""Stitching patches back into an object, in the positions' pixel frame."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from ptycho.data import make_probe
from ptycho.stitch import (
    Stitcher,
    extract_patches,
    object_shape_for,
    placement_function,
    stitch_patches,
)


def random_object(shape=(120, 130), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.3, 1, shape) * np.exp(1j * rng.uniform(-1, 1, shape))).astype(
        np.complex64
    )


def grid(n=32, step=8, count=6, offset=20.0):
    x, y = np.meshgrid(offset + step * np.arange(count), offset + step * np.arange(count))
    return x.ravel().astype(float), y.ravel().astype(float)


@pytest.mark.parametrize("backend", ["xla", "legacy"])
def test_stitching_exact_patches_at_integer_positions_returns_the_object(backend):
    obj = random_object()
    x, y = grid()
    patches = extract_patches(obj, x, y, 32)
    probe = make_probe(32, kind="gaussian", radius=0.4)
    out, mask = stitch_patches(patches, x, y, obj.shape, probe=probe, backend=backend)
    assert out.shape == obj.shape and out.dtype == np.complex64
    np.testing.assert_allclose(out[mask], obj[mask], atol=1e-5)
    assert not out[~mask].any()
    # Pixel (y, x) of the result is object coordinate (y, x): the covered box.
    rows, cols = np.nonzero(mask)
    assert rows.min() >= y.min() - 16 and rows.max() <= y.max() + 16
    assert cols.min() >= x.min() - 16 and cols.max() <= x.max() + 16


def test_subpixel_positions_stitch_close_to_the_object():
    rng = np.random.default_rng(1)
    smooth = scipy.ndimage.gaussian_filter(rng.normal(size=(120, 130)), 3)
    obj = (1 + 0.2 * smooth).astype(np.complex64)
    x, y = grid()
    x, y = x + rng.uniform(-0.5, 0.5, x.shape), y + rng.uniform(-0.5, 0.5, y.shape)
    patches = extract_patches(obj, x, y, 32)
    out, mask = stitch_patches(patches, x, y, obj.shape)
    inner = mask.copy()
    inner[: int(y.min()), :] = inner[int(y.max()) :, :] = False
    inner[:, : int(x.min())] = inner[:, int(x.max()) :] = False
    assert np.abs(out[inner] - obj[inner]).max() < 5e-3


def numpy_stitch(patches, x, y, shape, weight):
    """Weighted average of patches placed at sub-pixel positions, with scipy: each
    patch (times its weight) is put on the object frame at the integer part of its
    top-left corner and shifted by the fractional part (bilinear, zero fill)."""
    n = patches.shape[-1]
    total = np.zeros(shape, np.complex128)
    count = np.zeros(shape)
    for patch, xj, yj in zip(patches, x, y, strict=True):
        top, left = yj - n / 2, xj - n / 2
        row, col = int(np.floor(top)), int(np.floor(left))
        canvas = np.zeros(shape, np.complex128)
        canvas[row : row + n, col : col + n] = patch * weight
        ones = np.zeros(shape)
        ones[row : row + n, col : col + n] = weight

        def shift(part, fy=top - row, fx=left - col):
            return scipy.ndimage.shift(part, (fy, fx), order=1, mode="grid-constant")

        total += shift(canvas.real) + 1j * shift(canvas.imag)
        count += shift(ones)
    covered = count > 1e-3 * weight.max()
    return np.where(covered, total / np.where(covered, count, 1.0), 0), covered


@pytest.mark.parametrize("backend", ["xla", "legacy"])
def test_stitching_weights_disagreeing_patches_by_the_probe_intensity(backend):
    """Random (inconsistent) patches at sub-pixel positions under a non-uniform
    complex probe: the stitched object is the |P|^2-weighted average, not the
    |P|-weighted or plain one."""
    rng = np.random.default_rng(7)
    n = 32
    probe = make_probe(n, kind="fresnel", radius=0.3)
    x, y = grid(n=n, step=7, count=4, offset=20.0)
    x, y = x + rng.uniform(0.1, 0.9, x.shape), y + rng.uniform(0.1, 0.9, y.shape)
    patches = rng.normal(size=(len(x), n, n)) + 1j * rng.normal(size=(len(x), n, n))
    shape = (70, 75)
    out, mask = stitch_patches(patches, x, y, shape, probe=probe, backend=backend, batch_size=8)
    intensity = np.abs(probe) ** 2
    expected, covered = numpy_stitch(patches, x, y, shape, intensity)
    np.testing.assert_array_equal(mask, covered)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    by_modulus, _ = numpy_stitch(patches, x, y, shape, np.abs(probe))
    assert np.abs(out - by_modulus)[mask].mean() > 0.05  # the weighting is visible


def test_weighted_average_of_two_disagreeing_patches():
    patches = np.stack([np.full((16, 16), 1.0), np.full((16, 16), 3.0)]).astype(np.complex64)
    x = y = np.array([20.0, 20.0])
    probe = np.ones((16, 16))
    out, mask = stitch_patches(patches, x, y, (40, 40), probe=probe)
    np.testing.assert_allclose(out[mask], 2.0)
    assert mask.sum() == 16 * 16 and mask[12:28, 12:28].all()


def test_streaming_traces_once_for_any_scan_length():
    obj = random_object((200, 200))
    rng = np.random.default_rng(2)
    x, y = rng.uniform(20, 180, 700), rng.uniform(20, 180, 700)
    patches = extract_patches(obj, x, y, 32)
    placement_function.cache_clear()  # a fresh compiled placement, whatever ran before
    stitcher = Stitcher(obj.shape, 32, batch_size=64)
    assert stitcher.traces == 0
    for start in range(0, 700, 100):  # arrives in pieces, last batch partial
        stitcher.add(patches[start : start + 100], x[start : start + 100], y[start : start + 100])
    assert stitcher.traces == 1
    again = Stitcher(obj.shape, 32, batch_size=64)  # shares the compiled placement
    again.add(patches, x, y)
    assert again.traces == stitcher.traces  # same batch shape: no new trace
    out, mask = stitcher.result()
    whole, whole_mask = stitch_patches(patches, x, y, obj.shape, batch_size=64)
    np.testing.assert_allclose(out, whole, atol=1e-6)
    np.testing.assert_array_equal(mask, whole_mask)


def test_object_shape_holds_every_patch():
    assert object_shape_for(np.array([16.0, 40.5]), np.array([16.0, 30.0]), 32) == (47, 58)


def test_phase_alignment_undoes_a_constant_phase_per_group():
    """Each group of 4 exact patches carries its own random constant phase (what a
    network's output is free to have): aligned stitching returns the object up to one
    global phase; plain averaging cancels amplitude where groups overlap."""
    obj = random_object((150, 150), seed=3)
    x, y = grid(n=32, step=6, count=12, offset=20.0)
    rng = np.random.default_rng(4)
    x, y = x + rng.uniform(-0.4, 0.4, x.shape), y + rng.uniform(-0.4, 0.4, y.shape)
    groups = np.arange(len(x)).reshape(-1, 4)
    patches = extract_patches(obj, x, y, 32)
    phases = np.exp(1j * rng.uniform(-np.pi, np.pi, len(groups)))
    scrambled = (patches.reshape(-1, 4, 32, 32) * phases[:, None, None, None]).reshape(-1, 32, 32)
    probe = make_probe(32, kind="gaussian", radius=0.4)

    def stitched(align):
        stitcher = Stitcher(obj.shape, 32, probe=probe, batch_size=16, align_phase=align)
        stitcher.add(scrambled, x, y, group_size=4)
        return stitcher.result()

    reference, mask = stitch_patches(patches, x, y, obj.shape, probe=probe)
    aligned, aligned_mask = stitched(True)
    np.testing.assert_array_equal(aligned_mask, mask)
    gain = np.vdot(aligned[mask], reference[mask]) / np.vdot(aligned[mask], aligned[mask])
    assert abs(abs(gain) - 1) < 1e-3  # one global phase, no amplitude loss
    np.testing.assert_allclose(gain * aligned[mask], reference[mask], atol=5e-3)
    averaged, _ = stitched(False)
    assert np.mean(np.abs(averaged[mask])) < 0.8 * np.mean(np.abs(reference[mask]))
    with pytest.raises(ValueError, match="groups of 4"):
        Stitcher(obj.shape, 32, batch_size=6).add(scrambled, x, y, group_size=4)

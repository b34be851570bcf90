"""The reconstruction path checked against ground truth.

``reconstruct()`` is fed the true object patches (cut out with scipy, independently of
the project's warp) and their far-field amplitudes (numpy FFT); a shifted stitching
frame, a wrong scan region, a lost normalisation factor or broken scale and phase
removal in ``Scorer.score`` would all show here.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

import ptycho  # noqa: F401
from ptycho.data import group_offsets, group_positions, normalisation_factor, scan_step, simulate
from ptycho.inference import reconstruct
from ptycho.metrics import largest_rectangle, poisson_nll, r_factor
from ptycho.model import ModelConfig, build_model
from ptycho.reconstruction import Reconstruction
from ptycho.scoring import Scorer, scan_region

N = 64


def scipy_patch(obj: np.ndarray, x: float, y: float, n: int = N) -> np.ndarray:
    """The N x N window centred on (x, y), bilinear, zero outside (scipy)."""
    grid = np.meshgrid(y - n / 2 + np.arange(n), x - n / 2 + np.arange(n), indexing="ij")

    def sample(part):
        return scipy.ndimage.map_coordinates(part, grid, order=1, mode="grid-constant")

    return sample(obj.real.astype(np.float64)) + 1j * sample(obj.imag.astype(np.float64))


def numpy_far_field_amplitude(probe: np.ndarray, patch: np.ndarray) -> np.ndarray:
    wave = probe.astype(np.complex128) * patch
    return np.abs(np.fft.fftshift(np.fft.fft2(wave))) / wave.shape[-1]


class TruthOracle:
    """A stand-in for the network that answers every pattern with the truth.

    Each input pattern is identified by matching it against the scan's patterns (the
    scan is noiseless, so the match is exact); padded rows of the last batch are zeros
    and get some answer that ``reconstruct`` must discard.
    """

    def __init__(self, scan, factor: float, obj_gain: complex = 1.0):
        self.scan = scan
        self.factor = factor
        self.flat = scan.diffraction.reshape(scan.n_positions, -1).astype(np.float64)
        self.patches = np.stack(
            [
                scipy_patch(scan.object, x, y)
                for x, y in zip(scan.xcoords, scan.ycoords, strict=True)
            ]
        )
        self.amplitudes = np.stack([numpy_far_field_amplitude(scan.probe, p) for p in self.patches])
        self.obj_gain = obj_gain
        self.calls = 0

    def identify(self, diffraction: np.ndarray) -> np.ndarray:
        """(B, N, N, C) patterns -> (B, C) indices of the scan's patterns."""
        b, n, _, c = diffraction.shape
        queries = np.moveaxis(diffraction, -1, 1).reshape(b * c, n * n).astype(np.float64)
        distance = (
            (queries**2).sum(1)[:, None] - 2 * queries @ self.flat.T + (self.flat**2).sum(1)[None]
        )
        return np.argmin(distance, axis=1).reshape(b, c)

    def __call__(self, inputs):
        self.calls += 1
        index = self.identify(inputs["diffraction"].numpy())
        patches = np.moveaxis(self.patches[index], 1, -1) * self.obj_gain  # (B, N, N, C)
        amplitudes = np.moveaxis(self.amplitudes[index], 1, -1) * self.factor
        return {
            "amplitude": tf.constant(amplitudes.astype(np.float32)),
            "object": tf.constant(patches.astype(np.complex64)),
        }


def model_for(scan, **config):
    factor = normalisation_factor(scan.diffraction)
    model, _ = build_model(
        ModelConfig(n=N, filters=4, precision="float32", **config),
        probe=scan.probe,
        norm_factor=factor,
    )
    return model, factor


@pytest.fixture(scope="module")
def grid_scan():
    """Noiseless raster at integer positions (step 8 px) over a non-square object, under
    a flat-topped disk probe (coverage thresholds do not depend on how many groups
    cover a pixel)."""
    return simulate(
        n=N, n_positions=40, step=0.125, probe="disk", probe_radius=0.25, nphotons=None, seed=11
    )


@pytest.fixture(scope="module")
def jittered_scan():
    """Noiseless scan at sub-pixel positions over a smooth object (patches cut with the
    warp, the interpolation the network's stitching inverts)."""
    return simulate(
        n=N,
        n_positions=36,
        step=0.125,
        jitter=0.03,
        nphotons=None,
        subpixel="bilinear",
        object_kind="grf",
        correlation_length=6.0,
        seed=12,
    )


@pytest.mark.parametrize("gridsize", [1, 2])
def test_true_patches_reconstruct_the_truth_exactly_at_integer_positions(grid_scan, gridsize):
    scan = grid_scan
    assert np.allclose(scan.xcoords, np.round(scan.xcoords))  # the premise of exactness
    model, factor = model_for(scan, gridsize=gridsize)
    oracle = TruthOracle(scan, factor)
    result = reconstruct(model, scan, batch_size=8, predict_fn=oracle)
    groups = group_positions(scan.xcoords, scan.ycoords, gridsize)
    assert oracle.calls == math.ceil(len(groups) / 8)  # fixed batches, the last one padded
    assert result.r_factor < 1e-3
    assert result.obj.shape == scan.object.shape  # the truth's frame
    # Every covered pixel is the object's own value there: the stitching frame is the
    # positions' frame, with no shift.
    np.testing.assert_allclose(result.obj[result.mask], scan.object[result.mask], atol=1e-5)
    # Coverage is the union of the probe's footprints and nothing else.
    rows, cols = np.nonzero(result.mask)
    assert rows.min() >= scan.ycoords.min() - N / 2 and rows.max() < scan.ycoords.max() + N / 2
    assert cols.min() >= scan.xcoords.min() - N / 2 and cols.max() < scan.xcoords.max() + N / 2
    values = scored(result, scan)
    assert values["amp_ssim"] > 0.99 and values["phase_ssim"] > 0.99
    assert values["amp_psnr"] > 60 and values["phase_psnr"] > 60


def test_scored_removes_the_global_scale_and_phase_of_a_reconstruction(grid_scan):
    scan = grid_scan
    model, factor = model_for(scan, gridsize=2)
    gain = 0.6 * np.exp(1.1j)  # the ambiguities ptychography leaves: scale, phase offset
    result = reconstruct(model, scan, batch_size=8, predict_fn=TruthOracle(scan, factor, gain))
    np.testing.assert_allclose(result.obj[result.mask], gain * scan.object[result.mask], atol=1e-5)
    values = scored(result, scan)
    assert values["amp_ssim"] > 0.99 and values["phase_ssim"] > 0.99
    assert values["amp_mae"] < 1e-4 and values["phase_mae"] < 1e-4


def test_true_patches_at_subpixel_positions_reconstruct_a_smooth_object(jittered_scan):
    scan = jittered_scan
    assert np.abs(scan.xcoords - np.round(scan.xcoords)).max() > 0.2
    model, factor = model_for(scan, gridsize=2)
    result = reconstruct(model, scan, batch_size=8, predict_fn=TruthOracle(scan, factor))
    assert result.r_factor < 1e-3
    region = scan_interior(scan)
    error = np.abs(result.obj[region] - scan.object[region])
    assert error.max() < 0.02 * np.abs(scan.object[region]).max()  # bilinear round trips
    values = scored(result, scan)
    assert values["amp_ssim"] > 0.99 and values["phase_ssim"] > 0.99


def scan_interior(scan):
    return (
        slice(int(scan.ycoords.min()) + 1, int(scan.ycoords.max())),
        slice(int(scan.xcoords.min()) + 1, int(scan.xcoords.max())),
    )


def test_true_patches_through_the_models_own_physics_match_the_data(grid_scan):
    """object_support=full: the truth pushed through the model's overlap constraint,
    probe, far field and intensity scale reproduces the normalised measurements."""
    scan = grid_scan
    model, factor = model_for(scan, gridsize=2, object_support="full")
    # Noiseless data are |Psi| unscaled: the normalised target is factor * |Psi|.
    model.get_layer("amplitude").log_scale.assign(math.log(factor))
    oracle = TruthOracle(scan, factor)
    layers = [model.get_layer(name) for name in ("illumination", "far_field", "amplitude")]
    reassemble = model.get_layer("reassemble")

    def physics(inputs):
        patches = oracle(inputs)["object"]
        consistent = reassemble(patches, inputs["offsets"])
        out = consistent
        for layer in layers:
            out = layer(out)
        return {"amplitude": out, "object": consistent}

    result = reconstruct(model, scan, batch_size=8, predict_fn=physics)
    assert result.r_factor < 1e-6
    np.testing.assert_allclose(result.obj[result.mask], scan.object[result.mask], atol=1e-5)
    values = scored(result, scan)
    assert values["amp_ssim"] > 0.99 and values["phase_ssim"] > 0.99


def test_a_wrong_answer_is_not_scored_as_the_truth(grid_scan):
    """The checks above can fail: patterns answered with other positions' patches."""
    scan = grid_scan
    model, factor = model_for(scan, gridsize=1)
    oracle = TruthOracle(scan, factor)
    shuffled = np.random.default_rng(0).permutation(scan.n_positions)
    oracle.patches, oracle.amplitudes = oracle.patches[shuffled], oracle.amplitudes[shuffled]
    result = reconstruct(model, scan, batch_size=8, predict_fn=oracle)
    assert result.r_factor > 0.1
    assert scored(result, scan)["amp_ssim"] < 0.9


def scored(result, scan) -> dict:
    return Scorer(scan).score(result)


def given_object(obj, mask, scan) -> Reconstruction:
    """A reconstruction holding ``obj`` (no prediction behind it): for scoring alone."""
    return Reconstruction(
        obj=obj,
        mask=mask,
        xcoords=scan.xcoords,
        ycoords=scan.ycoords,
        probe=scan.probe,
        r_factor=0.0,
        poisson_nll=0.0,
        seconds=1.0,
        stage="given",
    )


def test_metrics_are_taken_on_the_scanned_region(grid_scan):
    """The truth inside the bounding box of the patch centres and noise outside it
    scores as perfect (a larger or transposed region would take in noise), and noise
    in the box's last row shows (a smaller region would miss it)."""
    scan = grid_scan
    rng = np.random.default_rng(1)
    noise = rng.uniform(0, 1, scan.object.shape) * np.exp(
        1j * rng.uniform(-3, 3, scan.object.shape)
    )
    rows = slice(int(scan.ycoords.min()), int(scan.ycoords.max()) + 1)
    cols = slice(int(scan.xcoords.min()), int(scan.xcoords.max()) + 1)
    assert rows.stop - rows.start != cols.stop - cols.start  # swapping x and y would show
    obj = noise.astype(np.complex64)
    obj[rows, cols] = scan.object[rows, cols]
    result = given_object(obj, np.ones(obj.shape, bool), scan)
    values = scored(result, scan)
    assert values["amp_ssim"] > 0.999 and values["phase_ssim"] > 0.999
    obj[rows.stop - 1, cols] = noise[rows.stop - 1, cols]  # the last scanned row counts
    assert scored(result, scan)["amp_ssim"] < 0.99


def test_the_unscanned_corners_of_a_spiral_are_not_scored():
    """A Fermat spiral covers a disk: the corners of its bounding box are never
    illuminated. The truth where the scan reached and zeros elsewhere scores as perfect;
    every scored pixel is near a position, the box's corners are out, and the region is
    more than half the box."""
    scan = simulate(n=N, n_positions=200, scan="spiral", step=0.125, nphotons=None, seed=3)
    rows, cols = scan_region(scan)
    yy, xx = np.mgrid[rows, cols]
    distance = np.hypot(
        xx.ravel()[:, None] - scan.xcoords[None], yy.ravel()[:, None] - scan.ycoords[None]
    ).min(axis=1)
    assert distance.max() <= 2 * scan_step(scan.xcoords, scan.ycoords)
    corners = [
        (y, x)
        for y in (scan.ycoords.min(), scan.ycoords.max())
        for x in (scan.xcoords.min(), scan.xcoords.max())
    ]
    assert not any(rows.start <= y < rows.stop and cols.start <= x < cols.stop for y, x in corners)
    box = np.ptp(scan.xcoords) * np.ptp(scan.ycoords)
    assert (rows.stop - rows.start) * (cols.stop - cols.start) > 0.5 * box  # not a sliver

    reached = np.zeros(scan.object.shape, bool)
    for x, y in zip(scan.xcoords, scan.ycoords, strict=True):
        reached[int(y) - N // 4 : int(y) + N // 4, int(x) - N // 4 : int(x) + N // 4] = True
    obj = np.where(reached, scan.object, 0).astype(np.complex64)
    result = given_object(obj, reached, scan)
    values = scored(result, scan)
    assert values["amp_ssim"] > 0.999 and values["phase_ssim"] > 0.999


@pytest.mark.parametrize("gridsize", [1, 2])
def test_tiled_groups_reconstruct_the_truth_with_fewer_predictions(grid_scan, gridsize):
    """groups="tile": every position predicted (about) once; the truth still comes out
    exactly, from about C times fewer groups."""
    scan = grid_scan
    model, factor = model_for(scan, gridsize=gridsize)
    every = group_positions(scan.xcoords, scan.ycoords, gridsize)
    result = reconstruct(
        model, scan, batch_size=8, predict_fn=TruthOracle(scan, factor), groups="tile"
    )
    assert result.groups < len(every) or gridsize == 1
    assert result.groups >= math.ceil(scan.n_positions / gridsize**2)
    assert result.r_factor < 1e-3
    np.testing.assert_allclose(result.obj[result.mask], scan.object[result.mask], atol=1e-5)
    full = reconstruct(model, scan, batch_size=8, predict_fn=TruthOracle(scan, factor))
    np.testing.assert_array_equal(result.mask, full.mask)  # the same coverage


def _box_fraction(scan, region) -> float:
    rows, cols = region
    box = (np.ptp(scan.ycoords) + 1) * (np.ptp(scan.xcoords) + 1)
    return (rows.stop - rows.start) * (cols.stop - cols.start) / box


def _lit_distance(scan, region) -> float:
    """The largest distance from a scored pixel to its nearest position, in pixels."""
    rows, cols = region
    yy, xx = np.mgrid[rows, cols]
    return float(
        np.hypot(xx.ravel()[:, None] - scan.xcoords[None], yy.ravel()[:, None] - scan.ycoords[None])
        .min(axis=1)
        .max()
    )


def test_a_dense_irregular_scan_is_scored_where_the_beam_reached():
    """Positions 1.2 px apart along rows 6 px apart (a dense scan whose corrected
    positions leave gaps five times their median spacing): a rule of two median spacings
    around each position keeps a strip one row tall; the scored region is the scanned
    area, every pixel of it within the probe's radius (0.2 N) of a position."""
    scan = simulate(n=N, n_positions=600, step=0.1, nphotons=None, seed=2)
    rng = np.random.default_rng(0)
    x = np.tile(np.arange(50) * 1.2, 12) + rng.normal(0, 0.3, 600)
    y = np.repeat(np.arange(12) * 6.0, 50) + rng.normal(0, 0.3, 600)
    scan = dataclasses.replace(scan, xcoords=x + N / 2 + 2, ycoords=y + N / 2 + 2)
    assert scan_step(scan.xcoords, scan.ycoords) < 1.5
    yy, xx = np.mgrid[: scan.object.shape[0], : scan.object.shape[1]]
    distance = np.hypot(
        xx.ravel()[:, None] - scan.xcoords[None], yy.ravel()[:, None] - scan.ycoords[None]
    ).min(axis=1)
    two_steps = largest_rectangle((distance <= 2.4).reshape(xx.shape))
    assert _box_fraction(scan, two_steps) < 0.2  # the strip the old rule scored
    assert _box_fraction(scan, scan_region(scan)) > 0.9
    assert _lit_distance(scan, scan_region(scan)) <= 0.2 * N


@pytest.mark.parametrize(("step", "radius"), [(0.0625, 0.2), (0.35, 0.25), (0.5, 0.25), (0.5, 0.2)])
def test_rasters_dense_and_sparse_are_scored_over_their_whole_box(step, radius):
    """Dense, 30 % linear overlap, footprints that touch, and gaps between footprints:
    the region is the box of the patch centres, gaps included (they belong to the
    scanned area; no method sees them, every method is scored on them)."""
    scan = simulate(n=N, n_positions=49, step=step, probe_radius=radius, nphotons=None, seed=4)
    rows, cols = scan_region(scan)
    for got, coords in ((rows, scan.ycoords), (cols, scan.xcoords)):
        assert (got.start, got.stop) == (math.floor(coords.min()), math.ceil(coords.max()) + 1)


def test_data_consistency_figures_match_numpy_on_the_same_predictions(grid_scan):
    """R-factor and Poisson NLL, summed per group in the compiled batch function (padded
    rows excluded), against scipy/numpy on the model's own predictions of every group."""
    scan = grid_scan
    model, factor = model_for(scan, gridsize=2)
    result = reconstruct(model, scan, batch_size=8, compile_mode="graph")
    groups = group_positions(scan.xcoords, scan.ycoords, 2)
    _, offsets = group_offsets(scan.xcoords, scan.ycoords, groups)
    measured = np.moveaxis(scan.diffraction[groups], 1, -1).astype(np.float32)
    predicted = model(
        {"diffraction": measured, "offsets": offsets.astype(np.float32)}, training=False
    )["amplitude"].numpy()
    measured = measured.astype(np.float64) * factor
    assert len(groups) % 8  # the last batch is padded: padding must not count
    assert result.r_factor == pytest.approx(r_factor(predicted, measured), rel=1e-5)
    assert result.poisson_nll == pytest.approx(poisson_nll(predicted, measured), rel=1e-5)


def test_overlapped_prediction_stitches_the_same_object(grid_scan):
    """The next batch predicted on a worker thread (the default with a GPU) while the
    host stitches: the same groups in the same order, so the same object and figures."""
    scan = grid_scan
    model, _ = model_for(scan, gridsize=2)
    plain = reconstruct(model, scan, batch_size=8, compile_mode="graph", overlap=False)
    overlapped = reconstruct(model, scan, batch_size=8, compile_mode="graph", overlap=True)
    np.testing.assert_array_equal(overlapped.obj, plain.obj)
    assert overlapped.r_factor == plain.r_factor
    assert len(overlapped.diffraction_pairs) == len(plain.diffraction_pairs) == 3

"""Comparison figures (ptycho/figures.py, ptycho/scoring.py): the error images after the
metrics' own alignment, colour scales, the PNG grid with and without ground truth. The
TensorBoard images of whole runs: tests/app/test_app.py."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
from matplotlib.image import imread

from ptycho import figures, metrics
from ptycho.scoring import compare_to_truth


def textured(shape=(96, 96), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    amplitude = 0.4 + 0.5 * scipy.ndimage.gaussian_filter(rng.random(shape), 3)
    phase = 2.0 * (scipy.ndimage.gaussian_filter(rng.random(shape), 3) - 0.5)
    return amplitude * np.exp(1j * phase)


def test_errors_vanish_after_the_ambiguities_the_metrics_remove():
    truth = textured()
    region = (slice(8, 88), slice(8, 88))
    seen = 1.7 * truth * np.exp(0.9j)  # another scale and phase offset: not errors
    comparison = compare_to_truth(truth, seen, region)
    assert np.abs(comparison["amplitude_error"]).max() < 1e-6
    assert np.abs(comparison["phase_error"]).max() < 1e-6
    assert comparison["amplitude_truth"].shape == (80, 80)

    bumped = truth.copy()
    bumped[40:44, 50:54] *= 1.5  # a real amplitude error
    comparison = compare_to_truth(truth, bumped, region)
    error = comparison["amplitude_error"]
    inside = error[32:36, 42:46]
    assert inside.min() > 0.1 and np.abs(np.delete(error, np.s_[30:38], axis=0)).max() < 0.05
    frc = comparison["frc"]
    frequency, curve, _ = metrics.frc(np.abs(truth[region]), comparison["amplitude"])
    assert np.allclose(frc["amplitude"], curve) and np.allclose(frc["frequency"], frequency)


def test_the_error_scale_is_symmetric_with_white_at_zero():
    values = np.array([[-2.0, 0.0, 1.0]])
    rgb = figures.diverging_image(values)[0, 0]
    assert rgb.shape == (3, 3)
    assert np.all(rgb[1] > 0.95)  # 0 is white
    assert rgb[0, 2] > rgb[0, 0]  # -limit blue
    assert rgb[2, 0] > rgb[2, 2] and rgb[2, 0] < 1  # +1 of limit 2: pale red


def test_diffraction_pairs_are_measured_over_predicted_per_column():
    n = 16
    pairs = [(np.full((n, n), 3.0), np.full((n, n), 1.0)), (np.ones((n, n)), np.ones((n, n)))]
    image = figures.diffraction_image(pairs)[0, ..., 0]
    assert image.shape == (2 * n, 2 * n + 2)
    assert image[0, 0] == pytest.approx(1.0)  # the column's brightest: the measured top
    assert image[n, 0] == pytest.approx(np.log10(2) / np.log10(10))  # log scale
    assert image[0, n + 2] == image[n, n + 2] == pytest.approx(1.0)


def test_reconstruction_png_is_a_grid_with_truth_and_a_row_without(tmp_path):
    truth = textured()
    region = (slice(8, 88), slice(8, 88))
    mask = np.ones(truth.shape, bool)
    comparison = compare_to_truth(truth, truth * 0.9, region)
    values = {"amp_ssim": 0.91, "r_factor": 0.1}
    figures.save_reconstruction_png(
        truth, mask, tmp_path / "grid.png", values=values, comparison=comparison
    )
    figures.save_reconstruction_png(
        truth, mask, tmp_path / "row.png", coverage=np.ones(truth.shape)
    )
    grid, row = imread(tmp_path / "grid.png"), imread(tmp_path / "row.png")
    assert grid.shape[0] / grid.shape[1] > 0.5  # two rows of three
    assert row.shape[0] / row.shape[1] < 0.4  # one row of three
    figures.save_frc_png(comparison, tmp_path / "frc.png")
    assert imread(tmp_path / "frc.png").shape[0] > 100

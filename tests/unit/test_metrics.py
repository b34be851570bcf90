"""Metrics against known cases and analytic values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage

from ptycho import metrics


def smooth_image(shape=(96, 96), seed=0, sigma=2.0):
    rng = np.random.default_rng(seed)
    return scipy.ndimage.gaussian_filter(rng.normal(size=shape), sigma)


def test_identical_images_are_perfect():
    image = smooth_image()
    assert metrics.psnr(image, image, data_range=1.0) == math.inf
    assert metrics.ssim(image, image, data_range=float(np.ptp(image))) == pytest.approx(1.0)
    assert metrics.mae(image, image) == 0.0
    frequency, correlation, _ = metrics.frc(image, image)
    np.testing.assert_allclose(correlation[1:], 1.0, atol=1e-9)
    assert metrics.frc_crossing(frequency, correlation, 0.5) == 1.0


def test_psnr_of_known_noise_level():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (200, 200))
    sigma = 0.05
    noisy = image + rng.normal(0, sigma, image.shape)
    assert metrics.psnr(image, noisy, data_range=1.0) == pytest.approx(
        10 * math.log10(1 / sigma**2), abs=0.1
    )


def test_frc_of_independent_noise_falls_below_threshold_at_once():
    rng = np.random.default_rng(2)
    frequency, correlation, half_bit = metrics.frc(
        rng.normal(size=(128, 128)), rng.normal(size=(128, 128))
    )
    assert np.mean(correlation[4:] > half_bit[4:]) < 0.1  # noise stays under 1/2-bit
    assert metrics.frc_crossing(frequency, correlation, 0.5) < 0.05
    assert metrics.frc_crossing(frequency, correlation, half_bit) < 0.1
    # The 1/2-bit curve (van Heel & Schatz) falls with the ring size towards 0.1716.
    assert np.all(np.diff(half_bit[1:]) < 0.05) and 0.1716 < half_bit[-1] < 0.3


def test_frc_resolution_of_a_low_passed_copy():
    image = np.random.default_rng(3).normal(size=(128, 128))
    spectrum = np.fft.fftshift(np.fft.fft2(image))
    coords = np.arange(128) - 64
    radius = np.hypot(coords[None], coords[:, None]) / 64  # fraction of Nyquist
    cut = np.real(np.fft.ifft2(np.fft.ifftshift(spectrum * (radius < 0.4))))
    noise = np.random.default_rng(4).normal(scale=0.05, size=image.shape)
    frequency, correlation, _ = metrics.frc(image, cut + noise, apodize=False)
    assert metrics.frc_crossing(frequency, correlation, 0.5) == pytest.approx(0.4, abs=0.03)


def test_registration_recovers_a_known_subpixel_shift():
    image = smooth_image(seed=5)
    fy, fx = np.fft.fftfreq(96)[:, None], np.fft.fftfreq(96)[None, :]
    phase_ramp = np.exp(-2j * np.pi * (2.4 * fy - 1.7 * fx))  # exact (Fourier) shift
    shifted = np.real(np.fft.ifft2(np.fft.fft2(image) * phase_ramp))
    dy, dx = metrics.register_shift(shifted, image)
    assert (dy, dx) == pytest.approx((2.4, -1.7), abs=0.06)


def test_align_removes_scale_phase_offset_and_ramp():
    rng = np.random.default_rng(6)
    amplitude = 0.5 + 0.4 * (smooth_image(seed=6) > 0)
    phase = smooth_image(seed=7)
    reference = amplitude * np.exp(1j * phase)
    rows, cols = np.indices(reference.shape)
    distorted = 1.7 * reference * np.exp(1j * (0.9 + 0.01 * rows - 0.02 * cols))
    distorted += 1e-3 * rng.normal(size=reference.shape)
    aligned, info = metrics.align(reference, distorted, register=False, remove_phase_ramp=True)
    assert info["amplitude_scale"] == pytest.approx(1 / 1.7, rel=1e-2)
    assert info["phase_ramp"] == pytest.approx((-0.01, 0.02), abs=2e-3)
    assert np.abs(aligned - reference).max() < 0.02


def test_compare_reports_every_field_and_perfect_scores_for_the_truth():
    reference = (0.5 + 0.4 * smooth_image(seed=8)) * np.exp(1j * smooth_image(seed=9))
    values = metrics.compare(reference, reference * np.exp(0.3j))
    for key in (
        "amp_psnr",
        "amp_ssim",
        "phase_psnr",
        "phase_ssim",
        "amp_frc50",
        "phase_frc50",
        "amp_mae",
        "phase_mae",
    ):
        assert key in values
    assert values["amp_ssim"] == pytest.approx(1.0) and values["phase_ssim"] == pytest.approx(1.0)


def test_compare_reports_the_mae_and_psnr_of_known_noise():
    rng = np.random.default_rng(10)
    amplitude = 0.6 + 0.3 * (smooth_image(seed=11) > 0)
    phase = 0.8 * np.tanh(smooth_image(seed=12))
    reference = amplitude * np.exp(1j * phase)
    amp_noise = rng.uniform(-0.06, 0.06, reference.shape)  # zero mean: scale stays 1
    phase_noise = rng.uniform(-0.2, 0.2, reference.shape)  # zero mean: offset stays 0
    noisy = (amplitude + amp_noise) * np.exp(1j * (phase + phase_noise))
    values = metrics.compare(reference, noisy, register=False)
    assert values["amp_mae"] == pytest.approx(0.03, rel=0.03)  # E|U(-a, a)| = a / 2
    assert values["phase_mae"] == pytest.approx(0.1, rel=0.03)
    amp_range = float(np.ptp(amplitude))
    expected = 10 * math.log10(amp_range**2 / (0.06**2 / 3))  # var U(-a, a) = a^2 / 3
    assert values["amp_psnr"] == pytest.approx(expected, abs=0.3)


def test_compare_registers_a_shifted_low_passed_copy_before_the_frc():
    """A copy shifted by (2.4, -1.7) px and low-passed at 0.4 of Nyquist: registration
    inside ``compare`` undoes the shift, so the FRC crosses 0.5 at the cut-off, while
    without registration the misalignment decorrelates it far earlier."""
    rng = np.random.default_rng(13)
    size = 128
    texture = scipy.ndimage.gaussian_filter(rng.normal(size=(size, size)), 1.0)
    reference = (1.0 + 0.5 * texture / texture.std()).astype(np.complex128)
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :]
    low_pass = np.hypot(fy, fx) < 0.4 * 0.5  # 0.4 of Nyquist (0.5 cycles / pixel)
    ramp = np.exp(-2j * np.pi * (2.4 * fy - 1.7 * fx))  # exact (Fourier) shift
    moved = np.real(np.fft.ifft2(np.fft.fft2(reference.real) * low_pass * ramp))
    registered = metrics.compare(reference, moved.astype(np.complex128))
    assert registered["amp_frc50"] == pytest.approx(0.4, abs=0.05)
    unregistered = metrics.compare(reference, moved.astype(np.complex128), register=False)
    assert unregistered["amp_frc50"] < 0.2
    assert registered["amp_ssim"] > unregistered["amp_ssim"] + 0.3
    _, info = metrics.align(reference, moved.astype(np.complex128))
    assert info["shift"] == pytest.approx((-2.4, 1.7), abs=0.1)


def test_r_factor_and_poisson_nll_analytic():
    measured = np.array([1.0, 2.0, 3.0])
    assert metrics.r_factor(measured, measured) == 0.0
    assert metrics.r_factor(measured * 1.1, measured) == pytest.approx(0.1)
    nll = metrics.poisson_nll(np.sqrt([2.0]), np.sqrt([3.0]))
    assert nll == pytest.approx(2.0 - 3.0 * math.log(2.0), rel=1e-9)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="differs"):
        metrics.psnr(np.zeros((4, 4)), np.zeros((4, 5)), data_range=1)
    with pytest.raises(ValueError, match="data_range"):
        metrics.ssim(np.zeros((8, 8)), np.zeros((8, 8)), data_range=0)
    with pytest.raises(ValueError, match="at least 8"):
        metrics.frc(np.zeros((4, 4)), np.zeros((4, 4)))


def test_phase_is_scored_by_rmse_and_by_ssim_only_where_it_has_structure():
    rng = np.random.default_rng(7)
    amplitude = 0.6 + 0.3 * np.tanh(smooth_image(seed=3))
    noise = 0.02 * rng.standard_normal(amplitude.shape)  # rad, well below PHASE_STRUCTURE
    flat = amplitude.astype(np.complex128)
    values = metrics.compare(flat, flat * np.exp(1j * (0.7 + noise)), register=False)
    assert "phase_ssim" not in values and "phase_psnr" not in values
    assert "phase_frc50" not in values
    # The constant 0.7 rad is removed; what is left is the noise, minus its own mean.
    assert values["phase_rmse"] == pytest.approx(np.std(noise), rel=1e-3)
    assert values["amp_ssim"] == pytest.approx(1.0)

    phase = 0.5 * np.tanh(smooth_image(seed=4) / smooth_image(seed=4).std())
    structured = amplitude * np.exp(1j * phase)
    values = metrics.compare(structured, structured * np.exp(1j * (0.7 + noise)), register=False)
    assert values["phase_ssim"] > 0.9 and math.isfinite(values["phase_psnr"])
    assert values["phase_rmse"] == pytest.approx(np.std(noise), rel=1e-3)


def brute_force_largest_rectangle_area(mask):
    height, width = mask.shape
    return (
        max(
            (r1 - r0) * (c1 - c0)
            for r0 in range(height)
            for r1 in range(r0 + 1, height + 1)
            for c0 in range(width)
            for c1 in range(c0 + 1, width + 1)
            if mask[r0:r1, c0:c1].all()
        )
        if mask.any()
        else 0
    )


@pytest.mark.parametrize("seed", range(8))
def test_largest_rectangle_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((7, 9)) < 0.75
    rows, cols = metrics.largest_rectangle(mask)
    assert mask[rows, cols].all()
    assert (rows.stop - rows.start) * (cols.stop - cols.start) == (
        brute_force_largest_rectangle_area(mask)
    )


def test_largest_rectangle_of_a_disk_is_its_inscribed_square():
    yy, xx = np.mgrid[:101, :101]
    disk = (yy - 50) ** 2 + (xx - 50) ** 2 <= 50**2
    rows, cols = metrics.largest_rectangle(disk)
    assert rows.stop - rows.start == pytest.approx(50 * math.sqrt(2), abs=2)
    assert cols.stop - cols.start == pytest.approx(50 * math.sqrt(2), abs=2)
    assert metrics.largest_rectangle(np.zeros((3, 4), bool)) == (slice(0, 0), slice(0, 0))

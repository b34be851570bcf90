"""Reconstruction quality metrics: pure functions over numpy arrays.

With ground truth (docs/design.md, section 6), a reconstruction is compared on the scanned
region after removing the ambiguities of ptychography: a sub-pixel translation
(registration), the global amplitude scale (which trades off against the intensity
scale), the global phase offset and, optionally, a phase ramp. Without ground truth,
data consistency in Fourier space: the R-factor and the Poisson negative
log-likelihood.

References
----------
Fourier ring correlation and the 1/2-bit threshold: M. van Heel and M. Schatz,
"Fourier shell correlation threshold criteria", J. Struct. Biol. 151, 250 (2005).
SSIM: Z. Wang et al., IEEE Trans. Image Process. 13, 600 (2004), as implemented by
scikit-image.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage

__all__ = [
    "PHASE_STRUCTURE",
    "align",
    "compare",
    "frc",
    "frc_crossing",
    "largest_rectangle",
    "mae",
    "poisson_nll",
    "psnr",
    "r_factor",
    "register_shift",
    "ssim",
]


PHASE_STRUCTURE = 0.05  # rad: a reference phase flatter than this has no structure to score


def _pair(reference, image, name="image"):
    reference, image = np.asarray(reference), np.asarray(image)
    if reference.shape != image.shape:
        raise ValueError(f"{name} shape {image.shape} differs from reference {reference.shape}")
    if reference.ndim != 2:
        raise ValueError(f"expected 2-D images, got shape {reference.shape}")
    return reference, image


def psnr(reference: np.ndarray, image: np.ndarray, *, data_range: float) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB (inf if equal)."""
    reference, image = _pair(reference, image)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = float(np.mean((reference.astype(np.float64) - image) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(reference: np.ndarray, image: np.ndarray, *, data_range: float) -> float:
    """Structural similarity (scikit-image, 7 x 7 window, Gaussian-free), in [-1, 1]."""
    from skimage.metrics import structural_similarity

    reference, image = _pair(reference, image)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    return float(
        structural_similarity(
            reference.astype(np.float64), image.astype(np.float64), data_range=data_range
        )
    )


def mae(reference: np.ndarray, image: np.ndarray) -> float:
    """Mean absolute error."""
    reference, image = _pair(reference, image)
    return float(np.mean(np.abs(reference.astype(np.float64) - image)))


def frc(
    image1: np.ndarray, image2: np.ndarray, *, apodize: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fourier ring correlation of two square-able images.

    Returns ``(frequency, correlation, half_bit)``: ring radius as a fraction of the
    Nyquist frequency (0 to 1), the FRC of each ring, and the 1/2-bit threshold for the
    ring's pixel count. Images are cropped to a common square and, by default,
    apodized with a Hann window so the edges do not correlate.
    """
    image1, image2 = _pair(image1, image2, "image2")
    size = min(image1.shape)
    size -= size % 2
    if size < 8:
        raise ValueError(f"FRC needs images of at least 8 x 8 pixels, got {image1.shape}")
    crop = (slice(0, size), slice(0, size))
    a = image1[crop].astype(np.float64)
    b = image2[crop].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    if apodize:
        window = np.outer(np.hanning(size), np.hanning(size))
        a, b = a * window, b * window
    fa, fb = np.fft.fftshift(np.fft.fft2(a)), np.fft.fftshift(np.fft.fft2(b))
    coords = np.arange(size) - size // 2
    radius = np.rint(np.hypot(coords[None, :], coords[:, None])).astype(int)
    rings = size // 2
    inside = radius < rings
    index = radius[inside]
    cross = np.bincount(index, (fa * np.conj(fb)).real[inside], rings)
    power1 = np.bincount(index, (np.abs(fa) ** 2)[inside], rings)
    power2 = np.bincount(index, (np.abs(fb) ** 2)[inside], rings)
    count = np.bincount(index, minlength=rings).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = cross / np.sqrt(power1 * power2)
    correlation = np.nan_to_num(correlation, nan=0.0)
    sqrt_n = np.sqrt(np.maximum(count, 1.0))
    half_bit = (0.2071 + 1.9102 / sqrt_n) / (1.2071 + 0.9102 / sqrt_n)
    frequency = np.arange(rings) / rings
    return frequency, correlation, half_bit


def frc_crossing(frequency: np.ndarray, correlation: np.ndarray, threshold) -> float:
    """First frequency (fraction of Nyquist) where the FRC falls below ``threshold``
    (a number or one value per ring), interpolated linearly; 1.0 if it never does.
    The DC ring is skipped."""
    threshold = np.broadcast_to(np.asarray(threshold, np.float64), correlation.shape)
    diff = correlation - threshold
    for i in range(1, len(diff)):
        if diff[i] < 0:
            if diff[i - 1] <= 0:
                return float(frequency[i])
            t = diff[i - 1] / (diff[i - 1] - diff[i])
            return float(frequency[i - 1] + t * (frequency[i] - frequency[i - 1]))
    return 1.0


def register_shift(
    reference: np.ndarray, image: np.ndarray, *, upsample: int = 20
) -> tuple[float, float]:
    """Sub-pixel shift ``(dy, dx)`` that registers ``image`` onto ``reference``
    (scikit-image's phase cross-correlation, ``upsample`` = 1 / precision in pixels)."""
    from skimage.registration import phase_cross_correlation

    reference, image = _pair(reference, image)
    shift, _, _ = phase_cross_correlation(
        reference, image, upsample_factor=upsample, normalization=None
    )
    return float(shift[0]), float(shift[1])


def align(
    reference: np.ndarray,
    image: np.ndarray,
    *,
    register: bool = True,
    remove_phase_ramp: bool = False,
    max_shift: float = 8.0,
) -> tuple[np.ndarray, dict]:
    """Remove ptychography's ambiguities from a complex ``image`` against ``reference``.

    In order: sub-pixel translation (registration of the amplitudes, at most
    ``max_shift`` pixels; larger estimates are ignored), global amplitude scale (least
    squares), global phase offset (phase of ``sum(reference * conj(image))``), and
    optionally a phase plane (least squares on the wrapped phase difference).

    Returns the aligned image and ``{"shift": (dy, dx), "amplitude_scale": s,
    "phase_offset": rad, "phase_ramp": (gy, gx) rad / pixel}``.
    """
    reference, image = _pair(reference, image)
    image = image.astype(np.complex128)
    info = {
        "shift": (0.0, 0.0),
        "amplitude_scale": 1.0,
        "phase_offset": 0.0,
        "phase_ramp": (0.0, 0.0),
    }
    if register:
        dy, dx = register_shift(np.abs(reference), np.abs(image))
        if math.hypot(dy, dx) <= max_shift:
            image = scipy.ndimage.shift(image.real, (dy, dx), order=1, mode="nearest") + 1j * (
                scipy.ndimage.shift(image.imag, (dy, dx), order=1, mode="nearest")
            )
            info["shift"] = (dy, dx)
    amplitude = np.abs(image)
    denominator = float(np.sum(amplitude**2))
    if denominator > 0:
        scale = float(np.sum(amplitude * np.abs(reference)) / denominator)
        image = image * scale
        info["amplitude_scale"] = scale
    offset = float(np.angle(np.sum(reference * np.conj(image))))
    image = image * np.exp(1j * offset)
    info["phase_offset"] = offset
    if remove_phase_ramp:
        difference = np.angle(reference * np.conj(image))
        rows, cols = np.indices(difference.shape)
        design = np.stack([rows.ravel(), cols.ravel(), np.ones(difference.size)], axis=1)
        (gy, gx, c), *_ = np.linalg.lstsq(design, difference.ravel(), rcond=None)
        image = image * np.exp(1j * (gy * rows + gx * cols + c))
        info["phase_ramp"] = (float(gy), float(gx))
    return image, info


def compare(
    reference: np.ndarray,
    image: np.ndarray,
    *,
    region: tuple[slice, slice] | None = None,
    register: bool = True,
    remove_phase_ramp: bool = False,
) -> dict[str, float]:
    """All ground-truth metrics of a complex reconstruction on ``region``.

    Both images are cropped to ``region`` (default: all), aligned (:func:`align`), and
    compared on amplitude and phase. ``data_range`` for PSNR and SSIM is the
    reference's (max - min) of each quantity. FRC crossings are fractions of Nyquist.

    Returns ``amp_psnr``, ``amp_ssim``, ``amp_mae``, ``amp_frc50``, ``amp_frc_halfbit``,
    ``phase_mae`` and ``phase_rmse`` (radians), and, only when the reference phase has
    structure (standard deviation >= ``PHASE_STRUCTURE`` rad on the region),
    ``phase_psnr``, ``phase_ssim``, ``phase_frc50``, ``phase_frc_halfbit``: on a flat
    phase those would score noise against a constant.
    """
    reference, image = _pair(reference, image)
    if region is not None:
        reference, image = reference[region], image[region]
    aligned, _ = align(reference, image, register=register, remove_phase_ramp=remove_phase_ramp)
    ref_phase = np.angle(reference)
    phase_error = np.angle(np.exp(1j * (np.angle(aligned) - ref_phase)))  # wrapped, rad
    out = {"phase_rmse": float(np.sqrt(np.mean(phase_error**2)))}
    parts = [("amp", np.abs(reference), np.abs(aligned))]
    if float(np.std(ref_phase)) >= PHASE_STRUCTURE:
        parts.append(("phase", ref_phase, np.angle(aligned)))
    else:
        out["phase_mae"] = float(np.mean(np.abs(phase_error)))
    for prefix, ref, rec in parts:
        data_range = float(ref.max() - ref.min()) or 1.0
        out[f"{prefix}_psnr"] = psnr(ref, rec, data_range=data_range)
        out[f"{prefix}_ssim"] = ssim(ref, rec, data_range=data_range)
        out[f"{prefix}_mae"] = mae(ref, rec)
        frequency, correlation, half_bit = frc(ref, rec)
        out[f"{prefix}_frc50"] = frc_crossing(frequency, correlation, 0.5)
        out[f"{prefix}_frc_halfbit"] = frc_crossing(frequency, correlation, half_bit)
    return out


def r_factor(predicted: np.ndarray, measured: np.ndarray, valid=None) -> float:
    """Fourier-space R-factor ``sum | |Psi_pred| - a_meas | / sum a_meas`` (amplitudes),
    over the ``valid`` pixels (bool, broadcast; None: all)."""
    predicted, measured = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    if predicted.shape != measured.shape:
        raise ValueError(f"shapes differ: {predicted.shape} vs {measured.shape}")
    weight = 1.0 if valid is None else np.broadcast_to(valid, measured.shape)
    total = float(np.sum(measured * weight))
    if not total > 0:
        raise ValueError("measured amplitudes sum to zero")
    return float(np.sum(np.abs(predicted - measured) * weight) / total)


def poisson_nll(predicted: np.ndarray, measured: np.ndarray, valid=None) -> float:
    """Mean Poisson negative log-likelihood of counts ``measured^2`` under rates
    ``predicted^2`` (amplitudes in), without the ``log k!`` term, over the ``valid``
    pixels (None: all)."""
    from scipy.special import xlogy

    rate = np.asarray(predicted, np.float64) ** 2 + 1e-12
    counts = np.asarray(measured, np.float64) ** 2
    terms = rate - xlogy(counts, rate)
    if valid is None:
        return float(np.mean(terms))
    return float(np.mean(terms[np.broadcast_to(valid, terms.shape)]))


def largest_rectangle(mask: np.ndarray) -> tuple[slice, slice]:
    """(rows, cols) of the largest axis-aligned rectangle of True pixels of a 2-D mask.

    Row by row, the heights of the True runs ending at that row form a histogram whose
    largest rectangle is found with a stack (O(H W)). Empty slices for an all-False mask.
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    height, width = mask.shape
    heights = np.zeros(width + 1, np.int64)  # a zero sentinel closes every run
    best, box = 0, (0, 0, 0, 0)
    for row in range(height):
        heights[:width] = np.where(mask[row], heights[:width] + 1, 0)
        stack: list[tuple[int, int]] = []  # (first column, height), heights increasing
        for col, h in enumerate(heights.tolist()):
            start = col
            while stack and stack[-1][1] >= h:
                start, top = stack.pop()
                if top * (col - start) > best:
                    best, box = top * (col - start), (row + 1 - top, row + 1, start, col)
            stack.append((start, h))
    return slice(box[0], box[1]), slice(box[2], box[3])

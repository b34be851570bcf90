"""The far-field physics shared by the simulator and the model.

``Psi = fftshift(fft2(P * o)) / N``: the unitary 2-D DFT of the exit wave, zero
frequency at the centre, so that ``sum |Psi|^2 = sum |P o|^2`` (docs/design.md, section 3).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

__all__ = ["Subpixel", "far_field", "far_field_amplitude", "far_field_amplitude_tf"]


class Subpixel(StrEnum):
    """How a patch at a fractional position is formed: ``fourier``, an exact shift
    through the spectrum; ``bilinear``, the project's warp (docs/design.md, section 3)."""

    fourier = "fourier"
    bilinear = "bilinear"


def far_field(exit_waves: np.ndarray) -> np.ndarray:
    """Far-field wave of (..., N, N) exit waves: ``fftshift(fft2(x)) / N``.

    Computed in double precision; returns complex128.
    """
    exit_waves = np.asarray(exit_waves)
    n = exit_waves.shape[-1]
    if exit_waves.shape[-2] != n:
        raise ValueError(f"exit waves must be square (..., N, N), got {exit_waves.shape}")
    spectrum = np.fft.fft2(exit_waves.astype(np.complex128, copy=False), axes=(-2, -1))
    return np.fft.fftshift(spectrum, axes=(-2, -1)) / n


def far_field_amplitude(probe: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """``|far_field(probe * patches)|`` for (N, N) probe and (..., N, N) patches."""
    return np.abs(far_field(np.asarray(probe) * np.asarray(patches)))


def far_field_amplitude_tf(exit_waves):
    """TensorFlow twin of :func:`far_field_amplitude` on (B, N, N, C) exit waves.

    Returns ``|fftshift(fft2(x)) / N|`` per channel, (B, N, N, C) float32.
    """
    import tensorflow as tf

    n = tf.cast(tf.shape(exit_waves)[1], tf.float32)
    waves = tf.transpose(tf.cast(exit_waves, tf.complex64), (0, 3, 1, 2))  # (B, C, N, N)
    spectrum = tf.signal.fftshift(tf.signal.fft2d(waves), axes=(-2, -1))
    return tf.transpose(tf.abs(spectrum), (0, 2, 3, 1)) / n

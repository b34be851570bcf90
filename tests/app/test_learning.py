"""The network learns the object: a short real training run beats every flat object.

A guard against regressions that leave training running but stop the network from
learning (groups it cannot read, a head that stalls, a broken loss or normalisation):
the default configuration, trained for about a minute on a small scan, must explain the
data better than the best object of constant modulus and phase, and reach an amplitude
SSIM well above what a flat object gets (about 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize

from ptycho import app
from ptycho.data import load_scan
from tests.conftest import compose_config


def best_flat_r_factor(scan) -> float:
    """R-factor of the best flat object: every pattern predicted as ``s |F(P)|``.

    A constant object c gives the far field ``c F(P)``, the same for every position; the
    R-factor ``sum | s a_P - a | / sum a`` is minimised over the scale s (1-D, convex).
    """
    n = scan.n
    probe_field = np.abs(np.fft.fftshift(np.fft.fft2(scan.probe.astype(np.complex128)))) / n
    measured = scan.diffraction.astype(np.float64)
    total = measured.sum()

    def r_factor(scale):
        return np.abs(scale * probe_field[None] - measured).sum() / total

    guess = np.sqrt((measured**2).sum(axis=(1, 2)).mean() / (probe_field**2).sum())
    best = scipy.optimize.minimize_scalar(r_factor, bounds=(0.01 * guess, 10 * guess))
    return float(min(best.fun, r_factor(guess)))


@pytest.mark.slow
def test_a_minute_of_training_beats_every_flat_object(tmp_path):
    cfg = compose_config(
        overrides=[
            "data.n_positions=625",
            "data.test_positions=400",
            "train.epochs=20",  # about a minute here; a fixed amount of work, not of time
            "train.max_minutes=null",
            "train.eval_every=0",
            "compile=graph",
        ]
    )
    summary = app.train(cfg, tmp_path)
    flat = best_flat_r_factor(load_scan(tmp_path / "test_scan.npz"))
    assert summary["r_factor"] < 0.7 * flat, (summary["r_factor"], flat)
    assert summary["amp_ssim"] > 0.6 and summary["phase_ssim"] > 0.4, summary

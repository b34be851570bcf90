"""Probe modes: a partially coherent illumination as K mutually incoherent modes
(docs/design.md, section 3).

A source that is not fully coherent illuminates the sample with a mixture of
mutually incoherent fields; each far-field pattern is the sum of the modes' intensities,
``I = sum_k |F(P_k O)|^2``. Any unitary mixture of the modes predicts the same patterns,
so the modes are kept orthogonal and sorted by power (:func:`orthogonalise`), the form
PtyLab, PtyPy and Pty-chi report. A probe is stored as (N, N) (one mode, fully coherent)
or (K, N, N).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "as_modes",
    "check_modes",
    "coherent_modes",
    "initial_modes",
    "intensity",
    "orthogonalise",
    "powers",
    "squeezed",
]


def as_modes(probe: np.ndarray) -> np.ndarray:
    """(K, N, N) view of an (N, N) or (K, N, N) probe."""
    probe = np.asarray(probe)
    if probe.ndim == 2:
        return probe[None]
    if probe.ndim != 3 or probe.shape[1] != probe.shape[2] or len(probe) < 1:
        raise ValueError(f"a probe is (N, N) or (K, N, N) with K >= 1, got shape {probe.shape}")
    return probe


def check_modes(field: str, asked: int | None, have: int, can_add: bool, to_add: str) -> None:
    """``ValueError`` (one line, the fix) when a probe of ``have`` modes cannot give the
    ``asked`` modes of option ``field`` (null: the probe's own): another K than a K-mode
    probe has, or new modes from a single probe where they cannot be fitted
    (``can_add`` False; ``to_add`` says what would fit them)."""
    wanted = asked or have
    if have not in (1, wanted):
        raise ValueError(
            f"{field}={wanted} but the probe has {have} modes: set {field}={have} (or null), "
            f"or give a probe of {wanted} modes"
        )
    if have != wanted and not can_add:
        raise ValueError(
            f"{field}={wanted} starts {wanted - 1} new modes from a single probe, which "
            f"{to_add}, or give data.probe_path a probe of {wanted} modes"
        )


def squeezed(modes: np.ndarray) -> np.ndarray:
    """(N, N) for one mode, else (K, N, N): the form a probe is stored in."""
    modes = as_modes(modes)
    return modes[0] if len(modes) == 1 else modes


def intensity(probe: np.ndarray) -> np.ndarray:
    """(N, N) float64 total intensity ``sum_k |P_k|^2``."""
    modes = as_modes(probe)
    return np.sum(np.abs(modes.astype(np.complex128)) ** 2, axis=0)


def powers(probe: np.ndarray) -> np.ndarray:
    """(K,) fractions of the total power each mode carries (sum 1)."""
    power = np.sum(np.abs(as_modes(probe).astype(np.complex128)) ** 2, axis=(1, 2))
    total = power.sum()
    if not total > 0:
        raise ValueError("the probe is zero everywhere")
    return power / total


def orthogonalise(probe: np.ndarray) -> np.ndarray:
    """The modes made orthogonal and sorted by decreasing power, as a unitary mixture:
    ``Q = U P`` with ``U`` the eigenvectors of the modes' overlap matrix ``P P^H``. The
    total intensity ``sum_k |Q_k(r)|^2`` (hence every predicted pattern) is unchanged."""
    modes = as_modes(probe)
    k, n = modes.shape[0], modes.shape[-1]
    flat = modes.reshape(k, n * n).astype(np.complex128)
    overlap = flat @ flat.conj().T
    values, vectors = np.linalg.eigh(overlap)
    order = np.argsort(values)[::-1]
    mixed = vectors[:, order].conj().T @ flat
    return mixed.reshape(k, n, n).astype(modes.dtype)


def _hermite(order: int, x: np.ndarray) -> np.ndarray:
    """Physicists' Hermite polynomial ``H_order(x)``."""
    return np.polynomial.hermite.hermval(x, [0] * order + [1])


def _orders(count: int) -> list[tuple[int, int]]:
    """(m, n) orders, lowest total order first: (1, 0), (0, 1), (2, 0), (1, 1), (0, 2),
    ..."""
    orders, total = [], 1
    while len(orders) < count:
        for m in range(total, -1, -1):
            orders.append((m, total - m))
        total += 1
    return orders[:count]


def _gram_schmidt(modes: list[np.ndarray], candidate: np.ndarray) -> np.ndarray:
    for mode in modes:
        candidate = candidate - np.vdot(mode, candidate) / np.vdot(mode, mode) * mode
    return candidate


def initial_modes(probe: np.ndarray, k: int, power: float) -> np.ndarray:
    """(K, N, N) starting modes from one probe guess: the guess itself, and the guess
    times low-order Hermite-Gauss polynomials ``H_m(x / s) H_n(y / s)`` (``s`` the guess's
    rms radius about its centre of intensity), made orthogonal to the modes before them.
    The added modes carry ``power`` of the total (halving from one mode to the next),
    the guess the rest; the total power is the guess's."""
    guess = as_modes(probe)[0].astype(np.complex128)
    if k < 1:
        raise ValueError(f"probe modes: K={k}, must be >= 1")
    if k == 1:
        return guess[None].astype(np.complex64)
    if not 0 < power < 1:
        raise ValueError(f"mode power {power}: must be in (0, 1)")
    n = guess.shape[-1]
    weight = np.abs(guess) ** 2
    total = float(weight.sum())
    if not total > 0:
        raise ValueError("the probe is zero everywhere")
    rows, cols = np.mgrid[:n, :n].astype(np.float64)
    cy, cx = float((weight * rows).sum() / total), float((weight * cols).sum() / total)
    spread = np.sqrt(float((weight * ((rows - cy) ** 2 + (cols - cx) ** 2)).sum() / total) / 2)
    x, y = (cols - cx) / spread, (rows - cy) / spread
    shares = 0.5 ** np.arange(k - 1)
    shares = power * shares / shares.sum()
    modes = [guess * np.sqrt(1.0 - power)]
    for (m, order), share in zip(_orders(k - 1), shares, strict=True):
        mode = _gram_schmidt(modes, guess * _hermite(m, x) * _hermite(order, y))
        modes.append(mode * np.sqrt(share * total / float(np.sum(np.abs(mode) ** 2))))
    return np.stack(modes).astype(np.complex64)


def coherent_modes(probe: np.ndarray, k: int, coherence: float, spread: float = 0.5) -> np.ndarray:
    """(K, N, N) modes of a partially coherent beam around ``probe``, for simulations.

    An extended source lights the sample from a spread of directions: the beam is an
    incoherent mixture of the probe tilted, ``P(r) exp(2 pi i q . r)``, with ``q``
    Gaussian of standard deviation ``spread`` detector pixels (the far field blurred by
    as much). The modes are the leading singular vectors of that mixture (sampled on a
    9 x 9 grid of tilts), with powers falling by ``coherence`` from one mode to the next
    (0.3 for K = 3 gives 72 / 22 / 6 %); the total power is the probe's."""
    probe = np.asarray(probe).astype(np.complex128)
    if k < 1:
        raise ValueError(f"probe modes: K={k}, must be >= 1")
    if not 0 < coherence <= 1:
        raise ValueError(f"coherence {coherence}: must be in (0, 1]")
    n = probe.shape[-1]
    total = float(np.sum(np.abs(probe) ** 2))
    if k == 1:
        return probe[None].astype(np.complex64)
    tilts = np.linspace(-2.0, 2.0, 9) * spread / n  # cycles per pixel
    weights = np.exp(-0.5 * (tilts * n / spread) ** 2)
    coords = np.arange(n) - n / 2
    rows = [
        np.sqrt(wy * wx)
        * (probe * np.exp(2j * np.pi * (qy * coords[:, None] + qx * coords[None, :]))).ravel()
        for qy, wy in zip(tilts, weights, strict=True)
        for qx, wx in zip(tilts, weights, strict=True)
    ]
    _, _, vectors = np.linalg.svd(np.stack(rows), full_matrices=False)
    shares = coherence ** np.arange(k)
    shares = shares / shares.sum()
    modes = vectors[:k].reshape(k, n, n)  # orthonormal, by decreasing power
    return (modes * np.sqrt(shares * total)[:, None, None]).astype(np.complex64)

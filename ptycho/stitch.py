"""Object <-> patch geometry: cutting patches out of an object at scan positions.

A patch j is the N x N window of the object covering rows ``[y_j - N/2, y_j + N/2)``
and columns ``[x_j - N/2, x_j + N/2)``, bilinear for sub-pixel positions, zero outside
the object (DESIGN.md section 3). Sub-pixel shifts go through the project's own
:func:`ptycho.warp.translate`, so the simulator and the model share one convention.
"""

from __future__ import annotations

import numpy as np

from ptycho.warp import translate

__all__ = ["extract_patches"]


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

"""What a user looks at: truth, reconstruction and error side by side, FRC curves,
coverage and diffraction patterns, for TensorBoard and for the run's PNG files.

The comparisons (:class:`ptycho.scoring.Comparison`) are made after the same
registration, amplitude scale and phase offset (and optional phase ramp) removal the
metrics use, on the same scored region; errors are drawn on a symmetric colour scale (0
is white).
"""

from __future__ import annotations

import math

import numpy as np

from ptycho.outputs import atomic_path
from ptycho.scoring import Comparison

__all__ = [
    "diffraction_image",
    "diverging_image",
    "frc_image",
    "grey_image",
    "pyplot",
    "save_frc_png",
    "save_curves",
    "save_png",
    "save_reconstruction_png",
]


# --------------------------------------------------------------------------------------
# TensorBoard images: (1, H, W, C) float32 in [0, 1]
# --------------------------------------------------------------------------------------


def grey_image(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(H, W) -> (1, H, W, 1), scaled to [0, 1] over ``mask`` (0 outside it)."""
    values = np.asarray(values, np.float64)
    mask = np.ones(values.shape, bool) if mask is None else mask
    shown = values[mask] if mask.any() else values.ravel()
    low, high = float(np.min(shown)), float(np.max(shown))
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.where(mask, np.clip(scaled, 0, 1), 0).astype(np.float32)[None, ..., None]


def diverging_image(values: np.ndarray, limit: float | None = None) -> np.ndarray:
    """(H, W) signed values -> (1, H, W, 3) RGB on a symmetric blue-white-red scale:
    -limit blue, 0 white, +limit red (limit: the largest magnitude by default)."""
    from matplotlib import colormaps

    values = np.asarray(values, np.float64)
    limit = float(np.max(np.abs(values))) if limit is None else float(limit)
    scaled = 0.5 + 0.5 * values / limit if limit > 0 else np.full(values.shape, 0.5)
    rgb = colormaps["RdBu_r"](np.clip(scaled, 0, 1))[..., :3]
    return rgb.astype(np.float32)[None]


def _figure_array(figure) -> np.ndarray:
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba(), np.float32) / 255.0
    import matplotlib.pyplot as plt

    plt.close(figure)
    return rgba[None, ..., :3]


def _frc_axes(axis, frc: dict) -> None:
    axis.plot(frc["frequency"], frc["amplitude"], label="amplitude")
    if frc["phase"] is not None:
        axis.plot(frc["frequency"], frc["phase"], label="phase")
    axis.axhline(0.5, color="grey", ls="--", lw=1, label="0.5")
    axis.plot(frc["frequency"], frc["half_bit"], color="black", ls=":", lw=1, label="1/2 bit")
    axis.set_xlabel("spatial frequency (fraction of Nyquist)")
    axis.set_ylabel("Fourier ring correlation")
    axis.set_xlim(0, 1)
    axis.set_ylim(-0.1, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path):
    """Write ``figure`` to ``path`` atomically (never a half-written PNG) and close it."""
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=100)
    pyplot().close(figure)
    return path


def frc_image(frc: dict) -> np.ndarray:
    """The FRC curves against the 0.5 and 1/2-bit thresholds as a (1, H, W, 3) image."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.5), dpi=80, constrained_layout=True)
    _frc_axes(axis, frc)
    return _figure_array(figure)


def diffraction_image(pairs: list) -> np.ndarray:
    """Measured (top) and predicted (middle) amplitudes of a few positions, log scale,
    one column per position and one shared colour scale per column, and, when the scan
    has a detector mask, the mask (bottom; white = masked, counted nowhere):
    (1, H, W, 1). ``pairs``: (measured, predicted[, valid or None]) per position."""
    columns = []
    for measured, predicted, *rest in pairs:
        valid = rest[0] if rest else None
        both = np.log10(np.stack([measured, predicted]).astype(np.float64) ** 2 + 1.0)
        high = float(both.max()) or 1.0
        rows = [both[0] / high, both[1] / high]
        if valid is not None:
            rows.append((~np.asarray(valid)).astype(np.float64))
        columns.append(np.concatenate(rows, axis=0))
    gap = np.ones((columns[0].shape[0], 2))
    image = np.concatenate([x for c in columns for x in (c, gap)][:-1], axis=1)
    return np.clip(image, 0, 1).astype(np.float32)[None, ..., None]


# --------------------------------------------------------------------------------------
# The run's PNG files
# --------------------------------------------------------------------------------------


def _title(title: str, values: dict | None) -> str:
    if not values:
        return title
    parts = [f"{key} {values[key]:.3f}" for key in ("amp_ssim", "phase_ssim") if key in values]
    parts += [f"{key} {values[key]:.1f} dB" for key in ("amp_psnr", "phase_psnr") if key in values]
    if "r_factor" in values:
        parts.append(f"R-factor {values['r_factor']:.4f}")
    return (title + "\n" if title else "") + "  ".join(parts)


def save_reconstruction_png(
    obj: np.ndarray,
    mask: np.ndarray,
    path,
    *,
    title: str = "",
    values: dict | None = None,
    comparison: Comparison | None = None,
    coverage: np.ndarray | None = None,
):
    """With ground truth (``comparison``): a 2 x 3 grid, amplitude and phase rows, truth /
    reconstruction / error columns (the error on a symmetric scale); without: amplitude,
    phase and, when given, the illumination coverage. Colour bars throughout; the
    metrics in ``values`` in the title."""
    plt = pyplot()
    if comparison is not None:
        figure, axes = plt.subplots(2, 3, figsize=(14, 8.4), constrained_layout=True)
        for row, (name, cmap) in enumerate((("amplitude", "gray"), ("phase", "twilight"))):
            truth, rec = comparison[f"{name}_truth"], comparison[name]
            low, high = float(truth.min()), float(truth.max())
            error = comparison[f"{name}_error"]
            limit = float(np.max(np.abs(error))) or 1.0
            panels = (
                (truth, f"{name} truth", cmap, low, high),
                (rec, f"{name} reconstruction (aligned)", cmap, low, high),
                (error, f"{name} error", "RdBu_r", -limit, limit),
            )
            for axis, (image, label, colours, vmin, vmax) in zip(axes[row], panels, strict=True):
                shown = axis.imshow(image, cmap=colours, vmin=vmin, vmax=vmax)
                axis.set_title(label + (" (rad)" if name == "phase" else ""))
                figure.colorbar(shown, ax=axis, shrink=0.85)
    else:
        images = [
            (np.where(mask, np.abs(obj), np.nan), "amplitude", "gray"),
            (np.where(mask, np.angle(obj), np.nan), "phase (rad)", "twilight"),
        ]
        if coverage is not None:
            images.append((coverage, "illumination coverage (sum |P|^2)", "viridis"))
        figure, axes = plt.subplots(
            1, len(images), figsize=(5.5 * len(images), 4.8), constrained_layout=True
        )
        for axis, (image, label, colours) in zip(np.atleast_1d(axes), images, strict=True):
            shown = axis.imshow(image, cmap=colours)
            axis.set_title(label)
            figure.colorbar(shown, ax=axis, shrink=0.85)
    for axis in np.ravel(axes):
        axis.set_xlabel("x (pixels)")
        axis.set_ylabel("y (pixels)")
    text = _title(title, values)
    if text:
        figure.suptitle(text)
    return save_png(figure, path)


def save_frc_png(comparison: Comparison, path, *, title: str = ""):
    """``frc.png``: amplitude and phase FRC curves against the 0.5 and 1/2-bit
    thresholds."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    _frc_axes(axis, comparison["frc"])
    if title:
        axis.set_title(title)
    return save_png(figure, path)


def save_curves(history: list, path, *, title: str = "", probe: np.ndarray | None = None):
    """PNG of a refinement's progress records against iterations: R-factor, ground-truth
    SSIM when known, position error when known, the probe modes' power fractions when
    there are several; with a (K, N, N) ``probe``, a row of the modes' amplitudes."""
    plt = pyplot()
    iterations = [r["iteration"] for r in history]
    panels = [("r_factor", "R-factor")]
    if any("amp_ssim" in r for r in history):
        panels.append(("ssim", "SSIM"))
    if any("position_rmse" in r for r in history):
        panels.append(("position_rmse", "position error (px rms)"))
    powers = sorted(k for k in history[-1] if k.startswith("mode_") and k.endswith("_power"))
    if powers:
        panels.append(("powers", "power fraction"))
    modes = [] if probe is None or np.ndim(probe) != 3 else list(probe)
    rows = 2 if modes else 1
    columns = max(len(panels), len(modes))
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(4.2 * columns, 3.6 * rows),
        constrained_layout=True,
        squeeze=False,
    )
    for axis, (key, label) in zip(axes[0], panels, strict=False):
        names = {"ssim": ("amp_ssim", "phase_ssim"), "powers": powers}.get(key)
        if names:
            for name in names:
                if any(name in r for r in history):
                    values = [r.get(name, math.nan) for r in history]
                    axis.plot(iterations, values, "o-", label=name.replace("_power", ""))
            axis.legend()
        else:
            axis.plot(iterations, [r[key] for r in history], "o-")
        axis.set_xlabel("iteration")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    for axis in axes[0][len(panels) :]:
        axis.axis("off")
    for k, axis in enumerate(axes[1] if modes else []):
        axis.axis("off")
        if k < len(modes):
            share = history[-1].get(f"mode_{k}_power", math.nan)
            axis.imshow(np.abs(modes[k]), cmap="gray")
            axis.set_title(f"probe mode {k}: |P|, {100 * share:.1f} % of the power")
    seconds = history[-1]["seconds"]
    figure.suptitle(f"{title}  ({iterations[-1]} iterations, {seconds:.1f} s)")
    return save_png(figure, path)

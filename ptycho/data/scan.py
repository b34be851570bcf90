"""The ``Scan``: one ptychography scan, validated once on construction.

Conventions (docs/design.md, sections 3-4): ``diffraction`` holds far-field *amplitudes*
(square roots of counts) with the zero frequency at the centre; ``xcoords`` and
``ycoords`` are patch *centres* in object pixels, x the column and y the row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ptycho.data.stream import Patterns

__all__ = ["Scan", "coordinates", "without_background"]

_CHUNK = 1024  # patterns per validation chunk: bounded temporaries on large scans


def _readonly(array: np.ndarray) -> np.ndarray:
    """A read-only view (no copy), so a Scan's arrays cannot change under it."""
    view = array.view()
    view.flags.writeable = False
    return view


def _check_amplitudes(diffraction: np.ndarray) -> None:
    """``ValueError`` naming the first pattern with a non-finite or negative amplitude."""
    if np.iscomplexobj(diffraction):
        raise ValueError(
            "Scan.diffraction: expected real amplitudes sqrt(counts), got a complex array"
        )
    for start in range(0, len(diffraction), _CHUNK):
        chunk = diffraction[start : start + _CHUNK]
        if not np.isfinite(chunk).all():
            bad = start + int(np.argmin(np.isfinite(chunk).all(axis=(1, 2))))
            raise ValueError(f"Scan.diffraction: non-finite value (NaN or Inf) in pattern {bad}")
        if (chunk < 0).any():
            bad = start + int(np.argmax((chunk < 0).any(axis=(1, 2))))
            raise ValueError(
                f"Scan.diffraction: negative amplitude in pattern {bad}; amplitudes are "
                "sqrt(counts) >= 0"
            )


def without_background(amplitudes: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``sqrt(max(a^2 - background, 0))``: amplitudes with the background counts taken
    out (clipped at zero)."""
    return np.sqrt(np.maximum(np.square(amplitudes) - background, 0.0))


def coordinates(values, m: int, name: str) -> np.ndarray:
    """``values`` as (M,) float64 positions, or a ``ValueError`` naming ``name``."""
    coords = np.asarray(values)
    if np.iscomplexobj(coords) or coords.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected real numbers, got dtype {coords.dtype}")
    if coords.shape != (m,):
        raise ValueError(
            f"{name}: expected shape ({m},), one position per pattern, got {coords.shape}"
        )
    return coords.astype(np.float64, copy=False)


@dataclass(frozen=True, eq=False)
class Scan:
    """A ptychography scan.

    Parameters
    ----------
    diffraction : (M, N, N) float32, or :class:`ptycho.data.stream.Patterns`
        Measured far-field amplitudes ``sqrt(counts)``, zero frequency at the centre.
        N is even and >= 16. Patterns (a streamed scan) read them from the file when
        they are indexed.
    probe : (N, N) complex64, or (K, N, N) for K mutually incoherent modes
        Illumination (:mod:`ptycho.probes`).
    xcoords, ycoords : (M,) float64
        Patch centres in object pixels (x = column, y = row). Patch j covers rows
        ``[y_j - N/2, y_j + N/2)`` and columns ``[x_j - N/2, x_j + N/2)`` of the object.
    object : (H, W) complex64, optional
        Ground truth, used only for metrics. When given, every patch centre must lie
        inside it.
    scan_index : (M,) int64, optional
        Scan number of each pattern (PtychoPINN's ``scan_index``); zeros by default.
    nphotons : float, optional
        Mean total counts per pattern the scan was simulated at (None: unknown or
        noiseless).
    seed : int, optional
        Seed of the simulation that made it.
    source : str
        Provenance: a file path or a description of the simulation.
    valid : (N, N) or (M, N, N) bool, optional
        The pixels that count (True) in every loss and metric; False marks pixels the
        detector mask excludes (beamstop, gaps, dead, hot, saturated or non-finite
        pixels: docs/measured-data.md), whose amplitudes are stored as 0. (N, N): one
        mask for every pattern; (M, N, N): per pattern (saturation). None: every pixel
        counts.
    background : (N, N) float32, optional
        Counts per pixel that are not the sample's (a dark frame), included in
        ``diffraction``; every stage models them as an additive term (refinement: counts
        ~ Poisson(I + background); the network sees ``sqrt(max(a^2 - background, 0))``).
    metadata : dict
        What preparation found and did (geometry, centre, shifts), for the run's log.

    Arrays are coerced to the dtypes above (no copy when they already have them) and
    stored as read-only views. Every check failure is a ``ValueError`` naming the field.
    """

    diffraction: np.ndarray
    probe: np.ndarray
    xcoords: np.ndarray
    ycoords: np.ndarray
    object: np.ndarray | None = None
    scan_index: np.ndarray | None = None
    nphotons: float | None = None
    seed: int | None = None
    source: str = ""
    metadata: dict = field(default_factory=dict)
    valid: np.ndarray | None = None
    background: np.ndarray | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: assign the coerced arrays once
        streamed = isinstance(self.diffraction, Patterns)
        diffraction = self.diffraction if streamed else np.asarray(self.diffraction)
        if diffraction.ndim != 3 or diffraction.shape[1] != diffraction.shape[2]:
            raise ValueError(
                f"Scan.diffraction: expected amplitudes of shape (M, N, N), got shape "
                f"{diffraction.shape}"
            )
        m, n = diffraction.shape[0], diffraction.shape[1]
        if m == 0:
            raise ValueError("Scan.diffraction: the scan is empty (M = 0 patterns)")
        if n < 16 or n % 2:
            raise ValueError(f"Scan.diffraction: pattern size N must be even and >= 16, got {n}")
        if not streamed:  # streamed patterns are finite and >= 0 as they are read
            _check_amplitudes(diffraction)
            diffraction = _readonly(diffraction.astype(np.float32, copy=False))
        set_(self, "diffraction", diffraction)

        probe = np.asarray(self.probe)
        if probe.shape[-2:] != (n, n) or probe.ndim not in (2, 3) or len(probe) == 0:
            raise ValueError(
                f"Scan.probe: expected shape ({n}, {n}), or (K, {n}, {n}) for K modes, to "
                f"match N, got {probe.shape}"
            )
        probe = probe.astype(np.complex64, copy=False)
        if not np.isfinite(probe).all():
            raise ValueError("Scan.probe: contains NaN or Inf")
        set_(self, "probe", _readonly(probe))

        for name in ("xcoords", "ycoords"):
            coords = coordinates(getattr(self, name), m, f"Scan.{name}")
            if not np.isfinite(coords).all():
                raise ValueError(f"Scan.{name}: contains NaN or Inf")
            set_(self, name, _readonly(coords))

        if self.scan_index is None:
            set_(self, "scan_index", _readonly(np.zeros(m, np.int64)))
        else:
            index = np.asarray(self.scan_index)
            if index.shape != (m,) or index.dtype.kind not in "iu":
                raise ValueError(
                    f"Scan.scan_index: expected integers of shape ({m},), got {index.dtype} "
                    f"{index.shape}"
                )
            set_(self, "scan_index", _readonly(index.astype(np.int64, copy=False)))

        if self.object is not None:
            obj = np.asarray(self.object)
            if obj.ndim != 2:
                raise ValueError(f"Scan.object: expected a 2-D (H, W) array, got shape {obj.shape}")
            obj = obj.astype(np.complex64, copy=False)
            if not np.isfinite(obj).all():
                raise ValueError("Scan.object: contains NaN or Inf")
            height, width = obj.shape
            outside = (
                (self.xcoords < 0)
                | (self.xcoords > width - 1)
                | (self.ycoords < 0)
                | (self.ycoords > height - 1)
            )
            if outside.any():
                j = int(np.argmax(outside))
                raise ValueError(
                    f"Scan.xcoords/ycoords: position {j} (x={self.xcoords[j]:.2f}, "
                    f"y={self.ycoords[j]:.2f}) lies outside the object of shape {obj.shape}; "
                    "positions are patch centres in object pixels"
                )
            set_(self, "object", _readonly(obj))

        if self.valid is not None:
            valid = np.asarray(self.valid)
            if valid.shape not in ((n, n), (m, n, n)):
                raise ValueError(
                    f"Scan.valid: expected shape ({n}, {n}) or ({m}, {n}, {n}) to match the "
                    f"patterns, got {valid.shape}"
                )
            valid = valid.astype(bool, copy=False)
            set_(self, "valid", None if valid.all() else _readonly(valid))

        if self.background is not None:
            background = np.asarray(self.background, np.float32)
            if background.shape != (n, n) or not np.isfinite(background).all():
                raise ValueError(
                    f"Scan.background: expected finite counts of shape ({n}, {n}), got "
                    f"{background.shape}"
                )
            if (background < 0).any():
                raise ValueError("Scan.background: negative counts")
            set_(self, "background", None if not background.any() else _readonly(background))

        if self.nphotons is not None:
            nphotons = float(self.nphotons)
            if not (np.isfinite(nphotons) and nphotons > 0):
                raise ValueError(
                    f"Scan.nphotons: expected a positive number, got {self.nphotons!r}"
                )
            set_(self, "nphotons", nphotons)

    # ---------------------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Pattern (and probe) size N in pixels."""
        return int(self.diffraction.shape[1])

    @property
    def probe_modes(self) -> int:
        """K: the probe's modes (1 for an (N, N) probe)."""
        return 1 if self.probe.ndim == 2 else int(self.probe.shape[0])

    @property
    def n_positions(self) -> int:
        """Number of scan positions M."""
        return int(self.diffraction.shape[0])

    @property
    def positions(self) -> np.ndarray:
        """(M, 2) patch centres as [x, y] in object pixels."""
        return np.stack([self.xcoords, self.ycoords], axis=1)

    def signal(self, indices) -> np.ndarray:
        """(len(indices), N, N) float32 amplitudes of patterns ``indices`` with the
        background taken out: ``sqrt(max(a^2 - background, 0))`` (the network's input)."""
        amplitudes = self.diffraction[np.asarray(indices)]
        if self.background is None:
            return amplitudes
        return without_background(amplitudes, self.background)

    @property
    def streamed(self) -> bool:
        """Whether the patterns are read from their file when used (not in memory)."""
        return isinstance(self.diffraction, Patterns)

    @property
    def masks_per_pattern(self) -> bool:
        """Whether some patterns have pixels of their own masked (bad or saturated)."""
        if self.streamed:
            return self.diffraction.per_pattern
        return self.valid is not None and self.valid.ndim == 3

    @property
    def masked(self) -> bool:
        """Whether any pixel is masked (the detector's mask, or a pattern's own)."""
        return self.valid is not None or self.masks_per_pattern

    def valid_pixels(self, indices) -> np.ndarray | None:
        """(*indices.shape, N, N) bool: the pixels that count in patterns ``indices``
        (None when every pixel counts)."""
        indices = np.asarray(indices)
        own = self.diffraction.valid(indices) if self.streamed else None
        if self.valid is None:
            return own
        if self.valid.ndim == 3:
            return self.valid[indices]
        detector = np.broadcast_to(self.valid, (*indices.shape, self.n, self.n))
        return detector if own is None else own & detector

    def replace(self, **changes) -> Scan:
        """A new Scan with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def subset(self, indices) -> Scan:
        """A Scan of the patterns ``indices`` (same probe and object), in memory."""
        indices = np.asarray(indices)
        return self.replace(
            diffraction=self.diffraction[indices],
            xcoords=self.xcoords[indices],
            ycoords=self.ycoords[indices],
            scan_index=self.scan_index[indices],
            valid=self.valid_pixels(indices) if self.masks_per_pattern else self.valid,
        )

    def __repr__(self) -> str:
        obj = "none" if self.object is None else "x".join(map(str, self.object.shape))
        return (
            f"Scan(M={self.n_positions}, N={self.n}, object={obj}, nphotons={self.nphotons}, "
            f"source={self.source!r})"
        )

"""From detector frames as a beamline writes them to a :class:`~ptycho.data.scan.Scan`.

A file gives :class:`Frames`: counts (or amplitudes) of any frame size, zero frequency
wherever the instrument put it, positions in any origin (pixels or metres), a detector
mask, a dark frame, a probe at the detector's sampling. :func:`prepare` turns them into
the Scan every stage works on (docs/design.md, section 4; docs/measured-data.md), in
this order, each step logged:

1. **Bad values.** Non-finite or negative counts, and counts at or above
   ``saturation``, are masked in their pattern (never used, never refused silently).
2. **Detector mask.** The file's own mask (CXI ``mask``, NeXus ``pixel_mask``) or a mask
   file, plus hot and dead pixels found over the whole scan (:func:`hot_and_dead`).
3. **Background.** A dark frame (the file's, a file, or a constant) is kept beside the
   counts (``Scan.background``, cut and binned with them): refinement models it as an
   additive term of the likelihood (counts ~ Poisson(I + b)), and the network sees
   ``sqrt(max(counts - b, 0))``; or, with ``background_mode=subtract``, subtracted and
   clipped at zero here (docs/measured-data.md compares the two).
4. **Zero frequency.** ``fftshift=auto`` shifts patterns whose mean energy sits in the
   corners (stored unshifted) to the centre (:func:`stored_in_corner`).
5. **Centre, crop, bin.** A ``crop`` x ``crop`` window around the beam centre (``auto``:
   :func:`find_centre`, the centre of point symmetry of the mean pattern), then ``bin``
   x ``bin`` pixels summed: N = crop / bin. The object pixel becomes ``lambda z / (crop
   p)``; a probe given at the frame's sampling is resampled to match
   (:func:`resample_probe`).
6. **Positions.** Metres become object pixels (sample translations change sign: the
   beam moves over the object the other way); positions whose patches would leave the
   frame are shifted into it.

Masked pixels are stored as amplitude 0 and marked False in ``Scan.valid``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from ptycho import probes
from ptycho.data.scan import Scan, without_background
from ptycho.data.stream import Patterns, Source
from ptycho.errors import choice, require

__all__ = [
    "BackgroundMode",
    "Frames",
    "Geometry",
    "PrepareOptions",
    "find_centre",
    "hot_and_dead",
    "prepare",
    "resample_probe",
    "stored_in_corner",
]

log = logging.getLogger(__name__)

_CHUNK_PIXELS = 2**20  # pixels per step (4 MB of float32): bounded temporaries


def _chunk(frame: int) -> int:
    """Frames per step for frames of ``frame`` x ``frame`` pixels."""
    return max(1, _CHUNK_PIXELS // (frame * frame))


AUTO = "auto"
PLANCK_TIMES_C = 6.62607015e-34 * 299792458.0  # J m
ELECTRON_VOLT = 1.602176634e-19  # J


class BackgroundMode(StrEnum):
    model = "model"
    subtract = "subtract"


@dataclass(frozen=True)
class Geometry:
    """The far-field geometry: ``wavelength`` (m), sample-detector ``distance`` (m),
    detector ``pixel`` size (m)."""

    wavelength: float
    distance: float
    pixel: float

    @property
    def energy_ev(self) -> float:
        return PLANCK_TIMES_C / self.wavelength / ELECTRON_VOLT

    def object_pixel(self, window: int) -> float:
        """Metres per object pixel for a ``window`` x ``window`` pixel detector window."""
        return self.wavelength * self.distance / (window * self.pixel)


@dataclass
class Frames:
    """What a scan file holds, before :func:`prepare`.

    ``frames`` is anything sliced by ``frames[a:b]`` into (k, F, F) numbers (a NumPy
    array, or an open HDF5 dataset read chunk by chunk, whose ``file`` says where it
    lives so that it can be streamed); ``amplitudes`` says whether it
    holds ``sqrt(counts)`` (the project's and PtychoPINN's files) or counts (detectors).
    ``positions`` is (M, 2) [x, y] in ``units`` ("pixels": patch centres in object
    pixels; "metres"). ``excluded``: (F, F) bool, True for pixels the file's mask
    excludes. ``centre``: the file's beam centre (row, col) in detector pixels.
    """

    frames: Any
    amplitudes: bool
    positions: np.ndarray
    units: str = "pixels"
    sample_translation: bool = False
    probe: np.ndarray | None = None
    object: np.ndarray | None = None
    scan_index: np.ndarray | None = None
    nphotons: float | None = None
    seed: int | None = None
    source: str = ""
    excluded: np.ndarray | None = None
    dark: np.ndarray | None = None
    geometry: Geometry | None = None
    centre: tuple[float, float] | None = None
    metadata: dict = field(default_factory=dict)
    file: Source | None = None
    """Where ``frames`` live when they are an HDF5 dataset (they can then be streamed)."""


@dataclass
class PrepareOptions:
    """How measured frames become patterns (part of the ``data`` section;
    docs/measured-data.md). The defaults handle a file as a beamline wrote it."""

    center: Any = AUTO
    """Zero frequency of the patterns, ``[row, col]`` in detector pixels (after any
    fftshift), or ``auto``: the file's beam centre, else the centre of point symmetry of
    the mean pattern (:func:`ptycho.data.prepare.find_centre`)."""
    crop: int | None = None
    """Window (detector pixels) cut around the centre; null: the whole frame, or the
    model's N x bin when the model is smaller."""
    bin: int = 1
    """Sum bin x bin pixels after cropping: N = crop / bin."""
    fftshift: Any = AUTO
    """``auto``: shift patterns stored with zero frequency in the corner (where the mean
    pattern's energy sits); ``true``/``false``: always/never."""
    mask: str | None = AUTO
    """Pixels to exclude: ``auto`` (the file's own mask, if it has one), a file (``.npy``,
    or ``.npz``/``.h5`` with a ``mask``; nonzero = excluded, as in CXI), or null."""
    mask_hot_pixels: bool = True
    """Also exclude pixels that are zero over the whole scan while their neighbours are
    not (dead), or far above all their neighbours (hot)."""
    saturation: float | None = None
    """Counts at or above this are excluded in their pattern (null: none)."""
    background: Any = AUTO
    """Counts that are not the sample's (dark current, stray light): ``auto`` (the file's
    dark frame, if any), a number (counts per pixel), a dark-frame file (``.npy``, or
    ``.npz``/``.h5`` with ``dark``), or null."""
    background_mode: BackgroundMode = BackgroundMode.model
    """``model``: an additive term of the likelihood (counts ~ Poisson(I + b); R-factors
    against the counts as measured); ``subtract``: ``sqrt(max(counts - b, 0))`` stored
    instead (docs/measured-data.md compares them)."""
    stream: Any = AUTO
    """Read HDF5 and CXI patterns from the file when they are used instead of holding
    them in memory (docs/large-scans.md): ``auto`` (when the prepared patterns exceed
    ``stream_above_gb``), ``true`` or ``false``. NPZ files are always read whole."""
    stream_above_gb: float = 0.25
    """``stream=auto`` streams scans whose prepared patterns exceed this (GB of float32):
    held in memory, training keeps about three copies of them."""

    def check(self) -> None:
        """``ValueError`` naming the first field out of range or file that is missing."""
        require(
            [
                (
                    self.center == AUTO or _is_pair(self.center),
                    f"center={self.center}: must be auto or [row, col]",
                ),
                (
                    self.crop is None or (self.crop >= 16 and self.crop % 2 == 0),
                    f"crop={self.crop}: must be an even number of pixels >= 16, or null",
                ),
                (self.bin >= 1, f"bin={self.bin}: must be >= 1"),
                (
                    self.crop is None or self.crop % self.bin == 0,
                    f"bin={self.bin} does not divide crop={self.crop}",
                ),
                (
                    self.fftshift in (AUTO, True, False),
                    f"fftshift={self.fftshift}: must be auto, true or false",
                ),
                (
                    self.mask in (AUTO, None) or Path(self.mask).is_file(),
                    f"mask={self.mask}: no such file (a mask file, auto or null)",
                ),
                (
                    self.saturation is None or self.saturation > 0,
                    f"saturation={self.saturation}: must be > 0 counts or null",
                ),
                (
                    self.background in (AUTO, None)
                    or (_is_number(self.background) and self.background >= 0)
                    or (isinstance(self.background, str) and Path(self.background).is_file()),
                    f"background={self.background}: must be auto, a count >= 0, a dark-frame "
                    "file or null",
                ),
                choice("background_mode", self.background_mode, BackgroundMode),
                (
                    self.stream in (AUTO, True, False),
                    f"stream={self.stream}: must be auto, true or false",
                ),
                (
                    self.stream_above_gb > 0,
                    f"stream_above_gb={self.stream_above_gb}: must be > 0",
                ),
            ]
        )


def _is_pair(value) -> bool:
    try:
        return len(value) == 2 and all(_is_number(v) for v in value)
    except TypeError:
        return False


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------
# The steps, each testable alone
# --------------------------------------------------------------------------------------


def stored_in_corner(mean: np.ndarray, *, ratio: float = 2.0) -> bool:
    """Whether a mean pattern holds its zero frequency in the corner: ``ratio`` times
    more of its energy in the central half of the frame after ``fftshift`` than before
    (a flat or ambiguous pattern is left as it is)."""
    f = mean.shape[0]
    centre = np.s_[f // 4 : f - f // 4, f // 4 : f - f // 4]
    return float(np.fft.fftshift(mean)[centre].sum()) > ratio * float(mean[centre].sum())


def find_centre(mean: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    """The centre of point symmetry (row, col) of a mean pattern, to half a pixel.

    Far-field intensities of a thin object are nearly centro-symmetric about the zero
    frequency (Friedel's law), and the probe's own far field (a disk, an annulus) is.
    The self-convolution ``S(s) = sum_p g(p) g(s - p)`` of ``g = sqrt(mean)`` (masked
    pixels 0) peaks where ``s`` is twice the centre of symmetry: unlike the centre of
    mass it is not pulled by a module gap or an off-centre beamstop. The peak is
    refined by a parabola through its neighbours.
    """
    from scipy.signal import fftconvolve

    g = np.sqrt(np.maximum(np.asarray(mean, np.float64), 0))
    if valid is not None:
        g = np.where(valid, g, 0.0)
    if not g.any():
        raise ValueError("the patterns hold no counts: cannot find their centre")
    s = fftconvolve(g, g, mode="full")
    peak = np.unravel_index(int(np.argmax(s)), s.shape)
    centre = []
    for axis, k in enumerate(peak):
        offset = 0.0
        if 0 < k < s.shape[axis] - 1:
            index = list(peak)
            values = []
            for d in (-1, 0, 1):
                index[axis] = k + d
                values.append(s[tuple(index)])
            curvature = values[0] - 2 * values[1] + values[2]
            if curvature < 0:
                offset = 0.5 * (values[0] - values[2]) / curvature
        centre.append((k + offset) / 2)
    return float(centre[0]), float(centre[1])


def hot_and_dead(total: np.ndarray, *, hot_factor: float = 5.0, dead_counts: float = 20.0):
    """Hot and dead pixels of a detector from its counts summed over the whole scan.

    Hot: more than ``hot_factor`` times the brightest of its 8 neighbours (plus 20
    counts): real features (speckles, the beam's edge) are a few pixels wide, so a real
    bright pixel always has a bright neighbour (with the patterns sampled at twice the
    speckle size or finer, a peak's neighbour holds at least 40 % of it). Dead: zero
    over the whole scan where the median of its neighbours is above ``dead_counts`` (an
    honest pixel at that rate reads zero with probability ``exp(-dead_counts)``).
    Returns ``(hot, dead)`` bool (F, F).
    """
    from scipy.ndimage import maximum_filter, median_filter

    total = np.asarray(total, np.float64)
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    brightest = maximum_filter(total, footprint=ring, mode="constant", cval=0.0)
    typical = median_filter(total, footprint=ring, mode="nearest")
    hot = total > hot_factor * brightest + 20.0
    dead = (total == 0) & (typical > dead_counts)
    return hot, dead


def resample_probe(probe: np.ndarray, window: int, n: int) -> np.ndarray:
    """A probe at a F x F frame's sampling, for a ``window`` x ``window`` detector crop
    binned to N x N.

    Cropping the detector to ``window`` pixels makes the object pixel F / window times
    larger: the probe is Fourier-cropped (its far field cut to the window, the field of
    view kept). Binning keeps the object pixel and shrinks the field of view: the probe's
    central N x N is kept. The modulus at each point of the sample is kept (the probe is
    resampled, not rescaled).
    """
    probe = np.asarray(probe, np.complex128)
    f = probe.shape[0]
    if window < f:
        far = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(probe)))
        start = f // 2 - window // 2
        far = far[start : start + window, start : start + window]
        probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(far))) * (window / f) ** 2
    if n < probe.shape[0]:
        start = probe.shape[0] // 2 - n // 2
        probe = probe[start : start + n, start : start + n]
    return probe.astype(np.complex64)


# --------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------


@dataclass
class _Statistics:
    total: np.ndarray  # (F, F) float64 counts summed over the good values
    bad: np.ndarray  # (F, F) int: patterns in which the pixel is not finite or negative
    saturated: int
    empty: int  # first pattern with no usable value, or -1


def _counts(frames: Frames, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of frames [start, stop) as float32 and where they are unusable (not finite,
    negative), those set to 0."""
    chunk = np.array(frames.frames[start:stop], dtype=np.float32)
    bad = _unusable(chunk)
    chunk[bad] = 0.0
    if frames.amplitudes:
        np.square(chunk, out=chunk)
    return chunk, bad


def _unusable(values: np.ndarray) -> np.ndarray:
    """Where ``values`` are not finite or negative (bool, one pass for NaN and < 0)."""
    bad = ~(values >= 0)  # NaN and negative
    bad |= values == np.inf
    return bad


def _statistics(frames: Frames, saturation: float | None) -> _Statistics:
    m, f = len(frames.positions), frames.frames.shape[-1]
    total, bad, saturated, empty = np.zeros((f, f)), np.zeros((f, f), np.int64), 0, -1
    step = _chunk(f)
    for start in range(0, m, step):
        counts, unusable = _counts(frames, start, start + step)
        total += counts.sum(axis=0, dtype=np.float64)
        bad += unusable.sum(axis=0)
        if saturation is not None:
            saturated += int(np.count_nonzero(counts >= saturation))
        whole = unusable.all(axis=(1, 2))
        if empty < 0 and whole.any():
            empty = start + int(np.argmax(whole))
    return _Statistics(total, bad, saturated, empty)


def _read_array(path: str, key: str, what: str) -> np.ndarray:
    """A mask or dark frame from ``.npy``, or the dataset/key ``key`` of ``.npz``/``.h5``."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return archive[key]
        import h5py

        with h5py.File(path, "r") as handle:
            return handle[key][()]
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"data.{what}={path}: cannot read {key!r} ({error})") from error


def _excluded(frames: Frames, options: PrepareOptions, f: int) -> tuple[np.ndarray, str]:
    """(F, F) bool of the pixels the mask option excludes, and where it came from."""
    if options.mask is None:
        return np.zeros((f, f), bool), "none"
    if options.mask == AUTO:
        if frames.excluded is None:
            return np.zeros((f, f), bool), "none in the file"
        excluded, origin = np.asarray(frames.excluded), "the file's"
    else:
        excluded, origin = _read_array(options.mask, "mask", "mask"), options.mask
    if excluded.shape != (f, f):
        raise ValueError(
            f"data.mask ({origin}) is {excluded.shape} but the frames are {f} x {f}; give a "
            "mask of the detector's shape"
        )
    return excluded.astype(bool), origin


def _background(frames: Frames, options: PrepareOptions, f: int) -> tuple[Any, str]:
    """The background (None, a float, or an (F, F) frame) and its origin."""
    value = options.background
    if value is None or (value == AUTO and frames.dark is None):
        return None, "none"
    if _is_number(value):
        return float(value), f"{value:g} counts"
    dark = frames.dark if value == AUTO else _read_array(value, "dark", "background")
    dark = np.asarray(dark, np.float32)
    if dark.shape != (f, f):
        raise ValueError(
            f"data.background: the dark frame is {dark.shape} but the frames are {f} x {f}"
        )
    if not np.isfinite(dark).all() or (dark < 0).any():
        raise ValueError(
            "data.background: the dark frame holds NaN, Inf or negative counts; give mean "
            "dark counts per pixel (>= 0)"
        )
    return dark, f"dark frame ({'the file' if value == AUTO else value}, mean {dark.mean():.3g})"


def _window(options: PrepareOptions, f: int, n: int | None, name: str) -> tuple[int, int]:
    """(window, N): the detector pixels cut around the centre and the pattern size."""
    b = options.bin
    if options.crop is not None:
        window = options.crop
    elif n is not None and f > n * b:
        window = n * b  # the model is smaller than the frame: cut its window
    else:
        window = f - f % (2 * b)
    if window > f:
        raise ValueError(
            f"{name}: the frames are {f} x {f}, smaller than data.crop={window}; lower data.crop"
        )
    if window % b:
        raise ValueError(f"{name}: data.bin={b} does not divide the {window}-pixel window")
    size = window // b
    if size < 16 or size % 2:
        raise ValueError(
            f"{name}: {window}-pixel window binned by {b} gives N = {size}; N must be even "
            "and >= 16"
        )
    if n is not None and size != n:
        raise ValueError(
            f"{name}: patterns are {f} x {f} and give N = {size} (window {window}, bin {b}) "
            f"but model.n={n}; set data.crop={n * b} or leave model.n unset (null)"
        )
    return window, size


def _corner(centre: tuple[float, float], window: int, f: int, name: str) -> tuple[int, int]:
    """Top-left pixel of the window whose pixel (window/2, window/2) is the centre."""
    row, col = (int(round(c)) - window // 2 for c in centre)
    if min(row, col) < 0 or max(row, col) + window > f:
        raise ValueError(
            f"{name}: a {window}-pixel window around the centre ({centre[0]:.1f}, "
            f"{centre[1]:.1f}) leaves the {f} x {f} frame; lower data.crop (at most "
            f"{2 * int(min(min(centre), f - 1 - max(centre)))}) or set data.center"
        )
    return row, col


def _positions(frames: Frames, n: int, window: int, f: int, name: str) -> tuple:
    """(x, y, notes): positions in object pixels, placed in the frame."""
    x, y = (np.asarray(frames.positions[:, k], np.float64) for k in (0, 1))
    notes = {}
    if frames.geometry is not None:
        notes["object_pixel_size_m"] = frames.geometry.object_pixel(window)
        notes["distance_m"] = frames.geometry.distance
        notes["energy_ev"] = frames.geometry.energy_ev
    if frames.units == "metres":
        if frames.geometry is None:
            raise ValueError(
                f"{name}: positions are in metres but the file has no geometry (energy, "
                "distance, detector pixel) to convert them"
            )
        sign = -1.0 if frames.sample_translation else 1.0
        x, y = (sign * v / notes["object_pixel_size_m"] for v in (x, y))
    elif window != f:  # pixels of the whole frame's sampling -> the window's
        x, y = x * window / f, y * window / f
    if frames.units == "pixels" and np.ptp(x) + np.ptp(y) < 1e-2 and len(x) > 1:
        raise ValueError(
            f"{name}: the positions span {np.ptp(x):.2g} x {np.ptp(y):.2g} object pixels: "
            "they look like metres; positions in .npz/.h5 files are object pixels"
        )
    shift = np.zeros(2)
    low = np.array([x.min(), y.min()]) - n / 2  # the first patch's corner
    # Placed when a patch would leave the frame, when the origin is far (a motor's), and
    # always for metres (their origin is the instrument's): first corner at pixel 0.
    place = (low < 0) | (low > n) | (frames.units == "metres")
    if frames.object is None and place.any():
        shift = np.where(place, np.ceil(-low - 1e-6), 0.0)  # metres -> pixels: rounding
        x, y = x + shift[0], y + shift[1]
        log.info(
            "%s: positions shifted by (%+.0f, %+.0f) px into the object frame (margin 0 px)",
            name,
            *shift,
        )
    notes["position_offset_px"] = shift.tolist()
    return x, y, notes


def prepare(
    frames: Frames,
    options: PrepareOptions | None = None,
    *,
    n: int | None = None,
    probe: np.ndarray | None = None,
    name: str = "data.path",
) -> Scan:
    """The :class:`Scan` of ``frames`` (steps in the module docstring).

    Parameters
    ----------
    n : int, optional
        The pattern size the model needs (None: what the frame, crop and bin give).
    probe : (P, P) complex, optional
        Replaces the file's probe. A probe of the frame's size is resampled with the
        frames (:func:`resample_probe`); otherwise it must be N x N.
    name : str
        How error messages name the file (``data.path``).

    Raises ``ValueError`` (one line naming the field and the fix) for a mask or dark
    frame of the wrong shape, a centre outside the frame, a window larger than it, a bin
    that does not divide it, a probe of the wrong size, positions that cannot be placed,
    or patterns with no usable pixel.
    """
    options = options or PrepareOptions()
    m, f = len(frames.positions), int(frames.frames.shape[-1])
    if tuple(frames.frames.shape[1:]) != (f, f) or len(frames.frames) != m:
        raise ValueError(
            f"{name}: frames must be (M, F, F) with one position each, got "
            f"{tuple(frames.frames.shape)} for {m} positions"
        )
    if m == 0:
        raise ValueError(f"{name}: the scan is empty (no patterns)")
    window, size = _window(options, f, n, name)
    excluded, mask_origin = _excluded(frames, options, f)
    background, background_origin = _background(frames, options, f)
    stats = _statistics(frames, options.saturation)
    if stats.empty >= 0:
        raise ValueError(
            f"{name}: pattern {stats.empty} holds no usable value (NaN, Inf or negative "
            "everywhere); remove it from the file"
        )
    excluded |= stats.bad == m  # never a usable value
    hot = dead = np.zeros((f, f), bool)
    if options.mask_hot_pixels:
        hot, dead = hot_and_dead(np.where(excluded, 0, stats.total))
        excluded |= hot | dead
    mean = np.where(excluded, 0, stats.total / m)
    if not mean.any():
        raise ValueError(
            f"{name}: the patterns hold no counts ({int(stats.bad.sum())} values are NaN, Inf "
            "or negative)"
        )

    shift = options.fftshift if options.fftshift != AUTO else stored_in_corner(mean)
    if shift:
        mean, excluded = np.fft.fftshift(mean), np.fft.fftshift(excluded)
        if isinstance(background, np.ndarray):
            background = np.fft.fftshift(background)
    if options.center != AUTO:
        centre, how = (float(options.center[0]), float(options.center[1])), "data.center"
    elif frames.centre is not None:
        centre, how = frames.centre, "the file's beam centre"
        if shift:
            centre = tuple((c + f // 2) % f for c in centre)
    else:
        centre, how = find_centre(mean, ~excluded), "point symmetry of the mean pattern"
    if not all(0 <= c <= f - 1 for c in centre):
        raise ValueError(
            f"{name}: data.center ({centre[0]:.1f}, {centre[1]:.1f}) lies outside the "
            f"{f} x {f} frame"
        )
    if window == f and options.center == AUTO and max(abs(c - f / 2) for c in centre) > 2:
        log.warning(
            "%s: the patterns look centred at (%.1f, %.1f), not (%d, %d); set data.crop "
            "to cut a window around that centre (or data.center to override)",
            name,
            *centre,
            f // 2,
            f // 2,
        )
    row, col = (f // 2 - window // 2,) * 2 if window == f else _corner(centre, window, f, name)

    x, y, position_notes = _positions(frames, size, window, f, name)
    probe = frames.probe if probe is None else probe
    if probe is None:
        raise ValueError(
            f"{name}: the file holds no probe (probeGuess); give one with data.probe_path"
        )
    modes = probes.as_modes(np.asarray(probe))  # (K, N, N): modes are kept
    if modes.shape[-2:] == (f, f) and (window, size) != (f, f):
        modes = np.stack([resample_probe(mode, window, size) for mode in modes])
    elif modes.shape[-2:] != (size, size):
        raise ValueError(
            f"{name}: the probe is {modes.shape[-2]} x {modes.shape[-1]} but the patterns "
            f"are {size} x {size} (frames {f}, window {window}, bin {options.bin}); give a "
            f"probe of {size} or {f} pixels (data.probe_path)"
        )

    detector = ~_binned(excluded[row : row + window, col : col + window][None], options.bin)[0]
    if isinstance(background, np.ndarray):
        cut = background[row : row + window, col : col + window]
        background = _binned(cut[None], options.bin)[0] * detector
    elif background is not None:
        background = np.full((size, size), background * options.bin**2, np.float32) * detector
    subtracted = background is not None and options.background_mode == BackgroundMode.subtract
    recipe = _Recipe(
        amplitudes=frames.amplitudes,
        saturation=options.saturation,
        shift=bool(shift),
        corner=(row, col),
        window=window,
        bin=options.bin,
        detector=detector,
        subtract=background if subtracted else None,
        clean=not (stats.bad.any() or stats.saturated),
    )
    if subtracted:
        background = None
    identity = (
        frames.amplitudes
        and (window, size, row) == (f, f, 0)
        and not shift
        and options.saturation is None
        and not stats.bad.any()
        and isinstance(frames.frames, np.ndarray)
    )
    per_pattern, valid = None, detector
    if _streams(frames, options, m, size):
        diffraction = Patterns(
            frames.file,
            (m, size, size),
            recipe,
            per_pattern=not recipe.clean,
        )
    elif identity:  # nothing to change: the file's amplitudes as they are (no copy)
        diffraction = frames.frames
        if not detector.all():
            diffraction = np.where(detector, diffraction, 0).astype(np.float32)
        if recipe.subtract is not None:
            diffraction = _subtract(diffraction, recipe.subtract, copy=diffraction is frames.frames)
    else:
        diffraction, per_pattern = _patterns(frames, recipe, size)
    if per_pattern is not None:
        valid = per_pattern & detector
        if not valid.any(axis=(1, 2)).all():
            bad = int(np.argmin(valid.any(axis=(1, 2))))
            raise ValueError(f"{name}: pattern {bad} has no usable pixel (all masked)")
    notes = {
        "frame": f,
        "window": window,
        "bin": options.bin,
        "n": size,
        "centre": [round(c, 2) for c in centre],
        "centre_from": how,
        "fftshift": bool(shift),
        "mask": mask_origin,
        "hot_pixels": int(hot.sum()),
        "dead_pixels": int(dead.sum()),
        "bad_values": int(stats.bad.sum()),
        "saturated_values": stats.saturated,
        "masked_pixels": int(size * size - (valid if valid.ndim == 2 else valid[0]).sum()),
        "background": background_origin,
        "background_mode": str(options.background_mode),
        **position_notes,
        **frames.metadata,
    }
    _log_preparation(name, notes)
    return Scan(
        diffraction=diffraction,
        probe=probes.squeezed(modes),
        xcoords=x,
        ycoords=y,
        object=frames.object if window == f else None,
        scan_index=frames.scan_index,
        nphotons=frames.nphotons,
        seed=frames.seed,
        source=frames.source,
        metadata=notes,
        valid=valid,
        background=background,
    )


def _binned(values: np.ndarray, b: int) -> np.ndarray:
    """(k, W, W) -> (k, W/b, W/b): sums of b x b blocks (bool: any)."""
    if b == 1:
        return values
    k, w = values.shape[0], values.shape[1]
    blocks = values.reshape(k, w // b, b, w // b, b)
    return blocks.any(axis=(2, 4)) if values.dtype == bool else blocks.sum(axis=(2, 4))


def _subtract(amplitudes: np.ndarray, background: np.ndarray, *, copy: bool) -> np.ndarray:
    """``sqrt(max(a^2 - background, 0))``, chunk by chunk (in place unless ``copy``)."""
    out = np.empty_like(amplitudes) if copy else amplitudes
    step = _chunk(amplitudes.shape[-1])
    for start in range(0, len(amplitudes), step):
        out[start : start + step] = without_background(amplitudes[start : start + step], background)
    return out


def _patterns(frames, recipe: _Recipe, size: int):
    """(M, N, N) float32 amplitudes in memory and the per-pattern valid pixels (or
    None), prepared block by block."""
    m = len(frames.positions)
    out = np.empty((m, size, size), np.float32)
    per_pattern = None
    step = _chunk(frames.frames.shape[-1])
    for start in range(0, m, step):
        amplitudes, valid = recipe(frames.frames[start : start + step])
        out[start : start + len(amplitudes)] = amplitudes
        if valid is not None and not valid.all():
            if per_pattern is None:
                per_pattern = np.ones((m, size, size), bool)
            per_pattern[start : start + len(amplitudes)] = valid
    return out, per_pattern


def _streams(frames: Frames, options: PrepareOptions, m: int, size: int) -> bool:
    """Whether the patterns are read from the file when used (``data.stream``)."""
    if frames.file is None and options.stream is True:
        log.warning(
            "data.stream=true: %s is read whole (only HDF5 and CXI files stream); convert "
            "it with python -m ptycho.data.convert",
            frames.source or "the scan",
        )
    if frames.file is None or options.stream is False:
        return False
    if options.stream is True:
        return True
    return m * size * size * 4 > options.stream_above_gb * 1e9


@dataclass(frozen=True, eq=False)
class _Recipe:
    """Steps 1 and 4-5 and the masks, for one block of frames as stored: ``frames (k,
    F, F) -> (amplitudes (k, N, N) float32, valid (k, N, N) bool)``, valid False where
    the block's own values are bad or saturated; amplitudes are 0 there and where the
    ``detector`` mask excludes, and have the ``subtract`` counts taken out."""

    amplitudes: bool
    saturation: float | None
    shift: bool
    corner: tuple[int, int]
    window: int
    bin: int
    detector: np.ndarray
    subtract: np.ndarray | None
    clean: bool = False  # no frame has a bad or saturated value: nothing to look for

    def __call__(self, frames) -> tuple[np.ndarray, np.ndarray | None]:
        counts = np.asarray(frames, dtype=np.float32)
        owned = counts is not frames  # a copy made here, which may be changed in place
        bad, any_bad = None, False
        if not self.clean:  # look for bad and saturated values
            bad = _unusable(counts)
            if self.saturation is not None:
                bad |= (np.square(counts) if self.amplitudes else counts) >= self.saturation
            any_bad = bool(bad.any())
        if any_bad:
            counts, owned = np.where(bad, np.float32(0), counts), True
        row, col = self.corner
        f = counts.shape[-1]
        if self.amplitudes and (self.window, self.bin, row, col, self.shift) == (f, 1, 0, 0, False):
            amplitudes = counts  # amplitudes as stored: nothing to cut, bin or shift
        else:
            if self.amplitudes:
                counts = np.square(counts, out=counts if owned else None)
            crop = np.s_[:, row : row + self.window, col : col + self.window]
            if self.shift:
                counts = np.fft.fftshift(counts, axes=(1, 2))
                bad = np.fft.fftshift(bad, axes=(1, 2)) if any_bad else None
            counts, bad = counts[crop], (bad[crop] if any_bad else None)
            amplitudes = np.sqrt(_binned(counts, self.bin)).astype(np.float32, copy=False)
        valid = ~_binned(bad, self.bin) if any_bad else None
        mask = self.detector if valid is None else valid & self.detector
        if not mask.all():  # masked pixels read 0 (the network's input)
            amplitudes = amplitudes * mask
        if self.subtract is not None:
            amplitudes = without_background(amplitudes, self.subtract).astype(np.float32)
        return amplitudes, valid


def _log_preparation(name: str, notes: dict) -> None:
    f, window, size = notes["frame"], notes["window"], notes["n"]
    steps = []
    if notes["fftshift"]:
        steps.append("zero frequency was in the corner: fftshifted")
    if (window, size) != (f, f):
        steps.append(
            f"{window}-pixel window around ({notes['centre'][0]:.1f}, "
            f"{notes['centre'][1]:.1f}) ({notes['centre_from']}), bin {notes['bin']}"
        )
    log.info(
        "%s: frames %d x %d -> N %d%s",
        name,
        f,
        f,
        size,
        "; " + "; ".join(steps) if steps else "",
    )
    masked = notes["masked_pixels"]
    if masked or notes["bad_values"] or notes["saturated_values"]:
        log.info(
            "%s: %d of %d pixels masked (mask: %s; %d hot, %d dead); %d non-finite or "
            "negative and %d saturated values masked in their patterns",
            name,
            masked,
            size * size,
            notes["mask"],
            notes["hot_pixels"],
            notes["dead_pixels"],
            notes["bad_values"],
            notes["saturated_values"],
        )
    if notes["background"] != "none":
        how = "modelled" if notes["background_mode"] == "model" else "subtracted, clipped at 0"
        log.info("%s: background (%s): %s", name, how, notes["background"])
    if "object_pixel_size_m" in notes:
        log.info("%s: object pixel %.4g m", name, notes["object_pixel_size_m"])

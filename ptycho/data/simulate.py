"""Simulated ptychography scans: objects, probes, scan paths, Poisson noise.

Everything is generated locally from a seed; nothing is downloaded. The ``image``
object kind reads test images that ship inside scikit-image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np
import scipy.ndimage

from ptycho import probes
from ptycho.data.scan import Scan
from ptycho.errors import choice, require
from ptycho.physics import Subpixel, far_field
from ptycho.stitch import extract_patches

__all__ = [
    "OBJECT_KINDS",
    "PROBE_KINDS",
    "SCAN_KINDS",
    "ObjectKind",
    "ProbeKind",
    "ScanKind",
    "SimulationSpec",
    "make_object",
    "make_probe",
    "fourier_patches",
    "scan_positions",
    "simulate",
]


class ObjectKind(StrEnum):
    lines = "lines"
    grf = "grf"
    image = "image"


class ProbeKind(StrEnum):
    disk = "disk"
    fresnel = "fresnel"
    aberrated = "aberrated"
    gaussian = "gaussian"


class ScanKind(StrEnum):
    grid = "grid"
    spiral = "spiral"
    random = "random"


OBJECT_KINDS = tuple(ObjectKind)
PROBE_KINDS = tuple(ProbeKind)
SCAN_KINDS = tuple(ScanKind)
BUNDLED_IMAGES = (
    "camera",
    "moon",
    "coins",
    "text",
    "brick",
    "grass",
    "gravel",
    "page",
    "cell",
    "astronaut",
)  # scikit-image test images bundled with the package (no download)

GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


def _normalise(texture: np.ndarray) -> np.ndarray:
    """Map a texture to [0, 1] (robust to a few outliers)."""
    low, high = np.percentile(texture, [0.5, 99.5])
    if high <= low:
        return np.zeros_like(texture)
    return np.clip((texture - low) / (high - low), 0.0, 1.0)


def lines_texture(
    size: tuple[int, int],
    rng: np.random.Generator,
    *,
    density: float = 2.5e-3,
    blur: float | tuple[float, ...] = 1.0,
    blur_weights: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Random line segments, Gaussian-blurred (after PtychoPINN's ``lines`` object), in [0, 1].

    ``density`` is the number of segments per pixel of area; segments have random
    orientation, length (up to a quarter of the size) and strength. The drawing is
    Gaussian-blurred with standard deviation ``blur`` pixels; a sequence of blurs with
    ``blur_weights`` (default equal) sums the weighted blurred drawings (PtychoPINN's own
    simulator uses blurs (1, 5, 10) with weights (1, 2, 5): mostly smooth structure).
    """
    blurs = (float(blur),) if np.isscalar(blur) else tuple(float(b) for b in blur)
    weights = (1.0,) * len(blurs) if blur_weights is None else tuple(map(float, blur_weights))
    if not blurs or len(weights) != len(blurs):
        raise ValueError(
            f"line blurs and weights must be non-empty and of equal length, got {blurs} "
            f"and {weights}"
        )
    if min(blurs) < 0 or min(weights) < 0 or max(weights) <= 0:
        raise ValueError(f"line blurs and weights must be >= 0, got {blurs} and {weights}")
    from skimage.draw import line_aa

    height, width = size
    canvas = np.zeros(size, np.float64)
    count = max(1, int(density * height * width))
    for _ in range(count):
        y0, x0 = rng.uniform(0, height), rng.uniform(0, width)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.02, 0.25) * max(height, width)
        y1 = np.clip(y0 + length * np.sin(angle), 0, height - 1)
        x1 = np.clip(x0 + length * np.cos(angle), 0, width - 1)
        rr, cc, val = line_aa(int(y0), int(x0), int(y1), int(x1))
        keep = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        canvas[rr[keep], cc[keep]] += rng.uniform(0.3, 1.0) * val[keep]
    blurred = sum(
        weight * scipy.ndimage.gaussian_filter(canvas, sigma)
        for sigma, weight in zip(blurs, weights, strict=True)
    )
    return _normalise(blurred)


def grf_texture(
    size: tuple[int, int], rng: np.random.Generator, *, correlation_length: float = 4.0
) -> np.ndarray:
    """Gaussian random field with a Gaussian spectrum of the given correlation length
    (pixels), mapped to [0, 1]."""
    noise = rng.normal(size=size)
    return _normalise(scipy.ndimage.gaussian_filter(noise, correlation_length, mode="wrap"))


def image_texture(name: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A grey-level scikit-image test image, randomly cropped (or resized) to ``size``,
    in [0, 1]."""
    import skimage.color
    import skimage.data
    import skimage.transform

    if name not in BUNDLED_IMAGES:
        raise ValueError(f"image name must be one of {list(BUNDLED_IMAGES)}, got {name!r}")
    image = np.asarray(getattr(skimage.data, name)(), np.float64)
    if image.ndim == 3:
        image = skimage.color.rgb2gray(image[..., :3])
    height, width = size
    if image.shape[0] < height or image.shape[1] < width:
        scale = max(height / image.shape[0], width / image.shape[1])
        shape = (math.ceil(image.shape[0] * scale), math.ceil(image.shape[1] * scale))
        image = skimage.transform.resize(image, shape, anti_aliasing=True)
    top = rng.integers(0, image.shape[0] - height + 1)
    left = rng.integers(0, image.shape[1] - width + 1)
    return _normalise(image[top : top + height, left : left + width])


def make_object(
    size: tuple[int, int],
    *,
    kind: str = "lines",
    amplitude_range: tuple[float, float] = (0.2, 1.0),
    phase_range: tuple[float, float] = (-0.6, 0.6),
    images: tuple[str, str] = ("camera", "moon"),
    correlation_length: float = 4.0,
    line_blur: tuple[float, ...] = (1.0, 5.0, 10.0),
    line_blur_weights: tuple[float, ...] | None = (1.0, 2.0, 5.0),
    seed: int = 0,
) -> np.ndarray:
    """A complex (H, W) object with independent amplitude and phase textures.

    Parameters
    ----------
    size : (H, W)
    kind : {"lines", "grf", "image"}
    amplitude_range : (a0, a1)
        Amplitude (transmission modulus) where the texture is 0 and where it is 1;
        (1.0, 0.2) makes the features absorb on a transparent background.
    phase_range : (p0, p1)
        Phase in radians where the texture is 0 and where it is 1.
    images : (amplitude image, phase image)
        Names of bundled scikit-image test images for ``kind="image"``; they must differ.
    correlation_length : float
        Pixels, for ``kind="grf"``.
    line_blur, line_blur_weights
        Blur(s) of the line drawing for ``kind="lines"``, see :func:`lines_texture`.
    seed : int

    Returns
    -------
    (H, W) complex64, ``A exp(i phi)``.
    """
    if kind not in OBJECT_KINDS:
        raise ValueError(f"object kind must be one of {list(OBJECT_KINDS)}, got {kind!r}")
    low, high = amplitude_range
    if min(low, high) < 0:
        raise ValueError(f"amplitude_range must be non-negative, got {amplitude_range}")
    rng = np.random.default_rng(seed)
    size = (int(size[0]), int(size[1]))
    if kind == "lines":
        blur = {"blur": tuple(line_blur), "blur_weights": line_blur_weights}
        amp_tex, phase_tex = lines_texture(size, rng, **blur), lines_texture(size, rng, **blur)
    elif kind == "grf":
        amp_tex = grf_texture(size, rng, correlation_length=correlation_length)
        phase_tex = grf_texture(size, rng, correlation_length=correlation_length)
    else:
        if images[0] == images[1]:
            raise ValueError(f"amplitude and phase images must differ, got {images}")
        amp_tex, phase_tex = (image_texture(name, size, rng) for name in images)
    amplitude = low + (high - low) * amp_tex
    phase = phase_range[0] + (phase_range[1] - phase_range[0]) * phase_tex
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


# Aberrations of the "aberrated" probe's aperture, radians at its edge: (Zernike-like
# polynomial of the normalised radius rho and angle theta). Fixed, so every run and
# every user sees the same probe.
ABERRATIONS = (
    (1.6, lambda rho, theta: rho**2 * np.cos(2 * theta - 0.3)),  # astigmatism
    (1.1, lambda rho, theta: (3 * rho**3 - 2 * rho) * np.cos(theta - 1.1)),  # coma
    (0.8, lambda rho, theta: rho**3 * np.cos(3 * theta + 0.4)),  # trefoil
)


def make_probe(
    n: int,
    *,
    kind: str = "aberrated",
    radius: float = 0.2,
    blur: float = 1.5,
    fresnel_number: float = 8.0,
) -> np.ndarray:
    """An (N, N) probe, maximum modulus 1.

    Parameters
    ----------
    n : int
    kind : {"disk", "fresnel", "aberrated", "gaussian"}
        ``disk``: circular aperture low-passed by a Gaussian of ``blur`` pixels (flat
        top, soft edge, flat phase: real and centro-symmetric, so every single pattern is
        explained as well by the object's twin). ``fresnel``: the aperture propagated in
        the Fresnel approximation to Fresnel number ``a^2 / (lambda z) = fresnel_number``:
        Fresnel rings in the modulus and a curved phase (still centro-symmetric).
        ``aberrated``: the aperture with fixed astigmatism, coma and trefoil
        (``ABERRATIONS``) propagated the same way and smoothed by half a pixel, like the
        probes of focusing optics measured at instruments: complex, asymmetric,
        structured. ``gaussian``: a Gaussian of standard deviation ``radius * N / 2``.
    radius : float
        Aperture radius as a fraction of N.
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"probe kind must be one of {list(PROBE_KINDS)}, got {kind!r}")
    if not 0 < radius <= 0.5:
        raise ValueError(f"probe radius must be in (0, 0.5] (fraction of N), got {radius}")
    coords = np.arange(n) - n / 2
    r2 = coords[None, :] ** 2 + coords[:, None] ** 2
    a = radius * n
    if kind == "gaussian":
        probe = np.exp(-r2 / (2 * (a / 2) ** 2)).astype(np.complex128)
    elif kind == "disk":
        aperture = (r2 <= a**2).astype(np.float64)
        probe = scipy.ndimage.gaussian_filter(aperture, blur).astype(np.complex128)
    else:
        aperture = (r2 <= a**2).astype(np.complex128)
        if kind == "aberrated":  # a soft edge, as an optic's aperture is seen
            aperture = scipy.ndimage.gaussian_filter(aperture.real, 1.0).astype(np.complex128)
            rho = np.sqrt(r2) / a
            theta = np.arctan2(coords[:, None], coords[None, :])
            phase = sum(weight * term(rho, theta) for weight, term in ABERRATIONS)
            aperture = aperture * np.exp(1j * phase)
        # Fresnel propagation: multiply the spectrum by exp(-i pi lambda z |f|^2) with
        # lambda z = a^2 / F and f in cycles per pixel.
        freq = np.fft.fftfreq(n)
        f2 = freq[None, :] ** 2 + freq[:, None] ** 2
        kernel = np.exp(-1j * np.pi * (a**2 / fresnel_number) * f2)
        probe = np.fft.fftshift(np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(aperture)) * kernel))
        if kind == "aberrated":
            probe = scipy.ndimage.gaussian_filter(
                probe.real, 0.5
            ) + 1j * scipy.ndimage.gaussian_filter(probe.imag, 0.5)
    return (probe / np.abs(probe).max()).astype(np.complex64)


def scan_positions(
    n_positions: int,
    *,
    kind: str = "grid",
    step: float = 16.0,
    jitter: float = 0.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Scan path relative to its own corner: (x, y) in pixels, min 0.

    Parameters
    ----------
    n_positions : int
    kind : {"grid", "spiral", "random"}
        ``grid``: row-major raster of ceil(sqrt(M)) columns. ``spiral``: Fermat spiral
        (golden-angle), mean nearest-neighbour distance ~ ``step``. ``random``:
        uniform over a square of the grid's extent.
    step : float
        Pixels between neighbouring positions.
    jitter : float
        Standard deviation in pixels of Gaussian noise added to every position.
    """
    if kind not in SCAN_KINDS:
        raise ValueError(f"scan kind must be one of {list(SCAN_KINDS)}, got {kind!r}")
    if n_positions < 1:
        raise ValueError(f"n_positions must be >= 1, got {n_positions}")
    if step <= 0:
        raise ValueError(f"scan step must be > 0 pixels, got {step}")
    rng = np.random.default_rng(seed)
    if kind == "grid":
        side = math.ceil(math.sqrt(n_positions))
        k = np.arange(n_positions)
        x, y = (k % side) * step, (k // side) * step
    elif kind == "spiral":
        k = np.arange(n_positions)
        radius = step * np.sqrt(k / np.pi)  # one point per step^2 of area
        x, y = radius * np.cos(k * GOLDEN_ANGLE), radius * np.sin(k * GOLDEN_ANGLE)
    else:
        extent = step * math.ceil(math.sqrt(n_positions))
        x, y = rng.uniform(0, extent, n_positions), rng.uniform(0, extent, n_positions)
    x = x + rng.normal(0, jitter, n_positions) if jitter else x
    y = y + rng.normal(0, jitter, n_positions) if jitter else y
    return x - x.min(), y - y.min()


@dataclass
class SimulationSpec:
    """One simulated scan: the object, the probe, the scan path and the dose.

    The defaults are the project's default sample (``conf/data/lines.yaml``): multi-scale
    random lines in amplitude and an independent drawing in phase, the measured-like
    aberrated probe, a dense raster, 1e9 photons per pattern.
    """

    n: int = 64
    """Pattern size N (even, >= 16)."""
    n_positions: int = 6400
    """Scan positions M."""
    object_kind: ObjectKind = ObjectKind.lines
    """``lines`` (random line drawings, PtychoPINN's), ``grf`` (Gaussian random field) or
    ``image`` (two of scikit-image's bundled photographs)."""
    amplitude_range: list[float] = field(default_factory=lambda: [0.2, 1.0])
    """Amplitude where the texture is 0 and where it is 1."""
    phase_range: list[float] = field(default_factory=lambda: [-0.6, 0.6])
    """Phase (rad) where the texture is 0 and where it is 1."""
    images: list[str] = field(default_factory=lambda: ["camera", "moon"])
    """Bundled scikit-image test images for ``object_kind=image``: (amplitude, phase)."""
    correlation_length: float = 4.0
    """Pixels, for ``object_kind=grf``."""
    line_blur: list[float] = field(default_factory=lambda: [1.0, 5.0, 10.0])
    """Gaussian blur(s) of the line drawing, pixels (``object_kind=lines``)."""
    line_blur_weights: list[float] | None = field(default_factory=lambda: [1.0, 2.0, 5.0])
    """One weight per blur (null: equal)."""
    probe: ProbeKind = ProbeKind.aberrated
    """``aberrated`` (complex, asymmetric: as focusing optics make), ``disk``, ``fresnel``
    or ``gaussian`` (:func:`make_probe`)."""
    probe_radius: float = 0.2
    """Aperture radius, fraction of N."""
    fresnel_number: float = 8.0
    """Of the propagated probes (``fresnel``, ``aberrated``)."""
    scan: ScanKind = ScanKind.grid
    """``grid`` (raster), ``spiral`` (Fermat) or ``random``."""
    step: float = 0.0625
    """Distance between neighbouring positions, fraction of N."""
    jitter: float = 0.0
    """Position noise (standard deviation), fraction of N."""
    position_error: float = 0.0
    """Pixels rms of random errors in the stored positions, as an instrument's encoders
    make; the true positions are kept in ``metadata["true_positions"]`` for metrics."""
    nphotons: float | None = 1e9
    """Mean total counts per pattern (Poisson); null: noiseless, unscaled ``|Psi|``."""
    subpixel: Subpixel = Subpixel.fourier
    """How a patch at a fractional position is cut: ``fourier`` (an exact band-limited
    shift of the object, as a real sample moves) or ``bilinear`` (the project's warp,
    the network's own interpolation). Whole-pixel positions (the default raster) are
    cut alike by both."""
    probe_modes: int = 1
    """K mutually incoherent probe modes (a partially coherent beam): each pattern is
    the sum of the modes' intensities; the truth's modes are the scan's probe
    (:func:`ptycho.probes.coherent_modes`)."""
    coherence: float = 0.3
    """Power of each mode over the one before it (``probe_modes`` > 1): 0.3 gives
    72 / 22 / 6 % for three modes."""
    margin: int = 2
    """Pixels of object around the outermost patches."""
    seed: int = 0
    """Seeds the object, the scan path, the noise and the position errors."""

    def check(self) -> None:
        """``ValueError`` naming the first field out of range."""
        blurs, weights = list(self.line_blur), self.line_blur_weights
        require(
            [
                (self.n >= 16 and self.n % 2 == 0, f"n={self.n}: must be even and >= 16"),
                (self.n_positions >= 1, f"n_positions={self.n_positions}: must be >= 1"),
                choice("subpixel", self.subpixel, Subpixel),
                (self.probe_modes >= 1, f"probe_modes={self.probe_modes}: must be >= 1"),
                (0 < self.coherence <= 1, f"coherence={self.coherence}: must be in (0, 1]"),
                (
                    self.nphotons is None or self.nphotons > 0,
                    f"nphotons={self.nphotons}: must be > 0, or null (noiseless)",
                ),
                (self.step > 0, f"step={self.step}: must be > 0 (fraction of N)"),
                (self.jitter >= 0, f"jitter={self.jitter}: must be >= 0 (fraction of N)"),
                (
                    self.position_error >= 0,
                    f"position_error={self.position_error}: must be >= 0 (pixels)",
                ),
                (
                    0 < self.probe_radius <= 0.5,
                    f"probe_radius={self.probe_radius}: must be in (0, 0.5] (fraction of N)",
                ),
                (
                    bool(blurs) and min(blurs) >= 0,
                    f"line_blur={blurs}: must be one or more blurs >= 0 (pixels)",
                ),
                (
                    weights is None
                    or (len(weights) == len(blurs) and min(weights) >= 0 and max(weights) > 0),
                    f"line_blur_weights={None if weights is None else list(weights)}: must be "
                    f"one weight >= 0 per line_blur entry ({len(blurs)}), not all 0, or null "
                    "for equal weights",
                ),
                (
                    len(self.amplitude_range) == 2 and min(self.amplitude_range) >= 0,
                    f"amplitude_range={list(self.amplitude_range)}: must be two values >= 0",
                ),
                (
                    len(self.phase_range) == 2,
                    f"phase_range={list(self.phase_range)}: must be two values (rad)",
                ),
            ]
        )


def simulate(spec: SimulationSpec | None = None, /, **changes) -> Scan:
    """Simulate a far-field ptychography scan.

    Parameters
    ----------
    spec : SimulationSpec, optional
        What to simulate (default: :class:`SimulationSpec`'s defaults); keyword arguments
        change fields of it (``simulate(n=32, n_positions=64, nphotons=None)``).

    Returns
    -------
    Scan with ``object`` set (the ground truth) and positions in object pixels (patch
    centres); the object is just large enough for every patch plus ``margin`` pixels.
    Intensities ``sum_k |fftshift(fft2(P_k O_j)) / N|^2`` over the probe's modes (one
    unless ``probe_modes`` > 1; the scan's probe is then (K, N, N)) (docs/design.md,
    section 3); with
    ``nphotons`` the stored amplitudes are ``sqrt(counts)``, ``counts ~ Poisson(s I)`` with
    ``s`` set so the expected total per pattern averages ``nphotons``.
    """
    spec = replace(spec or SimulationSpec(), **changes)
    spec.check()
    n = spec.n
    probe = make_probe(
        n, kind=spec.probe, radius=spec.probe_radius, fresnel_number=spec.fresnel_number
    )
    seeds = np.random.SeedSequence(spec.seed).spawn(3)
    x, y = scan_positions(
        spec.n_positions,
        kind=spec.scan,
        step=spec.step * n,
        jitter=spec.jitter * n,
        seed=int(seeds[0].generate_state(1)[0]),
    )
    # Exact shifts read the object up to a quarter of N beyond each patch: it is drawn
    # that much larger, then cut back (whole-pixel scans are drawn as they always were).
    fourier = spec.subpixel == Subpixel.fourier and not (
        np.all(x == np.round(x)) and np.all(y == np.round(y))
    )
    margin = spec.margin + (n // 4 if fourier else 0)
    x, y = x + n / 2 + margin, y + n / 2 + margin
    size = (math.ceil(y.max() + n / 2) + margin + 1, math.ceil(x.max() + n / 2) + margin + 1)
    obj = make_object(
        size,
        kind=spec.object_kind,
        amplitude_range=tuple(spec.amplitude_range),
        phase_range=tuple(spec.phase_range),
        images=tuple(spec.images),
        correlation_length=spec.correlation_length,
        line_blur=tuple(spec.line_blur),
        line_blur_weights=None if spec.line_blur_weights is None else tuple(spec.line_blur_weights),
        seed=int(seeds[1].generate_state(1)[0]),
    )
    if fourier:
        patches = fourier_patches(obj, x, y, n)
        cut = n // 4
        obj = np.ascontiguousarray(obj[cut:-cut, cut:-cut])
        x, y = x - cut, y - cut
    else:
        patches = extract_patches(obj, x, y, n)
    if spec.probe_modes > 1:
        probe = probes.coherent_modes(probe, spec.probe_modes, spec.coherence)
    modes = probes.as_modes(probe)
    intensity = np.zeros((spec.n_positions, n, n), np.float64)
    for start in range(0, spec.n_positions, 512):
        stop = start + 512
        for mode in modes:
            intensity[start:stop] += np.abs(far_field(mode * patches[start:stop])) ** 2
    if spec.nphotons is None:
        amplitudes = np.sqrt(intensity)
    else:
        scale = spec.nphotons / intensity.sum(axis=(1, 2)).mean()
        noise_rng = np.random.default_rng(seeds[2])
        amplitudes = np.sqrt(noise_rng.poisson(scale * intensity))
    scan = Scan(
        diffraction=amplitudes.astype(np.float32),
        probe=probe,
        xcoords=x,
        ycoords=y,
        object=obj,
        nphotons=spec.nphotons,
        seed=spec.seed,
        source=(
            f"simulated: object={spec.object_kind} probe={spec.probe} scan={spec.scan} n={n} "
            f"M={spec.n_positions}"
        ),
    )
    return _with_position_errors(scan, spec.position_error)


def fourier_patches(
    obj: np.ndarray, xcoords: np.ndarray, ycoords: np.ndarray, n: int
) -> np.ndarray:
    """(M, N, N) complex64 patches of ``obj`` at patch centres (x, y), sub-pixel parts
    by an exact band-limited shift: the window of the patch and N/4 pixels around it,
    continued by its mirror image (so that its periodic copies join without a jump),
    shifted by the remainder through its spectrum, the patch kept. On a smooth object
    the error is ~1e-4 of its values (tests/unit/test_data.py); the object is read N/4
    beyond each patch (continued by reflection past its edges). Whole-pixel positions
    are cut exactly."""
    obj = np.asarray(obj, np.complex128)
    margin = n // 4
    size = n + 2 * margin
    padded = np.pad(obj, n, mode="reflect")
    corner = np.stack([ycoords, xcoords], 1) - n / 2
    whole = np.floor(corner + 0.5).astype(np.int64)
    fraction = corner - whole
    freq = np.fft.fftfreq(2 * size)
    out = np.empty((len(corner), n, n), np.complex64)
    for j, ((row, col), (fy, fx)) in enumerate(zip(whole, fraction, strict=True)):
        if fy == 0 and fx == 0:
            out[j] = padded[row + n : row + 2 * n, col + n : col + 2 * n]
            continue
        top, left = row + n - margin, col + n - margin
        window = padded[top : top + size, left : left + size]
        window = np.concatenate([window, window[::-1]], 0)
        window = np.concatenate([window, window[:, ::-1]], 1)
        ramp = np.exp(2j * np.pi * (freq[:, None] * fy + freq[None, :] * fx))
        shifted = np.fft.ifft2(np.fft.fft2(window) * ramp)
        out[j] = shifted[margin : margin + n, margin : margin + n]
    return out


def _with_position_errors(scan: Scan, rms: float) -> Scan:
    """The scan with random errors of ``rms`` pixels (both axes together) in its stored
    positions; the true positions are kept in ``metadata["true_positions"]``."""
    if not rms:
        return scan
    rng = np.random.default_rng([scan.seed or 0, 7])
    error = rng.normal(0.0, rms / math.sqrt(2.0), (scan.n_positions, 2))
    height, width = scan.object.shape
    return scan.replace(
        xcoords=np.clip(scan.xcoords + error[:, 0], 0, width - 1),
        ycoords=np.clip(scan.ycoords + error[:, 1], 0, height - 1),
        metadata={**scan.metadata, "true_positions": scan.positions},
    )

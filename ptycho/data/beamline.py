"""A simulated scan that looks like measured data, for tests and benchmarks.

What a beamline's file holds (docs/measured-data.md): a zone-plate probe (an annular
pupil with a central stop, defocused, slightly astigmatic) and an analytical guess of it
(no astigmatism, another defocus, not scaled to the counts); detector frames larger than
the pattern, with the beam off-centre and the zero frequency stored in the corner; a
beamstop and a module gap (in the file's mask), hot and dead pixels (not in it), a dark
background of a few counts (its mean in the file); Poisson counts; positions in metres
with a random origin on a jittered raster. Written as CXI.

The *ideal* version of the same scan, the same signal counts centred in N x N frames
with no mask, background or bad pixels, and positions in the truth's frame, comes back
with it: what preparing the file should recover. ``python -m ptycho.data.beamline
scan.cxi`` writes both (``scan.cxi`` and ``scan_ideal.npz``, which holds the truth).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptycho import probes
from ptycho.data.cxi import write_cxi
from ptycho.data.io import save_scan
from ptycho.data.prepare import ELECTRON_VOLT, PLANCK_TIMES_C
from ptycho.data.scan import Scan
from ptycho.data.simulate import make_object, scan_positions
from ptycho.outputs import atomic_path
from ptycho.physics import far_field
from ptycho.stitch import extract_patches

__all__ = ["BeamlineSpec", "simulate_beamline", "write_beamline", "zone_plate_probe"]


@dataclass
class BeamlineSpec:
    """The preset (defaults: a hard X-ray zone-plate microprobe scan)."""

    n: int = 128
    """Pattern size of the ideal scan: the window to cut from the frame."""
    frame: int = 256
    """Detector frame, pixels."""
    beam_offset: tuple[int, int] = (7, -11)
    """Zero frequency's offset (rows, cols) from the frame's centre, pixels."""
    corner: bool = True
    """Store frames with the zero frequency in the corner (``ifftshift``ed)."""
    side: int = 22
    """Raster of side x side positions."""
    step: float = 0.07
    """Raster step, fraction of N."""
    jitter: float = 0.5
    """Position noise, pixels."""
    nphotons: float = 3e5
    """Mean signal counts per pattern."""
    dark: float = 3.0
    """Mean dark counts per pixel."""
    beamstop: float = 3.0
    """Beamstop radius, pixels."""
    gap: tuple[int, int] = (30, 4)
    """Module gap: first row below the beam, rows."""
    hot: int = 4
    """Hot pixels (5000 counts more in every frame)."""
    dead: int = 4
    """Dead pixels (0 in every frame), in the bright field."""
    pupil: float = 0.2
    """Zone plate's outer radius in the far field, fraction of N."""
    central_stop: float = 0.45
    """Central stop radius, fraction of the outer radius."""
    defocus: float = 12.0
    """Defocus phase at the pupil's edge, rad (sets the probe's size)."""
    astigmatism: float = 1.5
    """rad at the pupil's edge (the guess has none)."""
    guess_defocus: float = 10.0
    """The analytical guess's defocus, rad."""
    energy_ev: float = 8000.0
    distance: float = 2.0
    pixel: float = 75e-6
    probe_modes: int = 1
    """Incoherent probe modes of the beam (1: fully coherent; a partially coherent beam
    as :func:`ptycho.probes.coherent_modes` makes it)."""
    coherence: float = 0.3
    """Power of each mode over the one before it (``probe_modes`` > 1)."""
    seed: int = 0


def zone_plate_probe(
    n: int, *, pupil: float, central_stop: float, defocus: float, astigmatism: float = 0.0
) -> np.ndarray:
    """The probe of a zone plate: an annular pupil (outer radius ``pupil`` N, central stop
    ``central_stop`` of it) with a defocus (and astigmatism) phase, in the sample plane;
    maximum modulus 1."""
    q = np.arange(n) - n / 2
    qy, qx = np.meshgrid(q, q, indexing="ij")
    rho = np.hypot(qx, qy) / (pupil * n)
    theta = np.arctan2(qy, qx)
    aperture = ((rho <= 1) & (rho >= central_stop)).astype(np.float64)
    phase = defocus * rho**2 + astigmatism * rho**2 * np.cos(2 * theta)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(aperture * np.exp(1j * phase))))
    return (probe / np.abs(probe).max()).astype(np.complex64)


@dataclass
class BeamlineScan:
    """The measured-like file's contents and the ideal scan of the same counts."""

    counts: np.ndarray  # (M, F, F) uint32, as the detector stores them
    translation: np.ndarray  # (M, 2) metres (sample translations)
    excluded: np.ndarray  # (F, F) bool: the file's mask (beamstop, gap)
    dark: np.ndarray  # (F, F) float32 mean dark counts
    guess: np.ndarray  # (F, F) complex: the analytical probe at the frame's sampling
    ideal: Scan
    spec: BeamlineSpec

    @property
    def energy(self) -> float:
        return self.spec.energy_ev * ELECTRON_VOLT


def simulate_beamline(spec: BeamlineSpec | None = None) -> BeamlineScan:
    """The preset's detector counts, translations, mask, dark frame and probe guess, and
    the ideal scan of the same signal counts (module docstring)."""
    spec = spec or BeamlineSpec()
    n, f = spec.n, spec.frame
    rng = np.random.default_rng(spec.seed)
    probe = zone_plate_probe(
        n,
        pupil=spec.pupil,
        central_stop=spec.central_stop,
        defocus=spec.defocus,
        astigmatism=spec.astigmatism,
    )
    x, y = scan_positions(
        spec.side**2, kind="grid", step=spec.step * n, jitter=spec.jitter, seed=spec.seed
    )
    x, y = x + n / 2, y + n / 2  # patch centres in the truth's frame (margin 0)
    size = (math.ceil(y.max() + n / 2) + 1, math.ceil(x.max() + n / 2) + 1)
    obj = make_object(size, kind="lines", seed=spec.seed)  # the project's default sample
    patches = extract_patches(obj, x, y, n)
    probe = probes.squeezed(probes.coherent_modes(probe, spec.probe_modes, spec.coherence))
    intensity = np.sum(np.abs(far_field(probes.as_modes(probe)[:, None] * patches)) ** 2, 0)
    scale = spec.nphotons / intensity.sum(axis=(1, 2)).mean()
    signal = rng.poisson(scale * intensity).astype(np.uint32)  # (M, N, N), centred

    m = len(x)
    centre = (f // 2 + spec.beam_offset[0], f // 2 + spec.beam_offset[1])
    rows = np.s_[centre[0] - n // 2 : centre[0] + n // 2]
    cols = np.s_[centre[1] - n // 2 : centre[1] + n // 2]
    rr, cc = np.meshgrid(np.arange(f), np.arange(f), indexing="ij")
    dark = (spec.dark * (1 + 0.3 * np.sin(rr / 17.0) * np.cos(cc / 23.0))).astype(np.float32)
    counts = rng.poisson(np.broadcast_to(dark, (m, f, f))).astype(np.uint32)
    counts[:, rows, cols] += signal
    beamstop = np.hypot(rr - centre[0], cc - centre[1]) <= spec.beamstop
    gap = (rr >= centre[0] + spec.gap[0]) & (rr < centre[0] + spec.gap[0] + spec.gap[1])
    counts[:, beamstop] = rng.poisson(dark[beamstop], (m, int(beamstop.sum())))
    counts[:, gap] = 0
    # Hot pixels anywhere in the window; dead ones in the bright field.
    inside = (np.abs(rr - centre[0]) < n // 2 - 2) & (np.abs(cc - centre[1]) < n // 2 - 2)
    free = np.flatnonzero(inside & ~beamstop & ~gap)
    hot = rng.choice(free, spec.hot, replace=False)
    radius = np.hypot(rr - centre[0], cc - centre[1])
    bright = np.flatnonzero(
        (radius < 0.9 * spec.pupil * n) & (radius > 1.2 * spec.central_stop * spec.pupil * n)
    )
    dead = rng.choice(np.setdiff1d(bright, hot), spec.dead, replace=False)
    flat = counts.reshape(m, -1)
    flat[:, hot] += 5000
    flat[:, dead] = 0
    excluded = beamstop | gap
    if spec.corner:
        counts = np.fft.ifftshift(counts, axes=(1, 2))
        excluded, dark = np.fft.ifftshift(excluded), np.fft.ifftshift(dark)

    wavelength = PLANCK_TIMES_C / (spec.energy_ev * ELECTRON_VOLT)
    object_pixel = wavelength * spec.distance / (n * spec.pixel)
    origin = rng.integers(50, 5000, 2)  # object pixels: an arbitrary motor origin
    translation = -np.stack([x - origin[0], y - origin[1]], axis=1) * object_pixel
    guess = zone_plate_probe(
        f, pupil=spec.pupil * n / f, central_stop=spec.central_stop, defocus=spec.guess_defocus
    )  # the frame's sampling: finer pixels, the same far field
    ideal = Scan(
        diffraction=np.sqrt(signal.astype(np.float32)),
        probe=zone_plate_probe(
            n, pupil=spec.pupil, central_stop=spec.central_stop, defocus=spec.guess_defocus
        ),
        xcoords=x,
        ycoords=y,
        object=obj,
        nphotons=spec.nphotons,
        seed=spec.seed,
        source=f"simulated beamline scan (ideal): n={n} M={m}",
        metadata={"true_probe": probe * np.sqrt(scale)},
    )
    return BeamlineScan(counts, translation, excluded, dark, guess, ideal, spec)


def write_beamline(path, spec: BeamlineSpec | None = None) -> BeamlineScan:
    """Write the preset as CXI at ``path`` and its ideal version beside it
    (``<stem>_ideal.npz``, with the truth); returns both."""
    path = Path(path)
    scan = simulate_beamline(spec)
    with atomic_path(path) as tmp:
        write_cxi(
            tmp,
            scan.counts,
            scan.translation,
            energy=scan.energy,
            distance=scan.spec.distance,
            pixel=scan.spec.pixel,
            probe=scan.guess,
            excluded=scan.excluded,
            dark=scan.dark,
        )
    save_scan(scan.ideal, path.with_name(path.stem + "_ideal.npz"))
    return scan


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the CXI file to write (and <stem>_ideal.npz)")
    parser.add_argument("--n", type=int, default=BeamlineSpec.n)
    parser.add_argument("--frame", type=int, default=BeamlineSpec.frame)
    parser.add_argument("--side", type=int, default=BeamlineSpec.side)
    parser.add_argument("--nphotons", type=float, default=BeamlineSpec.nphotons)
    parser.add_argument("--probe-modes", type=int, default=BeamlineSpec.probe_modes)
    parser.add_argument("--coherence", type=float, default=BeamlineSpec.coherence)
    parser.add_argument("--seed", type=int, default=BeamlineSpec.seed)
    args = parser.parse_args(argv)
    spec = BeamlineSpec(
        n=args.n,
        frame=args.frame,
        side=args.side,
        nphotons=args.nphotons,
        probe_modes=args.probe_modes,
        coherence=args.coherence,
        seed=args.seed,
    )
    scan = write_beamline(args.path, spec)
    print(
        f"wrote {args.path} ({scan.counts.shape[0]} frames of {spec.frame} px) and "
        f"{Path(args.path).stem}_ideal.npz"
    )


if __name__ == "__main__":
    main()

"""CXI and NeXus NXcxi_ptycho files: detector counts as a beamline writes them.

Read (every path is looked for under ``entry_1``; NeXus' ``entry`` too):

- counts: ``data_1/data``, ``instrument_1/detector_1/data`` or ``image_1/data``,
  (M, F, F), or (nx, ny, F, F) for a NeXus raster (flattened in order);
- positions: ``sample_1/geometry_1/translation``, ``data_1/translation`` or
  ``instrument_1/detector_1/translation`` (M, 2 or 3), or NeXus'
  ``sample_1/transformations/x`` and ``y``: *sample* translations, so the beam moves
  over the object the other way (:func:`ptycho.data.prepare.prepare` flips the sign);
- geometry: the photon energy (``instrument_1/source_1/energy``, CXI, in J; or NeXus'
  ``instrument_1/beam_1/energy`` with its ``units``), ``detector_1/distance`` and
  ``detector_1/x_pixel_size``; lengths in metres unless a ``units`` attribute says
  otherwise (m, mm, um, nm);
- the detector mask ``detector_1/mask`` (CXI) or ``detector_1/pixel_mask`` (NeXus),
  nonzero = excluded; a dark frame ``detector_1/data_dark`` (or ``dark``); the beam
  centre ``detector_1/beam_center_x``/``_y`` (NeXus, lengths on the detector);
- a probe ``source_1/probe`` or ``detector_1/probe``, when it is a complex (N, N) array
  (NeXus uses ``source_1/probe`` for the probe's kind, "x-ray").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptycho.data.prepare import ELECTRON_VOLT, PLANCK_TIMES_C, Frames, Geometry
from ptycho.data.stream import Source

__all__ = ["frames", "probe", "write_cxi"]
_LENGTH = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "nm": 1e-9}
_ENERGY = {"J": 1.0, "eV": ELECTRON_VOLT, "keV": 1e3 * ELECTRON_VOLT}


def _entry(handle):
    for name in ("entry_1", "entry"):
        if name in handle:
            return handle[name]
    raise ValueError("no entry_1 (CXI) or entry (NeXus) group")


def _first(group, *names):
    for name in names:
        if name in group:
            return group[name]
    return None


def _units(dataset, table: dict, default: str) -> float:
    unit = dataset.attrs.get("units", default)
    unit = unit.decode() if isinstance(unit, bytes) else str(unit)
    if unit not in table:
        raise ValueError(f"{dataset.name}: unknown units {unit!r}; expected one of {list(table)}")
    return table[unit]


def _value(dataset, table: dict, default: str) -> float:
    return float(np.asarray(dataset[()]).reshape(-1)[0]) * _units(dataset, table, default)


class _Raster:
    """(nx, ny, F, F) raster counts sliced as (M, F, F) without reading them whole."""

    def __init__(self, dataset):
        self.dataset = dataset
        nx, ny, f, g = dataset.shape
        self.shape, self.ny, self.dtype, self.ndim = (nx * ny, f, g), ny, dataset.dtype, 3

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, item):
        start, stop, _ = item.indices(self.shape[0])
        rows = [self.dataset[k // self.ny, k % self.ny] for k in range(start, stop)]
        return np.stack(rows) if rows else np.zeros((0, *self.shape[1:]), np.float32)


def _geometry(entry, path: Path) -> Geometry:
    instrument = entry["instrument_1"] if "instrument_1" in entry else entry["instrument"]
    detector = _first(instrument, "detector_1", "detector")
    beam = _first(instrument, "beam_1", "beam")
    source = _first(instrument, "source_1", "source")
    if beam is not None and "energy" in beam:
        energy = _value(beam["energy"], _ENERGY, "J")
    elif source is not None and "energy" in source:
        energy = _value(source["energy"], _ENERGY, "J")
    else:
        raise ValueError(
            "missing the photon energy (instrument_1/source_1/energy or beam_1/energy), "
            "needed to place the positions"
        )
    missing = [
        name for name in ("distance", "x_pixel_size") if detector is None or name not in detector
    ]
    if missing:
        raise ValueError(
            f"missing instrument_1/detector_1/{missing[0]}, needed to place the positions"
        )
    distance = _value(detector["distance"], _LENGTH, "m")
    pixel = _value(detector["x_pixel_size"], _LENGTH, "m")
    if min(energy, distance, pixel) <= 0:
        raise ValueError("energy, distance and pixel size must be positive")
    return Geometry(wavelength=PLANCK_TIMES_C / energy, distance=distance, pixel=pixel)


def frames(handle, path: Path) -> Frames:
    """The :class:`Frames` of an open CXI or NeXus file."""
    entry = _entry(handle)
    data = _first(
        entry,
        "data_1/data",
        "instrument_1/detector_1/data",
        "image_1/data",
        "instrument/detector/data",
    )
    if data is None:
        raise ValueError("missing entry_1/data_1/data (the diffraction counts)")
    source = Source(str(path), data.name)
    if data.ndim == 4:
        data = _Raster(data)
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise ValueError(f"the counts must be (M, F, F), got {data.shape}")
    if np.dtype(data.dtype).kind not in "fiu":
        raise ValueError(f"the counts must be real numbers, got {data.dtype}")
    m = data.shape[0]
    positions = _translations(entry, m)
    geometry = _geometry(entry, path)
    detector = _first(entry, "instrument_1/detector_1", "instrument/detector")
    excluded = _first(detector, "mask", "pixel_mask")
    dark = _first(detector, "data_dark", "dark")
    return Frames(
        frames=data,
        amplitudes=False,
        positions=positions,
        units="metres",
        sample_translation=True,
        probe=probe(handle),
        source=str(path),
        excluded=None if excluded is None else np.asarray(excluded[()]) != 0,
        dark=None if dark is None else np.asarray(dark[()], np.float32),
        geometry=geometry,
        centre=_beam_centre(detector, geometry),
        file=source,
    )


def _translations(entry, m: int) -> np.ndarray:
    found = _first(
        entry,
        "sample_1/geometry_1/translation",
        "data_1/translation",
        "instrument_1/detector_1/translation",
    )
    if found is not None:
        translation = np.asarray(found[()], np.float64) * _units(found, _LENGTH, "m")
    elif "sample_1/transformations/x" in entry:
        axes = [entry[f"sample_1/transformations/{k}"] for k in ("x", "y")]
        translation = np.stack(
            [np.asarray(a[()], np.float64).reshape(-1) * _units(a, _LENGTH, "m") for a in axes],
            axis=1,
        )
    else:
        raise ValueError("missing entry_1/sample_1/geometry_1/translation (positions in metres)")
    if translation.ndim != 2 or translation.shape[0] != m or translation.shape[1] < 2:
        raise ValueError(
            f"translation must be (M, 2 or 3) metres with M = {m}, got {translation.shape}"
        )
    return translation[:, :2]


def _beam_centre(detector, geometry: Geometry):
    if detector is None or "beam_center_x" not in detector or "beam_center_y" not in detector:
        return None
    col = _value(detector["beam_center_x"], _LENGTH, "m") / geometry.pixel
    row = _value(detector["beam_center_y"], _LENGTH, "m") / geometry.pixel
    return (row, col)


def probe(handle) -> np.ndarray | None:
    """The complex (N, N) probe a CXI/NeXus file stores, or None."""
    entry = _entry(handle)
    for name in (
        "instrument_1/source_1/probe",
        "instrument_1/detector_1/probe",
        "instrument_1/probe",
    ):
        if name in entry and entry[name].ndim in (2, 3):
            array = entry[name][()]
            if np.iscomplexobj(array):
                return array
    return None


def write_cxi(
    path,
    counts: np.ndarray,
    translation: np.ndarray,
    *,
    energy: float,
    distance: float,
    pixel: float,
    probe: np.ndarray | None = None,
    excluded: np.ndarray | None = None,
    dark: np.ndarray | None = None,
) -> None:
    """Write a CXI file: ``counts`` (M, F, F), ``translation`` (M, 2) sample translations
    in metres, ``energy`` in J, ``distance`` and detector ``pixel`` in metres; an
    optional probe, mask (True = excluded) and dark frame. Chunked per frame."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle["cxi_version"] = 160
        entry = handle.create_group("entry_1")
        detector = entry.create_group("instrument_1/detector_1")
        data = detector.create_dataset(
            "data", data=counts, chunks=(1, *counts.shape[1:]), compression="gzip"
        )
        detector["distance"] = distance
        detector["x_pixel_size"] = pixel
        detector["y_pixel_size"] = pixel
        if excluded is not None:
            detector["mask"] = excluded.astype(np.uint32)
        if dark is not None:
            detector["data_dark"] = np.asarray(dark, np.float32)
        entry["instrument_1/source_1/energy"] = energy
        if probe is not None:
            entry["instrument_1/source_1/probe"] = np.asarray(probe, np.complex64)
        position = np.zeros((len(translation), 3))
        position[:, :2] = translation
        geometry = entry.create_group("sample_1/geometry_1")
        geometry["translation"] = position
        entry.create_group("data_1")
        entry["data_1/data"] = data
        entry["data_1/translation"] = geometry["translation"]

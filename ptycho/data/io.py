"""Reading and writing scans: PtychoPINN NPZ, the project's HDF5, CXI (read only).

Formats (docs/design.md, section 4; docs/data.md):

``.npz``
    PtychoPINN-compatible keys. ``diff3d`` (M, N, N) float32 amplitudes (``diffraction``
    accepted as an alias), ``probeGuess`` (N, N) complex, ``xcoords``/``ycoords`` (M,)
    patch centres in object pixels; optional ``objectGuess`` (H, W) complex and
    ``scan_index`` (M,) int. Written with ``xcoords_start``/``ycoords_start`` too, the
    full key set of PtychoPINN's ``RawData.from_file``. Always read with
    ``allow_pickle=False``.
``.h5`` / ``.hdf5``
    The same names as datasets, plus attributes: ``units`` on each dataset, and on the
    root ``format``, ``nphotons``, ``seed``, ``source``, ``ptycho_version``.
``.cxi``
    The Coherent X-ray Imaging convention: intensities ``entry_1/data_1/data``
    (converted to amplitudes), positions ``entry_1/sample_1/geometry_1/translation``
    (or ``entry_1/data_1/translation``) in metres, converted to object pixels with the
    pixel size ``lambda z / (N p)`` from ``source_1/energy`` (J),
    ``detector_1/distance`` (m) and ``detector_1/x_pixel_size`` (m), probe from
    ``entry_1/instrument_1/source_1/probe`` (or ``detector_1/probe``, or a
    ``probe=`` array).

Loading holds one copy of the diffraction data: files are read straight into the
final float32 array, chunk by chunk where a conversion is needed. Writing goes to a
temporary file in the same folder that is renamed over the target only when complete.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from ptycho import __version__
from ptycho.data.scan import Scan
from ptycho.outputs import atomic_path

__all__ = ["SUFFIXES", "ScanFileError", "load_scan", "save_scan"]

SUFFIXES = (".npz", ".h5", ".hdf5", ".cxi")
_CHUNK = 1024  # patterns converted per step

PLANCK_TIMES_C = 6.62607015e-34 * 299792458.0  # J m


class ScanFileError(ValueError):
    """A scan file that cannot be read: missing, corrupt, or not a scan."""


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ScanFileError(
            f"{path}: unknown scan format {suffix or '(no suffix)'!r}; expected one of "
            f"{', '.join(SUFFIXES)}"
        )
    return suffix


def load_scan(path: str | os.PathLike, *, probe: np.ndarray | None = None) -> Scan:
    """Load a scan; the format follows the suffix (.npz, .h5/.hdf5, .cxi).

    Parameters
    ----------
    path : path-like
    probe : (N, N) complex array, optional
        Probe to use when the file has none (CXI), or to override the file's.

    Raises
    ------
    ScanFileError
        The file is missing, unreadable, corrupt, lacks a required key, or its
        contents fail the Scan's checks; the message starts with the path.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise ScanFileError(f"{path}: no such file")
    try:
        if suffix == ".npz":
            scan = _load_npz(path, probe)
        elif suffix == ".cxi":
            scan = _load_cxi(path, probe)
        else:
            scan = _load_h5(path, probe)
    except ScanFileError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        message = str(error).strip("'\"")
        raise ScanFileError(f"{path}: {message}") from error
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ScanFileError(f"{path}: cannot read the file ({error})") from error
    return scan


def save_scan(scan: Scan, path: str | os.PathLike) -> Path:
    """Write a scan; the format follows the suffix (.npz or .h5/.hdf5).

    The file is written to a temporary name beside ``path`` and renamed over it once
    complete, so an interrupted write never leaves a partial or clobbered file.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".cxi":
        raise ScanFileError(f"{path}: writing CXI is not supported; use .h5 or .npz")
    writer = _write_npz if suffix == ".npz" else _write_h5
    with atomic_path(path) as tmp:
        writer(scan, tmp)
    return path


# --------------------------------------------------------------------------------------
# NPZ
# --------------------------------------------------------------------------------------

_NPZ_REQUIRED = {
    "probeGuess": "the probe, complex (N, N)",
    "xcoords": "patch centre columns in object pixels, (M,)",
    "ycoords": "patch centre rows in object pixels, (M,)",
}


def _check_keys(path: Path, names: set, probe, what: str) -> str:
    """Check the required keys are present; return the diffraction key's name."""
    diff_key = next((k for k in ("diff3d", "diffraction") if k in names), None)
    if diff_key is None:
        raise ScanFileError(
            f"{path}: missing {what} 'diff3d' (or 'diffraction'): the diffraction "
            "amplitudes, (M, N, N)"
        )
    for key, meaning in _NPZ_REQUIRED.items():
        if key not in names and not (key == "probeGuess" and probe is not None):
            raise ScanFileError(f"{path}: missing {what} {key!r}: {meaning}")
    return diff_key


def _load_npz(path: Path, probe: np.ndarray | None) -> Scan:
    with np.load(path, allow_pickle=False) as archive:
        keys = set(archive.files)
        diff_key = _check_keys(path, keys, probe, "key")

        def read(key):
            try:
                return archive[key]
            except ValueError as error:  # object arrays need pickle: refused
                if "allow_pickle" in str(error):
                    raise ScanFileError(
                        f"{path}: key {key!r} holds Python objects (pickle); refusing to load "
                        "it. Store plain numeric arrays."
                    ) from None
                raise

        diffraction = read(diff_key)
        return Scan(
            diffraction=diffraction,
            probe=read("probeGuess") if probe is None else probe,
            xcoords=read("xcoords"),
            ycoords=read("ycoords"),
            object=read("objectGuess") if "objectGuess" in keys else None,
            scan_index=read("scan_index") if "scan_index" in keys else None,
            nphotons=float(read("nphotons")) if "nphotons" in keys else None,
            source=str(path),
        )


def _write_npz(scan: Scan, tmp: Path) -> None:
    arrays = {
        "diff3d": scan.diffraction,
        "probeGuess": scan.probe,
        "xcoords": scan.xcoords,
        "ycoords": scan.ycoords,
        "xcoords_start": scan.xcoords,
        "ycoords_start": scan.ycoords,
        "scan_index": scan.scan_index,
    }
    if scan.object is not None:
        arrays["objectGuess"] = scan.object
    if scan.nphotons is not None:
        arrays["nphotons"] = np.float64(scan.nphotons)
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


# --------------------------------------------------------------------------------------
# HDF5
# --------------------------------------------------------------------------------------

_H5_UNITS = {
    "diff3d": "sqrt(counts)",
    "probeGuess": "arbitrary",
    "xcoords": "object pixels (patch centre column)",
    "ycoords": "object pixels (patch centre row)",
    "objectGuess": "transmission (complex)",
    "scan_index": "index",
}
_H5_FORMAT = "ptychopinn-xla scan"


def _read_float32(dataset) -> np.ndarray:
    """Read an HDF5 dataset into one float32 array (h5py converts while reading)."""
    out = np.empty(dataset.shape, np.float32)
    if dataset.size:
        dataset.read_direct(out)
    return out


def _load_h5(path: Path, probe: np.ndarray | None) -> Scan:
    import h5py

    with h5py.File(path, "r") as handle:
        names = set(handle.keys())
        diff_key = _check_keys(path, names, probe, "dataset")
        if np.dtype(handle[diff_key].dtype).kind not in "fiu":
            raise ScanFileError(
                f"{path}: dataset {diff_key!r} must hold real numbers, got {handle[diff_key].dtype}"
            )
        attrs = handle.attrs
        nphotons = attrs.get("nphotons")
        seed = attrs.get("seed")
        return Scan(
            diffraction=_read_float32(handle[diff_key]),
            probe=handle["probeGuess"][()] if probe is None else probe,
            xcoords=handle["xcoords"][()],
            ycoords=handle["ycoords"][()],
            object=handle["objectGuess"][()] if "objectGuess" in names else None,
            scan_index=handle["scan_index"][()] if "scan_index" in names else None,
            nphotons=None if nphotons is None or np.isnan(nphotons) else float(nphotons),
            seed=None if seed is None or seed < 0 else int(seed),
            source=str(attrs.get("source", path)),
        )


def _write_h5(scan: Scan, tmp: Path) -> None:
    import h5py

    with h5py.File(tmp, "w") as handle:
        handle.attrs["format"] = _H5_FORMAT
        handle.attrs["ptycho_version"] = __version__
        handle.attrs["nphotons"] = np.nan if scan.nphotons is None else scan.nphotons
        handle.attrs["seed"] = -1 if scan.seed is None else scan.seed
        handle.attrs["source"] = scan.source
        datasets = {
            "diff3d": scan.diffraction,
            "probeGuess": scan.probe,
            "xcoords": scan.xcoords,
            "ycoords": scan.ycoords,
            "scan_index": scan.scan_index,
        }
        if scan.object is not None:
            datasets["objectGuess"] = scan.object
        for name, data in datasets.items():
            chunks = (min(len(data), 64), *data.shape[1:]) if name == "diff3d" else None
            dataset = handle.create_dataset(name, data=data, chunks=chunks)
            dataset.attrs["units"] = _H5_UNITS[name]


# --------------------------------------------------------------------------------------
# CXI (read only)
# --------------------------------------------------------------------------------------


def _first(handle, *names):
    for name in names:
        if name in handle:
            return handle[name]
    return None


def _scalar(handle, name: str, path: Path, meaning: str) -> float:
    if name not in handle:
        raise ScanFileError(f"{path}: missing {name} ({meaning}), needed to place the positions")
    return float(np.asarray(handle[name][()]).reshape(-1)[0])


def _load_cxi(path: Path, probe: np.ndarray | None) -> Scan:
    import h5py

    with h5py.File(path, "r") as handle:
        data = _first(handle, "entry_1/data_1/data", "entry_1/image_1/data")
        if data is None:
            raise ScanFileError(
                f"{path}: missing entry_1/data_1/data (the diffraction intensities)"
            )
        if data.ndim != 3 or data.shape[1] != data.shape[2]:
            raise ScanFileError(
                f"{path}: entry_1/data_1/data must be (M, N, N) intensities, got {data.shape}"
            )
        m, n = data.shape[0], data.shape[1]
        amplitudes = np.empty((m, n, n), np.float32)
        for start in range(0, m, _CHUNK):  # intensities -> amplitudes in place, by chunk
            chunk = amplitudes[start : start + _CHUNK]
            data.read_direct(chunk, np.s_[start : start + _CHUNK])
            np.sqrt(np.maximum(chunk, 0.0, out=chunk), out=chunk)

        translation = _first(
            handle, "entry_1/sample_1/geometry_1/translation", "entry_1/data_1/translation"
        )
        if translation is None:
            raise ScanFileError(
                f"{path}: missing entry_1/sample_1/geometry_1/translation (positions in metres)"
            )
        translation = np.asarray(translation[()], np.float64)
        if translation.ndim != 2 or translation.shape[0] != m or translation.shape[1] < 2:
            raise ScanFileError(
                f"{path}: translation must be (M, 2 or 3) metres with M = {m}, got "
                f"{translation.shape}"
            )
        energy = _scalar(handle, "entry_1/instrument_1/source_1/energy", path, "photon energy, J")
        distance = _scalar(
            handle, "entry_1/instrument_1/detector_1/distance", path, "detector distance, m"
        )
        pixel = _scalar(
            handle, "entry_1/instrument_1/detector_1/x_pixel_size", path, "detector pixel, m"
        )
        if min(energy, distance, pixel) <= 0:
            raise ScanFileError(f"{path}: energy, distance and pixel size must be positive")
        wavelength = PLANCK_TIMES_C / energy
        object_pixel = wavelength * distance / (n * pixel)  # metres per object pixel
        # CXI stores the sample translation; the beam moves over the object the other way.
        x = -translation[:, 0] / object_pixel
        y = -translation[:, 1] / object_pixel
        x = x - x.min() + n / 2
        y = y - y.min() + n / 2

        if probe is None:
            stored = _first(
                handle,
                "entry_1/instrument_1/source_1/probe",
                "entry_1/instrument_1/detector_1/probe",
            )
            if stored is None:
                raise ScanFileError(
                    f"{path}: no probe in entry_1/instrument_1/source_1/probe; pass probe= "
                    "(data.probe_path in the app)"
                )
            probe = stored[()]
    return Scan(
        diffraction=amplitudes,
        probe=probe,
        xcoords=x,
        ycoords=y,
        source=str(path),
        metadata={"object_pixel_size_m": object_pixel},
    )

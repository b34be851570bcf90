"""Reading and writing scans: PtychoPINN NPZ, the project's HDF5, CXI and NeXus
NXcxi_ptycho (read), ptychodus products (probes; :mod:`ptycho.data.ptychodus`).

Formats (docs/design.md, section 4; docs/data.md, docs/measured-data.md):

``.npz``
    PtychoPINN-compatible keys. ``diff3d`` (M, N, N) float32 amplitudes (``diffraction``
    accepted as an alias), ``probeGuess`` (N, N) complex, ``xcoords``/``ycoords`` (M,)
    patch centres in object pixels; optional ``objectGuess`` (H, W) complex and
    ``scan_index`` (M,) int. Written with ``xcoords_start``/``ycoords_start`` too, the
    full key set of PtychoPINN's ``RawData.from_file``. Always read with
    ``allow_pickle=False``.
``.h5`` / ``.hdf5``
    The same names as datasets, plus attributes: ``units`` on each dataset, and on the
    root ``format``, ``nphotons``, ``seed``, ``source``, ``ptycho_version``. An HDF5 file
    with an ``entry_1`` group is read as CXI.
``.cxi`` / ``.nxs``
    CXI and NeXus NXcxi_ptycho (:mod:`ptycho.data.cxi`): counts, positions in metres,
    geometry, mask, dark frame, beam centre.

Every file goes through :func:`ptycho.data.prepare.prepare` (detector frames to
patterns). HDF5 files are read chunk by chunk, and large ones streamed: their patterns
stay in the file and are read when used (``data.stream``, :mod:`ptycho.data.stream`).
NPZ files are zip archives and are read whole; ``python -m ptycho.data.convert scan.npz
scan.h5`` converts one. Writing goes to a temporary file in the
same folder that is renamed over the target only when complete.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path

import numpy as np

from ptycho import __version__
from ptycho.data import cxi, ptychodus
from ptycho.data.prepare import Frames, PrepareOptions, prepare
from ptycho.data.scan import Scan, coordinates
from ptycho.data.stream import Source
from ptycho.errors import DataError
from ptycho.outputs import atomic_path

__all__ = ["SUFFIXES", "ScanFileError", "load_probe", "load_scan", "save_scan"]

SUFFIXES = (".npz", ".h5", ".hdf5", ".cxi", ".nxs")


class ScanFileError(DataError):
    """A scan file that cannot be read: missing, corrupt, or not a scan."""


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ScanFileError(
            f"{path}: unknown scan format {suffix or '(no suffix)'!r}; expected one of "
            f"{', '.join(SUFFIXES)}"
        )
    return suffix


def load_scan(
    path: str | os.PathLike,
    *,
    probe: np.ndarray | None = None,
    options: PrepareOptions | None = None,
    n: int | None = None,
    name: str | None = None,
) -> Scan:
    """Load a scan; the format follows the suffix (.npz, .h5/.hdf5, .cxi, .nxs) and the
    frames go through :func:`ptycho.data.prepare.prepare` (``options``; defaults: every
    step ``auto``).

    Parameters
    ----------
    path : path-like
    probe : complex array, optional
        Replaces the file's probe (or supplies a missing one).
    options : PrepareOptions, optional
    n : int, optional
        Pattern size the model needs.
    name : str, optional
        How messages name the file (default: its path).

    Raises
    ------
    ScanFileError
        The file is missing, unreadable, corrupt, lacks a required key, or its
        contents fail the checks; the message starts with ``name`` (or the path).
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise ScanFileError(f"{path}: no such file")
    label = name or str(path)
    try:
        with _open_frames(path, suffix) as frames:
            return prepare(frames, options, n=n, probe=probe, name=label)
    except ScanFileError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        message = str(error).strip("'\"")
        prefix = "" if message.startswith(label) else f"{label}: "
        raise ScanFileError(f"{prefix}{message}") from error
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ScanFileError(f"{label}: cannot read the file ({error})") from error


@contextlib.contextmanager
def _open_frames(path: Path, suffix: str):
    """The file's :class:`Frames` (HDF5 files stay open while they are read)."""
    if suffix == ".npz":
        yield _frames_npz(path)
        return
    import h5py

    with h5py.File(path, "r") as handle:
        if suffix in (".cxi", ".nxs") or "entry_1" in handle or "entry" in handle:
            yield cxi.frames(handle, path)
        elif ptychodus.is_product(handle):
            raise ScanFileError(
                f"{path}: a ptychodus product holds a probe, an object and positions but no "
                "diffraction patterns; use it as data.probe_path"
            )
        else:
            yield _frames_h5(handle, path)


def load_probe(path: str | os.PathLike) -> np.ndarray:
    """The probe of a file: a run's ``reconstruction.npz`` (``probe``), a scan file
    (``probeGuess``, CXI/NeXus), a ptychodus product (``probe``) or a ``.npy`` array.
    (N, N) complex64, or (K, N, N) for K modes."""
    path = Path(path)
    if not path.is_file():
        raise ScanFileError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".npy":
            probe = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                key = next((k for k in ("probe", "probeGuess") if k in archive.files), None)
                if key is None:
                    raise ScanFileError(
                        f"{path}: no 'probe' (a run's reconstruction.npz) or 'probeGuess' "
                        "(a scan file)"
                    )
                probe = archive[key]
        else:
            import h5py

            with h5py.File(path, "r") as handle:
                if ptychodus.is_product(handle):
                    probe = ptychodus.read_product(path).probe
                elif "probeGuess" in handle:
                    probe = handle["probeGuess"][()]
                else:
                    probe = cxi.probe(handle)
                    if probe is None:
                        raise ScanFileError(f"{path}: holds no probe")
    except ScanFileError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise ScanFileError(f"{path}: cannot read a probe ({error})") from error
    probe = np.asarray(probe)
    if probe.ndim == 4:  # ptychodus: (OPR modes, modes, N, N): the first OPR mode
        probe = probe[0]
    if probe.ndim == 3 and len(probe) == 1:  # one mode
        probe = probe[0]
    if probe.ndim not in (2, 3) or probe.shape[-1] != probe.shape[-2]:
        raise ScanFileError(f"{path}: a probe is (N, N) or (K, N, N), got {probe.shape}")
    if not np.isfinite(probe).all():
        raise ScanFileError(f"{path}: the probe holds NaN or Inf")
    return probe.astype(np.complex64)


def save_scan(scan: Scan, path: str | os.PathLike) -> Path:
    """Write a scan; the format follows the suffix (.npz or .h5/.hdf5).

    The file is written to a temporary name beside ``path`` and renamed over it once
    complete, so an interrupted write never leaves a partial or clobbered file.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix in (".cxi", ".nxs"):
        raise ScanFileError(f"{path}: writing {suffix} is not supported; use .h5 or .npz")
    writer = _write_npz if suffix == ".npz" else _write_h5
    with atomic_path(path) as tmp:
        writer(scan, tmp)
    return path


# --------------------------------------------------------------------------------------
# NPZ
# --------------------------------------------------------------------------------------

_NPZ_REQUIRED = {
    "xcoords": "patch centre columns in object pixels, (M,)",
    "ycoords": "patch centre rows in object pixels, (M,)",
}


def _check_keys(path: Path, names: set, what: str) -> str:
    """Check the required keys are present; return the diffraction key's name."""
    diff_key = next((k for k in ("diff3d", "diffraction") if k in names), None)
    if diff_key is None:
        raise ScanFileError(
            f"{path}: missing {what} 'diff3d' (or 'diffraction'): the diffraction "
            "amplitudes, (M, N, N)"
        )
    for key, meaning in _NPZ_REQUIRED.items():
        if key not in names:
            raise ScanFileError(f"{path}: missing {what} {key!r}: {meaning}")
    return diff_key


def _frames_npz(path: Path) -> Frames:
    with np.load(path, allow_pickle=False) as archive:
        keys = set(archive.files)
        diff_key = _check_keys(path, keys, "key")

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

        diffraction = _real_frames(read(diff_key), path, diff_key)
        return Frames(
            frames=diffraction,
            amplitudes=True,
            positions=_positions(read("xcoords"), read("ycoords"), len(diffraction), path),
            probe=read("probeGuess") if "probeGuess" in keys else None,
            object=read("objectGuess") if "objectGuess" in keys else None,
            scan_index=read("scan_index") if "scan_index" in keys else None,
            nphotons=float(read("nphotons")) if "nphotons" in keys else None,
            source=str(path),
        )


def _real_frames(frames, path: Path, key: str):
    """Check that ``frames`` are (M, F, F) real numbers (an array or an HDF5 dataset)."""
    if np.dtype(frames.dtype).kind not in "fiu":
        raise ScanFileError(f"{path}: {key!r}: expected real numbers, got {frames.dtype}")
    if frames.ndim != 3 or frames.shape[1] != frames.shape[2]:
        raise ScanFileError(f"{path}: {key!r} must be (M, N, N) patterns, got {frames.shape}")
    if isinstance(frames, np.ndarray):
        return frames.astype(np.float32, copy=False)
    return frames


def _positions(x, y, m: int, path: Path) -> np.ndarray:
    """(M, 2) [x, y] of a file's ``xcoords``, ``ycoords`` (checked as a Scan's)."""
    return np.stack([coordinates(x, m, "xcoords"), coordinates(y, m, "ycoords")], axis=1)


def _write_npz(scan: Scan, tmp: Path) -> None:
    arrays = {
        "diff3d": np.asarray(scan.diffraction),  # NPZ is written (and read) whole
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


def _frames_h5(handle, path: Path) -> Frames:
    names = set(handle.keys())
    diff_key = _check_keys(path, names, "dataset")
    attrs = handle.attrs
    nphotons = attrs.get("nphotons")
    seed = attrs.get("seed")
    frames = _real_frames(handle[diff_key], path, diff_key)
    return Frames(
        frames=frames,
        amplitudes=True,
        positions=_positions(handle["xcoords"][()], handle["ycoords"][()], len(frames), path),
        probe=handle["probeGuess"][()] if "probeGuess" in names else None,
        object=handle["objectGuess"][()] if "objectGuess" in names else None,
        scan_index=handle["scan_index"][()] if "scan_index" in names else None,
        nphotons=None if nphotons is None or np.isnan(nphotons) else float(nphotons),
        seed=None if seed is None or seed < 0 else int(seed),
        source=str(attrs.get("source", path)),
        file=Source(str(path), frames.name),
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
            if name == "diff3d":  # in blocks: a streamed scan is never read whole
                chunks = (min(len(data), 64), *data.shape[1:])
                dataset = handle.create_dataset(name, data.shape, np.float32, chunks=chunks)
                for start in range(0, len(data), 4096):
                    dataset[start : start + 4096] = data[start : start + 4096]
            else:
                dataset = handle.create_dataset(name, data=data)
            dataset.attrs["units"] = _H5_UNITS[name]

"""Peak memory of loading a large scan, per file format.

    python benchmarks/load_memory.py --json                 # 10,000 patterns, N = 128
    python benchmarks/load_memory.py --patterns 2000 --n 64

Writes one synthetic scan in each format to a temporary folder, then loads each file
in a fresh process and reports that process's peak resident memory (VmHWM) above its
resident memory just before the load (TensorFlow and the package already imported).
``copies`` is that increase divided by the size of the float32 amplitudes: 1.0 means
the loader held the data once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import os, sys, json
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import ptycho.data  # noqa: imports TensorFlow too, so it is in the baseline

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0
before = status("VmRSS")
scan = ptycho.data.load_scan(sys.argv[1])
print(json.dumps({"before_mb": before, "peak_mb": status("VmHWM"), "m": scan.n_positions}))
"""


def write_files(folder: Path, m: int, n: int) -> dict[str, Path]:
    import h5py

    from ptycho.data import Scan, save_scan

    rng = np.random.default_rng(0)
    amplitudes = np.sqrt(rng.poisson(4.0, (m, n, n)).astype(np.float32))
    side = int(np.ceil(np.sqrt(m)))
    scan = Scan(
        diffraction=amplitudes,
        probe=np.ones((n, n), np.complex64),
        xcoords=n / 2 + 4.0 * (np.arange(m) % side),
        ycoords=n / 2 + 4.0 * (np.arange(m) // side),
    )
    paths = {"npz": save_scan(scan, folder / "scan.npz"), "h5": save_scan(scan, folder / "scan.h5")}
    cxi = folder / "scan.cxi"
    with h5py.File(cxi, "w") as f:
        data = f.create_dataset("entry_1/data_1/data", (m, n, n), np.float32, chunks=(64, n, n))
        for start in range(0, m, 1024):
            data[start : start + 1024] = amplitudes[start : start + 1024] ** 2
        translation = np.zeros((m, 3))
        translation[:, 0], translation[:, 1] = -scan.xcoords * 1e-8, -scan.ycoords * 1e-8
        f["entry_1/sample_1/geometry_1/translation"] = translation
        f["entry_1/instrument_1/source_1/energy"] = 1.28e-15
        f["entry_1/instrument_1/source_1/probe"] = scan.probe
        f["entry_1/instrument_1/detector_1/distance"] = 1.0
        f["entry_1/instrument_1/detector_1/x_pixel_size"] = 1e-4
    paths["cxi"] = cxi
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--patterns", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=128)
    args = parser.parse_args(argv)
    data_mb = args.patterns * args.n * args.n * 4 / 2**20
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(Path(folder), args.patterns, args.n)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for fmt, path in paths.items():
            result = subprocess.run(
                [sys.executable, "-c", CHILD, str(path)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            child = json.loads(result.stdout.strip().splitlines()[-1])
            extra = child["peak_mb"] - child["before_mb"]
            record = {
                "format": fmt,
                "patterns": args.patterns,
                "n": args.n,
                "file_mb": round(path.stat().st_size / 2**20, 1),
                "data_mb": round(data_mb, 1),
                "load_peak_mb": round(extra, 1),
                "copies": round(extra / data_mb, 2),
            }
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                print(
                    f"{fmt:>4}: {args.patterns} x {args.n}^2 float32 = {data_mb:,.0f} MB; "
                    f"load peak +{extra:,.0f} MB ({extra / data_mb:.2f} copies)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

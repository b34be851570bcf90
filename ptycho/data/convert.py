"""Convert a scan file to the project's HDF5, which large scans stream from:

    python -m ptycho.data.convert scan.npz scan.h5

The scan is prepared as ``train.py`` would (:func:`ptycho.data.load_scan`, the
``data`` section's defaults) and written block by block; the target is replaced only
once it is complete.
"""

from __future__ import annotations

import argparse
import sys

from ptycho.data.io import ScanFileError, load_scan, save_scan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ptycho.data.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("source", help="scan file (.npz, .h5, .cxi, .nxs)")
    parser.add_argument("target", help="HDF5 file to write (.h5)")
    args = parser.parse_args(argv)
    try:
        scan = load_scan(args.source)
        save_scan(scan, args.target)
    except ScanFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.target}: {scan.n_positions} patterns of {scan.n} x {scan.n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

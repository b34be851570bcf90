"""The default run as a user starts it (``python train.py``), measured.

    python benchmarks/default_run.py --json                        # this checkout, as shipped
    python benchmarks/default_run.py --json --set compile=jit      # with overrides
    python benchmarks/default_run.py --json --code ../old --label before   # another checkout

Each run is ``python train.py [--set overrides]`` in a fresh process from the checkout
``--code`` (default: this one; its ``ptycho`` package is the one imported), into a
temporary run folder (``--keep DIR`` keeps it). One JSON record per run: the checkout's
commit, the overrides, the process's wall time and ``metrics.json``'s training and
reconstruction figures. Runs of several ``--code`` / ``--set`` combinations go one after
another, so their minutes are comparable (``train.max_minutes`` stops the default run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = (
    "epochs",
    "steps",
    "samples_per_s",
    "precision",
    "compile_stages",
    "r_factor",
    "amp_ssim",
    "phase_ssim",
    "amp_psnr",
    "phase_psnr",
    "phase_rmse",
)


def commit(code: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def run(code: Path, overrides: list[str], run_dir: Path, label: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(code / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{label}: train.py failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = {
        "label": label,
        "commit": commit(code),
        "set": " ".join(overrides),
        "wall_s": round(wall, 1),
    }
    for key in FIELDS:
        value = metrics.get(key)
        record[key] = round(value, 4) if isinstance(value, float) else value
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, nargs="+", default=[ROOT], help="checkouts")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--label", nargs="+", help="one per --code (default: the commit)")
    parser.add_argument("--keep", type=Path, help="keep the run folders here")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    labels = args.label or [commit(code) for code in args.code]
    for code, label in zip(args.code, labels, strict=True):
        with tempfile.TemporaryDirectory() as scratch:
            folder = (args.keep or Path(scratch)) / label
            record = run(code.resolve(), list(args.set), folder, label)
        print(json.dumps(record) if args.json else record, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

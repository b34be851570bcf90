"""Quality parity of the warp backends: the default model trained with each, four seeds.

    python benchmarks/quality_parity.py --json          # 30 epochs, seeds 0 to 3
    python benchmarks/quality_parity.py --epochs 5 --seeds 0 --keep runs/parity

Each cell is a real ``python train.py`` run (the default configuration) in a fresh
process with ``translate=<t> compile=<c> train.seed=<s> data.seed=<s>
train.epochs=<epochs> train.max_minutes=null train.eval_every=0``; the test object is
the same for every cell (``data.test_seed`` is not changed). The cells run one after
another so that their timings are comparable. Reported per cell: the final metrics of
``metrics.json`` on the test scan, the fit time and the median samples/s. The backends
should differ by no more than the seed-to-seed spread. Run folders are temporary unless
``--keep DIR`` names where to leave them (``DIR/<translate>_<compile>_<seed>``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = (("xla", "jit"), ("xla", "graph"), ("legacy", "graph"))
FIELDS = (
    "amp_psnr",
    "amp_ssim",
    "amp_frc50",
    "phase_psnr",
    "phase_ssim",
    "phase_frc50",
    "r_factor",
    "fit_seconds",
    "samples_per_s",
)


def run_train(overrides: list[str], what: str) -> None:
    """``python train.py *overrides`` in a fresh process from the repository root; a
    failure raises with ``what`` and the end of its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed: {done.stderr[-2000:]}")


def run_cell(translate: str, mode: str, seed: int, epochs: int, run_dir: Path) -> dict:
    overrides = [
        f"translate={translate}",
        f"compile={mode}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        f"train.epochs={epochs}",
        "train.max_minutes=null",
        "train.eval_every=0",
        f"hydra.run.dir={run_dir}",
    ]
    run_train(overrides, f"{translate}+{mode} seed {seed}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {key: round(float(metrics[key]), 4) for key in FIELDS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--keep", type=Path, help="leave the run folders here")
    args = parser.parse_args(argv)

    if not args.json:
        print("| translate+compile | seed | " + " | ".join(FIELDS) + " |")
        print("|" + "---|" * (len(FIELDS) + 2))
    with tempfile.TemporaryDirectory() as folder:
        for translate, mode in CONFIGS:
            for seed in args.seeds:
                base = args.keep.resolve() if args.keep else Path(folder)
                run_dir = base / f"{translate}_{mode}_{seed}"
                values = run_cell(translate, mode, seed, args.epochs, run_dir)
                record = {
                    "translate": translate,
                    "compile": mode,
                    "seed": seed,
                    "epochs": args.epochs,
                    **values,
                }
                if args.json:
                    print(json.dumps(record), flush=True)
                else:
                    cells = " | ".join(str(values[key]) for key in FIELDS)
                    print(f"| {translate}+{mode} | {seed} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

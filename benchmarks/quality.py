"""Reconstruction quality of the network against training time, per data preset and seed.

    python benchmarks/quality.py --json                          # the full grid
    python benchmarks/quality.py --data default --minutes 1 3 --seeds 0
    python benchmarks/quality.py --data default --set compile=graph   # other settings
    python benchmarks/quality.py --plot quality.png < results.jsonl   # curves from a file

Each (data, seed) cell is one real ``python train.py data=<preset> train.seed=<s>
data.seed=<s> train.max_minutes=<last mark> train.eval_minutes=[marks]`` in a fresh
process, otherwise with the shipped defaults; the test object is the same for every seed
(``data.test_seed`` is not changed). The test scan is scored after the epoch that crosses
each mark (wall minutes since training began, evaluations included) and once more at the
end, the figure a user gets in ``metrics.json``. ``default`` is the configuration as
shipped; ``--set`` adds overrides to every cell (recorded in the ``set`` field). Cells
run one after another, so their minutes are comparable.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from quality_parity import run_train  # the same train.py run, in benchmarks/

PRESETS = ("default", "lines_ptychopinn", "image_spiral", "lines_sharp")
FIELDS = ("amp_ssim", "phase_ssim", "amp_psnr", "phase_psnr", "phase_rmse", "r_factor")


def run_cell(
    data: str, seed: int, minutes: list[float], run_dir: Path, extra: list[str]
) -> list[dict]:
    """Train one cell; one record per mark (the last from the final reconstruction)."""
    marks = sorted(minutes)
    overrides = [
        *extra,
        f"train.seed={seed}",
        f"data.seed={seed}",
        f"train.max_minutes={marks[-1]}",
        f"train.eval_minutes=[{','.join(str(m) for m in marks[:-1])}]",
        "train.eval_every=0",
        f"hydra.run.dir={run_dir}",
    ]
    if data != "default":
        overrides.insert(0, f"data={data}")
    run_train(overrides, f"data={data} seed {seed}")
    history = json.loads((run_dir / "checkpoints" / "state.json").read_text())["history"]
    final = json.loads((run_dir / "metrics.json").read_text())
    evaluated = [h for h in history if "r_factor" in h]  # the marks, in order
    final["epoch"], final["minutes"] = final["epochs"], history[-1]["minutes"]
    cells = [*zip(marks[:-1], evaluated, strict=False), (marks[-1], final)]
    return [
        {
            "data": data,
            "set": " ".join(extra),
            "minutes": mark,
            "seed": seed,
            "wall_minutes": round(values["minutes"], 2),
            "epochs": values["epoch"],
            "steps": values["steps"],
            **{key: round(float(values[key]), 4) for key in FIELDS if key in values},
            "samples_per_s": round(float(values["samples_per_s"]), 1),
            "precision": final["precision"],
        }
        for mark, values in cells
    ]


def plot(records: list[dict], path: Path) -> None:
    """Amplitude SSIM (top) and phase SSIM (bottom, where the preset has phase structure)
    against minutes, one line per seed (and ``--set``), one column per preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = [p for p in PRESETS if any(r["data"] == p for r in records)]
    figure, axes = plt.subplots(2, len(presets), figsize=(4 * len(presets), 6.4), squeeze=False)
    for column, preset in enumerate(presets):
        cells = [r for r in records if r["data"] == preset]
        for row, key in enumerate(("amp_ssim", "phase_ssim")):
            axis = axes[row, column]
            for seed, extra in sorted({(r["seed"], r.get("set", "")) for r in cells}):
                curve = sorted(
                    (r["minutes"], r[key])
                    for r in cells
                    if (r["seed"], r.get("set", "")) == (seed, extra) and key in r
                )
                if curve:
                    label = f"seed {seed}" + (f", {extra}" if extra else "")
                    style = "--" if extra else "-"
                    axis.plot(*zip(*curve, strict=True), marker="o", ls=style, label=label)
            axis.set_xscale("log")
            axis.set_ylim(0, 1)
            axis.set_title(preset if row == 0 else f"{preset} (phase)")
            axis.set_xlabel("training minutes (2-core CPU)")
            axis.set_ylabel("test " + ("amplitude" if row == 0 else "phase") + " SSIM")
            axis.grid(alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=8)
            else:
                axis.text(0.5, 0.5, "no phase structure", ha="center", transform=axis.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--data", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 3, 10, 30])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", type=Path, help="leave the run folders here")
    parser.add_argument("--set", nargs="+", default=[], help="overrides for every cell")
    parser.add_argument(
        "--plot", type=Path, help="write the curves of JSON lines read from stdin to this PNG"
    )
    args = parser.parse_args(argv)
    if args.plot:
        plot([json.loads(line) for line in sys.stdin if line.strip()], args.plot)
        return 0
    if not args.json:
        print("| data | minutes | seed | epochs | steps | " + " | ".join(FIELDS) + " |")
        print("|" + "---|" * (len(FIELDS) + 5))
    with tempfile.TemporaryDirectory() as folder:
        base = args.keep.resolve() if args.keep else Path(folder)
        for data in args.data:
            for seed in args.seeds:
                folder = base / "_".join([data, str(seed), *args.set]).replace("=", "-")
                for record in run_cell(data, seed, args.minutes, folder, args.set):
                    if args.json:
                        print(json.dumps(record), flush=True)
                    else:
                        cells = " | ".join(str(record.get(key, "")) for key in FIELDS)
                        print(
                            f"| {data} | {record['minutes']} | {seed} | {record['epochs']} | "
                            f"{record['steps']} | {cells} |",
                            flush=True,
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

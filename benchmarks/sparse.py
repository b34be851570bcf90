"""Where the network beats iterative solvers: scan overlap x dose, four methods per cell.

    python benchmarks/sparse.py --json                             # the whole grid
    python benchmarks/sparse.py --json --geometry touching gaps --dose 1e6 --minutes 3
    python benchmarks/sparse.py --json --set model.gridsize=2      # overrides for the network
    python benchmarks/sparse.py --plot sparse.png < results.jsonl  # the figure from a file
    python benchmarks/sparse.py --json --minutes 3 --from-runs DIR  # network+refine again

A cell is a scan geometry (:data:`GEOMETRIES`: the default dense raster, a dense
irregular spiral, then rasters of about 50 %, 30 % and 0 % linear overlap and one with
gaps between the probe footprints) at a dose (photons per pattern, :data:`DOSES`), on the
default object kind, the training and test objects different drawings as always. Per
cell, on the same test scan:

* ``network``: ``python train.py`` with the cell's data for ``--minutes`` (the default
  budget: 9), the loss of :data:`LOSSES` for the dose (or ``--loss``), and ``--set``
  overrides; its test-scan reconstruction;
* ``network+refine``: ``refine=object`` after that network, as ``train.py
  refine=object`` runs it (from the network's amplitude with a flat phase), in this
  process;
* ``refine``: ``refine=object`` from a flat object (what ``infer.py ... refine=object``
  runs), in this process;
* ``epie``: textbook ePIE with the known probe (``benchmarks/refine.py``), 50
  iterations, in this process.

Each row: amplitude and phase SSIM and PSNR, R-factor, seconds (training included for
the network, the network's included for ``network+refine``). Linear overlap is
``1 - step / (2 r)`` with ``r`` the probe's aperture radius: negative means gaps.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from quality_parity import run_train  # the same train.py run, in benchmarks/

DOSES = (1e9, 1e6, 1e4, 1e3)
GEOMETRIES = {
    # name: (data overrides, aperture radius / N, step / N)
    "dense": ([], 0.2, 0.0625),
    "irregular": (
        ["data.scan=spiral", "data.jitter=0.01", "data.test_positions=1087"],
        0.2,
        0.03,
    ),
    "overlap50": (["data.test_positions=256"], 0.25, 0.25),
    "overlap30": (["data.test_positions=256"], 0.25, 0.35),
    "touching": (["data.test_positions=256"], 0.25, 0.5),
    "gaps": (["data.test_positions=256"], 0.2, 0.5),
}
LOSSES = {
    # dose at or above: (name, overrides)
    1e6: ("mae", ["train.mae_weight=1", "train.poisson_weight=0"]),
    0.0: ("poisson", ["train.mae_weight=0", "train.poisson_weight=1"]),
}
METRICS = ("amp_ssim", "phase_ssim", "amp_psnr", "phase_psnr", "r_factor")


def linear_overlap(geometry: str) -> float:
    _, radius, step = GEOMETRIES[geometry]
    return 1.0 - step / (2.0 * radius)


def loss_for(dose: float, name: str = "auto") -> tuple[str, list[str]]:
    """The network's loss at ``dose`` (:data:`LOSSES`), or the one ``name``d."""
    if name != "auto":
        return next(loss for loss in LOSSES.values() if loss[0] == name)
    for floor in sorted(LOSSES, reverse=True):
        if dose >= floor:
            return LOSSES[floor]
    raise ValueError(f"no loss for dose {dose}")


def data_overrides(geometry: str, dose: float) -> list[str]:
    extra, radius, step = GEOMETRIES[geometry]
    return [*extra, f"data.probe_radius={radius}", f"data.step={step}", f"data.nphotons={dose:g}"]


def scored(values: dict, prefix: str = "") -> dict:
    return {key: round(float(values[prefix + key]), 4) for key in METRICS if prefix + key in values}


def network_row(cell: dict, overrides: list[str], run_dir: Path) -> dict:
    """Train on the cell's scan; the ``network`` row (its test-scan reconstruction)."""
    begun = time.perf_counter()
    run_train([*overrides, f"hydra.run.dir={run_dir}"], str(cell))
    wall = time.perf_counter() - begun
    return {**cell, "method": "network", "wall_s": round(wall, 1), **trained(run_dir)}


def trained(run_dir: Path) -> dict:
    """The network's figures in a run's ``metrics.json``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "epochs": metrics["epochs"],
        "seconds": round(metrics["fit_seconds"] + metrics.get("reconstruct_seconds", 0.0), 1),
        **scored(metrics),
    }


def network_refine_row(cell: dict, run_dir: Path, scan) -> dict:
    """``refine=object`` after the run's network, with the defaults ``train.py
    refine=object`` uses (the network's amplitude, a flat phase: ``refine.network_phase``)."""
    from ptycho.inference import reconstruct
    from ptycho.model import load_model

    begun = time.perf_counter()
    network = reconstruct(load_model(run_dir / "model.keras"), scan, compile_mode="graph")
    seconds = time.perf_counter() - begun + trained(run_dir)["seconds"]
    result = refine_object(scan, network)
    return {
        **cell,
        "method": "network+refine",
        "seconds": round(seconds + result.seconds, 1),
        **scored(result.metrics),
    }


def refine_object(scan, start):
    """``refine=object`` of ``scan`` with the defaults, from ``start`` (a network's
    reconstruction, or None: a flat object), as the applications run it."""
    from ptycho.refine import RefineMode, RefineOptions
    from ptycho.scoring import Scorer
    from ptycho.stages import refine

    return refine.run(
        Scorer(scan),
        RefineOptions(mode=RefineMode.object),
        start=start,
        backend="xla",
        compile_mode="jit",
        stream=io.StringIO(),  # no progress bar in a benchmark
    )


def refine_row(cell: dict, scan) -> dict:
    """``refine=object`` from a flat object, as ``infer.py`` runs it."""
    result = refine_object(scan, None)
    seconds = round(result.seconds, 1)
    return {**cell, "method": "refine", "seconds": seconds, **scored(result.metrics)}


def epie_row(cell: dict, scan, iterations: int) -> dict:
    from refine import epie  # benchmarks/refine.py

    from ptycho.scoring import Scorer

    curve, obj, r_factor = epie(scan, iterations, every=iterations)
    values = {**Scorer(scan).truth(obj), "r_factor": r_factor}
    return {
        **cell,
        "method": "epie",
        "iterations": iterations,
        "seconds": round(curve[-1]["seconds"], 1),
        **scored(values),
    }


def describe(geometry: str, dose: float, args) -> tuple[dict, list[str]]:
    """The cell's record fields and its training's overrides."""
    loss, loss_overrides = loss_for(dose, args.loss)
    _, radius, step = GEOMETRIES[geometry]
    cell = {
        "geometry": geometry,
        "overlap": round(linear_overlap(geometry), 3),
        "step": step,
        "probe_radius": radius,
        "dose": dose,
        "loss": loss,
        "minutes": args.minutes,
        "set": " ".join(args.set),
    }
    overrides = [
        *data_overrides(geometry, dose),
        *loss_overrides,
        f"train.max_minutes={args.minutes}",
        "train.eval_every=0",
        *args.set,
    ]
    return cell, overrides


def run_cell(geometry: str, dose: float, args, run_dir: Path) -> list[dict]:
    """The four rows of a cell; with ``args.from_runs`` the network is the one already
    trained in ``run_dir`` and only ``network+refine`` is computed again."""
    from ptycho.data import load_scan

    cell, overrides = describe(geometry, dose, args)
    if args.from_runs:
        return [network_refine_row(cell, run_dir, load_scan(run_dir / "test_scan.npz"))]
    rows = [network_row(cell, overrides, run_dir)]
    scan = load_scan(run_dir / "test_scan.npz")
    rows.append(network_refine_row(cell, run_dir, scan))
    rows.append(refine_row(cell, scan))
    rows.append(epie_row(cell, scan, args.epie_iterations))
    return rows


METHODS = ("network", "network+refine", "refine", "epie")
STYLES = {"network": "C0", "network+refine": "C2", "refine": "C1", "epie": "C7"}


def plot(records: list[dict], path: Path) -> None:
    """Amplitude (top) and phase (bottom) SSIM against linear overlap, one column per
    dose, one line per method; the dense irregular scan as a separate marker; rows
    trained with another loss than the dose's (``--loss``) left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if r["loss"] == loss_for(r["dose"])[0]]  # the defaults
    doses = sorted({r["dose"] for r in records}, reverse=True)
    figure, axes = plt.subplots(2, len(doses), figsize=(3.6 * len(doses), 6.4), squeeze=False)
    for column, dose in enumerate(doses):
        for row, key in enumerate(("amp_ssim", "phase_ssim")):
            axis = axes[row, column]
            for method in METHODS:
                points = sorted(
                    (r["overlap"], r[key])
                    for r in records
                    if r["dose"] == dose
                    and r["method"] == method
                    and r["geometry"] != "irregular"
                    and key in r
                )
                if points:
                    axis.plot(*zip(*points, strict=True), "o-", color=STYLES[method], label=method)
                irregular = [
                    r[key]
                    for r in records
                    if r["dose"] == dose and r["method"] == method and r["geometry"] == "irregular"
                ]
                if irregular:
                    axis.plot([1.0], irregular[-1:], "*", ms=11, color=STYLES[method])
            axis.axvline(0.0, color="k", lw=0.5)
            axis.set_xlim(1.05, -0.3)
            axis.set_ylim(0, 1)
            axis.grid(alpha=0.3)
            axis.set_title(f"{dose:.0e} photons" + ("" if row == 0 else " (phase)"))
            axis.set_xlabel("linear overlap (* dense irregular)")
            axis.set_ylabel(("amplitude" if row == 0 else "phase") + " SSIM")
            if column == 0 and row == 0:
                axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--geometry", nargs="+", default=list(GEOMETRIES), choices=GEOMETRIES)
    parser.add_argument("--dose", type=float, nargs="+", default=list(DOSES))
    parser.add_argument("--minutes", type=float, default=9.0, help="training budget per cell")
    parser.add_argument("--epie-iterations", type=int, default=50)
    parser.add_argument(
        "--loss", choices=("auto", "mae", "poisson"), default="auto", help="auto: LOSSES"
    )
    parser.add_argument("--set", nargs="+", default=[], help="overrides for every training")
    parser.add_argument("--keep", type=Path, help="leave the run folders here")
    parser.add_argument(
        "--from-runs",
        type=Path,
        help="the run folders of an earlier --keep: network+refine again, nothing trained",
    )
    parser.add_argument("--plot", type=Path, help="the figure of JSON lines read from stdin")
    args = parser.parse_args(argv)
    if args.plot:
        plot([json.loads(line) for line in sys.stdin if line.strip()], args.plot)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        root = args.from_runs or args.keep or Path(scratch)
        for dose in args.dose:
            for geometry in args.geometry:
                run_dir = root / f"{geometry}_{dose:.0e}"
                if args.from_runs and not (run_dir / "model.keras").is_file():
                    continue
                for row in run_cell(geometry, dose, args, run_dir):
                    if args.json:
                        print(json.dumps(row), flush=True)
                    else:
                        shown = " ".join(f"{k}={row[k]}" for k in ("method", *METRICS) if k in row)
                        print(f"{geometry} {dose:.0e}: {shown} ({row['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

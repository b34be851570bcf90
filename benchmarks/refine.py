"""Physics refinement against ePIE: speed, time to quality and final quality.

    python benchmarks/refine.py --json                       # 1e6 and 1e4 photons
    python benchmarks/refine.py --json --nphotons 1e6 --checkpoint outputs/.../model.keras

The scan is the held-out kind the targets name: scikit-image's ``coins`` (amplitude) and
``text`` (phase, 1.2 rad) at N = 64, a Fresnel probe, a Fermat spiral of 1087 positions
(step N/8), Poisson noise at ``--nphotons`` per pattern (``data=image`` with
``data.probe=fresnel data.scan=spiral data.test_positions=1087``, the test scan).

Rows (one JSON line each, all in this process, one after the other):

- ``refine=object`` from a flat object for xla+jit, xla+graph and legacy+graph;
- ``refine=positions`` on the same scan with 1 px rms errors in the stored positions
  (xla+jit, xla+graph), and ``refine=object`` with the true positions beside it;
- with ``--checkpoint``: ``refine=object`` from the network's reconstruction (xla+jit)
  for the default iterations and for a third of them, the network's own time included
  in ``seconds`` and ``seconds_to_*``, and ``refine=object`` from flat for a third of
  them beside it;
- ePIE (``translate="epie"``): the textbook sequential algorithm in numpy with the
  known probe, PtyLab's defaults (object step 0.25, integer positions, random order),
  ``--epie-iterations`` iterations: the in-process yardstick.

Fields: ``translate``, ``compile``, ``mode``, ``start``, ``nphotons``, ``patterns``,
``iterations``, ``seconds`` (refinement steps and their progress passes, compilation
included, ground-truth scoring excluded), ``iterations_per_s``, ``amp_ssim``,
``phase_ssim``, ``position_rmse``, ``seconds_to_ssim_0.98`` and ``iterations_to_ssim_0.98``
(first progress point with amp SSIM >= 0.98, null if never), ``seconds_to_epie`` /
``iterations_to_epie`` (first point at or above ePIE's final amp SSIM), and ``curve``
(iteration, seconds, amp_ssim, phase_ssim per progress point). ``--plot`` draws the
curves (SSIM against iterations and seconds) to a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ptycho.data import simulate  # noqa: E402
from ptycho.refine import RefineOptions, Refiner  # noqa: E402
from ptycho.scoring import Scorer  # noqa: E402

POSITIONS = 1087
THRESHOLD = 0.98


def held_out_scan(nphotons: float):
    return simulate(
        n=64,
        n_positions=POSITIONS,
        object_kind="image",
        images=("coins", "text"),
        amplitude_range=(0.2, 1.0),
        phase_range=(-0.6, 0.6),
        probe="fresnel",
        probe_radius=0.25,
        scan="spiral",
        step=0.125,
        nphotons=nphotons,
        seed=1,
    )


def with_position_errors(scan, rms: float = 1.0, seed: int = 5):
    error = np.random.default_rng(seed).normal(0.0, rms / math.sqrt(2), (scan.n_positions, 2))
    return scan.replace(xcoords=scan.xcoords + error[:, 0], ycoords=scan.ycoords + error[:, 1])


def scorer(scan):
    truth = Scorer(scan).truth

    def score(obj):
        values = truth(obj)
        return {"amp_ssim": values["amp_ssim"], "phase_ssim": values.get("phase_ssim", math.nan)}

    return score


def first_at(curve: list, threshold: float, key: str):
    for point in curve:
        if point["amp_ssim"] >= threshold:
            return point[key]
    return None


def epie(scan, iterations: int, step: float = 0.25, seed: int = 0, every: int = 5):
    """Textbook ePIE (Maiden & Rodenburg 2009), known probe: for each position in a
    random order, project the exit wave onto the measured modulus and update the
    object patch by ``step * conj(P) * (psi' - psi) / max |P|^2``."""
    n = scan.n
    amplitudes = np.fft.ifftshift(scan.diffraction.astype(np.float64), axes=(-2, -1))
    probe = scan.probe.astype(np.complex128)
    counts = float(np.sum(amplitudes**2)) / scan.n_positions
    probe = probe * math.sqrt(counts / float(np.sum(np.abs(probe) ** 2)))
    obj = np.ones(scan.object.shape, np.complex128)
    rows = np.rint(scan.ycoords - n / 2).astype(int)
    cols = np.rint(scan.xcoords - n / 2).astype(int)
    weight = step * np.conj(probe) / float(np.max(np.abs(probe) ** 2))
    rng = np.random.default_rng(seed)
    score = scorer(scan)
    curve = [{"iteration": 0, "seconds": 0.0, **score(obj)}]
    seconds = 0.0
    for iteration in range(1, iterations + 1):
        begin = time.perf_counter()
        for j in rng.permutation(scan.n_positions):
            window = (slice(rows[j], rows[j] + n), slice(cols[j], cols[j] + n))
            patch = obj[window]
            wave = probe * patch
            far = np.fft.fft2(wave) / n
            corrected = np.fft.ifft2(amplitudes[j] * np.exp(1j * np.angle(far))) * n
            obj[window] = patch + weight * (corrected - wave)
        seconds += time.perf_counter() - begin
        if iteration % every == 0 or iteration == iterations:
            curve.append({"iteration": iteration, "seconds": seconds, **score(obj)})
    return curve


def refine_row(scan, truth_scan, options, backend, mode, initial=None, extra_seconds=0.0):
    refiner = Refiner(
        scan,
        options,
        initial=initial,
        backend=backend,
        compile_mode=mode,
        shape=truth_scan.object.shape,
    )
    result = refiner.run(score=scorer(truth_scan), true_positions=truth_scan.positions)
    curve = [
        {k: r[k] for k in ("iteration", "seconds", "amp_ssim", "phase_ssim", "position_rmse")}
        for r in result.history
    ]
    for point in curve:
        point["seconds"] += extra_seconds
    final = curve[-1]
    return {
        "translate": backend,
        "compile": mode,
        "mode": options.mode,
        "iterations": result.iterations,
        "seconds": result.seconds,
        "iterations_per_s": result.iterations / result.seconds,
        "amp_ssim": final["amp_ssim"],
        "phase_ssim": final["phase_ssim"],
        "position_rmse": final["position_rmse"],
        "curve": curve,
    }


def network_start(checkpoint: str, scan):
    from ptycho.inference import reconstruct
    from ptycho.model import load_model

    model = load_model(checkpoint, translate_backend="xla")
    reconstruct(model, scan.subset(np.arange(64)), compile_mode="jit", shape=scan.object.shape)
    begin = time.perf_counter()
    result = reconstruct(model, scan, compile_mode="jit")
    return result.obj, time.perf_counter() - begin


def run(nphotons: float, args) -> list[dict]:
    scan = held_out_scan(nphotons)
    iterations = args.iterations or RefineOptions().iterations
    options = RefineOptions(mode="object", iterations=iterations, eval_every=args.every)
    rows = []

    def emit(row, **labels):
        row = {**labels, "nphotons": nphotons, "patterns": scan.n_positions, **row}
        rows.append(row)
        brief = {k: v for k, v in row.items() if k != "curve"}
        print(json.dumps(brief) if args.json else brief, flush=True)

    reference = epie(scan, args.epie_iterations, every=args.every)
    epie_row = {
        "translate": "epie",
        "compile": "numpy",
        "mode": "object",
        "iterations": args.epie_iterations,
        "seconds": reference[-1]["seconds"],
        "iterations_per_s": args.epie_iterations / reference[-1]["seconds"],
        "amp_ssim": reference[-1]["amp_ssim"],
        "phase_ssim": reference[-1]["phase_ssim"],
        "position_rmse": 0.0,
        "curve": reference,
    }
    target = epie_row["amp_ssim"]

    def with_targets(row):
        row[f"seconds_to_ssim_{THRESHOLD}"] = first_at(row["curve"], THRESHOLD, "seconds")
        row[f"iterations_to_ssim_{THRESHOLD}"] = first_at(row["curve"], THRESHOLD, "iteration")
        row["seconds_to_epie"] = first_at(row["curve"], target, "seconds")
        row["iterations_to_epie"] = first_at(row["curve"], target, "iteration")
        return row

    emit(with_targets(epie_row), start="flat")
    for backend, mode in (("xla", "jit"), ("xla", "graph"), ("legacy", "graph")):
        emit(with_targets(refine_row(scan, scan, options, backend, mode)), start="flat")
    if args.checkpoint:
        initial, seconds = network_start(args.checkpoint, scan)
        third = RefineOptions(mode="object", iterations=max(1, iterations // 3), eval_every=1)
        for settings in (options, third):
            row = refine_row(
                scan, scan, settings, "xla", "jit", initial=initial, extra_seconds=seconds
            )
            row["seconds"] += seconds
            row["network_seconds"] = seconds
            row["network_amp_ssim"] = row["curve"][0]["amp_ssim"]
            row["network_phase_ssim"] = row["curve"][0]["phase_ssim"]
            emit(with_targets(row), start="network")
        emit(with_targets(refine_row(scan, scan, third, "xla", "jit")), start="flat")
    if not args.skip_positions:
        wrong = with_position_errors(scan)
        moving = RefineOptions(mode="positions", iterations=iterations, eval_every=args.every)
        for backend, mode in (("xla", "jit"), ("xla", "graph")):
            emit(
                with_targets(refine_row(wrong, scan, moving, backend, mode)),
                start="flat",
                position_error_px=1.0,
            )
        emit(
            with_targets(refine_row(wrong, scan, options, "xla", "jit")),
            start="flat",
            position_error_px=1.0,
        )
    return rows


def plot(rows: list, path: str) -> None:
    """Per dose: amp SSIM and phase SSIM against iterations, amp SSIM against seconds
    (xla+jit rows and ePIE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("iteration", "amp_ssim"), ("iteration", "phase_ssim"), ("seconds", "amp_ssim"))
    doses = sorted({r["nphotons"] for r in rows}, reverse=True)
    figure, axes = plt.subplots(len(doses), 3, figsize=(16, 4.3 * len(doses)), squeeze=False)
    for axes_row, dose in zip(axes, doses, strict=True):
        shown = [r for r in rows if r["nphotons"] == dose and r["compile"] != "graph"]
        for row in shown:
            label = (
                f"{row['translate']} {row['mode']}, {row['start']} start, {row['iterations']} its"
            )
            if row.get("position_error_px"):
                label += f", {row['position_error_px']:g} px position errors"
            curve = row["curve"]
            for axis, (x, y) in zip(axes_row, panels, strict=True):
                axis.plot([p[x] for p in curve], [p[y] for p in curve], "o-", label=label, ms=3)
        for axis, (x, y) in zip(axes_row, panels, strict=True):
            values = [p[y] for r in shown for p in r["curve"][1:]]
            axis.set_ylim(max(0.0, min(values) - 0.02), min(1.0, max(values) + 0.01))
            axis.set_xlabel("seconds" if x == "seconds" else "iterations")
            axis.set_ylabel(y.replace("_", " "))
            axis.set_title(f"{dose:.0e} photons per pattern")
            axis.grid(alpha=0.3)
        axes_row[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nphotons", type=float, nargs="+", default=[1e6, 1e4])
    parser.add_argument("--iterations", type=int, help="default: refine.iterations")
    parser.add_argument("--epie-iterations", type=int, default=50)
    parser.add_argument("--every", type=int, default=5, help="iterations between points")
    parser.add_argument("--checkpoint", help="a model.keras trained on N = 64, Fresnel probe")
    parser.add_argument("--skip-positions", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--out", help="also write the rows, curves included, as JSON lines")
    parser.add_argument("--plot", help="PNG of the SSIM curves")
    parser.add_argument("--replot", nargs="+", help="draw --plot from --out files; no runs")
    args = parser.parse_args()
    if args.replot:
        rows = [json.loads(line) for name in args.replot for line in open(name) if line.strip()]
        plot(rows, args.plot)
        return
    rows = [row for dose in args.nphotons for row in run(dose, args)]
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()

"""Physics refinement against ePIE (and PtyLab): speed, time to quality, final quality.

    python benchmarks/refine.py --json                       # 1e6 and 1e4 photons
    python benchmarks/refine.py --json --nphotons 1e6 --checkpoint outputs/.../model.keras
    python benchmarks/refine.py --json --case sharp          # sharp images against ePIE-50
    python benchmarks/refine.py --json --case modes          # a partially coherent scan
    python benchmarks/refine.py --json --case n128           # 516 x 128^2, PtyLab beside

``--case dose`` (the default): the scan is the held-out kind the targets name:
scikit-image's ``coins`` (amplitude) and ``text`` (phase, 1.2 rad) at N = 64, a Fresnel
probe, a Fermat spiral of 1087 positions (step N/8), Poisson noise at ``--nphotons`` per
pattern, patterns made with exact (Fourier) sub-pixel shifts of the object (``data=image``
with ``data.probe=fresnel data.scan=spiral data.test_positions=1087``, the test scan).
Rows (one JSON line each, all in this process, one after the other):

- ``refine=object`` from a flat object for xla+jit (``subpixel`` fourier, the default,
  and bilinear), xla+graph and legacy+graph;
- ``refine=positions`` on the same scan with 1 px rms errors in the stored positions
  (both sub-pixel models), and ``refine=object`` with the true positions beside it;
- with ``--checkpoint``: ``refine=object`` from the network's reconstruction (xla+jit)
  for the default iterations and for a third of them, the network's own time included
  in ``seconds`` and ``seconds_to_*``, and ``refine=object`` from flat for a third of
  them beside it;
- ePIE (``translate="epie"``): the textbook sequential algorithm in numpy with the
  known probe, PtyLab's defaults (object step 0.25, integer positions, random order),
  ``--epie-iterations`` iterations: the in-process yardstick.

``--case sharp``: sharp photographs (``camera``/``astronaut`` and ``brick``/``gravel``,
phase 1.2 rad), the same probe, spiral and 1e6 photons: ePIE-50 against ``refine=object``
with each sub-pixel model.

``--case modes``: the coins/text scan with a partially coherent beam, 3 modes of 72 /
22 / 6 % (``data.probe_modes=3 data.coherence=0.3``), 1e6 photons: ``refine=full`` with
``probe_modes=3`` from the first mode alone and from the true modes, and with one mode;
``mode_powers`` found; then the seconds per iteration of the compiled step with K = 1
and K = 3 (``seconds_per_iteration``: median of 3 passes after 2 warm-up passes).

``--case n128``: 516 patterns of 128 x 128 (the measured scan's size), coins/text,
spiral: ``refine=full`` seconds per iteration (steps only, median of 3 passes) with K = 1
and K = 3, PtyLab's mPIE with probe update beside it in this process when ``ptylab`` is
installed (``pip install ptylab``), and where one step's time goes (``profile``: the
compiled pieces timed alone: gather, forward model, gradients, the whole step).

Fields: ``translate``, ``compile``, ``mode``, ``subpixel``, ``start``, ``nphotons``,
``patterns``, ``iterations``, ``seconds`` (refinement steps and their progress passes,
compilation included, ground-truth scoring excluded), ``iterations_per_s``, ``amp_ssim``,
``phase_ssim``, ``r_factor``, ``position_rmse``, ``seconds_to_ssim_0.98`` and
``iterations_to_ssim_0.98`` (first progress point with amp SSIM >= 0.98, null if never),
``seconds_to_epie`` / ``iterations_to_epie`` (first point at or above ePIE's final amp
SSIM), and ``curve`` (iteration, seconds, amp_ssim, phase_ssim per progress point).
``--plot`` draws the curves (SSIM against iterations and seconds) to a PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ptycho import probes  # noqa: E402
from ptycho.data import simulate  # noqa: E402
from ptycho.metrics import r_factor  # noqa: E402
from ptycho.refine import RefineOptions, Refiner  # noqa: E402
from ptycho.scoring import Scorer  # noqa: E402

POSITIONS = 1087
THRESHOLD = 0.98


def held_out_scan(nphotons: float, **changes):
    settings = dict(
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
    return simulate(**{**settings, **changes})


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
    object patch by ``step * conj(P) * (psi' - psi) / max |P|^2``.

    Returns ``(curve, object, R-factor of the final object)``."""
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
    predicted = np.stack(
        [
            np.abs(np.fft.fft2(probe * obj[r : r + n, c : c + n])) / n
            for r, c in zip(rows, cols, strict=True)
        ]
    )
    return curve, obj, r_factor(predicted, amplitudes)


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
    keys = ("iteration", "seconds", "amp_ssim", "phase_ssim", "position_rmse", "r_factor")
    curve = [{k: r[k] for k in keys} for r in result.history]
    for point in curve:
        point["seconds"] += extra_seconds
    final = curve[-1]
    row = {
        "translate": backend,
        "compile": mode,
        "mode": options.mode,
        "subpixel": str(options.subpixel),
        "iterations": result.iterations,
        "seconds": result.seconds,
        "iterations_per_s": result.iterations / result.seconds,
        "amp_ssim": final["amp_ssim"],
        "phase_ssim": final["phase_ssim"],
        "r_factor": final["r_factor"],
        "position_rmse": final["position_rmse"],
        "curve": curve,
    }
    if refiner.modes > 1:
        row["probe_modes"] = refiner.modes
        row["mode_powers"] = [round(float(p), 4) for p in probes.powers(result.probe)]
    return row


def network_start(checkpoint: str, scan):
    from ptycho.inference import reconstruct
    from ptycho.model import load_model

    model = load_model(checkpoint, translate_backend="xla")
    reconstruct(model, scan.subset(np.arange(64)), compile_mode="jit", shape=scan.object.shape)
    begin = time.perf_counter()
    result = reconstruct(model, scan, compile_mode="jit")
    return result.obj, time.perf_counter() - begin


class Rows:
    """The rows of one scan: printed as they come (JSON lines with ``--json``), each
    with ePIE's targets when an ePIE row has been given."""

    def __init__(self, args, scan, **labels):
        self.args, self.rows, self.target = args, [], None
        self.labels = {**labels, "nphotons": scan.nphotons, "patterns": scan.n_positions}

    def epie(self, scan) -> None:
        iterations = self.args.epie_iterations
        curve, _, _ = epie(scan, iterations, every=self.args.every)
        self.target = curve[-1]["amp_ssim"]
        row = {
            "translate": "epie",
            "compile": "numpy",
            "mode": "object",
            "iterations": iterations,
            "seconds": curve[-1]["seconds"],
            "iterations_per_s": iterations / curve[-1]["seconds"],
            "amp_ssim": curve[-1]["amp_ssim"],
            "phase_ssim": curve[-1]["phase_ssim"],
            "position_rmse": 0.0,
            "curve": curve,
        }
        self.emit(row, start="flat")

    def emit(self, row, **labels) -> None:
        row = {**self.labels, **labels, **row}
        if "curve" in row:
            row[f"seconds_to_ssim_{THRESHOLD}"] = first_at(row["curve"], THRESHOLD, "seconds")
            row[f"iterations_to_ssim_{THRESHOLD}"] = first_at(row["curve"], THRESHOLD, "iteration")
            if self.target is not None:
                row["seconds_to_epie"] = first_at(row["curve"], self.target, "seconds")
                row["iterations_to_epie"] = first_at(row["curve"], self.target, "iteration")
        self.rows.append(row)
        brief = {k: v for k, v in row.items() if k != "curve"}
        print(json.dumps(brief) if self.args.json else brief, flush=True)


def run(nphotons: float, args) -> list[dict]:
    """``--case dose``: the coins/text scan at ``nphotons``."""
    scan = held_out_scan(nphotons)
    iterations = args.iterations or RefineOptions().iterations
    options = RefineOptions(mode="object", iterations=iterations, eval_every=args.every)
    bilinear = replace(options, subpixel="bilinear")
    rows = Rows(args, scan, case="dose")
    rows.epie(scan)
    for settings, backend, mode in (
        (options, "xla", "jit"),
        (bilinear, "xla", "jit"),
        (options, "xla", "graph"),
        (options, "legacy", "graph"),
    ):
        rows.emit(refine_row(scan, scan, settings, backend, mode), start="flat")
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
            rows.emit(row, start="network")
        rows.emit(refine_row(scan, scan, third, "xla", "jit"), start="flat")
    if not args.skip_positions:
        wrong = with_position_errors(scan)
        moving = RefineOptions(mode="positions", iterations=iterations, eval_every=args.every)
        for settings, mode in (
            (moving, "jit"),
            (replace(moving, subpixel="bilinear"), "jit"),
            (moving, "graph"),
        ):
            row = refine_row(wrong, scan, settings, "xla", mode)
            rows.emit(row, start="flat", position_error_px=1.0)
        row = refine_row(wrong, scan, options, "xla", "jit")
        rows.emit(row, start="flat", position_error_px=1.0)
    return rows.rows


SHARP = (("camera", "astronaut"), ("brick", "gravel"))


def run_sharp(args) -> list[dict]:
    """``--case sharp``: ePIE-50 against ``refine=object`` (both sub-pixel models) on
    sharp photographs."""
    out = []
    options = RefineOptions(mode="object", eval_every=args.every)
    for images in SHARP:
        scan = held_out_scan(1e6, images=images)
        rows = Rows(args, scan, case="sharp", images="/".join(images))
        rows.epie(scan)
        for settings in (options, replace(options, subpixel="bilinear")):
            rows.emit(refine_row(scan, scan, settings, "xla", "jit"), start="flat")
        out += rows.rows
    return out


def steady_seconds(refiner: Refiner, passes: int = 3) -> float:
    """Median seconds of one pass of compiled steps over every position (steps only,
    two warm-up passes first)."""
    import tensorflow as tf

    batches = [batch[:3] for batch in refiner._minibatches(refiner._windows_of())]
    steps = (tf.constant(1.0), tf.constant(0.1), tf.constant(0.5))
    times = []
    for k in range(passes + 2):
        begin = time.perf_counter()
        for batch in batches:
            loss = refiner._step(*batch, *steps)
        float(loss)
        if k >= 2:
            times.append(time.perf_counter() - begin)
    return float(np.median(times))


def run_modes(args) -> list[dict]:
    """``--case modes``: a 3-mode scan refined with 3 modes (from the first mode, from
    the true modes) and with one; then seconds per iteration with K = 1 and K = 3."""
    scan = held_out_scan(1e6, probe_modes=3, coherence=0.3)
    first = scan.replace(probe=scan.probe[0])
    rows = Rows(args, scan, case="modes", true_powers=probes.powers(scan.probe).round(4).tolist())
    options = RefineOptions(mode="full", eval_every=args.every, iterations=args.iterations or 30)
    for start, source, k in (
        ("first mode", first, 3),
        ("true modes", scan, 3),
        ("first mode", first, 1),
    ):
        settings = replace(options, probe_modes=k)
        rows.emit(refine_row(source, scan, settings, "xla", "jit"), start=start, probe_modes=k)
    for k in (1, 3):
        refiner = Refiner(first, replace(options, probe_modes=k), shape=scan.object.shape)
        row = {"mode": "full", "probe_modes": k, "seconds_per_iteration": steady_seconds(refiner)}
        rows.emit(row, start="speed", translate="xla", compile="jit")
    return rows.rows


def run_n128(args) -> list[dict]:
    """``--case n128``: seconds per iteration at the measured scan's size, PtyLab beside."""
    scan = held_out_scan(1e6, n=128, n_positions=516)
    rows = Rows(args, scan, case="n128")
    options = RefineOptions(mode="full")
    for k in (1, 3):
        refiner = Refiner(scan, replace(options, probe_modes=k))
        row = {"mode": "full", "probe_modes": k, "seconds_per_iteration": steady_seconds(refiner)}
        if k == 1:
            row["profile"] = profile(refiner)
        rows.emit(row, translate="xla", compile="jit", start="speed")
    try:
        import PtyLab  # noqa: F401
    except ImportError:
        print("ptylab is not installed (pip install ptylab): no PtyLab rows", file=sys.stderr)
        return rows.rows
    for k in (1, 3):
        row = {"mode": "mPIE+probe", "probe_modes": k, "seconds_per_iteration": ptylab(scan, k)}
        rows.emit(row, translate="ptylab", compile="numpy", start="speed")
    return rows.rows


def profile(refiner: Refiner) -> dict:
    """Milliseconds per minibatch of the step's compiled pieces, each timed alone: the
    gather of the windows, the forward model (shifted probes, FFT, intensities), the
    gradients of object, probe and positions, and the whole step (with the updates)."""
    import tensorflow as tf

    batch = next(iter(refiner._minibatches(refiner._windows_of())))[:3]
    compiled = lambda f: tf.function(f, jit_compile=True)  # noqa: E731

    @compiled
    def gather(index):
        tiles, offset, _ = refiner._blocks(index)
        return tf.reduce_sum(refiner._cut(refiner._caught_up(tiles)[0], offset))

    @compiled
    def forward(index):
        tiles, offset, fraction = refiner._blocks(index)
        probe = tf.convert_to_tensor(refiner.probe)
        patches = refiner._patches(refiner._cut(refiner._caught_up(tiles)[0], offset), fraction)
        return tf.reduce_sum(refiner._intensity(refiner._illuminations(probe, fraction), patches))

    @compiled
    def gradients(index, counts, weight):
        wrt = ("canvas", "probe", "positions")
        return refiner._window_gradients(index, counts, weight, wrt)[1]

    steps = (tf.constant(1.0), tf.constant(0.1), tf.constant(0.5))
    pieces = {
        "gather": (gather, batch[:1]),
        "forward": (forward, batch[:1]),
        "gradients": (gradients, batch),
        "step": (refiner._step, (*batch, *steps)),
    }
    out = {}
    for name, (function, inputs) in pieces.items():
        times = []
        for k in range(12):
            begin = time.perf_counter()
            result = function(*inputs)
            for value in tf.nest.flatten(result):
                value.numpy()
            if k >= 2:
                times.append(time.perf_counter() - begin)
        out[f"{name}_ms"] = round(1e3 * float(np.median(times)), 2)
    out["batch_size"] = refiner.batch_size
    return out


def ptylab(scan, modes: int, iterations: int = 5) -> float:
    """Seconds per iteration of PtyLab's mPIE with probe update (``modes`` probe modes)
    on ``scan``, its defaults otherwise, written to a temporary PtyLab file."""
    import logging
    import tempfile

    import h5py
    import PtyLab
    from PtyLab import Engines

    n, wavelength, distance, pixel = scan.n, 1e-9, 0.1, 1e-5
    object_pixel = wavelength * distance / (n * pixel)
    encoder = np.stack([scan.ycoords, scan.xcoords], 1) * object_pixel
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scan.h5"
        with h5py.File(path, "w") as handle:
            handle["ptychogram"] = np.square(scan.diffraction)
            handle["wavelength"] = wavelength
            handle["encoder"] = encoder - encoder.mean(0)
            handle["dxd"] = pixel
            handle["zo"] = distance
        logging.disable(logging.WARNING)
        try:
            _, reconstruction, params, _, engine = PtyLab.easyInitialize(
                path, engine=Engines.mPIE, operationMode="CPM", dummyMonitor=True
            )
            params.probeUpdateStart = 1
            reconstruction.npsm = modes
            reconstruction.initializeObjectProbe()
            engine.numIterations = iterations
            begin = time.perf_counter()
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                engine.reconstruct()
            return (time.perf_counter() - begin) / iterations
        finally:
            logging.disable(logging.NOTSET)


def plot(rows: list, path: str) -> None:
    """One row of panels per scan (case, images, dose): amp SSIM and phase SSIM against
    iterations, amp SSIM against seconds, and the R-factor against iterations (xla+jit
    rows and ePIE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("iteration", "amp_ssim"),
        ("iteration", "phase_ssim"),
        ("seconds", "amp_ssim"),
        ("iteration", "r_factor"),
    )
    curves = [r for r in rows if "curve" in r and r["compile"] != "graph"]
    scans = list(
        dict.fromkeys((r.get("case", "dose"), r.get("images"), r["nphotons"]) for r in curves)
    )
    figure, axes = plt.subplots(
        len(scans), len(panels), figsize=(21, 4.3 * len(scans)), squeeze=False
    )
    for axes_row, (case, images, dose) in zip(axes, scans, strict=True):
        shown = [
            r
            for r in curves
            if (r.get("case", "dose"), r.get("images"), r["nphotons"]) == (case, images, dose)
        ]
        for row in shown:
            label = f"{row['translate']} {row['mode']}"
            if row.get("subpixel"):
                label += f" {row['subpixel']}"
            if row.get("probe_modes"):
                label += f" K={row['probe_modes']}"
            label += f", {row['start']} start, {row['iterations']} its"
            if row.get("position_error_px"):
                label += f", {row['position_error_px']:g} px position errors"
            curve = row["curve"]
            for axis, (x, y) in zip(axes_row, panels, strict=True):
                points = [(p[x], p[y]) for p in curve if p.get(y) is not None]
                if points:
                    axis.plot(*zip(*points, strict=True), "o-", label=label, ms=3)
        for axis, (x, y) in zip(axes_row, panels, strict=True):
            values = [p[y] for r in shown for p in r["curve"][1:] if p.get(y) is not None]
            if y != "r_factor" and values:
                axis.set_ylim(max(0.0, min(values) - 0.02), min(1.0, max(values) + 0.01))
            axis.set_xlabel("seconds" if x == "seconds" else "iterations")
            axis.set_ylabel(y.replace("_", " "))
            scan = f"{case}{', ' + images if images else ''}"
            axis.set_title(f"{scan}: {dose:.0e} photons per pattern")
            axis.grid(alpha=0.3)
        axes_row[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("dose", "sharp", "modes", "n128"), default="dose")
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
    if args.case == "dose":
        rows = [row for dose in args.nphotons for row in run(dose, args)]
    else:
        rows = {"sharp": run_sharp, "modes": run_modes, "n128": run_n128}[args.case](args)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()

"""Reconstruction speed, its bound and start-up, and memory of whole scans.

    python benchmarks/infer.py --json                   # 1,000 and 10,000 patterns, N = 64
    python benchmarks/infer.py --patterns 1000 --configs xla:graph --precision float32 bfloat16
    python benchmarks/infer.py --patterns 1000 --groups all tile --iterative-iterations 0

For each scan length a simulated scan (N = 64, grid, step N/8) and, per precision, the
default model (random weights: speed does not depend on them) are written to a
temporary folder; each configuration (translate, compile, precision, infer groups) then
runs in a fresh process, as ``infer.py`` would:

* start-up, reported separately: ``import_s`` (Python, TensorFlow and the package),
  ``load_s`` (``model.keras``), ``first_s`` (the first reconstruction of a 64-position
  scan: tracing and compiling the predict and stitching functions, fixed batch shapes,
  so no scan length recompiles them) and ``process_s``, their sum: from the first line
  of the script to the first result (the interpreter's own start, ~0.05 s, before it);
* ``variant="reconstruct"``: the whole reconstruction of the scan (grouping, batches,
  prediction, stitching, R-factor and Poisson NLL), ``seconds`` and ``patterns_per_s``;
* ``variant="cnn_only"``: the bound, the network alone (the model with the physics and
  warp removed, :func:`ptycho.model.build_cnn_only`, same precision) forward over as many
  groups as the reconstruction evaluates, same batch and compile mode, as patterns/s of
  the scan; ``variant="model"``: the whole model (network and physics) over the same
  batches, without stitching.

Variants alternate for ``--rounds`` rounds in the same process; medians are reported,
and the reconstruction row carries ``bound_fraction`` (its patterns/s over the bound's)
and ``model_fraction``. Memory: ``peak_rss_mb`` (VmHWM) and ``rss_increase_mb`` (VmHWM
minus the resident memory before the first full reconstruction); ``traces`` (times the
predict function was traced).

The iterative reference (``translate="iterative"``) is a vectorised error-reduction
ptychography solver in numpy with the known probe (every pattern's exit wave is
projected onto its measured modulus and the object is updated by the probe-weighted
average of the corrections), run for ``--iterative-iterations`` iterations on the same
scan (0: skipped); ``patterns_per_s`` = patterns / total time. It also reports the
amplitude SSIM it reaches, for scale.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ("xla:jit", "xla:graph", "legacy:graph")

CHILD = r"""
import json, sys, time
started = time.perf_counter()
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
from ptycho.data import group_positions, load_scan, tile_groups
from ptycho.inference import make_predict_fn, reconstruct
from ptycho.model import ModelConfig, build_cnn_only, load_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0

path, model_path, backend, mode, batch, groups, precision, rounds = sys.argv[1:9]
batch, rounds = int(batch), int(rounds)
imported = time.perf_counter()
scan = load_scan(path)
model = load_model(model_path, translate_backend=backend)
loaded = time.perf_counter()
predict = make_predict_fn(model, mode)
warm = scan.subset(np.arange(min(64, scan.n_positions)))
reconstruct(model, warm, batch_size=batch, compile_mode=mode, backend=backend,
            predict_fn=predict, groups=groups, shape=scan.object.shape)
first = time.perf_counter()
startup = {"import_s": imported - started, "load_s": loaded - imported, "first_s": first - loaded}

chosen = group_positions(scan.xcoords, scan.ycoords, 2)
if groups == "tile":
    chosen = tile_groups(chosen, scan.n_positions)
batches = -(-len(chosen) // batch)
inputs = {"diffraction": tf.constant(np.moveaxis(scan.diffraction[chosen[:batch]], 1, -1)),
          "offsets": tf.zeros((batch, 4, 2))}
cnn = build_cnn_only(ModelConfig(n=scan.n, filters=16, precision=precision))
jit = mode == "jit"
network = tf.function(lambda x: cnn(x, training=False)["amplitude"], jit_compile=jit)
whole = predict

def run_network(function, feed):
    start = time.perf_counter()
    for _ in range(batches):
        out = function(feed)
    tf.nest.map_structure(lambda t: t.numpy(), out)
    return time.perf_counter() - start

run_network(network, {"diffraction": inputs["diffraction"]})
before = status("VmRSS")
times = {"reconstruct": [], "cnn_only": [], "model": []}
for _ in range(rounds):
    start = time.perf_counter()
    result = reconstruct(model, scan, batch_size=batch, compile_mode=mode, backend=backend,
                         predict_fn=predict, groups=groups)
    times["reconstruct"].append(time.perf_counter() - start)
    times["cnn_only"].append(run_network(network, {"diffraction": inputs["diffraction"]}))
    times["model"].append(run_network(whole, inputs))
print(json.dumps({
    "times": {key: float(np.median(value)) for key, value in times.items()},
    "groups_evaluated": len(chosen), **startup,
    "peak_rss_mb": status("VmHWM"), "rss_increase_mb": status("VmHWM") - before,
    "traces": int(predict.experimental_get_tracing_count()),
    "r_factor": result.r_factor,
}))
"""


def error_reduction(scan, iterations: int) -> tuple[np.ndarray, float]:
    """Vectorised ptychographic error reduction with a known probe; (object, seconds)."""
    n = scan.n
    probe = scan.probe.astype(np.complex64)
    rows = np.rint(scan.ycoords - n / 2).astype(int)[:, None] + np.arange(n)
    cols = np.rint(scan.xcoords - n / 2).astype(int)[:, None] + np.arange(n)
    r_index, c_index = rows[:, :, None], cols[:, None, :]
    obj = np.ones(scan.object.shape, np.complex64)
    weight = np.zeros(obj.shape, np.float32)
    np.add.at(weight, (r_index, c_index), np.broadcast_to(np.abs(probe) ** 2, (len(rows), n, n)))
    weight = np.maximum(weight, 1e-3 * weight.max())
    amplitudes = scan.diffraction
    start = time.perf_counter()
    for _ in range(iterations):
        update = np.zeros_like(obj)
        for first in range(0, len(rows), 1024):  # bounded memory
            r, c = r_index[first : first + 1024], c_index[first : first + 1024]
            exit_wave = probe * obj[r, c]
            spectrum = np.fft.fft2(exit_wave)
            spectrum = (
                amplitudes[first : first + 1024]
                * n
                * np.exp(1j * np.angle(np.fft.fftshift(spectrum, axes=(-2, -1))))
            )
            corrected = np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(-2, -1)))
            np.add.at(update, (r, c), np.conj(probe) * (corrected - exit_wave))
        obj = obj + update / weight
    return obj, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--patterns", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--batch", type=int, default=64, help="infer_batch_size")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="translate:compile")
    parser.add_argument("--precision", nargs="+", default=["float32"])
    parser.add_argument("--groups", nargs="+", default=["all"], help="infer_groups")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterative-iterations", type=int, default=100)
    args = parser.parse_args(argv)

    from ptycho.cli import initialise_devices
    from ptycho.data import normalisation_factor, save_scan, simulate
    from ptycho.metrics import compare
    from ptycho.model import ModelConfig, build_model
    from ptycho.outputs import save_model
    from ptycho.scoring import scan_region

    initialise_devices()  # TensorFlow's start-up notices filtered, as in the entry points
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as folder:
        for patterns in args.patterns:
            scan = simulate(n=64, n_positions=patterns, step=0.125, probe="disk", seed=0)
            path = save_scan(scan, Path(folder) / f"scan_{patterns}.npz")
            models = {}
            for precision in args.precision:
                model, _ = build_model(
                    ModelConfig(n=64, filters=16, precision=precision),
                    probe=scan.probe,
                    norm_factor=normalisation_factor(scan.diffraction),
                )
                models[precision] = Path(folder) / f"model_{precision}.keras"
                save_model(model, models[precision])
            records = []
            for config in args.configs:
                backend, mode = config.split(":")
                for precision in args.precision:
                    for groups in args.groups:
                        records += run_child(
                            env, path, models[precision], backend, mode, precision, groups, args
                        )
            if args.iterative_iterations:
                obj, seconds = error_reduction(scan, args.iterative_iterations)
                quality = compare(scan.object, obj, region=scan_region(scan))
                records.append(
                    {
                        "translate": "iterative",
                        "compile": "numpy",
                        "seconds": seconds,
                        "patterns_per_s": patterns / seconds,
                        "iterations": args.iterative_iterations,
                        "amp_ssim": round(quality["amp_ssim"], 3),
                    }
                )
            for record in records:
                record = {"patterns": patterns, "n": 64, "batch": args.batch, **record}
                for key, value in list(record.items()):
                    if isinstance(value, float):
                        record[key] = round(value, 3)
                print(json.dumps(record) if args.json else describe(record), flush=True)
    return 0


def run_child(env, path, model_path, backend, mode, precision, groups, args) -> list[dict]:
    """One configuration in a fresh process: its three variants' records."""
    arguments = [path, model_path, backend, mode, args.batch, groups, precision, args.rounds]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, arguments)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    child = json.loads(out.stdout.strip().splitlines()[-1])
    times = child.pop("times")
    patterns = int(Path(path).stem.split("_")[1])
    common = {
        "translate": backend,
        "compile": mode,
        "precision": precision,
        "groups": groups,
        "groups_evaluated": child["groups_evaluated"],
    }
    rates = {variant: patterns / seconds for variant, seconds in times.items()}
    records = []
    for variant in ("reconstruct", "cnn_only", "model"):
        record = {
            **common,
            "variant": variant,
            "seconds": times[variant],
            "patterns_per_s": rates[variant],
        }
        if variant == "reconstruct":
            record.update(
                bound_fraction=rates["reconstruct"] / rates["cnn_only"],
                model_fraction=rates["reconstruct"] / rates["model"],
                import_s=child["import_s"],
                load_s=child["load_s"],
                first_s=child["first_s"],
                process_s=child["import_s"] + child["load_s"] + child["first_s"],
                peak_rss_mb=child["peak_rss_mb"],
                rss_increase_mb=child["rss_increase_mb"],
                traces=child["traces"],
            )
        records.append(record)
    return records


def describe(record: dict) -> str:
    name = f"{record['patterns']:>6} patterns  {record['translate']}+{record['compile']}"
    rate = f"{record['patterns_per_s']:,.0f} patterns/s"
    if record["translate"] == "iterative":
        return f"{name}: {rate}, {record['iterations']} its, amp SSIM {record['amp_ssim']}"
    line = (
        f"{name} {record['precision']} groups={record['groups']} {record['variant']}: "
        f"{rate} ({record['seconds']:.2f} s)"
    )
    if record["variant"] == "reconstruct":
        line += (
            f", {record['bound_fraction']:.2f} of the bound, start-up {record['process_s']:.1f} s "
            f"(import {record['import_s']:.1f}, load {record['load_s']:.1f}, first "
            f"{record['first_s']:.1f}), peak {record['peak_rss_mb']:,.0f} MB"
        )
    return line


if __name__ == "__main__":
    sys.exit(main())

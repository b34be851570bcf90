"""Reconstruction speed and memory of whole scans: model inference vs an iterative solver.

    python benchmarks/infer.py --json                   # 1,000 and 10,000 patterns, N = 64
    python benchmarks/infer.py --patterns 2000 --iterative-iterations 50

For each scan length a simulated scan (N = 64, grid, step N/8) is written to a
temporary file; each configuration then runs in a fresh process that loads it, builds
the default model (random weights: speed does not depend on them), compiles and warms
the predict function on the first batch, and reconstructs the whole scan (predict +
stitch, fixed batches). Reported: ``patterns_per_s``, ``peak_rss_mb`` (the process's
VmHWM), ``rss_increase_mb`` (VmHWM minus the resident memory before reconstructing) and
``traces`` (times the predict function was traced).

The iterative reference (``translate="iterative"``) is a vectorised
error-reduction ptychography solver in numpy with the known probe (every pattern's
exit wave is projected onto its measured modulus and the object is updated by the
probe-weighted average of the corrections), run for ``--iterative-iterations``
iterations on the same scan; ``patterns_per_s`` = patterns / total time. It also
reports the amplitude SSIM it reaches, for scale.
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

CONFIGS = (("xla", "jit"), ("xla", "graph"), ("legacy", "graph"))

CHILD = r"""
import json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
from ptycho.data import load_scan, normalisation_factor
from ptycho.inference import make_predict_fn, reconstruct
from ptycho.model import ModelConfig, build_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0

path, backend, mode, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
scan = load_scan(path)
model, _ = build_model(ModelConfig(n=scan.n), probe=scan.probe,
                       norm_factor=normalisation_factor(scan.diffraction),
                       translate_backend=backend)
predict = make_predict_fn(model, mode)
warm = scan.subset(np.arange(min(batch, scan.n_positions)))
reconstruct(model, warm, batch_size=batch, compile_mode=mode, backend=backend,
            predict_fn=predict, shape=scan.object.shape)
before = status("VmRSS")
start = time.perf_counter()
result = reconstruct(model, scan, batch_size=batch, compile_mode=mode, backend=backend,
                     predict_fn=predict)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "patterns_per_s": scan.n_positions / seconds,
                  "peak_rss_mb": status("VmHWM"), "rss_increase_mb": status("VmHWM") - before,
                  "traces": int(predict.experimental_get_tracing_count())}))
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
    parser.add_argument("--iterative-iterations", type=int, default=100)
    args = parser.parse_args(argv)

    from ptycho.data import save_scan, simulate
    from ptycho.inference import scan_region
    from ptycho.metrics import compare

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as folder:
        for patterns in args.patterns:
            scan = simulate(n=64, n_positions=patterns, step=0.125, probe="disk", seed=0)
            path = save_scan(scan, Path(folder) / f"scan_{patterns}.npz")
            records = []
            for backend, mode in CONFIGS:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), backend, mode, str(args.batch)],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                child = json.loads(out.stdout.strip().splitlines()[-1])
                records.append({"translate": backend, "compile": mode, **child})
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
                        record[key] = round(value, 2)
                if args.json:
                    print(json.dumps(record), flush=True)
                else:
                    extra = (
                        f", peak {record['peak_rss_mb']:,.0f} MB (+"
                        f"{record['rss_increase_mb']:,.0f}), traces {record['traces']}"
                        if "traces" in record
                        else f", {record['iterations']} iterations, amp SSIM {record['amp_ssim']}"
                    )
                    print(
                        f"{patterns:>6} patterns  {record['translate']}+{record['compile']}: "
                        f"{record['patterns_per_s']:,.0f} patterns/s{extra}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the warp backends, side by side in one process.

    python benchmarks/warp.py --json            # full grid, one JSON object per line
    python benchmarks/warp.py --batch 256 --n 64 --repeats 30

Each configuration is timed as the median over ``--rounds`` x ``--per-round`` calls
after warm-up (the first call traces and compiles), the configurations alternating
round by round. ``images_per_s = batch / median``. The three
configurations per op are xla+jit, xla+graph and legacy+graph (the legacy op has no
XLA kernel). ``forward_backward`` is the gradient of ``sum(out * cotangent)`` with
respect to the images (the legacy op has no gradient with respect to the transform).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ptycho.warp import projective_warp, translate  # noqa: E402

CONFIGS = (("xla", "jit"), ("xla", "graph"), ("legacy", "graph"))
# Reference: an XLA-compiled elementwise copy of the same images, the floor for any
# XLA op that reads and writes them once on this machine.
COPY = ("copy", "jit")


def make_inputs(op: str, batch: int, n: int, channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, (batch, n, n, channels)).astype(np.float32)
    cotangent = rng.normal(size=images.shape).astype(np.float32)
    if op == "translate":
        params = rng.uniform(-n / 4, n / 4, (batch, 2)).astype(np.float32)
    else:  # small rotation + scale + shift about the centre, a little perspective
        params = np.zeros((batch, 8), np.float32)
        for b in range(batch):
            angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.9, 1.1)
            c, s = scale * np.cos(angle), scale * np.sin(angle)
            centre = (n - 1) / 2
            params[b] = [
                c,
                -s,
                centre - c * centre + s * centre + rng.uniform(-4, 4),
                s,
                c,
                centre - s * centre - c * centre + rng.uniform(-4, 4),
                rng.uniform(-1e-4, 1e-4),
                rng.uniform(-1e-4, 1e-4),
            ]
    return tf.constant(images), tf.constant(params), tf.constant(cotangent)


def make_fn(op: str, backend: str, compile_mode: str, pass_: str):
    def forward(images, params):
        if op == "translate":
            return translate(images, params, backend=backend)
        return projective_warp(images, params, backend=backend)

    if pass_ == "forward":
        fn = forward
    else:

        def fn(images, params, cotangent):
            with tf.GradientTape() as tape:
                tape.watch(images)
                loss = tf.reduce_sum(forward(images, params) * cotangent)
            return tape.gradient(loss, images)

    return tf.function(fn, jit_compile=(compile_mode == "jit"))


def time_interleaved(fns: dict, args, rounds: int, per_round: int) -> dict:
    """Median seconds per call of each function, timed in alternating rounds.

    Alternating the backends round by round spreads the noise of a shared machine
    evenly over them, so their ratio is steadier than either absolute figure.
    """
    for fn in fns.values():  # trace + compile, then one warm call
        fn(*args).numpy()
        fn(*args).numpy()
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn(*args).numpy()
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(value) for key, value in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--op", nargs="+", default=["translate", "projective"])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--pass", dest="passes", nargs="+", default=["forward", "forward_backward"])
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--per-round", type=int, default=5, help="calls per round")
    args = parser.parse_args(argv)

    if not args.json:
        print(
            f"{'op':<11}{'pass':<17}{'batch':>6}{'n':>5}  "
            + "".join(f"{b + '+' + c:>14}" for b, c in CONFIGS)
            + "  xla+jit/legacy"
            + f"{'xla copy':>12}"
        )
    for op in args.op:
        for pass_ in args.passes:
            for n in args.n:
                for batch in args.batch:
                    images, params, cotangent = make_inputs(op, batch, n, args.channels)
                    inputs = (images, params) if pass_ == "forward" else (images, params, cotangent)
                    fns = {c: make_fn(op, c[0], c[1], pass_) for c in CONFIGS}
                    if pass_ == "forward" and op == "translate":
                        fns[COPY] = tf.function(lambda x, p: x * 1.0 + 0.0, jit_compile=True)
                    medians = time_interleaved(fns, inputs, args.rounds, args.per_round)
                    rates = {key: batch / median for key, median in medians.items()}
                    for (backend, compile_mode), median in medians.items():
                        if args.json:
                            print(
                                json.dumps(
                                    {
                                        "op": "copy" if backend == "copy" else op,
                                        "backend": backend,
                                        "compile": compile_mode,
                                        "pass": pass_,
                                        "batch": batch,
                                        "n": n,
                                        "channels": args.channels,
                                        "images_per_s": round(batch / median, 1),
                                        "median_ms": round(1e3 * median, 4),
                                    }
                                ),
                                flush=True,
                            )
                    if not args.json:
                        ratio = rates[("xla", "jit")] / rates[("legacy", "graph")]
                        copy = f"{rates[COPY]:>12,.0f}" if COPY in rates else ""
                        print(
                            f"{op:<11}{pass_:<17}{batch:>6}{n:>5}  "
                            + "".join(f"{rates[c]:>14,.0f}" for c in CONFIGS)
                            + f"  {ratio:>13.2f}x"
                            + copy,
                            flush=True,
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Samples/s of a full training step, backends side by side in one process.

    python benchmarks/train_step.py --json                      # full grid
    python benchmarks/train_step.py --gridsize 2 --n 64 --batch 16

A step is forward, Poisson loss, backward and Adam (``model.train_on_batch`` of the
compiled model) on one fixed batch of a simulated scan. Configurations: xla+jit,
xla+graph, legacy+graph, and ``variant="cnn_only"`` (jit and graph): the same network
with the physics and warp removed, the lower bound of the step time in each mode. The
configurations of a cell are timed in alternating rounds after warm-up; the figure is
the median.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402

from ptycho.data import group_positions, make_dataset, normalisation_factor, simulate  # noqa: E402
from ptycho.model import ModelConfig, build_cnn_only, build_model, compile_model  # noqa: E402

CONFIGS = (
    ("xla", "jit", "full"),
    ("xla", "graph", "full"),
    ("legacy", "graph", "full"),
    ("xla", "jit", "cnn_only"),
    ("xla", "graph", "cnn_only"),
)


def batch_for(n: int, gridsize: int, batch: int):
    scan = simulate(n=n, n_positions=max(64, batch * 2), step=0.125, seed=0)
    groups = group_positions(scan.xcoords, scan.ycoords, gridsize)
    factor = normalisation_factor(scan.diffraction)
    dataset = make_dataset(scan, groups, norm_factor=factor, batch_size=batch, shuffle=False)
    inputs, target = next(iter(dataset))
    return scan, factor, inputs, target


def make_model(config: ModelConfig, scan, factor, backend, mode, variant):
    keras.utils.set_random_seed(0)
    if variant == "cnn_only":
        model = build_cnn_only(config, norm_factor=factor)
    else:
        model, _ = build_model(
            config, probe=scan.probe, norm_factor=factor, translate_backend=backend
        )
    return compile_model(model, mode)


def time_cell(models: dict, inputs, target, rounds: int, per_round: int) -> dict:
    for model in models.values():  # trace, compile, warm up
        for _ in range(3):
            model.train_on_batch(_inputs_for(model, inputs), target)
    times = {key: [] for key in models}
    for _ in range(rounds):
        for key, model in models.items():
            x = _inputs_for(model, inputs)
            for _ in range(per_round):
                start = time.perf_counter()
                model.train_on_batch(x, target)
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(value) for key, value in times.items()}


def _inputs_for(model, inputs):
    names = {tensor.name.split(":")[0] for tensor in model.inputs}
    return {key: value for key, value in inputs.items() if key in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--gridsize", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--filters", type=int, default=16, help="model.filters (the default)")
    parser.add_argument(
        "--precision", nargs="+", default=["float32"], choices=["float32", "bfloat16"]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=4)
    args = parser.parse_args(argv)

    if not args.json:
        names = [f"{b}+{c}" if v == "full" else f"cnn_only+{c}" for b, c, v in CONFIGS]
        header = "".join(f"{name:>16}" for name in names)
        print(f"{'g':>2}{'n':>5}{'batch':>6}{'precision':>10}{header}  jit/legacy  graph/legacy")
    for gridsize, n, batch in itertools.product(args.gridsize, args.n, args.batch):
        scan, factor, inputs, target = batch_for(n, gridsize, batch)
        for precision in args.precision:
            config = ModelConfig(n=n, gridsize=gridsize, filters=args.filters, precision=precision)
            models = {c: make_model(config, scan, factor, *c) for c in CONFIGS}
            medians = time_cell(models, inputs, target, args.rounds, args.per_round)
            rates = {key: batch / value for key, value in medians.items()}
            for (backend, mode, variant), median in medians.items():
                if args.json:
                    print(
                        json.dumps(
                            {
                                "translate": backend if variant == "full" else "none",
                                "compile": mode,
                                "variant": variant,
                                "gridsize": gridsize,
                                "n": n,
                                "batch": batch,
                                "filters": args.filters,
                                "precision": precision,
                                "samples_per_s": round(batch / median, 1),
                                "step_ms_median": round(1e3 * median, 2),
                            }
                        ),
                        flush=True,
                    )
            if not args.json:
                jit, graph, legacy = (rates[c] for c in CONFIGS[:3])
                cells = "".join(f"{rates[c]:>16,.1f}" for c in CONFIGS)
                print(
                    f"{gridsize:>2}{n:>5}{batch:>6}{precision:>10}{cells}  {jit / legacy:>9.2f}x"
                    f"  {graph / legacy:>11.2f}x",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time and peak memory against the number of patterns: training, inference and
refinement of streamed HDF5 scans (docs/large-scans.md).

    python benchmarks/scale.py --json                        # 1e3 .. 1e6 patterns, N 64
    python benchmarks/scale.py --patterns 1000 10000 --json
    python benchmarks/scale.py --compare 10000 --json        # in memory vs streamed
    python benchmarks/scale.py --plot benchmarks/results/scale_cpu.jsonl

Each scan is simulated straight into an HDF5 file a block at a time (the generator
itself stays within memory): a random smooth complex object, the project's aberrated
probe, positions on a raster of ``--step`` pixels (4 px: PtychoPINN's dense grid, which
keeps the object of 1e6 positions at 4,000 x 4,000 pixels), noiseless patterns of 1e6
photons. Each task runs in a fresh process, which reports its wall time and its peak
resident memory (VmHWM, the whole process: Python, TensorFlow, the model):

``train``
    Three calls of ``--train-steps`` steps of a training epoch (batch 16, 2 x 2 groups,
    the default model, ``compile=jit``), after the epoch's setup (grouping,
    normalisation, the first window); the epoch's time is extrapolated from the steps'
    rate (``model.fit`` as train.py runs it, the input pipeline included; the median of
    the calls that kept the cores busy, :func:`spread_calls`), since a full epoch of
    1e6 groups takes hours on a CPU.
``infer``
    A whole reconstruction (``infer.groups=tile``: each position predicted once; an
    untrained network of the default size: the cost does not depend on the weights).
``refine``
    ``refine=object``: setup (the probe's count scale), one iteration and the final
    evaluation pass (``--refine-batch``: ``refine.batch_size``, default 64).

``--compare M`` runs each task on one scan of M patterns with the patterns in memory
and streamed, alternately, ``--repeats`` times, and reports the median ratio. Inference
and refinement alternate fresh processes; training alternates the two datasets feeding
one compiled model in one process (``--compile``: graph, the CPU default, and jit), and
its medians count only the calls that kept the machine's cores busy (each call reports
``cores_busy``; docs/benchmarks.md says why).

``--workers M`` runs inference and refinement (``refine=object``, ``--iterations``) on
one scan of M patterns by 1 and by 2 worker processes on localhost
(``MultiWorkerMirroredStrategy``, as ``infer.py distribute=multiworker``), with the same
batch per worker (2 workers: a global minibatch twice as large, half the steps), and
reports time and quality against the simulated object (amplitude SSIM, R-factor), and
the largest difference of the two objects.

``--entry-points M`` runs the applications themselves on a scan of M patterns, each in
a fresh process whose peak resident memory is read when it ends: ``train.py`` (one
epoch of ``data.n_groups=3200`` groups drawn from the whole scan, scored on a small
test scan), ``infer.py`` with that model (``reconstruct.groups=tile``), and ``infer.py
refine=object refine.iterations=1``; ``--scan PATH`` reuses a scan file.

``--quality EPOCHS`` trains the default run's network on the default simulated scans
written to HDF5, read in memory and streamed (``data.stream=false|true``), for EPOCHS
epochs each, and reports the test reconstruction's quality: the streamed batches' order
(shuffled windows of neighbouring groups) against a full permutation per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = ("train", "infer", "refine")
TRAIN_CALLS = 3  # timed model.fit calls of --train-steps steps each (train task)
PHOTONS = 1e6


def peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# --------------------------------------------------------------------------------------
# The scan, written a block at a time
# --------------------------------------------------------------------------------------


def write_scan(path: Path, m: int, n: int, step: float, seed: int = 0) -> None:
    """A scan of ``m`` patterns of ``n`` x ``n`` in the project's HDF5 format, simulated
    and written 4,096 patterns at a time."""
    import h5py

    from ptycho import __version__
    from ptycho.data.simulate import make_probe

    side = int(np.ceil(np.sqrt(m)))
    rows = int(np.ceil(m / side))
    size = (int(rows * step + n + 2), int(side * step + n + 2))
    rng = np.random.default_rng(seed)
    # A smooth random object: low-passed noise in amplitude and phase.
    fy, fx = np.fft.fftfreq(size[0])[:, None], np.fft.rfftfreq(size[1])[None, :]
    lowpass = np.exp(-(fx**2 + fy**2) / (2 * 0.02**2)).astype(np.float32)
    fields = []
    for _ in range(2):
        noise = rng.standard_normal(size, dtype=np.float32)
        smooth = np.fft.irfft2(np.fft.rfft2(noise) * lowpass, s=size).astype(np.float32)
        fields.append((smooth - smooth.mean()) / (smooth.std() + 1e-12))
    obj = (0.6 + 0.2 * np.tanh(fields[0])) * np.exp(0.5j * np.tanh(fields[1]))
    obj = obj.astype(np.complex64)
    del fields
    probe = make_probe(n).astype(np.complex64)
    index = np.arange(m)
    x = n / 2 + 1 + step * (index % side)
    y = n / 2 + 1 + step * (index // side)
    scale = None
    with h5py.File(path, "w") as handle:
        handle.attrs["format"] = "ptychopinn-xla scan"
        handle.attrs["ptycho_version"] = __version__
        handle.attrs["nphotons"] = PHOTONS
        handle.attrs["seed"] = seed
        handle.attrs["source"] = f"benchmarks/scale.py: {m} patterns, step {step}"
        data = handle.create_dataset("diff3d", (m, n, n), np.float32, chunks=(64, n, n))
        rows_, cols_ = np.arange(n)[None, :, None], np.arange(n)[None, None, :]
        for start in range(0, m, 1024):
            block = slice(start, min(start + 1024, m))
            top = np.round(y[block] - n / 2).astype(np.int64)[:, None, None]
            left = np.round(x[block] - n / 2).astype(np.int64)[:, None, None]
            patches = obj[top + rows_, left + cols_]
            far = np.fft.fftshift(np.fft.fft2(patches * probe), axes=(1, 2))
            intensity = (far.real**2 + far.imag**2).astype(np.float32)
            if scale is None:
                scale = PHOTONS / float(intensity.sum(axis=(1, 2)).mean())
            data[block] = np.sqrt(intensity * scale)
        for name, values in (("xcoords", x), ("ycoords", y)):
            handle.create_dataset(name, data=values)
        handle.create_dataset("probeGuess", data=probe)
        handle.create_dataset("objectGuess", data=obj)


# --------------------------------------------------------------------------------------
# The tasks, each in a process of its own
# --------------------------------------------------------------------------------------


def child(task: str, path: str, stream: bool, steps: int, refine_batch: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from ptycho.data import load_scan
    from ptycho.data.prepare import PrepareOptions
    from ptycho.model import ModelConfig, build_model

    started = time.perf_counter()
    scan = load_scan(path, options=PrepareOptions(stream=stream))
    record = {"load_s": time.perf_counter() - started, "streamed": scan.streamed}
    keras.utils.set_random_seed(0)
    config = ModelConfig(n=scan.n).resolved("jit")
    if task == "train":
        record.update(_train(scan, config, steps))
    elif task == "infer":
        from ptycho.data.pipeline import normalisation_factor
        from ptycho.inference import reconstruct

        factor = normalisation_factor(scan.diffraction)
        model, _ = build_model(config, probe=scan.probe, norm_factor=factor)
        since, begin = os.times(), time.perf_counter()
        result = reconstruct(model, scan, compile_mode="jit", batch_size=64, groups="tile")
        seconds = time.perf_counter() - begin
        record.update(seconds=seconds, groups=result.groups, cores_busy=cpu_use(since, seconds))
    else:
        from ptycho.refine import RefineOptions, Refiner

        since, begin = os.times(), time.perf_counter()
        options = RefineOptions(mode="object", iterations=1, eval_every=1, batch_size=refine_batch)
        refiner = Refiner(scan, options)
        result = refiner.run()
        seconds = time.perf_counter() - begin
        record.update(
            seconds=seconds,
            cores_busy=cpu_use(since, seconds),
            r_factor=result.r_factor,
            batch_size=refine_batch,
            dense=refiner.dense,
        )
    record["peak_rss_mb"] = peak_mb()
    return record


def _train(scan, config, steps: int) -> dict:
    from ptycho.data import make_dataset
    from ptycho.data.grouping import group_positions
    from ptycho.data.pipeline import normalisation_factor
    from ptycho.model import build_model, compile_model

    batch = 16
    begin = time.perf_counter()
    groups = group_positions(scan.xcoords, scan.ycoords, config.gridsize)
    factor = normalisation_factor(scan.diffraction)
    model, _ = build_model(config, probe=scan.probe, norm_factor=factor)
    compile_model(model, "jit")
    dataset = make_dataset(
        scan, groups, norm_factor=factor, batch_size=batch, drop_remainder=True, epochs=None
    )
    model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)  # trace and compile
    setup = time.perf_counter() - begin
    epoch_steps = len(groups) // batch
    steps = min(steps, epoch_steps)
    calls = []
    for _ in range(TRAIN_CALLS):  # as train.py trains
        since, tick = os.times(), time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
        seconds = time.perf_counter() - tick
        calls.append(
            {"samples_per_s": batch * steps / seconds, "cores_busy": cpu_use(since, seconds)}
        )
    rate = statistics.median(c["samples_per_s"] for c in spread_calls(calls))
    return {
        "seconds": setup + epoch_steps * batch / rate,
        "setup_s": setup,
        "steps_timed": steps,
        "epoch_steps": epoch_steps,
        "samples_per_s": rate,
        "calls": calls,
        "extrapolated": steps < epoch_steps,
    }


def spread_calls(calls: list[dict]) -> list[dict]:
    """The calls that kept the cores about as busy as the busiest did (within 5%). On a
    machine whose scheduler now and then runs the compute threads of a whole call on one
    core (docs/benchmarks.md) the others run at a fixed lower rate whatever is measured."""
    busiest = max(c["cores_busy"] for c in calls)
    return [c for c in calls if c["cores_busy"] >= 0.95 * busiest]


def cpu_use(since: os.times_result, seconds: float) -> float:
    """Cores this process kept busy on average since ``since`` (user + system time over
    wall time)."""
    now = os.times()
    return (now.user + now.system - since.user - since.system) / seconds


def train_pair(path: str, steps: int, rounds: int, mode: str) -> list[dict]:
    """Training in memory and streamed side by side in one process: one model, its
    steps compiled once, ``rounds`` rounds of ``steps`` steps fed by each dataset in
    turn (the one that goes first alternates). Each call reports its rate and the cores
    the process kept busy (see ``_compare``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from ptycho.data import load_scan, make_dataset
    from ptycho.data.grouping import group_positions
    from ptycho.data.pipeline import normalisation_factor
    from ptycho.data.prepare import PrepareOptions
    from ptycho.model import ModelConfig, build_model, compile_model

    batch, datasets = 16, {}
    for stream in (False, True):
        scan = load_scan(path, options=PrepareOptions(stream=stream))
        config = ModelConfig(n=scan.n).resolved(mode)
        groups = group_positions(scan.xcoords, scan.ycoords, config.gridsize)
        factor = normalisation_factor(scan.diffraction)
        datasets[stream] = make_dataset(
            scan, groups, norm_factor=factor, batch_size=batch, drop_remainder=True, epochs=None
        )
    keras.utils.set_random_seed(0)
    model, _ = build_model(config, probe=scan.probe, norm_factor=factor)
    compile_model(model, mode)
    for dataset in datasets.values():  # trace, compile, start each pipeline once
        model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)
    records = []
    for round_ in range(rounds):
        for stream in (False, True) if round_ % 2 == 0 else (True, False):
            since, tick = os.times(), time.perf_counter()
            model.fit(datasets[stream], epochs=1, steps_per_epoch=steps, verbose=0)
            seconds = time.perf_counter() - tick
            records.append(
                {
                    "streamed": stream,
                    "compile": mode,
                    "round": round_,
                    "steps": steps,
                    "samples_per_s": batch * steps / seconds,
                    "cores_busy": cpu_use(since, seconds),
                }
            )
    return records


def worker_child(task: str, path: str, iterations: int, out: str) -> dict:
    """One worker of ``--workers``: the cluster from TF_CONFIG (none: one worker)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from ptycho.distribute import DistributeOptions, make_distribution

    multi = bool(os.environ.get("TF_CONFIG"))
    distribution = make_distribution(DistributeOptions(strategy="multiworker" if multi else "none"))
    import keras

    from ptycho.data import load_scan
    from ptycho.scoring import Scorer

    scan = load_scan(path)
    keras.utils.set_random_seed(0)
    begin = time.perf_counter()
    if task == "infer":
        from ptycho.data.pipeline import normalisation_factor
        from ptycho.inference import reconstruct
        from ptycho.model import ModelConfig, build_model

        factor = normalisation_factor(scan.diffraction)
        model, _ = build_model(
            ModelConfig(n=scan.n).resolved("jit"), probe=scan.probe, norm_factor=factor
        )
        begin = time.perf_counter()
        result = reconstruct(
            model,
            scan,
            compile_mode="jit",
            groups="tile",
            align_phase=False,  # each share aligned as a whole otherwise (docs/large-scans.md)
            distribution=distribution,
        )
    else:
        from ptycho.refine import RefineOptions, Refiner

        options = RefineOptions(mode="object", iterations=iterations, eval_every=iterations)
        result = Refiner(scan, options, distribution=distribution).run()
    seconds = time.perf_counter() - begin
    metrics = Scorer(scan).score(result)
    if distribution.chief:
        np.save(out, result.obj)
    return {
        "seconds": seconds,
        "r_factor": metrics["r_factor"],
        "amp_ssim": metrics.get("amp_ssim"),
        "phase_ssim": metrics.get("phase_ssim"),
        "worker": distribution.worker,
        "peak_rss_mb": peak_mb(),
    }


def run_workers(task: str, path: Path, count: int, iterations: int, folder: Path) -> dict:
    """``task`` by ``count`` local worker processes; the chief's record."""
    import socket

    ports = []
    for _ in range(count):
        with socket.socket() as probe:
            probe.bind(("localhost", 0))
            ports.append(probe.getsockname()[1])
    cluster = [f"localhost:{port}" for port in ports]
    out = folder / f"obj_{task}_{count}.npy"
    processes = []
    for worker in range(count):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
        if count > 1:
            config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": worker}}
            env["TF_CONFIG"] = json.dumps(config)
        command = [sys.executable, __file__, "--worker-child", task, str(path), str(iterations)]
        processes.append(
            subprocess.Popen(
                [*command, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [process.communicate() for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"{task} on {count} workers failed:\n{stderr[-3000:]}")
    record = json.loads(outputs[0][0].strip().splitlines()[-1])
    record["object"] = str(out)
    return record


ENTRY_POINTS = {
    "train.py": [
        "train.py",
        "data=npz",
        "data.n_groups=3200",
        "train.epochs=1",
        "train.max_minutes=null",
        "reconstruct.groups=tile",
    ],
    "infer.py": ["infer.py", "data=npz", "reconstruct.groups=tile"],
    "infer.py refine=object": [
        "infer.py",
        "data=npz",
        "refine=object",
        "refine.iterations=1",
    ],
}
MEASURE = """
import resource, subprocess, sys, time
begin = time.perf_counter()
code = subprocess.call(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"{code} {time.perf_counter() - begin} {peak}")
"""


def _entry_points(path: Path, m: int, args, folder: Path) -> None:
    test = folder / "test.h5"
    write_scan(test, 1600, args.n, args.step, seed=1)
    model = folder / "runs" / "train" / "model.keras"
    for name, command in ENTRY_POINTS.items():
        run_dir = folder / "runs" / ("refine" if "refine" in name else name.split(".")[0])
        extra = [f"data.path={path}", f"hydra.run.dir={run_dir}"]
        if name == "train.py":
            extra.append(f"data.test_path={test}")
        elif "refine" not in name:
            extra.append(f"checkpoint={model}")
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, sys.executable, *command, *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        code, seconds, peak = result.stdout.split()[-3:]
        if int(code) != 0:
            raise RuntimeError(f"{name} on {path} failed:\n{result.stderr[-3000:]}")
        emit(
            {
                "kind": "entry",
                "command": name,
                "patterns": m,
                "seconds": float(seconds),
                "peak_rss_mb": float(peak),
            },
            args.json,
        )


def _quality(epochs: int, args, folder: Path) -> None:
    from ptycho.data import load_scans, save_scan
    from ptycho.data.sources import DataOptions

    scans = load_scans(DataOptions())
    paths = [
        save_scan(scan, folder / f"{name}.h5")
        for name, scan in (("train", scans.train), ("test", scans.test))
    ]
    for stream in ("false", "true"):
        run_dir = folder / f"quality_{stream}"
        command = [
            sys.executable,
            "train.py",
            "data=npz",
            f"data.path={paths[0]}",
            f"data.test_path={paths[1]}",
            f"data.stream={stream}",
            f"train.epochs={epochs}",
            "train.max_minutes=null",
            f"train.seed={args.seed}",
            f"hydra.run.dir={run_dir}",
        ]
        begin = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"train.py data.stream={stream} failed:\n{result.stderr[-3000:]}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        emit(
            {
                "kind": "quality",
                "stream": stream == "true",
                "seed": args.seed,
                "epochs": metrics["epochs"],
                "steps": metrics.get("steps"),
                "wall_s": time.perf_counter() - begin,
                **{
                    key: metrics.get(key)
                    for key in (
                        "samples_per_s",
                        "r_factor",
                        "amp_ssim",
                        "phase_ssim",
                        "amp_psnr",
                        "phase_rmse",
                    )
                },
            },
            args.json,
        )


def run_child(task: str, path: Path, stream: bool, steps: int, refine_batch: int = 64) -> dict:
    command = [sys.executable, __file__, "--child", task, str(path), str(int(stream))]
    result = subprocess.run(
        [*command, str(steps), str(refine_batch)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{task} on {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def emit(record: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record), flush=True)
        return
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
        flush=True,
    )


def plot(path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("kind") == "scale"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    key = lambda r: (r["task"], r.get("batch_size"), r.get("cpu"))  # noqa: E731
    for task, batch, cpu in sorted({key(r) for r in records}, key=str):
        rows = sorted(
            (r for r in records if key(r) == (task, batch, cpu)), key=lambda r: r["patterns"]
        )
        notes = [f"batch {batch}"] * (batch not in (None, 64)) + [cpu] * (cpu is not None)
        label = f"{task} ({', '.join(notes)})" if notes else task
        m = [r["patterns"] for r in rows]
        left.loglog(m, [r["seconds"] for r in rows], "o-", label=label)
        right.semilogx(m, [r["peak_rss_mb"] / 1024 for r in rows], "o-", label=label)
    if records:
        m = np.array(sorted({r["patterns"] for r in records}), float)
        left.loglog(m, m / m[0] * 10, "k:", label="linear")
    left.set(xlabel="patterns (N 64)", ylabel="seconds", title="time")
    right.axhline(3.0, color="r", ls="--", label="3 GB target")
    right.set(xlabel="patterns (N 64)", ylabel="peak RSS (GB)", title="memory", ylim=(0, None))
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--patterns", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000]
    )
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--step", type=float, default=4.0, help="raster step, pixels")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--compare", type=int, help="in memory vs streamed at this size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="where the scans go (default: a temp folder)")
    parser.add_argument(
        "--keep",
        type=Path,
        help="a folder whose scans (these patterns, --n, --step) are reused, or written and kept",
    )
    parser.add_argument("--plot", type=Path, help="plot a results file (.jsonl) to .png")
    parser.add_argument("--workers", type=int, help="1 vs 2 local workers at this size")
    parser.add_argument("--entry-points", type=int, help="train.py, infer.py at this size")
    parser.add_argument("--scan", type=Path, help="an existing scan file (--entry-points)")
    parser.add_argument("--quality", type=int, help="default run in memory vs streamed, epochs")
    parser.add_argument("--seed", type=int, default=0, help="train.seed (--quality)")
    parser.add_argument("--iterations", type=int, default=10, help="refinement (--workers)")
    parser.add_argument(
        "--refine-batch", type=int, default=64, help="refine.batch_size of the refine task"
    )
    parser.add_argument(
        "--compile",
        nargs="+",
        choices=("graph", "jit"),
        default=["graph", "jit"],
        help="training's compile modes (--compare)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--train-pair", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--worker-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_child:
        task, path, iterations, out = args.worker_child
        print(json.dumps(worker_child(task, path, int(iterations), out)), flush=True)
        return 0
    if args.train_pair:
        path, steps, rounds, mode = args.train_pair
        print(json.dumps(train_pair(path, int(steps), int(rounds), mode)), flush=True)
        return 0
    if args.child:
        task, path, stream, steps, *batch = args.child
        record = child(task, path, bool(int(stream)), int(steps), int(batch[0]) if batch else 64)
        print(json.dumps(record), flush=True)
        return 0
    if args.plot:
        plot(args.plot, args.plot.with_suffix(".png"))
        return 0
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        if args.quality:
            _quality(args.quality, args, Path(folder))
            return 0
        single = args.compare or args.workers or args.entry_points
        sizes = [single] if single else args.patterns
        for m in sizes:
            if args.scan:
                _entry_points(args.scan, m, args, Path(folder))
                break
            path = (args.keep or Path(folder)) / f"scan_{m}_n{args.n}_step{args.step:g}.h5"
            if not (args.keep and path.exists()):
                begin = time.perf_counter()
                write_scan(path, m, args.n, args.step)
                emit(
                    {
                        "kind": "scan",
                        "patterns": m,
                        "n": args.n,
                        "file_gb": round(path.stat().st_size / 1e9, 3),
                        "write_s": round(time.perf_counter() - begin, 1),
                        "writer_peak_rss_mb": round(peak_mb(), 1),
                    },
                    args.json,
                )
            if args.workers:
                _workers(path, args, Path(folder))
            elif args.entry_points:
                _entry_points(path, m, args, Path(folder))
            else:
                _run_tasks(path, m, args)
            if not args.keep:
                path.unlink()
    return 0


def _run_tasks(path: Path, m: int, args) -> None:
    for task in args.tasks:
        if args.compare:
            _compare(task, path, m, args)
            continue
        record = run_child(task, path, True, args.train_steps, args.refine_batch)
        record = {"kind": "scale", "task": task, "patterns": m, "n": args.n, **record}
        emit({**record, "cpu": cpu_name()}, args.json)


def _workers(path: Path, args, folder: Path) -> None:
    for task in ("infer", "refine"):
        records = {
            count: run_workers(task, path, count, args.iterations, folder) for count in (1, 2)
        }
        objects = {count: np.load(record.pop("object")) for count, record in records.items()}
        scale = float(np.abs(objects[1]).max())
        for count, record in records.items():
            emit(
                {
                    "kind": "workers",
                    "task": task,
                    "patterns": args.workers,
                    "workers": count,
                    **record,
                },
                args.json,
            )
        emit(
            {
                "kind": "workers_compare",
                "task": task,
                "patterns": args.workers,
                "speedup": records[1]["seconds"] / records[2]["seconds"],
                "amp_ssim_change": (records[2]["amp_ssim"] or 0) - (records[1]["amp_ssim"] or 0),
                "r_factor_ratio": records[2]["r_factor"] / records[1]["r_factor"],
                "max_object_difference": float(np.abs(objects[2] - objects[1]).max()) / scale,
            },
            args.json,
        )


def _compare(task: str, path: Path, m: int, args) -> None:
    if task == "train":
        for mode in args.compile:
            _compare_training(path, m, mode, args)
        return
    rates = {False: [], True: []}
    for _ in range(args.repeats):
        for stream in (False, True):
            record = run_child(task, path, stream, args.train_steps)
            # training: the steps' rate (the epoch's setup is the same either way)
            rates[stream].append(
                16 / record["samples_per_s"] if task == "train" else record["seconds"]
            )
            emit({"kind": "run", "task": task, "patterns": m, **record}, args.json)
    memory, streamed = (statistics.median(rates[s]) for s in (False, True))
    emit(
        {
            "kind": "compare",
            "task": task,
            "patterns": m,
            "memory_s": memory,
            "streamed_s": streamed,
            "streamed_over_memory": streamed / memory,
            "repeats": args.repeats,
        },
        args.json,
    )


def _compare_training(path: Path, m: int, mode: str, args) -> None:
    """Training's rate in memory and streamed, from :func:`train_pair` in a process of
    its own (:func:`training_ratio`)."""
    command = [sys.executable, __file__, "--train-pair", str(path)]
    result = subprocess.run(
        [*command, str(args.train_steps), str(args.repeats), mode],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"training in memory and streamed failed:\n{result.stderr[-3000:]}")
    records = json.loads(result.stdout.strip().splitlines()[-1])
    for record in records:
        emit({"kind": "run", "task": "train", "patterns": m, **record}, args.json)
    row = {"kind": "compare", "task": "train", "patterns": m, **training_ratio(records)}
    emit({**row, "cpu": cpu_name()}, args.json)


def training_ratio(records: list[dict]) -> dict:
    """The ``compare`` row of :func:`train_pair`'s calls: the median rates of the calls
    that kept the cores busy (:func:`spread_calls`), and of all calls (a call on one
    core runs at a fixed lower rate whichever dataset feeds it; counted in, such calls
    decide the ratio by chance)."""
    spread = spread_calls(records)

    def median(rows, stream):
        rates = [r["samples_per_s"] for r in rows if r["streamed"] == stream]
        return statistics.median(rates) if rates else None

    memory, streamed = median(spread, False), median(spread, True)
    return {
        "compile": records[0]["compile"],
        # seconds per step (batch 16), as the other tasks' rows give seconds
        "memory_s": 16 / memory if memory else None,
        "streamed_s": 16 / streamed if streamed else None,
        "streamed_over_memory": memory / streamed if memory and streamed else None,
        "all_calls_ratio": median(records, False) / median(records, True),
        "repeats": len(records) // 2,
        "calls_spread": {
            "memory": sum(not r["streamed"] for r in spread),
            "streamed": sum(r["streamed"] for r in spread),
        },
    }


if __name__ == "__main__":
    sys.exit(main())

"""What the machine offers, and compiling for it: the compile mode of each stage, the
precision of the network, one way of wrapping a function for a compile mode.

``compile=auto`` (the default) and ``model.precision=auto`` pick per device what was
measured fastest (``benchmarks/results/train_step_cpu.jsonl`` for the network,
``benchmarks/results/refine_cpu.jsonl`` for the refinement; docs/benchmarks.md): on a
GPU XLA everywhere; on a CPU oneDNN's graph for the network (its convolutions beat
XLA's CPU backend, and run bfloat16 natively on CPUs with AVX512-BF16 or AMX) and XLA
for the refinement (gathers, warp and FFT with no convolution). :func:`pipelined` runs
the next item of a loop on a thread while the caller uses this one (prediction beside
stitching, reading beside refining).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

__all__ = [
    "CompileMode",
    "CompileOptions",
    "CompileStages",
    "compile_hint",
    "compiled",
    "cpu_flags",
    "has_gpu",
    "native_bfloat16",
    "resolve_compile",
    "resolve_precision",
    "run_mode",
]

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class CompileMode(StrEnum):
    """How compiled functions run: ``jit`` XLA (``jit_compile=True``, verified on);
    ``graph`` ``tf.function`` without XLA; ``eager`` op by op, for debugging; ``auto`` per
    device and stage (:func:`resolve_compile`)."""

    auto = "auto"
    jit = "jit"
    graph = "graph"
    eager = "eager"


@dataclass
class CompileOptions:
    """The ``compile`` section."""

    mode: CompileMode = CompileMode.auto
    """``auto`` (per device and stage, logged and recorded as ``compile_stages``), or
    ``jit``, ``graph``, ``eager`` for every stage. ``jit`` always means XLA everywhere."""


@dataclass(frozen=True)
class CompileStages:
    """The compile mode of each stage of a run (never ``auto``)."""

    train: str
    reconstruct: str
    refine: str

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags Linux reports (empty where it reports none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bfloat16(compile_mode: str, flags: set[str] | None = None) -> bool:
    """True when the network's convolutions run bfloat16 natively on this machine under
    ``compile_mode`` (``flags``: the CPU's, read from /proc/cpuinfo when None): GPUs of
    compute capability 8.0 and newer; CPUs with AVX512-BF16 or AMX-BF16 under oneDNN
    (``graph``, ``eager``). XLA's CPU convolutions (``jit``) have no native bfloat16."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get(
            "compute_capability", (0, 0)
        )
        return tuple(capability) >= (8, 0)
    if compile_mode == CompileMode.jit:
        return False
    return bool((cpu_flags() if flags is None else flags) & set(BF16_CPU_FLAGS))


def resolve_precision(precision: str, compile_mode: str, flags: set[str] | None = None) -> str:
    """``"auto"`` -> ``"bfloat16"`` where :func:`native_bfloat16`, else ``"float32"``;
    other values unchanged."""
    if precision != "auto":
        return str(precision)
    return "bfloat16" if native_bfloat16(compile_mode, flags) else "float32"


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_compile(mode: str, backend: str = "xla", gpu: bool | None = None) -> CompileStages:
    """The compile mode of each stage for ``compile=<mode>``.

    A mode other than ``"auto"`` applies to every stage. ``"auto"``: on a GPU ``jit``
    everywhere (XLA fuses the whole step and calls cuDNN); on a CPU ``graph`` for the
    network's training and reconstruction and ``jit`` for the refinement (module
    docstring). With ``translate=legacy`` nothing is ``jit`` (the legacy op has no XLA
    kernel). ``"auto"`` is logged with what it chose.
    """
    if mode != CompileMode.auto:
        return CompileStages(str(mode), str(mode), str(mode))
    xla = "jit" if backend == "xla" else "graph"
    on_gpu = has_gpu() if gpu is None else gpu
    stages = CompileStages(xla, xla, xla) if on_gpu else CompileStages("graph", "graph", xla)
    chosen = ", ".join(f"{stage} {choice}" for stage, choice in stages.as_dict().items())
    log.info("compile=auto on %s: %s", "a GPU" if on_gpu else "a CPU", chosen)
    return stages


def compiled(function: Callable, mode: str) -> Callable:
    """``function`` as it runs under ``mode``: as is (``eager``), a ``tf.function``
    (``graph``) or an XLA-compiled ``tf.function`` (``jit``); AutoGraph off (the project's
    compiled functions have no Python control flow on tensors)."""
    import tensorflow as tf

    if run_mode(mode) == CompileMode.eager:
        return function
    return tf.function(function, jit_compile=mode == CompileMode.jit, autograph=False)


def run_mode(mode: str) -> CompileMode:
    """``mode`` as a mode functions run under (``jit``, ``graph``, ``eager``; ``auto`` is
    resolved per stage first, :func:`resolve_compile`); ``ValueError`` otherwise."""
    if mode not in (CompileMode.jit, CompileMode.graph, CompileMode.eager):
        raise ValueError(f"compile mode must be jit, graph or eager, got {mode!r}")
    return CompileMode(mode)


def compile_hint(compile_mode: str) -> str | None:
    """A line for the log when the chosen compile mode is the slower one on this machine:
    ``compile=jit`` on a CPU, where XLA's convolutions are slower than oneDNN's."""
    if compile_mode != CompileMode.jit or has_gpu():
        return None
    return (
        "compile=jit on a CPU: XLA's CPU convolutions are slower than oneDNN's; compile=auto "
        "(graph for the network, jit for refinement) trains faster here "
        "(benchmarks/results/train_step_cpu.jsonl)"
    )


def pipelined(function: Callable, items: Iterable, overlap: bool) -> Iterator:
    """``function(item)`` for each item, in order. With ``overlap`` the next item's call
    runs on a worker thread while the caller uses this one's result."""
    if not overlap:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptycho-ahead") as worker:
        pending = None
        for item in items:
            following = worker.submit(function, item)
            if pending is not None:
                yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()

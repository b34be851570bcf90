"""What the machine offers: the choices that depend on the hardware at hand.

``resolve_precision("auto", compile_mode)`` picks bfloat16 for the network where the
hardware and the compiler run it natively: GPUs of compute capability 8.0 and newer; CPUs
with AVX512_BF16 or AMX-BF16 when the convolutions are oneDNN's (``compile=graph`` or
``eager``), where bfloat16 steps are measured 1.2x faster than float32. XLA's CPU
convolutions (``compile=jit``) have no native bfloat16 and were measured slower with it
(0.92x), so there, and everywhere else, float32 (``benchmarks/train_step.py
--precision float32 bfloat16``, README). ``resolve_compile("auto", ...)`` picks the
compile mode of each stage the same way.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "STAGES",
    "compile_hint",
    "cpu_flags",
    "has_gpu",
    "native_bfloat16",
    "resolve_compile",
    "resolve_precision",
]

STAGES = ("train", "reconstruct", "refine")

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


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
    ``compile_mode`` (``flags``: the CPU's, read from /proc/cpuinfo when None)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get(
            "compute_capability", (0, 0)
        )
        return tuple(capability) >= (8, 0)
    if compile_mode == "jit":  # XLA's CPU convolutions: no native bfloat16
        return False
    return bool((cpu_flags() if flags is None else flags) & set(BF16_CPU_FLAGS))


def resolve_precision(precision: str, compile_mode: str, flags: set[str] | None = None) -> str:
    """``"auto"`` -> ``"bfloat16"`` or ``"float32"`` for this machine and compile mode;
    other values unchanged."""
    if precision != "auto":
        return precision
    return "bfloat16" if native_bfloat16(compile_mode, flags) else "float32"


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_compile(mode: str, backend: str = "xla", gpu: bool | None = None) -> dict:
    """The compile mode of each stage (``STAGES``) for ``compile=<mode>``.

    A mode other than ``"auto"`` applies to every stage. ``"auto"`` picks what was
    measured fastest (README, Choosing settings): on a GPU ``jit`` everywhere (XLA fuses
    the whole step and calls cuDNN); on a CPU ``graph`` for the network, training and
    reconstruction (oneDNN's convolutions: 1.3x (float32) to 1.6x (bfloat16) the
    samples/s of XLA's), and ``jit`` for the physics refinement (gathers, warp and FFT
    with no convolution: 3.3x faster per iteration under XLA). With ``translate=legacy``
    nothing is ``jit`` (the legacy op has no XLA kernel).
    """
    if mode != "auto":
        return dict.fromkeys(STAGES, mode)
    xla = "jit" if backend == "xla" else "graph"
    if has_gpu() if gpu is None else gpu:
        return dict.fromkeys(STAGES, xla)
    return {"train": "graph", "reconstruct": "graph", "refine": xla}


def compile_hint(compile_mode: str) -> str | None:
    """A line for the log when the chosen compile mode is the slower one on this machine:
    ``compile=jit`` on a CPU (XLA's CPU convolutions are slower than oneDNN's)."""
    import tensorflow as tf

    if compile_mode != "jit" or tf.config.list_physical_devices("GPU"):
        return None
    return (
        "compile=jit on a CPU: XLA's CPU convolutions are slower than oneDNN's; "
        "compile=auto (graph for the network, jit for refinement) trained 1.3x (float32) to "
        "1.6x (bfloat16) more samples/s on the CPU measured (README, Choosing settings)"
    )

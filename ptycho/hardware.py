"""What the machine offers: the choices that depend on the hardware at hand.

``resolve_precision("auto", compile_mode)`` picks bfloat16 for the network where the
hardware and the compiler run it natively: GPUs of compute capability 8.0 and newer; CPUs
with AVX512_BF16 or AMX-BF16 when the convolutions are oneDNN's (``compile=graph`` or
``eager``), where bfloat16 steps are measured 1.2x faster than float32. XLA's CPU
convolutions (``compile=jit``) have no native bfloat16 and were measured slower with it
(0.92x), so there, and everywhere else, float32 (``benchmarks/train_step.py
--precision float32 bfloat16``, README).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["compile_hint", "cpu_flags", "native_bfloat16", "resolve_precision"]

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


def compile_hint(compile_mode: str) -> str | None:
    """A line for the log when the chosen compile mode is the slower one on this machine:
    ``compile=jit`` on a CPU (XLA's CPU convolutions are slower than oneDNN's)."""
    import tensorflow as tf

    if compile_mode != "jit" or tf.config.list_physical_devices("GPU"):
        return None
    return (
        "compile=jit on a CPU: XLA's CPU convolutions are slower than oneDNN's; "
        "compile=graph trained 1.3x (float32) to 1.6x (bfloat16) more samples/s on the CPU "
        "measured (README, Choosing settings)"
    )

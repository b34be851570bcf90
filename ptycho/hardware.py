"""What the machine offers: the choices that depend on the hardware at hand.

``resolve_precision("auto")`` picks bfloat16 for the network where the hardware runs it
natively (GPUs of compute capability 8.0 and newer; CPUs with AVX512_BF16 or AMX-BF16,
where oneDNN's bfloat16 convolutions are measured faster than float32, see the README) and
float32 elsewhere, where bfloat16 would be emulated and slower.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_flags", "native_bfloat16", "resolve_precision"]

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


def native_bfloat16() -> bool:
    """True when the device the network runs on computes bfloat16 natively."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get(
            "compute_capability", (0, 0)
        )
        return tuple(capability) >= (8, 0)
    return bool(cpu_flags() & set(BF16_CPU_FLAGS))


def resolve_precision(precision: str) -> str:
    """``"auto"`` -> ``"bfloat16"`` or ``"float32"`` for this machine; others unchanged."""
    if precision != "auto":
        return precision
    return "bfloat16" if native_bfloat16() else "float32"

"""precision=auto: bfloat16 only where the hardware and the compiler run it natively."""

from __future__ import annotations

import pytest
import tensorflow as tf

from ptycho.hardware import compile_hint, cpu_flags, resolve_precision


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbogomips\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(
    ("precision", "mode", "flags", "expected"),
    [
        ("auto", "graph", {"avx2", "avx512_bf16"}, "bfloat16"),  # oneDNN bfloat16
        ("auto", "eager", {"amx_bf16"}, "bfloat16"),
        ("auto", "graph", {"avx2"}, "float32"),  # emulated: slower
        ("auto", "jit", {"avx512_bf16"}, "float32"),  # XLA CPU convolutions: no bfloat16
        ("float32", "graph", {"avx512_bf16"}, "float32"),  # an explicit choice stays
        ("bfloat16", "jit", set(), "bfloat16"),
    ],
)
def test_auto_precision_on_a_cpu(monkeypatch, precision, mode, flags, expected):
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert resolve_precision(precision, mode, flags) == expected


def test_jit_on_a_cpu_gets_a_hint_and_graph_or_a_gpu_does_not(monkeypatch):
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert "compile=auto" in compile_hint("jit")
    assert compile_hint("graph") is None
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    assert compile_hint("jit") is None

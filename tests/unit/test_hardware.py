"""What the machine offers: precision=auto (bfloat16 only where the hardware and the
compiler run it natively), compile=auto per device and stage, XLA kept on under a
distribution strategy."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ptycho.data import normalisation_factor, simulate
from ptycho.hardware import compile_hint, compiled, cpu_flags, resolve_compile, resolve_precision
from ptycho.model import ModelConfig, build_model, compile_model


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


def test_jit_stays_on_under_a_strategy():
    """Keras' jit_compile="auto" means no XLA under tf.distribute; compile=jit sets it
    explicitly and a training step runs compiled under the strategy's scope."""
    scan = simulate(n=64, n_positions=16, step=0.125, seed=0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model, _ = build_model(
            ModelConfig(n=64, filters=4, precision="float32"),
            probe=scan.probe,
            norm_factor=normalisation_factor(scan.diffraction),
        )
        compile_model(model, "jit")
    assert model.jit_compile is True
    assert model.distribute_strategy is strategy
    inputs = {
        "diffraction": np.ones((4, 64, 64, 4), np.float32),
        "offsets": np.zeros((4, 4, 2), np.float32),
    }
    history = model.fit(inputs, {"amplitude": inputs["diffraction"]}, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize(
    ("mode", "backend", "gpu", "expected"),
    [
        ("auto", "xla", False, {"train": "graph", "reconstruct": "graph", "refine": "jit"}),
        ("auto", "xla", True, {"train": "jit", "reconstruct": "jit", "refine": "jit"}),
        ("auto", "legacy", False, {"train": "graph", "reconstruct": "graph", "refine": "graph"}),
        ("auto", "legacy", True, {"train": "graph", "reconstruct": "graph", "refine": "graph"}),
        ("jit", "xla", False, {"train": "jit", "reconstruct": "jit", "refine": "jit"}),
        ("graph", "xla", True, {"train": "graph", "reconstruct": "graph", "refine": "graph"}),
    ],
)
def test_compile_auto_picks_per_device_and_stage(mode, backend, gpu, expected):
    assert resolve_compile(mode, backend, gpu=gpu).as_dict() == expected


@pytest.mark.parametrize(("mode", "xla"), [("jit", True), ("graph", False)])
def test_compiled_runs_the_function_as_the_mode_says(mode, xla):
    from ptycho.warp import inside_xla_compilation

    seen = []

    def function(x):
        seen.append(inside_xla_compilation())
        return x * 2.0

    assert float(compiled(function, mode)(tf.constant(1.5))) == 3.0
    assert seen == [xla]
    assert compiled(function, "eager") is function
    with pytest.raises(ValueError, match="jit, graph or eager"):
        compiled(function, "auto")

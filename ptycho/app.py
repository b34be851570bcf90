"""Glue between the Hydra configuration and the library.

The only module that sees an ``omegaconf`` config: it validates the choices and turns
them into plain arguments for the library functions.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from ptycho.warp import translate

log = logging.getLogger(__name__)

COMPILE_MODES = ("jit", "graph", "eager")


class ConfigError(ValueError):
    """An impossible or invalid configuration, reported before any work."""


def check_backend_and_compile(backend: str, mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile={mode} is not one of {list(COMPILE_MODES)}")
    if backend == "legacy" and mode == "jit":
        raise ConfigError(
            "translate=legacy cannot run with compile=jit: ImageProjectiveTransformV3 has no "
            "XLA kernel. Use translate=xla, or compile=graph for the legacy path."
        )


def compiled(fn, mode: str):
    """Wrap ``fn`` for a compile mode: XLA (jit), plain graph, or eager."""
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=(mode == "jit"))


def train(cfg: DictConfig) -> dict:
    """Smoke job: warp a batch of random complex patches forward and backward."""
    backend, mode = cfg.translate.backend, cfg.compile.mode
    check_backend_and_compile(backend, mode)
    rng = np.random.default_rng(cfg.seed)
    patches = tf.constant(
        (rng.normal(size=(64, 64, 64, 1)) + 1j * rng.normal(size=(64, 64, 64, 1))).astype(
            np.complex64
        )
    )
    offsets = tf.constant(rng.uniform(-8, 8, size=(64, 2)).astype(np.float32))

    def step(x, o):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.abs(translate(x, o, backend=backend)) ** 2)
        return loss, tape.gradient(loss, x)

    fn = compiled(step, mode)
    fn(patches, offsets)
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        loss, _ = fn(patches, offsets)
    elapsed = (time.perf_counter() - start) / repeats
    result = {
        "translate": backend,
        "compile": mode,
        "loss": float(loss),
        "patches_per_s": 64 / elapsed,
    }
    log.info(
        "translate=%s compile=%s: %.0f patches/s (forward + backward)",
        backend,
        mode,
        result["patches_per_s"],
    )
    return result

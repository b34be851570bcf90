"""Shared test helpers: composing the real Hydra configuration, running the entry points.

The suite is split by kind: ``unit/`` (library functions against independent
computations), ``app/`` (the real ``app.train`` / ``app.infer`` on composed
configurations, in-process), ``e2e/`` (``train.py`` / ``infer.py`` as users run them, in
subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hypothesis import settings

from ptycho.config import register_configs, typed
from ptycho.data import save_scan, simulate

# Property-based tests draw the same examples on every run and machine: a failure in CI
# is reproduced by running the test again, and a green run means the same cases passed.
settings.register_profile("reproducible", derandomize=True, database=None)
settings.load_profile("reproducible")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_raw(name: str = "train", overrides=()):
    """The real configuration ``conf/<name>.yaml`` with ``overrides``, as Hydra composes it."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def compose_config(name: str = "train", overrides=()):
    """The typed configuration the entry point hands the application."""
    return typed(compose_raw(name, overrides))


def _environment(env=None) -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}


def run_script(
    *args, env=None, timeout=600, cwd=ROOT, input_text=None
) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository root (or ``cwd``), as a user would
    (``input_text`` on its stdin)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        input=input_text,
        env=_environment(env),
        timeout=timeout,
    )


def start_script(*args, env=None) -> subprocess.Popen:
    """Start ``python <args>`` like :func:`run_script`, without waiting (to signal it)."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --------------------------------------------------------------------------------------
# Scan files
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_scan(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    return save_scan(simulate(n=64, n_positions=36, step=0.125, seed=0), folder / "good.npz")


def write_npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def scan_arrays(path: Path) -> dict:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}

"""What a user sees on the terminal: TensorFlow's start-up notices filtered (and only
them), the training progress bar on a terminal and epoch lines on a pipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptycho.quiet import is_notice, native_notices_filtered

ROOT = Path(__file__).resolve().parents[2]
START = "import ptycho; from ptycho.cli import initialise_devices; initialise_devices()"
NOTICES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795827495.635796   11796 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results due to floating-point round-off errors",
    "I0000 00:00:1795827495.636248   11796 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "I0000 00:00:1795827495.690445   11796 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "E0000 00:00:1795827500.680726   11801 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
]


def start_up(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    env.pop("PTYCHO_VERBOSE", None)
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", START], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_the_known_notices_are_recognised_and_nothing_else():
    assert all(is_notice(line) for line in NOTICES)
    for line in (
        "E0000 00:00:1795827500.680726   11801 cuda_platform.cc:52] failed call to cuInit: "
        "CUDA_ERROR_OUT_OF_MEMORY",
        "E0000 00:00:1.0 1 some_kernel.cc:10] INVALID_ARGUMENT: shapes differ",
        "Traceback (most recent call last):",
        "W0000 00:00:1.0 1 port.cc:153] oneDNN custom operations failed",
    ):
        assert not is_notice(line), line


def test_captured_lines_other_than_notices_are_written_back(capfd):
    with native_notices_filtered():
        os.write(2, (NOTICES[0] + "\n").encode())
        os.write(2, b"E0000 real.cc:1] a real error\n")
        os.write(2, (NOTICES[5] + "\n").encode())
    assert capfd.readouterr().err == "E0000 real.cc:1] a real error\n"


@pytest.mark.slow
def test_start_up_is_quiet_and_verbose_shows_the_notices():
    """Pinned against the installed TensorFlow: its notices still exist (verbose) and
    none of them reaches the terminal otherwise."""
    quiet = start_up({})
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = start_up({"PTYCHO_VERBOSE": "1"})
    shown = [line for line in loud.stderr.splitlines() if line.strip()]
    assert loud.returncode == 0 and len(shown) >= 3, loud.stderr
    assert all(is_notice(line) for line in shown), loud.stderr


def run_training(tmp_path: Path, stdout) -> subprocess.CompletedProcess:
    args = [sys.executable, "train.py", "debug=smoke", "train.epochs=3", "compile=graph"]
    return subprocess.run(
        [*args, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=600,
    )


@pytest.mark.slow
def test_training_shows_a_progress_bar_on_a_terminal_and_epoch_lines_on_a_pipe(tmp_path):
    import pty

    leader, follower = pty.openpty()
    try:
        done = run_training(tmp_path / "tty", follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: everything has been read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    assert done.returncode == 0, done.stderr[-2000:]
    terminal = b"".join(chunks).decode(errors="replace")
    assert "\rtrain [" in terminal and "samples/s" in terminal and "ETA" in terminal
    assert "epoch 3/3" in terminal  # the epoch lines are still printed, under the bar

    piped = run_training(tmp_path / "pipe", subprocess.PIPE)
    assert piped.returncode == 0, piped.stderr[-2000:]
    text = piped.stdout.decode()
    assert "epoch 1/3" in text and "epoch 3/3" in text
    assert "\r" not in text and "train [" not in text

"""Training across devices (tf.distribute), and compile=auto as a run records it.

A strategy's devices are fixed when TensorFlow starts, so the data-parallel runs are
real ``train.py`` processes: two logical CPU devices (``distribute.cpu_devices=2``) for
``MirroredStrategy``, two processes on localhost ports (``TF_CONFIG``) for
``MultiWorkerMirroredStrategy``.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import run_script, start_script

SMOKE = ["train.py", "debug=smoke", "compile=graph", "data.test_positions=16"]


def epoch_losses(run_dir) -> list[float]:
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    return [record["loss"] for record in state["history"]]


@pytest.mark.slow
def test_two_replicas_give_the_loss_of_one_replica_and_resume(tmp_path):
    """One epoch on two replicas (each half of every global batch) against one replica
    with the same global batch: Keras averages the loss over the global batch and sums
    the replicas' gradients, so the losses agree to float round-off; the two-replica
    run then resumes from its checkpoint."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*SMOKE, "train.epochs=1", "train.batch_size=8"]
    single = run_script(*common, f"hydra.run.dir={one}")
    assert single.returncode == 0, single.stderr
    pair = run_script(
        *common, "distribute=mirrored", "distribute.cpu_devices=2", f"hydra.run.dir={two}"
    )
    assert pair.returncode == 0, pair.stderr
    assert json.loads((two / "metrics.json").read_text())["replicas"] == 2
    assert json.loads((one / "metrics.json").read_text())["replicas"] == 1
    assert epoch_losses(two) == pytest.approx(epoch_losses(one), rel=1e-5)
    # Adam divides by the gradients' RMS, so the round-off of the all-reduce moves
    # weights whose gradient is near zero by up to ~1e-5 (measured); the model's
    # reconstruction is the same.
    r_one = json.loads((one / "metrics.json").read_text())["r_factor"]
    assert json.loads((two / "metrics.json").read_text())["r_factor"] == pytest.approx(
        r_one, rel=1e-3
    )
    assert "2 replicas" in (two / "train.log").read_text()

    resumed = run_script(
        *SMOKE,
        "train.epochs=2",
        "train.batch_size=8",
        "distribute=mirrored",
        "distribute.cpu_devices=2",
        "resume=true",
        f"hydra.run.dir={two}",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert len(epoch_losses(two)) == 2
    assert json.loads((two / "metrics.json").read_text())["epochs"] == 2


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_on_localhost_train_together_and_only_the_chief_writes(tmp_path):
    run_dir = tmp_path / "run"
    workers = [f"localhost:{port}" for port in free_ports(2)]
    processes = [
        start_script(
            *SMOKE,
            "train.epochs=2",
            "distribute=multiworker",
            f"hydra.run.dir={run_dir}",
            env={
                "TF_CONFIG": json.dumps(
                    {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
                ),
                "TMPDIR": str(tmp_path),
            },
        )
        for i in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["epochs"] == 2
    assert metrics["distribute"] == "multiworker"
    # The chief's TensorBoard only (one writer), and no worker folder left behind.
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    assert not list(tmp_path.glob("ptycho-worker*"))
    assert len(epoch_losses(run_dir)) == 2


@pytest.mark.slow
def test_jit_over_cpu_replicas_is_refused_before_training(tmp_path):
    result = run_script(
        "train.py",
        "debug=smoke",
        "compile=jit",
        "distribute=mirrored",
        "distribute.cpu_devices=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "compile=graph" in lines[0] and "compile=auto" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_compile_auto_is_logged_and_recorded(tmp_path):
    result = run_script("train.py", "debug=smoke", "compile=auto", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "train.log").read_text()
    assert "compile=auto on a CPU: train graph, reconstruct graph, refine jit" in log
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["compile"] == "auto"
    assert metrics["compile_stages"] == {"train": "graph", "reconstruct": "graph", "refine": "jit"}

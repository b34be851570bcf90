"""Reconstruction, refinement and faults across worker processes on localhost
(``distribute=multiworker``, ``TF_CONFIG``): two workers reconstruct and refine a scan
as one does, a worker killed mid-epoch or mid-refinement stops the other within the
collective timeout with one line naming it (the run then resumes), and a Ctrl-C on one
worker stops both after the same step."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from ptycho.data import save_scan, simulate
from ptycho.distribute import COLLECTIVE_TIMEOUT_S
from tests.conftest import run_script, start_script
from tests.e2e.test_distribute import SMOKE, epoch_losses, free_ports


def start_workers(count: int, *args, tmp_path, first=(), env=None):
    """``count`` processes of ``python *args`` as the workers of one cluster; worker 1
    runs ``python *first *args`` (a wrapper that kills or interrupts it)."""
    workers = [f"localhost:{port}" for port in free_ports(count)]
    processes = []
    for i in range(count):
        prefix = tuple(first) if i == 1 else ()
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        processes.append(
            start_script(
                *prefix,
                *args,
                "distribute=multiworker",
                env={"TF_CONFIG": json.dumps(config), "TMPDIR": str(tmp_path), **(env or {})},
            )
        )
    return processes, workers


def finish(processes, timeout=600):
    return [process.communicate(timeout=timeout) for process in processes]


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("workers")
    scan = simulate(n=64, n_positions=144, step=0.125, nphotons=1e6, seed=5)
    return save_scan(scan, folder / "scan.npz")


@pytest.mark.slow
def test_two_workers_reconstruct_and_refine_a_scan_as_one(tmp_path, scan_file):
    """The network's reconstruction split over two workers and the canvases added, then
    refine=object with each worker taking half of every minibatch: the run one worker
    makes with the whole minibatch, to float32 round-off (phase alignment off: aligned
    shares differ by the alignment's reference, docs/large-scans.md)."""
    trained = run_script(
        *SMOKE, "data=npz", f"data.path={scan_file}", f"hydra.run.dir={tmp_path / 't'}"
    )
    assert trained.returncode == 0, trained.stderr
    common = [
        "infer.py",
        f"checkpoint={tmp_path / 't' / 'model.keras'}",
        "data=npz",
        f"data.path={scan_file}",
        "compile=graph",
        "reconstruct.align_phase=false",
        "refine=object",
        "refine.iterations=4",
    ]
    one = run_script(*common, "refine.batch_size=32", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    processes, _ = start_workers(
        2, *common, "refine.batch_size=16", f"hydra.run.dir={tmp_path / 'two'}", tmp_path=tmp_path
    )
    for process, (_, stderr) in zip(processes, finish(processes), strict=True):
        assert process.returncode == 0, stderr
    metrics = [json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("one", "two")]
    assert metrics[1]["workers"] == 2 and metrics[0]["workers"] == 1
    for key in ("r_factor", "refined_r_factor", "refined_amp_ssim", "refined_phase_ssim"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-4), key
    objects = [np.load(tmp_path / k / "reconstruction.npz")["obj"] for k in ("one", "two")]
    np.testing.assert_allclose(objects[1], objects[0], atol=1e-4 * np.abs(objects[0]).max())
    assert not list(tmp_path.glob("ptycho-worker*"))


def refining(scan_file, run_dir, iterations: int) -> list[str]:
    """infer.py refining ``scan_file`` from a flat object for ``iterations``, with a
    progress point and a checkpoint after every iteration."""
    return [
        "infer.py",
        "data=npz",
        f"data.path={scan_file}",
        "refine=object",
        f"refine.iterations={iterations}",
        "refine.eval_every=1",
        "refine.checkpoint_seconds=0",
        "refine.batch_size=16",
        f"hydra.run.dir={run_dir}",
    ]


@pytest.mark.slow
def test_a_worker_killed_mid_refinement_stops_the_other_and_the_refinement_resumes(
    tmp_path, scan_file
):
    """Worker 1 killed as iteration 3 ends: the chief stops within the collective
    timeout naming it, keeps the checkpoint of iteration 2 and writes no results; both
    started again with resume=true continue from iteration 2 and finish, the
    checkpoint removed once the results are written."""
    run_dir = tmp_path / "run"
    args = refining(scan_file, run_dir, iterations=5)
    processes, workers = start_workers(
        2, *args, tmp_path=tmp_path, first=("tests/e2e/kill_at_step.py", "3", "--refinement")
    )
    processes[1].wait(timeout=600)
    killed_at = time.monotonic()
    _, stderr = processes[0].communicate(timeout=600)
    assert processes[1].returncode == -9
    assert processes[0].returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: worker 1 ({workers[1]})"), stderr
    assert stderr.strip().splitlines() == errors  # TensorFlow's own lines kept out
    assert time.monotonic() - killed_at < COLLECTIVE_TIMEOUT_S + 30
    assert not (run_dir / "metrics.json").exists()
    saved = np.load(run_dir / "checkpoints" / "refine.npz")
    assert json.loads(str(saved["header"]))["iteration"] == 2

    processes, _ = start_workers(2, *args, "resume=true", tmp_path=tmp_path)
    for process, (_, stderr) in zip(processes, finish(processes), strict=True):
        assert process.returncode == 0, stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["refine_iterations"] == 5 and metrics["workers"] == 2
    log = (run_dir / "infer.log").read_text().splitlines()
    for worker in (0, 1):  # both append to the run's log, each line naming its worker
        mine = [line for line in log if line.startswith(f"[worker {worker}][")]
        assert any("continuing the refinement after iteration 2" in line for line in mine), log
    assert not (run_dir / "checkpoints" / "refine.npz").exists()


@pytest.mark.slow
def test_ctrl_c_on_one_worker_stops_both_refining_at_the_same_step(tmp_path, scan_file):
    """Ctrl-C on worker 1 as it evaluates iteration 3: both workers stop at the first
    step of iteration 4 (the stop travels with the step's sums), long before the
    collective timeout, each with one ``interrupted:`` line saying how to continue; the
    chief keeps the checkpoint of iteration 3 and writes no results."""
    run_dir = tmp_path / "run"
    args = refining(scan_file, run_dir, iterations=6)
    processes, _ = start_workers(
        2,
        *args,
        tmp_path=tmp_path,
        first=("tests/e2e/kill_at_step.py", "3", "--refinement", "--signal=INT"),
    )
    processes[1].wait(timeout=600)
    stopped = time.monotonic()
    outputs = finish(processes)
    assert time.monotonic() - stopped < COLLECTIVE_TIMEOUT_S / 2
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 130, stderr
        lines = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
        assert len(lines) == 1 and "resume=true" in lines[0], stderr
    assert "holds iteration 3" in outputs[0][1]
    assert "another worker was interrupted" in (run_dir / "infer.log").read_text()
    assert not (run_dir / "metrics.json").exists()
    saved = np.load(run_dir / "checkpoints" / "refine.npz")
    assert json.loads(str(saved["header"]))["iteration"] == 3


FAULT_RUN = [*SMOKE[1:], "data.n_positions=100", "train.epochs=3", "train.batch_size=8"]


@pytest.mark.slow
def test_a_killed_worker_stops_the_other_which_names_it_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.py", *FAULT_RUN, f"hydra.run.dir={run_dir}"]
    processes, workers = start_workers(
        2, *args, tmp_path=tmp_path, first=("tests/e2e/kill_at_step.py", "15")
    )
    processes[1].wait(timeout=600)  # killed in epoch 2 (12 steps per epoch)
    killed_at = time.monotonic()
    _, stderr = processes[0].communicate(timeout=600)
    waited = time.monotonic() - killed_at
    assert processes[1].returncode == -9
    assert processes[0].returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: worker 1 ({workers[1]})"), stderr
    assert stderr.strip().splitlines() == errors  # TensorFlow's own lines kept out
    assert "resume=true" in errors[0]
    assert waited < COLLECTIVE_TIMEOUT_S + 30
    assert not (run_dir / "metrics.json").exists()  # nothing half-written
    assert len(epoch_losses(run_dir)) == 1  # the checkpoint of epoch 1 is intact

    processes, _ = start_workers(2, *args, "resume=true", tmp_path=tmp_path)
    for process, (_, stderr) in zip(processes, finish(processes), strict=True):
        assert process.returncode == 0, stderr
    assert len(epoch_losses(run_dir)) == 3
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_ctrl_c_on_one_worker_stops_both_after_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.py", *FAULT_RUN, f"hydra.run.dir={run_dir}"]
    processes, _ = start_workers(
        2, *args, tmp_path=tmp_path, first=("tests/e2e/kill_at_step.py", "15", "--signal=INT")
    )
    outputs = finish(processes)
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 130, stderr
        assert "interrupted: stopped during epoch 2" in stderr
    assert "another worker was interrupted" in outputs[0][1] + (run_dir / "train.log").read_text()
    assert len(epoch_losses(run_dir)) == 1
    processes, _ = start_workers(2, *args, "resume=true", tmp_path=tmp_path)
    for process, (_, stderr) in zip(processes, finish(processes), strict=True):
        assert process.returncode == 0, stderr
    assert len(epoch_losses(run_dir)) == 3

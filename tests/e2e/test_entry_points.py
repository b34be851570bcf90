"""The entry points as users run them: ``train.py`` / ``infer.py`` in fresh processes.

Exit codes and one-line errors, the rollback environment, sweeps and launchers, a real
SIGKILL then ``resume=true``, SIGINT."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from ptycho.data.beamline import BeamlineSpec, write_beamline
from tests.conftest import ROOT, run_script, scan_arrays, start_script, write_npz

OUTPUTS = ("model.keras", "metrics.json", "reconstruction.npz", "reconstruction.png")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:"))]


def test_refused_configuration_exits_2_with_one_line():
    result = run_script("train.py", "translate=legacy", "compile=jit")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: translate=legacy cannot run with compile=jit (ImageProjectiveTransformV3 has no "
        "XLA kernel): use translate=xla, or compile=graph for the legacy path"
    ]


@pytest.mark.slow
def test_train_script_with_rollback_environment(tmp_path):
    result = run_script(
        "train.py", "debug=smoke", f"hydra.run.dir={tmp_path}", env={"USE_XLA_TRANSLATE": "0"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["translate"], metrics["compile"]) == ("legacy", "graph")
    assert (tmp_path / "train.log").is_file()


@pytest.mark.slow
def test_multirun_sweeps_two_cells(tmp_path):
    result = run_script(
        "train.py",
        "-m",
        "translate=xla,legacy",
        "compile=graph",
        "debug=smoke",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    cells = sorted(tmp_path.glob("*/metrics.json"))
    assert len(cells) == 2
    backends = {json.loads(path.read_text())["translate"] for path in cells}
    assert backends == {"xla", "legacy"}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["parallel", "local"])  # joblib, submitit_local
def test_sweep_launcher_runs_a_sweep(tmp_path, launcher):
    result = run_script(
        "train.py",
        "-m",
        f"hydra/launcher={launcher}",
        "compile=graph",
        "debug=smoke",
        "train.seed=1,2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.glob("*/metrics.json"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("corrupt npz", 1),
        ("pickle npz", 1),
        ("typo", 2),
        ("wrong type", 2),
        ("legacy jit", 2),
        ("unwritable output", 2),
        ("unwritable default output", 2),
        ("missing checkpoint", 2),
        ("lambda checkpoint", 1),
    ],
)
def test_entry_points_exit_with_one_line_and_the_right_code(case, code, good_scan, tmp_path):

    arrays = scan_arrays(good_scan)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(good_scan.read_bytes()[:999])
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x)(inputs)).save(tmp_path / "lam.keras")
    run_dir = tmp_path / "run"
    train = ["train.py", "debug=smoke", f"hydra.run.dir={run_dir}"]
    args = {
        "corrupt npz": [*train, "data=npz", f"data.path={corrupt}"],
        "pickle npz": [
            *train,
            "data=npz",
            "data.path="
            + str(
                write_npz(tmp_path / "p.npz", **{**arrays, "probeGuess": np.array([None], object)})
            ),
        ],
        "typo": [*train, "train.epoch=3"],
        "wrong type": [*train, "train.epochs=many"],
        "legacy jit": [*train, "translate=legacy", "compile=jit"],
        "unwritable output": ["train.py", "debug=smoke", f"hydra.run.dir={blocker}/run"],
        # run from a folder where the default outputs/ cannot be made (a file is there)
        "unwritable default output": [str(ROOT / "train.py"), "debug=smoke"],
        "missing checkpoint": [
            "infer.py",
            f"checkpoint={tmp_path}/none.keras",
            f"data.path={good_scan}",
            f"hydra.run.dir={run_dir}",
        ],
        "lambda checkpoint": [
            "infer.py",
            f"checkpoint={tmp_path / 'lam.keras'}",
            f"data.path={good_scan}",
            f"hydra.run.dir={run_dir}",
        ],
    }[case]
    if case == "unwritable default output":
        (tmp_path / "outputs").write_text("not a folder")
    result = run_script(*args, cwd=tmp_path if case == "unwritable default output" else ROOT)
    assert result.returncode == code, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    if case.startswith("unwritable"):
        assert "hydra.run.dir" in lines[0], lines[0]
    if case == "lambda checkpoint":
        assert "contains a Lambda layer" in lines[0] and len(lines[0]) <= 200, lines[0]
    assert "Traceback" not in result.stderr
    for name in OUTPUTS:
        assert not (run_dir / name).exists()


def wait_for_epoch(run_dir: Path, epoch: int, process, timeout=300) -> None:
    state = run_dir / "checkpoints" / "state.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.stderr.read()[-2000:]}")
        if state.exists():
            try:
                if json.loads(state.read_text())["epoch"] >= epoch:
                    return
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


RESUME_RUN = [
    "debug=smoke",
    "compile=graph",
    "train.epochs=5",
    "data.n_positions=64",
    "train.eval_every=0",
]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = run_script("train.py", *RESUME_RUN, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = tmp_path / "killed"
    # 64 raster positions give 49 blocks of 2 x 2, 6 full batches of 8 per epoch: killed
    # at the start of the 3rd step of epoch 3.
    killed = run_script(
        "tests/e2e/kill_at_step.py", "14", "train.py", *RESUME_RUN, f"hydra.run.dir={run_dir}"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads((run_dir / "checkpoints" / "state.json").read_text())["epoch"] == 2
    assert not (run_dir / "model.keras").exists()
    resumed = run_script("train.py", *RESUME_RUN, f"hydra.run.dir={run_dir}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from epoch" in (run_dir / "train.log").read_text()

    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    # Same seed, same batches (the shuffle depends only on seed and epoch), same Adam
    # state (saved in the checkpoint): graph mode reproduces the run to float32 noise.
    for key in ("final_loss", "r_factor", "amp_ssim", "phase_ssim"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_sigint_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    process = start_script(
        "train.py",
        "debug=smoke",
        "compile=graph",
        "train.epochs=200",
        "data.n_positions=64",
        "train.eval_every=0",
        f"hydra.run.dir={run_dir}",
    )
    wait_for_epoch(run_dir, 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    lines = error_lines(stderr)
    assert len(lines) == 1 and "resume=true" in lines[0] and str(run_dir) in lines[0]
    assert (run_dir / "checkpoints" / "last.keras").is_file()
    saved = json.loads((run_dir / "checkpoints" / "state.json").read_text())["epoch"]
    assert f"checkpoint of epoch {saved} " in lines[0]
    assert not (run_dir / "model.keras").exists()
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_beamline_file_goes_through_infer_py_and_bad_windows_are_one_line(tmp_path):
    write_beamline(
        tmp_path / "scan.cxi", BeamlineSpec(n=64, frame=128, side=6, gap=(15, 2), beamstop=2.0)
    )
    common = ["infer.py", "data=npz", f"data.path={tmp_path / 'scan.cxi'}"]
    run_dir = tmp_path / "run"
    result = run_script(
        *common, "data.crop=64", "refine=object", "refine.iterations=2", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr
    log = (run_dir / "infer.log").read_text()
    assert "frames 128 x 128 -> N 64; zero frequency was in the corner: fftshifted" in log
    assert "(mask: the file's; 4 hot, " in log and "background (modelled" in log
    refused = run_script(
        *common, "data.crop=256", "refine=object", f"hydra.run.dir={tmp_path / 'no'}"
    )
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "smaller than data.crop=256; lower data.crop" in lines[0], lines
    assert not (tmp_path / "no" / "reconstruction.npz").exists()

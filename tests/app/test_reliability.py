"""Bad input, interrupted and failing runs, reproducibility: the real ``app.train`` and
``app.infer`` in-process. The same through the entry points: tests/e2e/."""

from __future__ import annotations

import json
import os
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ptycho import app
from ptycho.data import ScanFileError, load_scan, save_scan, simulate
from ptycho.errors import ConfigError, DataError
from tests.conftest import compose_config as make_config
from tests.conftest import scan_arrays, write_npz

# --------------------------------------------------------------------------------------
# Bad data files: a clear error naming the file, nothing written
# --------------------------------------------------------------------------------------


def bad_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    arrays = scan_arrays(good)
    raw = good.read_bytes()
    cases = {}
    (folder / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    cases["truncated npz"] = (folder / "truncated.npz", "cannot read")
    cases["pickle npz"] = (
        write_npz(folder / "pickle.npz", **{**arrays, "diff3d": np.array([{"x": 1}], object)}),
        "pickle",
    )
    cases["missing key"] = (
        write_npz(folder / "nokey.npz", **{k: v for k, v in arrays.items() if k != "xcoords"}),
        "missing key 'xcoords'",
    )
    cases["length mismatch"] = (
        write_npz(folder / "lengths.npz", **{**arrays, "ycoords": arrays["ycoords"][:-3]}),
        r"ycoords: expected shape \(36,\)",
    )
    nan = np.full_like(arrays["diff3d"], np.nan)  # NaN in one pixel is masked (test_measured)
    cases["nan"] = (write_npz(folder / "nan.npz", **{**arrays, "diff3d": nan}), "no usable value")
    cases["negative"] = (
        write_npz(folder / "neg.npz", **{**arrays, "diff3d": -arrays["diff3d"]}),
        "negative",
    )
    cases["complex"] = (
        write_npz(folder / "cplx.npz", **{**arrays, "diff3d": arrays["diff3d"] + 1j}),
        "expected real",
    )
    cases["empty"] = (
        write_npz(
            folder / "empty.npz",
            **{
                **arrays,
                "diff3d": arrays["diff3d"][:0],
                "xcoords": arrays["xcoords"][:0],
                "ycoords": arrays["ycoords"][:0],
            },
        ),
        "empty",
    )
    cases["outside"] = (
        write_npz(folder / "outside.npz", **{**arrays, "xcoords": arrays["xcoords"] + 1e4}),
        "outside the object",
    )
    h5 = save_scan(load_scan(good), folder / "scan.h5")
    (folder / "truncated.h5").write_bytes(h5.read_bytes()[:3000])
    cases["truncated h5"] = (folder / "truncated.h5", "cannot read")
    (folder / "truncated.cxi").write_bytes(h5.read_bytes()[:3000])
    cases["truncated cxi"] = (folder / "truncated.cxi", "cannot read")
    return cases


def test_every_bad_data_file_fails_training_with_its_name_and_writes_nothing(good_scan, tmp_path):
    cases = bad_files(tmp_path, good_scan)
    for name, (path, match) in cases.items():
        run_dir = tmp_path / f"run_{path.stem}"
        cfg = make_config(overrides=["debug=smoke", "data=npz", f"data.path={path}"])
        with pytest.raises(ScanFileError, match=match) as caught:
            app.train(cfg, run_dir)
        assert str(path) in str(caught.value), name
        assert not run_dir.exists() or not any(run_dir.iterdir()), name


def test_inference_refuses_mismatched_checkpoints_and_data(good_scan, tmp_path):
    cfg = make_config(
        overrides=["debug=smoke", "data=npz", f"data.path={good_scan}", "compile=graph"]
    )
    app.train(cfg, tmp_path / "run")
    checkpoint = tmp_path / "run" / "model.keras"

    def infer(data_path, checkpoint_path=checkpoint):
        return app.infer(
            make_config("infer", [f"checkpoint={checkpoint_path}", f"data.path={data_path}"]),
            tmp_path / "inf",
        )

    save_scan(simulate(n=32, n_positions=9, seed=1), tmp_path / "n32.npz")
    with pytest.raises(DataError, match=r"n32.npz: patterns are 32 x 32 .* model.n=64"):
        infer(tmp_path / "n32.npz")
    with pytest.raises(ConfigError, match="no such file"):
        infer(good_scan, tmp_path / "absent.keras")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(DataError, match="cannot load the model"):
        infer(good_scan, corrupt)
    assert not (tmp_path / "inf").exists() or not any((tmp_path / "inf").iterdir())


def rewrite_keras(source: Path, target: Path, edit) -> Path:
    """Copy a .keras archive, editing its config.json with ``edit(dict) -> dict``."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "config.json":
                data = json.dumps(edit(json.loads(data))).encode()
            zout.writestr(item, data)
    return target


def test_keras_files_with_lambda_or_unknown_classes_are_refused(good_scan, tmp_path):
    import keras

    from ptycho.model import load_model

    inputs = keras.Input((4,))
    lam = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    lam.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="(?i)lambda|unsafe|safe_mode"):
        load_model(tmp_path / "lambda.keras")

    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.save(tmp_path / "dense.keras")

    def rename(config):
        text = json.dumps(config).replace('"Dense"', '"EvilLayer"')
        return json.loads(text.replace('"keras.layers"', '"evil.module"'))

    rewrite_keras(tmp_path / "dense.keras", tmp_path / "unknown.keras", rename)
    with pytest.raises(Exception, match="(?i)evil|could not|unknown|locate"):
        load_model(tmp_path / "unknown.keras")

    # What the application says: one short line naming the file, what is wrong, the fix.
    from ptycho.checkpoints import load_trained
    from ptycho.errors import DataError

    for name, says in (
        ("lambda.keras", "contains a Lambda layer (arbitrary code): refused; re-save the model"),
        ("unknown.keras", "uses a layer class this version does not know ("),
    ):
        with pytest.raises(DataError) as refused:
            load_trained(str(tmp_path / name), "xla")
        line = str(refused.value)
        assert line.startswith(f"checkpoint={tmp_path / name}: {says}"), line
        assert len(line) - len(str(tmp_path)) <= 150 and "\n" not in line, line


# --------------------------------------------------------------------------------------
# Interrupted and failing runs
# --------------------------------------------------------------------------------------


def test_ctrl_c_mid_epoch_stops_after_the_step_and_does_not_count_the_epoch(tmp_path, monkeypatch):
    """The first Ctrl-C is a request: the step finishes, the cut epoch is not saved."""
    from ptycho.errors import Interrupted
    from ptycho.monitor import TrainingMonitor

    seen = []
    original = TrainingMonitor.on_train_batch_begin

    def interrupt_at_epoch_2_step_2(self, batch, logs=None):
        seen.append((self._epoch + 1, batch + 1))
        if (self._epoch + 1, batch + 1) == (2, 2):
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, logs)

    monkeypatch.setattr(TrainingMonitor, "on_train_batch_begin", interrupt_at_epoch_2_step_2)
    # What the process had (a shell that starts jobs in the background ignores SIGINT).
    before = signal.getsignal(signal.SIGINT)
    cfg = make_config(overrides=["debug=smoke", "compile=graph", "train.epochs=3"])
    with pytest.raises(Interrupted, match="during epoch 2; the checkpoint of epoch 1") as info:
        app.train(cfg, tmp_path)
    assert "resume=true" in str(info.value)
    assert seen[-1] == (2, 2)  # no step after the interrupted one
    assert json.loads((tmp_path / "checkpoints" / "state.json").read_text())["epoch"] == 1
    assert not (tmp_path / "model.keras").exists()
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_a_second_ctrl_c_interrupts_at_once():
    from ptycho.monitor import stop_on_interrupt

    class Monitor:
        stop_requested = False

        def request_stop(self):
            self.stop_requested = True

    monitor = Monitor()
    survived_the_first = False
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), stop_on_interrupt(monitor):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs between bytecodes
        survived_the_first = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert survived_the_first and monitor.stop_requested
    assert signal.getsignal(signal.SIGINT) is before


def test_nan_loss_stops_with_epoch_and_step_and_keeps_outputs(tmp_path):
    good = make_config(overrides=["debug=smoke", "compile=graph"])
    app.train(good, tmp_path)
    model_before = (tmp_path / "model.keras").read_bytes()
    checkpoint_before = (tmp_path / "checkpoints" / "last.keras").read_bytes()
    diverging = make_config(
        overrides=[
            "debug=smoke",
            "compile=graph",
            "train.epochs=2",
            "resume=true",
            "train.learning_rate=1e30",
        ]
    )
    from ptycho.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"NaN at epoch 2, step \d+"):
        app.train(diverging, tmp_path)
    assert (tmp_path / "model.keras").read_bytes() == model_before
    assert (tmp_path / "checkpoints" / "last.keras").read_bytes() == checkpoint_before


# --------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_reproduces_metrics(tmp_path):
    """Graph mode repeats a run bitwise, XLA to float32 round-off.

    Assumes deterministic kernels, which TensorFlow's CPU kernels used here are; on GPUs
    some (cuDNN convolution backward passes, scatter-adds) are not unless
    ``tf.config.experimental.enable_op_determinism()`` is on, and that turns Keras' XLA
    off. CI runs on CPUs.
    """
    results = {}
    for mode in ("graph", "jit"):
        for attempt in (1, 2):
            cfg = make_config(overrides=["debug=smoke", f"compile={mode}", "train.epochs=2"])
            results[mode, attempt] = app.train(cfg, tmp_path / f"{mode}{attempt}")
    keys = ("final_loss", "r_factor", "amp_ssim", "phase_psnr")
    for key in keys:  # graph mode: identical
        assert results["graph", 1][key] == results["graph", 2][key], key
    for key in keys:  # XLA: reproducible to float32 round-off (see README)
        assert results["jit", 1][key] == pytest.approx(results["jit", 2][key], rel=1e-5), key

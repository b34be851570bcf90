"""The Hydra application: composed configs, real train/infer runs, outputs, refusals.

In the style of lightning-hydra-template: compose the real configuration, shrink it
with ``debug=smoke``, point the outputs at ``tmp_path`` and run the real functions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest

from ptycho import app
from ptycho.data import ScanFileError, load_scan, load_scans, save_scan, simulate
from ptycho.errors import ConfigError, DataError
from ptycho.hardware import resolve_compile, resolve_precision
from ptycho.scoring import scan_region as app_scan_region
from ptycho.stitch import object_shape_for
from tests.conftest import compose_config as make_config

METRIC_FIELDS = (
    "amp_psnr",
    "amp_ssim",
    "phase_psnr",
    "phase_ssim",
    "amp_frc50",
    "phase_frc50",
    "r_factor",
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train_run")
    cfg = make_config(overrides=["debug=smoke", "train.epochs=2"])
    summary = app.train(cfg, run_dir)
    return run_dir, summary


def read_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    return events


def scalar_tags(run_dir: Path) -> dict[str, list[float]]:
    """Scalar summaries (TF2 writes them as tensors with the "scalars" plugin)."""
    import tensorflow as tf

    events = read_events(run_dir)
    return {
        tag: [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
        if events.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }


# --------------------------------------------------------------------------------------
# Training and inference
# --------------------------------------------------------------------------------------


def test_train_writes_every_output(trained_run):
    run_dir, summary = trained_run
    for name in (
        "model.keras",
        "metrics.json",
        "train_scan.npz",
        "test_scan.npz",
        "reconstruction.npz",
        "reconstruction.png",
        "checkpoints/last.keras",
        "checkpoints/state.json",
    ):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for field in METRIC_FIELDS:
        assert math.isfinite(metrics[field]), field
    assert metrics["epochs"] == 2 and metrics["translate"] == "xla"
    assert metrics["compile"] == "auto"  # the default: per device and stage
    stages = resolve_compile("auto", "xla").as_dict()
    assert metrics["compile_stages"] == stages
    assert metrics["precision"] == resolve_precision("auto", stages["train"])
    reconstruction = np.load(run_dir / "reconstruction.npz")
    test_scan = load_scan(run_dir / "test_scan.npz")
    assert reconstruction["obj"].dtype == np.complex64
    assert reconstruction["obj"].shape == test_scan.object.shape == reconstruction["mask"].shape
    assert reconstruction["mask"].dtype == bool and reconstruction["mask"].any()
    assert not reconstruction["obj"][~reconstruction["mask"]].any()
    train_scan = load_scan(run_dir / "train_scan.npz")
    assert not np.array_equal(train_scan.object[:20, :20], test_scan.object[:20, :20])
    assert summary["amp_ssim"] == metrics["amp_ssim"]


def test_tensorboard_holds_losses_metrics_images_config_and_hparams(trained_run):
    run_dir, _ = trained_run
    tags = scalar_tags(run_dir)
    for tag in (
        "train/loss",
        "train/loss_step",
        "train/learning_rate",
        "train/samples_per_s",
        *(f"test/{field}" for field in METRIC_FIELDS),
        "final/amp_ssim",
    ):
        assert tag in tags, tag
        assert all(math.isfinite(v) for v in tags[tag]), tag
    assert len(tags["train/loss"]) == 2
    events = read_events(run_dir)
    plugins = {
        events.SummaryMetadata(tag).plugin_data.plugin_name for tag in events.Tags()["tensors"]
    }
    assert {"scalars", "images", "text", "hparams"} <= plugins
    assert "test/amplitude" in events.Tags()["tensors"]


def image_shapes(run_dir: Path) -> dict[str, list[tuple]]:
    """Every image summary: tag -> the (H, W, C) of each logged image (PNG decoded)."""
    import tensorflow as tf

    events = read_events(run_dir)
    shapes = {}
    for tag in events.Tags()["tensors"]:
        if events.SummaryMetadata(tag).plugin_data.plugin_name != "images":
            continue
        for event in events.Tensors(tag):
            encoded = tf.make_ndarray(event.tensor_proto)[2]  # width, height, PNG
            shapes.setdefault(tag, []).append(tuple(tf.io.decode_png(encoded).shape))
    return shapes


def test_tensorboard_shows_truth_error_and_frc_beside_the_reconstruction(trained_run):
    """Two evaluations (the monitor's after epoch 1, the run's final one after epoch 2),
    logged the same way: images of both, the truth once."""
    run_dir, _ = trained_run
    shapes = image_shapes(run_dir)
    test_scan = load_scan(run_dir / "test_scan.npz")
    rows, cols = app_scan_region(test_scan)
    region = (rows.stop - rows.start, cols.stop - cols.start)
    assert shapes["test/amplitude"] == [(*test_scan.object.shape, 1)] * 2
    for tag in ("test/amplitude_truth", "test/phase_truth"):
        assert shapes[tag] == [(*region, 1)], tag  # logged once
    for tag in ("test/amplitude_error", "test/phase_error"):
        assert shapes[tag] == [(*region, 3)] * 2, tag  # RGB: a symmetric colour scale
    assert len(shapes["test/frc"]) == 2
    frc = shapes["test/frc"][-1]
    assert frc[2] == 3 and frc[0] > 100 and frc[1] > 100


def test_the_final_reconstruction_is_what_tensorboard_shows_last(trained_run):
    """The reconstruction a user gets (metrics.json) is TensorBoard's last evaluation,
    images included, at the last epoch."""
    import tensorflow as tf

    run_dir, summary = trained_run
    events = read_events(run_dir)
    assert [e.step for e in events.Tensors("test/amplitude")] == [1, 2]
    for key in ("r_factor", "amp_ssim", "phase_ssim"):
        final = events.Tensors(f"final/{key}")
        assert [e.step for e in final] == [2]
        assert float(tf.make_ndarray(final[0].tensor_proto)) == pytest.approx(summary[key])
        last = events.Tensors(f"test/{key}")[-1]
        assert last.step == 2 and float(tf.make_ndarray(last.tensor_proto)) == pytest.approx(
            summary[key]
        )


def test_a_one_epoch_run_still_shows_its_reconstruction(tmp_path):
    app.train(make_config(overrides=["debug=smoke", "compile=graph"]), tmp_path)
    shapes = image_shapes(tmp_path)
    assert len(shapes["test/amplitude"]) == 1 and len(shapes["test/amplitude_error"]) == 1


def test_infer_reconstructs_a_scan_file_with_the_trained_model(trained_run, tmp_path):
    run_dir, _ = trained_run
    cfg = make_config(
        "infer",
        [
            f"checkpoint={run_dir / 'model.keras'}",
            "data=npz",
            f"data.path={run_dir / 'test_scan.npz'}",
            "reconstruct.batch_size=8",
        ],
    )
    summary = app.infer(cfg, tmp_path)
    assert summary["traces"] == 1  # fixed batches: one trace however long the scan
    for field in METRIC_FIELDS:
        assert math.isfinite(summary[field]), field
    assert (tmp_path / "reconstruction.npz").is_file() and (
        tmp_path / "reconstruction.png"
    ).is_file()
    # The same model reconstructs the same scan in training and inference.
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert summary["r_factor"] == pytest.approx(trained["r_factor"], rel=1e-3)


def test_infer_with_the_other_backend_agrees(trained_run, tmp_path):
    """Sub-pixel positions, so both warps interpolate: the same model gives the same
    object (stitched by each backend) and the same R-factor. Without phase alignment,
    which would carry the backends' float32 round-off from group to group."""
    run_dir, _ = trained_run
    scan = simulate(n=64, n_positions=36, step=0.125, jitter=0.04, seed=5)
    assert np.abs(scan.xcoords - np.round(scan.xcoords)).max() > 0.2
    save_scan(scan, tmp_path / "jittered.npz")
    common = [
        f"checkpoint={run_dir / 'model.keras'}",
        "data=npz",
        f"data.path={tmp_path / 'jittered.npz'}",
        "reconstruct.batch_size=8",
        "reconstruct.align_phase=false",
        "compile=graph",  # the same network arithmetic for both (XLA's convolutions round
    ]  # differently from oneDNN's, in bfloat16 visibly)
    xla = app.infer(make_config("infer", common), tmp_path / "xla")
    legacy = app.infer(
        make_config("infer", [*common, "translate=legacy", "compile=graph"]), tmp_path / "legacy"
    )
    assert legacy["r_factor"] == pytest.approx(xla["r_factor"], rel=1e-4)
    objects = [np.load(tmp_path / name / "reconstruction.npz") for name in ("xla", "legacy")]
    np.testing.assert_array_equal(objects[0]["mask"], objects[1]["mask"])
    np.testing.assert_allclose(objects[0]["obj"], objects[1]["obj"], atol=1e-4)
    assert np.abs(objects[0]["obj"]).max() > 0.1


def test_infer_refuses_data_whose_n_does_not_match_the_checkpoint(trained_run, tmp_path):
    run_dir, _ = trained_run
    scan = simulate(n=32, n_positions=9, seed=0)  # smaller than the model: nothing to cut
    save_scan(scan, tmp_path / "small.npz")
    cfg = make_config(
        "infer",
        [
            f"checkpoint={run_dir / 'model.keras'}",
            "data=npz",
            f"data.path={tmp_path / 'small.npz'}",
        ],
    )
    with pytest.raises(DataError, match=r"patterns are 32 x 32 .* but model.n=64"):
        app.infer(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "reconstruction.npz").exists()


def test_train_on_a_user_scan_file(tmp_path):
    scan = simulate(n=64, n_positions=36, step=0.125, seed=3)
    save_scan(scan, tmp_path / "scan.npz")
    cfg = make_config(
        overrides=["debug=smoke", "data=npz", f"data.path={tmp_path / 'scan.npz'}", "compile=graph"]
    )
    summary = app.train(cfg, tmp_path / "run")
    assert math.isfinite(summary["amp_ssim"])  # objectGuess present: ground-truth metrics
    assert not (tmp_path / "run" / "train_scan.npz").exists()  # files are not copied


def test_resume_continues_from_the_last_completed_epoch(tmp_path):
    first = make_config(overrides=["debug=smoke", "compile=graph", "train.epochs=1"])
    app.train(first, tmp_path)
    with pytest.raises(ConfigError, match="resume=true"):
        app.train(first, tmp_path)  # a run dir with checkpoints is not silently reused
    again = make_config(overrides=["debug=smoke", "compile=graph", "train.epochs=2", "resume=true"])
    summary = app.train(again, tmp_path)
    state = json.loads((tmp_path / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert summary["epochs"] == 2


def lag5(obj) -> float:
    """Correlation of the amplitude with itself 5 pixels along: high for smooth objects."""
    amp = np.abs(obj)
    return float(np.corrcoef(amp[:, :-5].ravel(), amp[:, 5:].ravel())[0, 1])


def test_data_presets_simulate_what_they_describe():
    def scan(preset: str, test: bool = True):
        cfg = make_config(overrides=[*(["data=" + preset] if preset else []), "debug=smoke"])
        return cfg, simulate(cfg.data.simulation(cfg.data.pattern_size(cfg.model.n), test=test))

    cfg, default = scan("")
    amplitude, phase = np.abs(default.object), np.angle(default.object)
    assert list(cfg.data.line_blur) == [1.0, 5.0, 10.0] and cfg.data.probe == "aberrated"
    assert np.ptp(phase) >= 1.0 and np.std(phase) > 0.1  # phase with structure, >= 1 rad
    assert abs(np.corrcoef(amplitude.ravel(), phase.ravel())[0, 1]) < 0.3  # independent
    _, train = scan("", test=False)
    assert train.object.shape != default.object.shape or not np.allclose(
        train.object, default.object
    )
    probe = default.probe
    assert not np.allclose(probe, probe[::-1, ::-1], atol=0.05)  # asymmetric
    assert np.std(np.angle(probe[np.abs(probe) > 0.3])) > 0.3  # complex

    _, pinn = scan("lines_ptychopinn")
    assert np.allclose(np.angle(pinn.object), 0.0) and np.abs(pinn.object).std() > 0.05
    cfg, sharp = scan("lines_sharp")
    assert lag5(pinn.object) > 0.6 > 0.3 > lag5(sharp.object)
    assert cfg.data.probe == "disk"
    cfg, spiral = scan("image_spiral")
    assert cfg.data.scan == "spiral" and cfg.data.test_seed is None
    scans = load_scans(cfg.data, cfg.model.n)
    assert scans.test is scans.train  # trained and scored on the same scan


# --------------------------------------------------------------------------------------
# Documented options, each doing what the README says
# --------------------------------------------------------------------------------------


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "checkpoints" / "state.json").read_text())["history"]


def test_max_minutes_stops_after_the_epoch_that_crosses_it(tmp_path):
    cfg = make_config(
        overrides=["debug=smoke", "compile=graph", "train.epochs=4", "train.max_minutes=1e-6"]
    )
    summary = app.train(cfg, tmp_path)
    assert summary["epochs"] == 1 and [h["epoch"] for h in history(tmp_path)] == [1]
    assert (tmp_path / "model.keras").is_file()


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # Keras' CosineDecay with alpha = final / initial, over every step of the run
        ("cosine", lambda t: 1e-3 * ((1 - 0.01) * 0.5 * (1 + math.cos(math.pi * t)) + 0.01)),
        ("exponential", lambda t: 1e-3 * 0.01**t),
    ],
)
def test_learning_rate_schedule_runs_to_the_final_rate_across_resumes(tmp_path, schedule, expected):
    run = [
        "debug=smoke",
        "compile=graph",
        f"train.schedule={schedule}",
        "train.learning_rate=1e-3",
        "train.final_learning_rate=1e-5",
        "train.epochs=3",
        "train.eval_every=0",
    ]  # 36 positions on a 6 x 6 raster: 25 blocks of 2 x 2, in batches of 8: 3 steps per epoch
    app.train(make_config(overrides=[*run, "train.max_minutes=1e-6"]), tmp_path)  # epoch 1
    app.train(make_config(overrides=[*run, "train.max_minutes=1e-6", "resume=true"]), tmp_path)
    app.train(make_config(overrides=[*run, "resume=true"]), tmp_path)  # epoch 3, the end
    rates = [h["learning_rate"] for h in history(tmp_path)]
    assert rates == pytest.approx([expected(epoch / 3) for epoch in (1, 2, 3)], rel=1e-5)
    assert rates[-1] == pytest.approx(1e-5, rel=1e-5)
    # What the optimizer itself holds, not only what was logged:
    optimizer = keras.saving.load_model(tmp_path / "checkpoints" / "last.keras").optimizer
    assert int(optimizer.iterations.numpy()) == 9
    assert float(optimizer.learning_rate) == pytest.approx(1e-5, rel=1e-5)
    # A scheduled run continued with a constant rate (Keras refuses to set a number on
    # an optimizer built with a schedule; the app builds a new one with the old state).
    constant = ["debug=smoke", "compile=graph", "train.epochs=4", "train.learning_rate=2e-4"]
    app.train(make_config(overrides=[*constant, "resume=true"]), tmp_path)
    last = history(tmp_path)[-1]
    assert last["epoch"] == 4 and last["learning_rate"] == pytest.approx(2e-4)


def test_resume_under_jit_trains_with_xla(tmp_path, monkeypatch):
    from ptycho.monitor import TrainingMonitor

    seen = []
    original = TrainingMonitor.on_train_begin

    def record(self, logs=None):
        seen.append(self.model.jit_compile)
        return original(self, logs)

    monkeypatch.setattr(TrainingMonitor, "on_train_begin", record)
    app.train(make_config(overrides=["debug=smoke", "compile=jit", "train.epochs=1"]), tmp_path)
    summary = app.train(
        make_config(overrides=["debug=smoke", "compile=jit", "train.epochs=2", "resume=true"]),
        tmp_path,
    )
    assert seen == [True, True] and summary["compile"] == "jit" and summary["epochs"] == 2


def user_scan(tmp_path: Path, name: str, *, drop=(), seed=3, **simulation) -> Path:
    """A simulated scan saved as a user's .npz, without the keys in ``drop``."""
    scan = simulate(
        n=64, n_positions=simulation.pop("n_positions", 36), step=0.125, seed=seed, **simulation
    )
    path = save_scan(scan, tmp_path / name)
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files if key not in drop}
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def test_test_path_is_the_scan_the_metrics_are_about(tmp_path):
    train_path = user_scan(tmp_path, "train.npz", seed=3)
    test_path = user_scan(tmp_path, "test.npz", seed=4, n_positions=25)
    overrides = ["debug=smoke", "compile=graph", "data=npz", f"data.path={train_path}"]
    summary = app.train(
        make_config(overrides=[*overrides, f"data.test_path={test_path}"]), tmp_path / "run"
    )
    test_scan = load_scan(test_path)
    reconstruction = np.load(tmp_path / "run" / "reconstruction.npz")
    assert (
        reconstruction["obj"].shape == test_scan.object.shape != load_scan(train_path).object.shape
    )
    inferred = app.infer(
        make_config(
            "infer",
            [
                f"checkpoint={tmp_path / 'run' / 'model.keras'}",
                f"data.path={test_path}",
                "compile=graph",
            ],
        ),
        tmp_path / "infer",
    )
    assert inferred["r_factor"] == pytest.approx(summary["r_factor"], rel=1e-4)
    assert inferred["amp_ssim"] == pytest.approx(summary["amp_ssim"], rel=1e-4)


def test_probe_path_supplies_the_probe_of_a_file_without_one(tmp_path):
    scan_path = user_scan(tmp_path, "noprobe.npz", drop=("probeGuess",), probe="fresnel")
    probe_path = user_scan(tmp_path, "probe.npz", probe="fresnel", n_positions=4)
    overrides = ["debug=smoke", "compile=graph", "data=npz", f"data.path={scan_path}"]
    with pytest.raises(
        ScanFileError,
        match=r"data.path=.*: the file holds no probe \(probeGuess\); give one with data.probe_",
    ):
        app.train(make_config(overrides=overrides), tmp_path / "refused")
    app.train(
        make_config(overrides=[*overrides, f"data.probe_path={probe_path}"]), tmp_path / "run"
    )
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    np.testing.assert_allclose(
        model.get_layer("illumination").probe.numpy(), load_scan(probe_path).probe, atol=1e-7
    )


def test_a_scan_without_ground_truth_trains_and_reconstructs(tmp_path):
    path = user_scan(tmp_path, "blind.npz", drop=("objectGuess",))
    scan = load_scan(path)
    assert scan.object is None
    cfg = make_config(overrides=["debug=smoke", "compile=graph", "data=npz", f"data.path={path}"])
    summary = app.train(cfg, tmp_path / "run")
    inferred = app.infer(
        make_config(
            "infer", [f"checkpoint={tmp_path / 'run' / 'model.keras'}", f"data.path={path}"]
        ),
        tmp_path / "infer",
    )
    for result in (summary, inferred):
        assert math.isfinite(result["r_factor"]) and "amp_ssim" not in result
    for folder in ("run", "infer"):
        reconstruction = np.load(tmp_path / folder / "reconstruction.npz")
        assert reconstruction["obj"].shape == object_shape_for(scan.xcoords, scan.ycoords, 64)
        assert reconstruction["mask"].any()
        assert (tmp_path / folder / "reconstruction.png").is_file()
        assert not (tmp_path / folder / "frc.png").exists()  # no truth, no FRC


def test_a_batch_larger_than_a_files_samples_is_refused(tmp_path):
    path = user_scan(tmp_path, "small.npz")
    cfg = make_config(
        overrides=["debug=smoke", "data=npz", f"data.path={path}", "train.batch_size=100"]
    )
    with pytest.raises(ConfigError, match="train.batch_size=100 is larger than the 25"):
        app.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["translate=legacy", "compile=jit"], "use translate=xla, or compile=graph"),
        (["model.n=100"], "model.n=100: must be 64, 128 or 256, or null"),
        (["model.gridsize=0"], "model.gridsize=0: must be >= 1"),
        (["data=npz", "data.path=/no/such/scan.npz"], "data.path=/no/such/scan.npz: no such file"),
        (["data=npz"], "data.path is required"),
        (["train.batch_size=1000"], "larger than the 25 training samples"),
        (["data.line_blur=[1,5]", "data.line_blur_weights=[1]"], "one weight >= 0 per"),
        (["data.line_blur=[]"], "data.line_blur=\\[\\]: must be one or more blurs"),
    ],
)
def test_impossible_configurations_are_refused_before_any_work(tmp_path, overrides, match):
    cfg = make_config(overrides=["debug=smoke", *overrides])
    with pytest.raises(ConfigError, match=match):
        app.train(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_block_grouping_of_a_spiral_is_refused_before_anything_is_written(tmp_path):
    cfg = make_config(overrides=["debug=smoke", "data.scan=spiral", "data.grouping=block"])
    with pytest.raises(DataError, match="data.grouping=block: .*raster"):
        app.train(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_without_ground_truth_tensorboard_shows_coverage_and_diffraction(tmp_path):
    path = user_scan(tmp_path, "blind.npz", drop=("objectGuess",))
    overrides = ["debug=smoke", "compile=graph", "data=npz", f"data.path={path}"]
    app.train(make_config(overrides=[*overrides, "train.epochs=2"]), tmp_path / "run")
    shapes = image_shapes(tmp_path / "run")
    scan = load_scan(path)
    reconstruction = np.load(tmp_path / "run" / "reconstruction.npz")
    # Evaluated after epoch 1 (eval_every=1) and at the end: the same images both times.
    assert shapes["test/coverage"] == [(*reconstruction["obj"].shape, 1)] * 2
    assert shapes["test/diffraction"] == [(2 * scan.n, 3 * scan.n + 4, 1)] * 2
    assert not any(tag.endswith(("_error", "_truth", "frc")) for tag in shapes)

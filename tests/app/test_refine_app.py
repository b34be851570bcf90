"""Physics refinement as a stage of the applications: ``infer.py`` without a checkpoint,
``train.py`` with ``refine=``, their outputs and refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ptycho import app
from ptycho.errors import ConfigError
from tests.app.test_app import scalar_tags
from tests.conftest import compose_config as make_config


def test_infer_without_a_checkpoint_is_an_iterative_reconstruction(tmp_path):
    cfg = make_config(
        "infer",
        [
            "data=grf",
            "data.test_positions=49",
            "data.position_error=1.0",
            "refine=positions",
            "refine.iterations=4",
            "refine.eval_every=2",
            "refine.batch_size=16",
        ],
    )
    summary = app.infer(cfg, tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["refine_iterations"] == 4 and written["refine_seconds"] > 0
    assert written["seconds"] >= written["refine_seconds"]
    assert written["checkpoint"] is None
    for key in ("amp_ssim", "r_factor", "position_rmse"):
        assert (
            math.isfinite(written[f"refined_{key}"]) and written[key] == written[f"refined_{key}"]
        )
    assert summary == written
    saved = np.load(tmp_path / "reconstruction.npz")
    assert saved["xcoords"].shape == saved["ycoords"].shape == (49,)
    assert saved["probe"].shape == (64, 64) and saved["probe"].dtype == np.complex64
    assert (tmp_path / "refine.png").is_file()
    tags = scalar_tags(tmp_path)
    for tag in ("refine/loss", "refine/r_factor", "refine/amp_ssim", "refine/position_rmse"):
        assert len(tags[tag]) == 3, tag  # iterations 0, 2, 4


RESUMABLE_REFINEMENT = [
    "data=grf",
    "data.test_positions=49",
    "data.position_error=1.0",
    "refine=positions",
    "refine.iterations=5",
    "refine.eval_every=1",
    "refine.batch_size=16",
    "refine.checkpoint_seconds=0",
]


def test_a_refinement_stopped_by_ctrl_c_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Ctrl-C in iteration 3: one line naming the checkpoint of iteration 2 and
    ``resume=true``, no results; the folder is refused without ``resume=true`` and with
    other refine settings; continued, the run writes what an uninterrupted run writes
    and removes the checkpoint."""
    from ptycho.errors import Interrupted
    from ptycho.refine import Refiner

    whole = app.infer(make_config("infer", RESUMABLE_REFINEMENT), tmp_path / "whole")
    assert not (tmp_path / "whole" / "checkpoints" / "refine.npz").exists()

    run_dir = tmp_path / "stopped"
    record = Refiner._record

    def interrupted_in_iteration_3(self, iteration, *args, **kwargs):
        if iteration == 3:
            raise KeyboardInterrupt
        return record(self, iteration, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Refiner, "_record", interrupted_in_iteration_3)
        with pytest.raises(Interrupted) as stopped:
            app.infer(make_config("infer", RESUMABLE_REFINEMENT), run_dir)
    message = str(stopped.value)
    assert "holds iteration 2" in message and f"hydra.run.dir={run_dir} resume=true" in message
    assert not (run_dir / "metrics.json").exists()
    with pytest.raises(ConfigError, match="resume=true"):
        app.infer(make_config("infer", RESUMABLE_REFINEMENT), run_dir)
    other = [*RESUMABLE_REFINEMENT, "refine.step=0.5", "resume=true"]
    with pytest.raises(ConfigError, match=r"refine\.step=1\.0 then, 0\.5 now"):
        app.infer(make_config("infer", other), run_dir)

    passes = []

    def counted(self, iteration, *args, **kwargs):
        passes.append(iteration)
        return record(self, iteration, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Refiner, "_record", counted)
        resumed = app.infer(make_config("infer", [*RESUMABLE_REFINEMENT, "resume=true"]), run_dir)
    assert passes == [3, 4, 5]  # iterations 1 and 2 were not run again
    for key in ("refine_iterations", "r_factor", "amp_ssim", "phase_ssim", "position_rmse"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-5), key
    objects = [
        np.load(folder / "reconstruction.npz")["obj"] for folder in (tmp_path / "whole", run_dir)
    ]
    np.testing.assert_allclose(objects[1], objects[0], atol=1e-5 * np.abs(objects[0]).max())
    assert not (run_dir / "checkpoints" / "refine.npz").exists()


def test_train_keeps_the_networks_figures_beside_the_refined_ones(tmp_path):
    cfg = make_config(overrides=["debug=smoke", "refine=object", "refine.iterations=2"])
    summary = app.train(cfg, tmp_path)
    assert summary["amp_ssim"] != summary["refined_amp_ssim"]
    assert summary["refine_iterations"] == 2
    saved = np.load(tmp_path / "reconstruction.npz")
    assert "probe" in saved and saved["xcoords"].shape == (36,)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["translate=legacy", "compile=graph", "refine=positions", "refine.subpixel=bilinear"],
            "use refine.subpixel=fourier, translate=xla",
        ),
        (
            ["translate=legacy", "compile=graph", "refine=full", "refine.subpixel=bilinear"],
            "use refine.subpixel=fourier, translate=xla",
        ),
        (["refine=object", "refine.iterations=0"], "refine.iterations=0: must be >= 1"),
    ],
)
def test_impossible_refinements_are_refused_before_any_work(tmp_path, overrides, match):
    for name in ("train", "infer"):
        cfg = make_config(name, ["data=grf", *overrides])
        with pytest.raises(ConfigError, match=match):
            getattr(app, name)(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []

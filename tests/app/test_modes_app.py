"""Probe modes through the applications: a partially coherent scan refined with 3 modes
by ``infer.py`` (the modes in ``reconstruction.npz``, TensorBoard and ``refine.png``),
the refined modes carried into training, and the refusals of modes that cannot be."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from ptycho import app, probes
from ptycho.data import save_scan, simulate
from ptycho.errors import DataError
from tests.app.test_app import read_events, scalar_tags
from tests.conftest import compose_config as make_config


@pytest.fixture(scope="module")
def coherent_scan(tmp_path_factory):
    """A 3-mode scan on file and its first mode alone (the probe guess)."""
    folder = tmp_path_factory.mktemp("modes")
    scan = simulate(
        n=64, n_positions=100, object_kind="image", images=("coins", "text"), probe="fresnel",
        probe_radius=0.25, scan="spiral", step=0.125, nphotons=1e6, probe_modes=3, seed=2,
    )  # fmt: skip
    save_scan(scan, folder / "scan.npz")
    np.save(folder / "first.npy", scan.probe[0])
    return folder, scan


def test_refined_modes_are_written_shown_and_carried_into_training(coherent_scan, tmp_path):
    folder, scan = coherent_scan
    data = ["data=npz", f"data.path={folder / 'scan.npz'}"]
    overrides = [*data, f"data.probe_path={folder / 'first.npy'}", "refine=full"]
    settings = ["refine.iterations=6", "refine.eval_every=3", "refine.probe_modes=3"]
    app.infer(make_config("infer", [*overrides, *settings]), tmp_path / "refined")
    refined = tmp_path / "refined" / "reconstruction.npz"
    with np.load(refined) as saved:
        modes = saved["probe"]
    assert modes.shape == (3, 64, 64) and modes.dtype == np.complex64
    flat = modes.reshape(3, -1).astype(np.complex128)
    overlap = np.abs(flat @ flat.conj().T)
    assert np.abs(overlap - np.diag(np.diag(overlap))).max() < 1e-4 * overlap.max()
    assert np.all(np.diff(np.diag(overlap)) <= 0)  # sorted by power
    # TensorBoard: each mode's image and power fraction at every progress point.
    tags = scalar_tags(tmp_path / "refined")
    shares = [tags[f"refine/mode_{k}_power"] for k in range(3)]
    assert all(len(values) == 3 for values in shares)  # iterations 0, 3, 6
    np.testing.assert_allclose(np.sum(shares, axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose([v[-1] for v in shares], probes.powers(modes), rtol=1e-4)
    images = read_events(tmp_path / "refined").Tags()["tensors"]
    assert {f"refine/probe_mode_{k}" for k in range(3)} <= set(images)
    assert (tmp_path / "refined" / "refine.png").is_file()

    # The network takes the refined modes as its probe (model.probe_modes null).
    train = ["debug=smoke", "compile=graph", *data, f"data.probe_path={refined}"]
    app.train(make_config(overrides=train), tmp_path / "network")
    model = keras.saving.load_model(tmp_path / "network" / "model.keras")
    np.testing.assert_allclose(model.get_layer("illumination").probe.numpy(), modes, rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("train", ["model.probe_modes=2"], r"model.probe_modes=2 but the probe has 3 modes"),
        ("infer", ["refine=full", "refine.probe_modes=2"], r"refine.probe_modes=2 but the"),
        ("train", ["refine=object", "refine.probe_modes=2"], r"refine.probe_modes=2 but the"),
    ],
)
def test_modes_that_cannot_be_are_refused_before_anything_is_written(
    coherent_scan, tmp_path, name, overrides, match
):
    folder, _ = coherent_scan
    data = ["data=npz", f"data.path={folder / 'scan.npz'}"]
    config = make_config(name, [*data, *(["debug=smoke"] if name == "train" else []), *overrides])
    with pytest.raises(DataError, match=match) as error:
        getattr(app, name)(config, tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists() or list((tmp_path / "run").iterdir()) == []


def test_modes_of_the_wrong_size_are_refused_naming_the_file(coherent_scan, tmp_path):
    folder, _ = coherent_scan
    np.save(tmp_path / "small.npy", np.ones((3, 32, 32), np.complex64))
    data = ["data=npz", f"data.path={folder / 'scan.npz'}", f"data.probe_path={tmp_path}/small.npy"]
    with pytest.raises(DataError, match=r"the probe is 32 x 32 but the patterns are 64 x 64"):
        app.infer(make_config("infer", [*data, "refine=object"]), tmp_path / "run")

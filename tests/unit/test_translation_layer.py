"""The Translation Keras layer: semantics, jitter, serialization, XLA inside Keras."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import ptycho  # noqa: F401  (registers the layers)
from ptycho.layers import Translation
from ptycho.warp import LegacyBackendUnderXLAError


def scipy_shift(image, dx, dy):
    import scipy.ndimage

    return scipy.ndimage.shift(image, (dy, dx), order=1, mode="grid-constant")


def small_model(layer: Translation) -> keras.Model:
    images = keras.Input((16, 16, 1), dtype="complex64")
    offsets = keras.Input((2,))
    return keras.Model([images, offsets], layer(images, offsets))


def inputs(rng, batch=3):
    images = rng.normal(size=(batch, 16, 16, 1)) + 1j * rng.normal(size=(batch, 16, 16, 1))
    return images.astype(np.complex64), rng.uniform(-4, 4, size=(batch, 2)).astype(np.float32)


def test_layer_translates_complex_patches_like_scipy():
    rng = np.random.default_rng(0)
    images, offsets = inputs(rng)
    out = Translation()(images, offsets).numpy()
    for b, (dx, dy) in enumerate(offsets):
        expected = scipy_shift(images[b, ..., 0].real, dx, dy) + 1j * scipy_shift(
            images[b, ..., 0].imag, dx, dy
        )
        assert np.max(np.abs(out[b, ..., 0] - expected)) < 1e-5


def test_jitter_only_applies_in_training():
    rng = np.random.default_rng(1)
    images, offsets = inputs(rng)
    layer = Translation(jitter_stddev=0.5, seed=3)
    plain = Translation()(images, offsets).numpy()
    np.testing.assert_array_equal(layer(images, offsets, training=False).numpy(), plain)
    assert np.abs(layer(images, offsets, training=True).numpy() - plain).max() > 1e-3
    # The jittered shift is still a translation: total intensity of an interior blob is kept.
    blob = np.zeros((1, 16, 16, 1), np.complex64)
    blob[0, 6:10, 6:10, 0] = 1.0
    moved = layer(blob, np.zeros((1, 2), np.float32), training=True).numpy()
    assert np.sum(moved.real) == pytest.approx(16.0, rel=1e-5)


def test_layer_round_trips_through_get_config_and_keras_file(tmp_path):
    rng = np.random.default_rng(2)
    images, offsets = inputs(rng)
    layer = Translation(backend="legacy", interpolation="nearest", jitter_stddev=0.1, seed=5)
    clone = Translation.from_config(layer.get_config())
    assert (clone.backend, clone.interpolation, clone.jitter_stddev, clone.seed) == (
        "legacy",
        "nearest",
        0.1,
        5,
    )

    model = small_model(Translation())
    path = tmp_path / "translation.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(
        loaded([images, offsets]).numpy(), model([images, offsets]).numpy()
    )


def test_backend_is_a_runtime_choice():
    """Switching the attribute switches the op: only the xla backend runs inside an
    XLA-compiled function, so the same model fails there as legacy and runs as xla."""
    rng = np.random.default_rng(3)
    images, offsets = inputs(rng)
    model = small_model(Translation(backend="legacy"))
    legacy = model([images, offsets]).numpy()
    with pytest.raises(LegacyBackendUnderXLAError):
        tf.function(model, jit_compile=True)([images, offsets])
    model.layers[-1].backend = "xla"
    switched = tf.function(model, jit_compile=True)([images, offsets]).numpy()
    assert np.max(np.abs(switched - legacy)) < 1e-5
    model.layers[-1].backend = "legacy"
    with pytest.raises(LegacyBackendUnderXLAError):
        tf.function(model, jit_compile=True)([images, offsets])


def test_keras_jit_compile_really_uses_xla_with_the_xla_backend():
    rng = np.random.default_rng(4)
    images, offsets = inputs(rng, batch=4)
    real = keras.Input((16, 16, 1))
    shifts = keras.Input((2,))
    model = keras.Model([real, shifts], Translation()(real, shifts))
    model.compile(loss="mse", jit_compile=True)
    assert model.jit_compile is True
    target = np.zeros((4, 16, 16, 1), np.float32)
    model.fit([images.real, offsets], target, epochs=1, verbose=0)

    legacy = keras.Model([real, shifts], Translation(backend="legacy")(real, shifts))
    legacy.compile(loss="mse", jit_compile=True)
    with pytest.raises(LegacyBackendUnderXLAError, match='backend="xla"'):
        legacy.fit([images.real, offsets], target, epochs=1, verbose=0)


def test_invalid_layer_arguments_are_rejected():
    with pytest.raises(ValueError, match="backend"):
        Translation(backend="gpu")
    with pytest.raises(ValueError, match="interpolation"):
        Translation(interpolation="cubic")
    with pytest.raises(ValueError, match="jitter_stddev"):
        Translation(jitter_stddev=-1.0)


def test_gradient_flows_to_images_through_the_layer():
    images = tf.Variable(np.ones((1, 8, 8, 1), np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(Translation()(images, tf.constant([[0.5, 0.5]])))
    grad = tape.gradient(loss, images).numpy()[0, ..., 0]
    # Adjoint of a (0.5, 0.5) shift: interior pixels feed four outputs with weight 1/4 each.
    assert grad[3, 3] == pytest.approx(1.0)
    assert grad[7, 7] == pytest.approx(0.25)

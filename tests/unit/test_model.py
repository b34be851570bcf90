"""The PtychoPINN model: physics convention, overlap constraint, training, saving."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import ptycho  # noqa: F401
from ptycho.data import (
    group_offsets,
    group_positions,
    make_dataset,
    normalisation_factor,
    simulate,
)
from ptycho.layers import FarFieldAmplitude, Illumination, ReassemblePatches
from ptycho.model import (
    ModelConfig,
    PtychoLoss,
    build_model,
    compile_model,
    load_model,
    translate_backends,
)
from ptycho.stitch import extract_patches
from ptycho.warp import LegacyBackendUnderXLAError


@pytest.fixture(scope="module")
def tiny_scan():
    return simulate(n=64, n_positions=36, step=0.2, nphotons=1e6, seed=0)


def first_batch(scan, gridsize, batch_size=8):
    groups = group_positions(scan.xcoords, scan.ycoords, gridsize)
    factor = normalisation_factor(scan.diffraction)
    dataset = make_dataset(scan, groups, norm_factor=factor, batch_size=batch_size, shuffle=False)
    inputs, target = next(iter(dataset))
    return inputs, target, factor


# --------------------------------------------------------------------------------------
# Physics and overlap constraint against independent computations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("jitter", [0.0, 0.05])
def test_physics_layers_reproduce_simulated_amplitudes(jitter):
    scan = simulate(n=64, n_positions=16, jitter=jitter, nphotons=None, seed=2, subpixel="bilinear")
    # Ground-truth patches cut independently (scipy), not with the project's warp.
    import scipy.ndimage

    def cut(part, x, y):
        grid = np.meshgrid(y - 32 + np.arange(64), x - 32 + np.arange(64), indexing="ij")
        return scipy.ndimage.map_coordinates(part, grid, order=1, mode="grid-constant")

    patches = np.stack(
        [
            cut(scan.object.real, x, y) + 1j * cut(scan.object.imag, x, y)
            for x, y in zip(scan.xcoords, scan.ycoords, strict=True)
        ]
    )[..., None].astype(np.complex64)
    illumination = Illumination(64)
    illumination.set_probe(scan.probe)
    amplitudes = FarFieldAmplitude()(illumination(patches)).numpy()[..., 0]
    scale = scan.diffraction.max()
    assert np.max(np.abs(amplitudes - scan.diffraction)) <= 1e-4 * scale


@pytest.mark.parametrize("backend", ["xla", "legacy"])
def test_reassembly_returns_patches_of_a_consistent_object(backend):
    rng = np.random.default_rng(0)
    obj = rng.uniform(0.5, 1, (160, 160)) * np.exp(1j * rng.uniform(-1, 1, (160, 160)))
    obj = obj.astype(np.complex64)
    step = 8  # integer positions with even spacing: integer offsets from group centres
    x, y = np.meshgrid(48 + step * np.arange(6), 48 + step * np.arange(6))
    x, y = x.ravel().astype(float), y.ravel().astype(float)
    groups = group_positions(x, y, gridsize=2)
    centres, offsets = group_offsets(x, y, groups)
    patches = extract_patches(obj, x[groups].ravel(), y[groups].ravel(), 64)
    patches = patches.reshape(len(groups), 4, 64, 64).transpose(0, 2, 3, 1)
    layer = ReassemblePatches(pad=16, backend=backend)
    out = layer(patches, offsets.astype(np.float32)).numpy()
    np.testing.assert_allclose(out, patches, atol=1e-5)


def test_reassembly_backends_agree_and_average_inconsistent_patches():
    rng = np.random.default_rng(1)
    patches = rng.normal(size=(3, 64, 64, 4)) + 1j * rng.normal(size=(3, 64, 64, 4))
    patches = patches.astype(np.complex64)
    offsets = rng.uniform(-9, 9, (3, 4, 2)).astype(np.float32)
    xla = ReassemblePatches(pad=16, backend="xla")(patches, offsets).numpy()
    legacy = ReassemblePatches(pad=16, backend="legacy")(patches, offsets).numpy()
    np.testing.assert_allclose(xla, legacy, atol=1e-5)
    # Two identical offsets: the merged object is the mean of the two patches there.
    same = np.zeros((1, 4, 2), np.float32)
    merged = ReassemblePatches(pad=8)(patches[:1], same).numpy()
    np.testing.assert_allclose(merged[..., 0], patches[:1].mean(axis=-1), atol=1e-5)


def scipy_shift(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Bilinear shift with zero fill (content moves right by dx, down by dy)."""
    import scipy.ndimage

    def shift(part):
        return scipy.ndimage.shift(part, (dy, dx), order=1, mode="grid-constant")

    return shift(image.real) + 1j * shift(image.imag) if np.iscomplexobj(image) else shift(image)


def numpy_reassemble(patches, offsets, pad: int, support: float) -> np.ndarray:
    """The overlap constraint written out with scipy: each group's patches, masked to
    their central ``support * N`` square, are averaged where they overlap on a canvas,
    and the patches are cut back out of the average."""
    batch, n, _, channels = patches.shape
    size = n + 2 * pad
    line = np.abs(np.arange(n) - n / 2 + 0.5) < support * n / 2
    mask = np.outer(line, line).astype(np.float64)
    out = np.zeros(patches.shape, np.complex128)
    for b in range(batch):
        total = np.zeros((size, size), np.complex128)
        count = np.zeros((size, size))
        for c in range(channels):
            dx, dy = offsets[b, c]
            canvas = np.zeros((size, size), np.complex128)
            canvas[pad : pad + n, pad : pad + n] = patches[b, :, :, c] * mask
            weight = np.zeros((size, size))
            weight[pad : pad + n, pad : pad + n] = mask
            total += scipy_shift(canvas, dx, dy)
            count += scipy_shift(weight, dx, dy)
        covered = count > 1e-3
        merged = np.where(covered, total / np.where(covered, count, 1.0), 0)
        for c in range(channels):
            dx, dy = offsets[b, c]
            out[b, :, :, c] = scipy_shift(merged, -dx, -dy)[pad : pad + n, pad : pad + n]
    return out


def random_patches(rng, shape):
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


@pytest.mark.parametrize("backend", ["xla", "legacy"])
@pytest.mark.parametrize(("support", "pad"), [(0.5, 0), (1.0, 8)])
def test_reassembly_is_the_masked_average_of_the_groups_patches(backend, support, pad):
    """Inconsistent patches at sub-pixel offsets: the default half support (pad 0) and
    full support, against the scipy reference."""
    rng = np.random.default_rng(5)
    patches = random_patches(rng, (3, 32, 32, 4))
    offsets = rng.uniform(-6.5, 6.5, (3, 4, 2)).astype(np.float32)
    offsets -= offsets.mean(axis=1, keepdims=True)  # relative to the group centre
    assert np.abs(offsets - np.round(offsets)).min() > 1e-3
    layer = ReassemblePatches(pad=pad, support=support, backend=backend)
    out = layer(patches, offsets).numpy()
    expected = numpy_reassemble(patches, offsets, pad, support)
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_reassembly_gradient_matches_finite_differences():
    rng = np.random.default_rng(6)
    patches = random_patches(rng, (2, 16, 16, 4))
    offsets = tf.constant(rng.uniform(-3.5, 3.5, (2, 4, 2)).astype(np.float32))
    weights = tf.constant(rng.uniform(0.5, 1.5, (2, 16, 16, 4)).astype(np.float32))
    layer = ReassemblePatches(pad=0, support=0.5)

    def loss(real, imag):  # non-linear in the patches
        out = layer(tf.complex(real, imag), offsets)
        return tf.reduce_sum(weights * tf.abs(out) ** 2)

    real, imag = tf.constant(patches.real), tf.constant(patches.imag)
    with tf.GradientTape() as tape:
        tape.watch([real, imag])
        value = loss(real, imag)
    grad_real, grad_imag = tape.gradient(value, [real, imag])
    assert float(tf.reduce_max(tf.abs(grad_real))) > 0
    step = 1e-2
    for _ in range(4):  # directional derivatives along random directions
        dr = rng.normal(size=patches.shape).astype(np.float32)
        di = rng.normal(size=patches.shape).astype(np.float32)
        plus = loss(real + step * dr, imag + step * di)
        minus = loss(real - step * dr, imag - step * di)
        numerical = float(plus - minus) / (2 * step)
        analytic = float(tf.reduce_sum(grad_real * dr) + tf.reduce_sum(grad_imag * di))
        assert analytic == pytest.approx(numerical, rel=2e-3)


def test_poisson_loss_is_the_poisson_nll_difference():
    rng = np.random.default_rng(3)
    measured = np.sqrt(rng.poisson(3.0, (2, 8, 8, 1))).astype(np.float32)
    predicted = rng.uniform(0.5, 2.5, (2, 8, 8, 1)).astype(np.float32)
    loss = PtychoLoss(poisson_weight=1.0)(measured, predicted).numpy()
    counts, rate = measured.astype(np.float64) ** 2, predicted.astype(np.float64) ** 2 + 1e-6

    def nll(lam):  # Poisson NLL without the log(k!) term; xlogy handles k = 0
        from scipy.special import xlogy

        return lam - xlogy(counts, lam)

    expected = np.mean(nll(rate) - nll(np.where(counts > 0, counts, 1e-300)))
    assert loss == pytest.approx(expected, rel=1e-4)
    assert PtychoLoss()(measured, measured).numpy() == pytest.approx(0.0, abs=1e-5)
    mae = PtychoLoss(poisson_weight=0.0, mae_weight=1.0)(measured, predicted).numpy()
    assert mae == pytest.approx(np.mean(np.abs(predicted - measured)), rel=1e-5)
    with pytest.raises(ValueError, match="loss weights"):
        PtychoLoss(poisson_weight=0.0, mae_weight=0.0)


# --------------------------------------------------------------------------------------
# Building and training
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "gridsize"), [(64, 1), (64, 2), (128, 1), (128, 2)])
def test_model_builds_with_expected_shapes(n, gridsize):
    probe = np.ones((n, n), np.complex64)
    training, inference = build_model(
        ModelConfig(n=n, gridsize=gridsize, filters=4, precision="float32"),
        probe=probe,
        norm_factor=1.0,
    )
    c = gridsize**2
    inputs = {"diffraction": np.ones((2, n, n, c), np.float32)}
    if gridsize > 1:
        inputs["offsets"] = np.zeros((2, c, 2), np.float32)
    outputs = training(inputs)
    assert outputs["amplitude"].shape == (2, n, n, c)
    assert outputs["object"].dtype == tf.complex64
    np.testing.assert_allclose(outputs["intensity"], outputs["amplitude"].numpy() ** 2, rtol=1e-5)
    np.testing.assert_array_equal(inference(inputs).numpy(), outputs["object"].numpy())
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in training.layers)
    assert translate_backends(training) == ({"xla"} if gridsize > 1 else set())


@pytest.fixture(scope="module")
def learnable_scan():
    """The default kind of sample, small: multi-scale lines, aberrated probe, dense raster."""
    return simulate(
        n=64,
        n_positions=64,
        step=0.0625,
        probe="aberrated",
        probe_radius=0.2,
        line_blur=(1.0, 5.0, 10.0),
        line_blur_weights=(1.0, 2.0, 5.0),
        phase_range=(-0.6, 0.6),
        seed=0,
    )


def object_error(predicted: np.ndarray, truth: np.ndarray, probe: np.ndarray) -> float:
    """Relative error of object patches where the probe shines, after the one complex
    gain (global scale and phase) that ptychography cannot determine."""
    weight = np.abs(probe)[None, :, :, None]
    p, t = predicted * weight, truth * weight
    gain = np.vdot(p, t) / np.vdot(p, p)
    return float(np.linalg.norm(gain * p - t) ** 2 / np.linalg.norm(t) ** 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "mode"), [("xla", "jit"), ("xla", "graph"), ("legacy", "graph"), ("xla", "eager")]
)
def test_training_steps_decrease_the_loss_and_the_object_error(learnable_scan, backend, mode):
    """Not only the loss (the intensity scale alone could lower it): the object patches
    of the batch move towards the truth, cut out independently with scipy."""
    from tests.unit.test_reconstruction import scipy_patch

    scan = learnable_scan
    keras.utils.set_random_seed(0)
    groups = group_positions(scan.xcoords, scan.ycoords, 2)[:8]
    inputs, target, factor = first_batch(scan, gridsize=2)
    truth = np.moveaxis(
        np.stack(
            [
                [scipy_patch(scan.object, scan.xcoords[j], scan.ycoords[j]) for j in g]
                for g in groups
            ]
        ),
        1,
        -1,
    )
    training, _ = build_model(
        ModelConfig(n=64, gridsize=2, filters=8, precision="float32"),
        probe=scan.probe,
        norm_factor=factor,
        translate_backend=backend,
    )
    compile_model(training, mode, learning_rate=1e-3, poisson_weight=0.0, mae_weight=1.0)
    if mode == "jit":
        assert training.jit_compile is True
    before = object_error(training(inputs)["object"].numpy(), truth, scan.probe)
    losses = [float(training.train_on_batch(inputs, target)) for _ in range(30)]
    after = object_error(training(inputs)["object"].numpy(), truth, scan.probe)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert after < 0.5 * before, (before, after)


def set_amplitude_head(model: keras.Model, bias: float) -> None:
    """Make the amplitude head's last convolution output ``bias`` everywhere."""
    head = model.get_layer("amplitude_out")
    kernel, offset = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.full_like(offset, bias)])


@pytest.mark.parametrize(
    ("activation", "reference"),
    [
        ("sigmoid", lambda b: 1 / (1 + np.exp(-b))),
        ("softplus", lambda b: np.log1p(np.exp(b))),
        ("relu", lambda b: max(b, 0.0)),
        ("exponential", np.exp),
    ],
)
@pytest.mark.parametrize("support", ["half", "full"])
def test_amplitude_activation_and_object_support(activation, reference, support):
    """|O| is the head's activation of its last convolution, on the central N/2 square
    (half support, zero outside) or the whole patch (full)."""
    n = 64
    _, inference = build_model(
        ModelConfig(
            n=n,
            gridsize=1,
            filters=4,
            amplitude_activation=activation,
            object_support=support,
            precision="float32",
        ),
        probe=np.ones((n, n), np.complex64),
        norm_factor=1.0,
    )
    set_amplitude_head(inference, 1.5)
    amplitude = np.abs(inference({"diffraction": np.ones((1, n, n, 1), np.float32)}).numpy())
    inside = np.zeros((n, n), bool)
    inside[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = True
    if support == "full":
        inside[:] = True
    np.testing.assert_allclose(amplitude[0, inside, 0], reference(1.5), rtol=1e-5)
    assert not amplitude[0, ~inside, 0].any()


def test_probe_mask_radius_cuts_the_probe_to_a_disk():
    n, radius = 64, 0.2
    rng = np.random.default_rng(8)
    probe = (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))).astype(np.complex64)
    layer = Illumination(n, mask_radius=radius)
    layer.set_probe(probe)
    coords = np.arange(n) - n / 2
    disk = np.hypot(coords[None, :], coords[:, None]) <= radius * n
    np.testing.assert_array_equal(layer.probe.numpy(), np.where(disk, probe, 0))
    patches = np.ones((1, n, n, 1), np.complex64)
    np.testing.assert_array_equal(layer(patches).numpy()[0, ..., 0], np.where(disk, probe, 0))


def test_compile_model_refuses_jit_when_keras_turns_xla_off(tiny_scan):
    class NoXLA(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.supports_jit = False  # as Keras layers that XLA cannot compile declare

        def call(self, x):
            return x

    inputs = keras.Input((64, 64, 1), name="diffraction")
    model = keras.Model(inputs, {"amplitude": NoXLA()(inputs)})
    with pytest.raises(RuntimeError, match="turned XLA off"):
        compile_model(model, "jit")
    compile_model(model, "graph")  # the other modes do not need XLA
    assert model.jit_compile is False


def test_legacy_model_is_refused_for_jit(tiny_scan):
    training, _ = build_model(
        ModelConfig(filters=4, precision="float32"),
        probe=tiny_scan.probe,
        norm_factor=1.0,
        translate_backend="legacy",
    )
    with pytest.raises(LegacyBackendUnderXLAError, match="use translate=xla"):
        compile_model(training, "jit")


def test_gradients_reach_every_trainable_weight(tiny_scan):
    inputs, target, factor = first_batch(tiny_scan, gridsize=2, batch_size=4)
    training, _ = build_model(
        ModelConfig(n=64, gridsize=2, filters=4, probe_trainable=True, precision="float32"),
        probe=tiny_scan.probe,
        norm_factor=factor,
    )
    loss_fn = PtychoLoss()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(loss_fn(target["amplitude"], training(inputs)["amplitude"]))
    grads = tape.gradient(loss, training.trainable_weights)
    names = [w.path for w in training.trainable_weights]
    assert any("probe_real" in name for name in names) and any("log_scale" in n for n in names)
    for name, grad in zip(names, grads, strict=True):
        assert grad is not None, name
        assert float(tf.reduce_max(tf.abs(grad))) > 0, name


# --------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------


LOAD_IN_FRESH_PROCESS = """
import sys, numpy as np, keras
import ptycho
model = keras.saving.load_model(sys.argv[1])  # safe_mode stays on, no custom objects
inputs = dict(np.load(sys.argv[2]))
out = model.predict(inputs, verbose=0)
np.savez(sys.argv[3], amplitude=out["amplitude"], object=out["object"])
"""


@pytest.mark.slow
def test_saved_model_loads_in_a_fresh_process_with_safe_mode(tiny_scan, tmp_path):
    inputs, target, factor = first_batch(tiny_scan, gridsize=2, batch_size=4)
    training, _ = build_model(
        ModelConfig(filters=4, precision="float32"), probe=tiny_scan.probe, norm_factor=factor
    )
    compile_model(training, "graph")
    training.train_on_batch(inputs, target)
    path = tmp_path / "model.keras"
    training.save(path)
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
    subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_IN_FRESH_PROCESS,
            str(path),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "out.npz"),
        ],
        check=True,
        capture_output=True,
    )
    fresh = np.load(tmp_path / "out.npz")
    here = training.predict(inputs, verbose=0)
    np.testing.assert_allclose(fresh["amplitude"], here["amplitude"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fresh["object"], here["object"], rtol=1e-5, atol=1e-6)
    loaded = load_model(path)
    assert loaded.get_layer("normalise").factor == pytest.approx(factor)
    probe = loaded.get_layer("illumination").probe.numpy()
    np.testing.assert_allclose(probe, tiny_scan.probe, atol=1e-7)


@pytest.mark.parametrize(("saved", "loaded"), [("legacy", "xla"), ("xla", "legacy")])
def test_backend_is_chosen_at_load_time(tiny_scan, tmp_path, saved, loaded):
    inputs, _, factor = first_batch(tiny_scan, gridsize=2, batch_size=4)
    inputs["offsets"] = inputs["offsets"] + 0.37  # sub-pixel shifts: the backends really warp
    training, _ = build_model(
        ModelConfig(filters=4, precision="float32"),
        probe=tiny_scan.probe,
        norm_factor=factor,
        translate_backend=saved,
    )
    before = training.predict(inputs, verbose=0)
    training.save(tmp_path / "model.keras")
    model = load_model(tmp_path / "model.keras", translate_backend=loaded)
    assert translate_backends(model) == {loaded}
    after = model.predict(inputs, verbose=0)
    inner = (slice(None), slice(8, -8), slice(8, -8))
    np.testing.assert_allclose(after["object"][inner], before["object"][inner], atol=1e-4)
    np.testing.assert_allclose(after["amplitude"], before["amplitude"], rtol=1e-3, atol=1e-4)
    # The loaded backend is the one that runs: only xla compiles under XLA.
    compiled = tf.function(lambda x: model(x), jit_compile=True)
    if loaded == "legacy":
        with pytest.raises(LegacyBackendUnderXLAError):
            compiled(inputs)
    else:
        compiled(inputs)


def test_reassembly_gradient_is_the_same_inline_under_xla_and_as_its_own_cluster():
    rng = np.random.default_rng(4)
    patches = tf.constant(
        (rng.normal(size=(2, 64, 64, 4)) + 1j * rng.normal(size=(2, 64, 64, 4))).astype(
            np.complex64
        )
    )
    offsets = tf.constant(rng.uniform(-7, 7, (2, 4, 2)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(2, 64, 64, 4)).astype(np.float32))
    layer = ReassemblePatches(pad=8, support=0.5)

    def grad(p, o):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = tf.reduce_sum(tf.abs(layer(p, o)) * weights)
        return tape.gradient(loss, p)

    graph = tf.function(grad)(patches, offsets)  # the layer runs as its own XLA cluster
    inline = tf.function(grad, jit_compile=True)(patches, offsets)  # traced into XLA
    np.testing.assert_allclose(graph.numpy(), inline.numpy(), atol=1e-5)
    assert float(tf.reduce_max(tf.abs(graph))) > 0

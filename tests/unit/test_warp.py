"""The warp against independent references: the legacy op, numpy, scipy, analytic results."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from ptycho.warp import (
    FILL_MODES,
    INTERPOLATIONS,
    LegacyBackendUnderXLAError,
    inside_xla_compilation,
    projective_warp,
    translate,
)

TOL = 1e-5  # float32 parity with ImageProjectiveTransformV3


def legacy_op(
    images,
    transforms,
    interpolation="bilinear",
    fill_mode="constant",
    fill_value=0.0,
    output_shape=None,
):
    """ImageProjectiveTransformV3 called directly: the reference implementation."""
    images = np.asarray(images)
    transforms = np.asarray(transforms, np.float32)
    if transforms.ndim == 1:
        transforms = np.broadcast_to(transforms, (images.shape[0], 8))
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=list(output_shape or images.shape[1:3]),
        fill_value=np.float32(fill_value),
        interpolation=interpolation.upper(),
        fill_mode=fill_mode.upper(),
    ).numpy()


def random_transforms(kind: str, batch: int, size: int, rng) -> np.ndarray:
    """Output->input transforms about the image centre, shifted so some borders show."""
    out = np.zeros((batch, 8), np.float32)
    centre = (size - 1) / 2
    for b in range(batch):
        matrix = np.eye(2)
        if kind in ("rotation", "perspective"):
            angle = rng.uniform(-np.pi, np.pi)
            matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        if kind in ("scale", "perspective"):
            matrix = matrix @ np.diag(rng.uniform(0.5, 1.8, 2))
        if kind == "shear":
            matrix = matrix @ np.array(
                [[1.0, rng.uniform(-0.6, 0.6)], [rng.uniform(-0.6, 0.6), 1.0]]
            )
        shift = rng.uniform(-0.6 * size, 0.6 * size, 2)
        offset = centre - matrix @ [centre, centre] + shift
        perspective = rng.uniform(-0.02, 0.02, 2) if kind == "perspective" else (0.0, 0.0)
        out[b] = [*matrix[0], offset[0], *matrix[1], offset[1], *perspective]
    return out


KINDS = ("translation", "rotation", "scale", "shear", "perspective")


def jit(fn):
    return tf.function(fn, jit_compile=True)


# --------------------------------------------------------------------------------------
# Parity with ImageProjectiveTransformV3
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill_mode", FILL_MODES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_projective_warp_matches_legacy_op_for_every_mode(interpolation, fill_mode):
    rng = np.random.default_rng(7)
    images = rng.normal(size=(6, 19, 23, 3)).astype(np.float32)
    compiled = jit(
        lambda x, t: projective_warp(
            x, t, interpolation=interpolation, fill_mode=fill_mode, fill_value=0.25
        )
    )
    for kind in KINDS:
        transforms = random_transforms(kind, 6, 21, rng)
        expected = legacy_op(images, transforms, interpolation, fill_mode, 0.25)
        eager = projective_warp(
            images, transforms, interpolation=interpolation, fill_mode=fill_mode, fill_value=0.25
        ).numpy()
        xla = compiled(images, transforms).numpy()
        assert np.max(np.abs(eager - expected)) <= TOL, kind
        assert np.max(np.abs(xla - expected)) <= TOL, kind


def test_projective_warp_output_shape_and_matrix_form_match_legacy():
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(3, 16, 20, 2)).astype(np.float32)
    transforms = random_transforms("rotation", 3, 16, rng)
    expected = legacy_op(images, transforms, output_shape=(11, 27))
    matrices = np.concatenate([transforms, np.ones((3, 1), np.float32)], 1).reshape(3, 3, 3)
    got = projective_warp(images, 2.0 * matrices, output_shape=(11, 27)).numpy()
    assert got.shape == (3, 11, 27, 2)
    assert np.max(np.abs(got - expected)) <= TOL


def test_single_transform_broadcasts_over_batch():
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(5, 12, 12, 1)).astype(np.float32)
    transform = random_transforms("shear", 1, 12, rng)[0]
    got = projective_warp(images, transform).numpy()
    expected = legacy_op(images, np.tile(transform, (5, 1)))
    assert np.max(np.abs(got - expected)) <= TOL


def test_legacy_backend_of_projective_warp_is_the_legacy_op():
    rng = np.random.default_rng(3)
    images = rng.uniform(size=(2, 10, 10, 1)).astype(np.float32)
    transforms = random_transforms("perspective", 2, 10, rng)
    got = projective_warp(images, transforms, backend="legacy", fill_mode="reflect").numpy()
    np.testing.assert_array_equal(got, legacy_op(images, transforms, fill_mode="reflect"))


def test_complex_images_warp_as_real_and_imaginary_parts():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(4, 14, 14, 2)).astype(np.float32)
    imag = rng.normal(size=(4, 14, 14, 2)).astype(np.float32)
    transforms = random_transforms("rotation", 4, 14, rng)
    got = projective_warp((real + 1j * imag).astype(np.complex64), transforms).numpy()
    assert got.dtype == np.complex64
    assert np.max(np.abs(got.real - legacy_op(real, transforms))) <= TOL
    assert np.max(np.abs(got.imag - legacy_op(imag, transforms))) <= TOL


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float64])
def test_other_float_dtypes_keep_their_dtype_and_values(dtype):
    rng = np.random.default_rng(5)
    images = rng.uniform(size=(2, 12, 12, 1)).astype(np.float32)
    offsets = np.array([[1.3, -2.6], [-0.4, 3.2]], np.float32)
    cast = tf.cast(images, dtype)
    got = translate(cast, offsets)
    assert got.dtype == dtype
    reference = legacy_op(
        tf.cast(cast, tf.float32).numpy(),
        np.array([[1, 0, -1.3, 0, 1, 2.6, 0, 0], [1, 0, 0.4, 0, 1, -3.2, 0, 0]], np.float32),
    )
    tolerance = {tf.float16: 2e-3, tf.bfloat16: 1e-2, tf.float64: 1e-6}[dtype]
    assert np.max(np.abs(tf.cast(got, tf.float32).numpy() - reference)) <= tolerance


# --------------------------------------------------------------------------------------
# Translation semantics against numpy / scipy
# --------------------------------------------------------------------------------------


def test_translate_moves_content_right_for_positive_dx_and_down_for_positive_dy():
    image = np.zeros((1, 9, 9, 1), np.float32)
    image[0, 4, 4, 0] = 1.0
    for backend in ("xla", "legacy"):
        out = translate(image, [[2.0, -3.0]], backend=backend).numpy()[0, ..., 0]
        assert out[1, 6] == 1.0 and out.sum() == 1.0, backend


@pytest.mark.parametrize("backend", ["xla", "legacy"])
def test_integer_shift_equals_np_roll_with_zero_fill(backend):
    rng = np.random.default_rng(6)
    images = rng.normal(size=(4, 10, 13, 2)).astype(np.float32)
    shifts = np.array([[3, 2], [-4, 1], [0, -5], [12, 0]], np.float32)  # [dx, dy]
    got = translate(images, shifts, backend=backend).numpy()
    for b, (dx, dy) in enumerate(shifts.astype(int)):
        expected = np.roll(images[b], (dy, dx), axis=(0, 1))
        if dy > 0:
            expected[:dy] = 0
        elif dy < 0:
            expected[dy:] = 0
        if dx > 0:
            expected[:, :dx] = 0
        elif dx < 0:
            expected[:, dx:] = 0
        np.testing.assert_array_equal(got[b], expected)


@pytest.mark.parametrize("backend", ["xla", "legacy"])
def test_subpixel_shift_matches_scipy_grid_constant(backend):
    rng = np.random.default_rng(8)
    images = rng.uniform(-1, 1, size=(6, 16, 20, 1)).astype(np.float32)
    offsets = rng.uniform(-7, 7, size=(6, 2)).astype(np.float32)
    got = translate(images, offsets, backend=backend).numpy()
    for b, (dx, dy) in enumerate(offsets):
        expected = scipy.ndimage.shift(
            images[b, ..., 0].astype(np.float64), (dy, dx), order=1, mode="grid-constant", cval=0.0
        )
        assert np.max(np.abs(got[b, ..., 0] - expected)) <= TOL


def test_translate_xla_matches_legacy_real_and_complex_under_jit():
    rng = np.random.default_rng(9)
    images = (rng.normal(size=(8, 24, 24, 2)) + 1j * rng.normal(size=(8, 24, 24, 2))).astype(
        np.complex64
    )
    offsets = rng.uniform(-30, 30, size=(8, 2)).astype(np.float32)
    expected = translate(images, offsets, backend="legacy").numpy()
    for interpolation in INTERPOLATIONS:
        expected = translate(images, offsets, backend="legacy", interpolation=interpolation)
        got = jit(lambda x, o, i=interpolation: translate(x, o, interpolation=i))(images, offsets)
        assert np.max(np.abs(got.numpy() - expected.numpy())) <= TOL, interpolation


def test_shift_larger_than_the_image_gives_all_fill():
    images = np.ones((3, 8, 8, 1), np.float32)
    offsets = np.array([[8.0, 0.0], [0.5, -9.5], [-100.0, 100.0]], np.float32)
    for backend in ("xla", "legacy"):
        assert not translate(images, offsets, backend=backend).numpy().any()


def test_one_offset_row_broadcasts_over_the_batch():
    rng = np.random.default_rng(10)
    images = rng.uniform(size=(5, 12, 12, 1)).astype(np.float32)
    one = translate(images, [[1.5, -0.25]]).numpy()
    many = translate(images, np.tile([[1.5, -0.25]], (5, 1))).numpy()
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(translate(images, [1.5, -0.25]).numpy(), many)


def test_nearest_translation_rounds_half_away_from_zero_like_the_legacy_op():
    rng = np.random.default_rng(11)
    images = rng.normal(size=(4, 9, 9, 1)).astype(np.float32)
    offsets = np.array([[0.5, -0.5], [1.5, 2.5], [-2.5, 0.49], [0.51, -3.5]], np.float32)
    got = translate(images, offsets, interpolation="nearest").numpy()
    expected = translate(images, offsets, interpolation="nearest", backend="legacy").numpy()
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------------------
# XLA
# --------------------------------------------------------------------------------------


def test_xla_backend_compiles_under_jit():
    def shift(x, offsets):
        return translate(x, offsets)

    def warp(x, transforms):
        return projective_warp(x, transforms)

    images = tf.zeros((4, 16, 16, 2))
    for fn, params in ((shift, tf.zeros((4, 2))), (warp, tf.zeros((4, 8)))):
        hlo = jit(fn).experimental_get_compiler_ir(images, params)(stage="hlo")
        assert "gather" in hlo


def test_legacy_backend_under_jit_raises_a_clear_error_naming_the_fix():
    images = tf.zeros((2, 8, 8, 1))
    with pytest.raises(LegacyBackendUnderXLAError, match='backend="xla"'):
        jit(lambda x: translate(x, [[1.0, 1.0]], backend="legacy"))(images)
    with pytest.raises(LegacyBackendUnderXLAError):
        jit(lambda x: projective_warp(x, tf.zeros((8,)), backend="legacy"))(images)
    # ...also when nested inside a plain tf.function called from a compiled one.
    inner = tf.function(lambda x: translate(x, [[1.0, 1.0]], backend="legacy"))
    with pytest.raises(LegacyBackendUnderXLAError):
        jit(lambda x: inner(x) * 2.0)(images)
    # Without XLA the same call works.
    assert tf.function(lambda x: translate(x, [[1.0, 1.0]], backend="legacy"))(images).shape == (
        2,
        8,
        8,
        1,
    )


def test_inside_xla_compilation_tells_jit_from_graph_and_eager():
    seen = {}

    def probe(name):
        def fn(x):
            seen[name] = inside_xla_compilation()
            return x

        return fn

    probe("eager")(1.0)
    tf.function(probe("graph"))(tf.constant(1.0))
    jit(probe("jit"))(tf.constant(1.0))
    assert seen == {"eager": False, "graph": False, "jit": True}


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["interior", "border"])
@pytest.mark.parametrize("backend", ["xla", "legacy"])
def test_image_gradient_matches_finite_differences(backend, where):
    rng = np.random.default_rng(12)
    images = rng.normal(size=(2, 7, 8, 1)).astype(np.float32)
    offsets = np.array(
        [[0.3, -0.6], [1.7, 0.45]] if where == "interior" else [[5.4, -0.3], [-0.7, -6.35]],
        np.float32,
    )
    theoretical, numerical = tf.test.compute_gradient(
        lambda x: translate(x, offsets, backend=backend), [images], delta=1e-2
    )
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-3)


@pytest.mark.parametrize("where", ["interior", "border"])
def test_offset_gradient_matches_finite_differences(where):
    rng = np.random.default_rng(13)
    images = rng.normal(size=(3, 9, 8, 2)).astype(np.float32)
    offsets = np.array(
        [[0.3, -0.6], [1.7, 0.45], [-2.35, 3.6]]
        if where == "interior"
        else [[6.4, -0.3], [-0.7, -7.35], [7.25, 8.6]],
        np.float32,
    )
    theoretical, numerical = tf.test.compute_gradient(
        lambda o: translate(images, o), [offsets], delta=1e-2
    )
    assert np.abs(theoretical[0]).max() > 0.1  # the check is not vacuous
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=5e-3)


def test_offset_gradient_under_jit_equals_eager():
    rng = np.random.default_rng(14)
    images = tf.constant(rng.normal(size=(4, 12, 12, 2)).astype(np.float32))
    offsets = tf.constant(rng.uniform(-5, 5, size=(4, 2)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(4, 12, 12, 2)).astype(np.float32))

    def grads(x, o):
        with tf.GradientTape() as tape:
            tape.watch([x, o])
            loss = tf.reduce_sum(translate(x, o) * weights)
        return tape.gradient(loss, [x, o])

    eager = grads(images, offsets)
    compiled = jit(grads)(images, offsets)
    for a, b in zip(eager, compiled, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_image_gradient_is_the_adjoint_translation():
    """<T x, y> = <x, T^T y>, with T^T the translation by -t: the custom gradient."""
    rng = np.random.default_rng(15)
    x = rng.normal(size=(3, 11, 10, 1)).astype(np.float64)
    y = rng.normal(size=(3, 11, 10, 1)).astype(np.float64)
    offsets = np.array([[2.3, -1.2], [-4.6, 0.7], [9.5, 3.1]], np.float32)
    forward = np.sum(translate(x, offsets).numpy() * y)
    adjoint = np.sum(x * translate(y, -offsets).numpy())
    assert forward == pytest.approx(adjoint, rel=1e-6)
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        loss = tf.reduce_sum(translate(xt, offsets) * y)
    np.testing.assert_allclose(tape.gradient(loss, xt).numpy(), translate(y, -offsets).numpy())


def test_legacy_backend_has_no_offset_gradient():
    images = tf.ones((1, 6, 6, 1))
    offsets = tf.constant([[0.5, 0.5]])
    with tf.GradientTape() as tape:
        tape.watch(offsets)
        loss = tf.reduce_sum(translate(images, offsets, backend="legacy"))
    assert tape.gradient(loss, offsets) is None


def sample_coordinates(transform: np.ndarray, size: int) -> np.ndarray:
    """Input coordinates (x_in, y_in) read by every output pixel (module convention)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    a = transform.astype(np.float64)
    k = a[6] * x + a[7] * y + 1
    return np.stack([(a[0] * x + a[1] * y + a[2]) / k, (a[3] * x + a[4] * y + a[5]) / k])


def test_transform_gradient_of_projective_warp_matches_finite_differences():
    """Every entry of the Jacobian with respect to the 8 transform parameters.

    The output is piecewise smooth in the transform (bilinear weights between pixel
    crossings), so each parameter is perturbed by a step that moves no sample by more
    than 2e-3 px, and the transforms are drawn so that no sample lies within twice that
    of a pixel crossing: the finite difference then sees one smooth piece everywhere.
    """
    rng = np.random.default_rng(16)
    size, move = 7, 2e-3
    images = rng.normal(size=(2, size, size, 1)).astype(np.float32)
    transforms = []
    while len(transforms) < 2:
        candidate = random_transforms("perspective", 1, size, rng)[0]
        candidate[6:] *= 0.5
        coords = sample_coordinates(candidate, size)
        inside = (coords > 0.5) & (coords < size - 1.5)
        distance = np.abs(coords - np.round(coords))
        if inside.mean() > 0.5 and distance.min() > 2 * move:
            transforms.append(candidate)
    transforms = np.stack(transforms).astype(np.float32)

    variable = tf.Variable(transforms)
    with tf.GradientTape(persistent=True) as tape:
        out = projective_warp(images, variable)
    jacobian = tape.jacobian(out, variable, experimental_use_pfor=False).numpy()
    jacobian = jacobian.reshape(2, size * size, 2, 8)  # (image, pixel, image', parameter)

    y, x = np.mgrid[0:size, 0:size]
    reach = max(size, 1.0)  # |x|, |y| of the output pixels
    for b in range(2):
        coords = sample_coordinates(transforms[b], size)
        lever = [reach, reach, 1.0, reach, reach, 1.0]  # how far a unit step moves a sample
        lever += [reach * np.abs(coords).max()] * 2
        for i in range(8):
            step = move / lever[i]
            plus, minus = transforms.copy(), transforms.copy()
            plus[b, i] += step
            minus[b, i] -= step
            numerical = (
                projective_warp(images, plus).numpy() - projective_warp(images, minus).numpy()
            ) / (2 * step)
            np.testing.assert_allclose(
                jacobian[b, :, b, i], numerical[b].ravel(), atol=1e-2, rtol=5e-3
            )
            assert not numerical[1 - b].any()  # another image's transform: no effect
        assert not jacobian[b, :, 1 - b].any()  # and no gradient
    assert np.abs(jacobian).max() > 0.5


# --------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    images = np.zeros((2, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="rank 4"):
        translate(np.zeros((8, 8, 1), np.float32), [[0.0, 0.0]])
    with pytest.raises(TypeError, match="float or complex"):
        translate(np.zeros((1, 8, 8, 1), np.int32), [[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"\[dx, dy\]"):
        translate(images, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="expected 1 \\(broadcast\\) or 2"):
        translate(images, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="transforms must have shape"):
        projective_warp(images, np.zeros((2, 6)))
    with pytest.raises(ValueError, match="backend must be one of"):
        translate(images, [[0.0, 0.0]], backend="fast")
    with pytest.raises(ValueError, match="fill_mode must be one of"):
        projective_warp(images, np.zeros(8), fill_mode="mirror")

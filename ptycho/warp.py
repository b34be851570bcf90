"""Projective warps and sub-pixel translations that compile under XLA.

Two backends implement the same semantics:

``"xla"``
    Pure TensorFlow (index arithmetic + ``tf.gather``). Compiles under
    ``tf.function(jit_compile=True)``, runs on any device, and is differentiable with
    respect to the images *and* the transforms / offsets.
``"legacy"``
    ``tf.raw_ops.ImageProjectiveTransformV3``, the op the research code used. It has no
    XLA kernel, so it cannot run inside an XLA-compiled function, and TensorFlow
    registers no gradient with respect to the transform (only the images).

Conventions (docs/design.md, section 3)
---------------------------------------
Images are NHWC. A transform maps *output* pixel coordinates ``(x, y)`` (x = column,
y = row, pixel centres at integers) to *input* coordinates::

    k = a6 * x + a7 * y + 1
    x_in = (a0 * x + a1 * y + a2) / k
    y_in = (a3 * x + a4 * y + a5) / k

exactly as ``ImageProjectiveTransformV3``. :func:`translate` takes offsets ``[dx, dy]``
and moves content right by ``dx`` and down by ``dy``::

    out(y, x) = img(y - dy, x - dx)

with bilinear interpolation and zero fill. Complex tensors are warped as their real and
imaginary parts.

Fast path
---------
A pure translation (indeed any axis-aligned scale + shift) is separable: it is done as a
row gather followed by a column gather, two taps each, instead of a four-corner gather
of every output pixel. For the bilinear zero-fill translation used by the model, the
gradient with respect to the images is the exact adjoint, which is the translation by
``-[dx, dy]``; a custom gradient uses that, so the backward pass costs one forward pass
instead of a scatter-add.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import tensorflow as tf

__all__ = [
    "BACKENDS",
    "FILL_MODES",
    "INTERPOLATIONS",
    "LEGACY_UNDER_JIT",
    "Backend",
    "LegacyBackendUnderXLAError",
    "TranslateOptions",
    "check_compilable",
    "inside_xla_compilation",
    "projective_warp",
    "run_under_xla",
    "translate",
    "translation_transforms",
]


class Backend(StrEnum):
    """Warp implementations (module docstring)."""

    xla = "xla"
    legacy = "legacy"


BACKENDS = tuple(Backend)
INTERPOLATIONS = ("bilinear", "nearest")
FILL_MODES = ("constant", "nearest", "reflect", "wrap")

_HALF_TYPES = (tf.float16, tf.bfloat16)


class LegacyBackendUnderXLAError(Exception):
    """The legacy op was asked for inside a function that XLA must compile.

    Derives from ``Exception`` with its constructor untouched so that AutoGraph
    re-raises it with its own type instead of wrapping it in a ``StagingError``.
    """


LEGACY_UNDER_JIT = (
    "translate=legacy cannot run with compile=jit (ImageProjectiveTransformV3 has no XLA "
    "kernel): use translate=xla, or compile=graph for the legacy path"
)


def check_compilable(backend: str, compile_mode: str) -> None:
    """The one rule of backends and compile modes: the legacy op has no XLA kernel, so
    ``backend="legacy"`` cannot run with ``compile_mode="jit"``. Raises
    :class:`LegacyBackendUnderXLAError` (its message names the fix) before any tracing;
    :func:`inside_xla_compilation` catches what gets past it while tracing."""
    if backend == Backend.legacy and compile_mode == "jit":
        raise LegacyBackendUnderXLAError(LEGACY_UNDER_JIT)


@dataclass
class TranslateOptions:
    """The ``translate`` section: the warp of every translation (the model's overlap
    constraint, the stitcher, the refinement's patch extraction)."""

    backend: Backend = Backend.xla
    """``xla``: the pure-TensorFlow gather warp (compiles under XLA; gradients for images
    and offsets). ``legacy``: ``ImageProjectiveTransformV3`` (no XLA kernel, no offset
    gradient): the rollback path."""


# --------------------------------------------------------------------------------------
# XLA context detection
# --------------------------------------------------------------------------------------


def inside_xla_compilation() -> bool:
    """Return True while tracing a function that XLA will compile.

    Covers ``tf.function(jit_compile=True)`` (and Keras ``jit_compile=True``, which uses
    it) at any nesting depth, and the XLA control-flow contexts of
    ``tf.xla.experimental.compile`` / TPU rewrites. Eager code returns False.
    """
    if tf.executing_eagerly():
        return False
    from tensorflow.python.ops import control_flow_util  # noqa: PLC0415

    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return True
    # tf.function passes its attributes (``_XlaMustCompile`` for jit_compile=True) to
    # the tracer as ``tracing_options``; the FuncGraph being traced does not carry
    # them, so look for them on the tracing call stack. Tracing happens once per input
    # signature, so the cost of the walk does not matter.
    frame = sys._getframe(1)
    while frame is not None:
        options = frame.f_locals.get("tracing_options")
        attributes = getattr(options, "attributes", None)
        if isinstance(attributes, dict) and attributes.get("_XlaMustCompile"):
            return True
        frame = frame.f_back
    return False


# --------------------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _as_images(images) -> tf.Tensor:
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(
            f"images must be NHWC with rank 4 (batch, height, width, channels), got shape "
            f"{images.shape}"
        )
    if not (images.dtype.is_floating or images.dtype.is_complex):
        raise TypeError(
            f"images must be a float or complex tensor, got {images.dtype.name}; cast "
            "integer images to float32 first"
        )
    return images


def _compute_dtype(dtype: tf.DType) -> tf.DType:
    if dtype in _HALF_TYPES:
        return tf.float32
    return dtype


def _split_complex(images: tf.Tensor) -> tuple[tf.Tensor, bool]:
    """Complex (B, H, W, C) -> real (B, H, W, 2C) with [real | imag] channels."""
    if images.dtype.is_complex:
        return tf.concat([tf.math.real(images), tf.math.imag(images)], axis=-1), True
    return images, False


def _as_flat_transforms(transforms) -> tf.Tensor:
    """(8,), (B, 8), (3, 3) or (B, 3, 3) -> float32 (B', 8) with B' in {1, B}."""
    transforms = tf.cast(tf.convert_to_tensor(transforms), tf.float32)
    shape = transforms.shape
    if shape.rank == 1 and shape[0] == 8:
        return transforms[None]
    if shape.rank == 2 and shape[-1] == 8:
        return transforms
    if shape.rank in (2, 3) and shape[-2:] == (3, 3):
        matrices = transforms[None] if shape.rank == 2 else transforms
        matrices = matrices / matrices[:, 2:3, 2:3]
        return tf.reshape(matrices, (-1, 9))[:, :8]
    raise ValueError(
        f"transforms must have shape (8,), (batch, 8), (3, 3) or (batch, 3, 3), got {shape}"
    )


def _check_batch(name: str, rows: int | None, batch: int | None) -> None:
    if rows is not None and batch is not None and rows not in (1, batch):
        raise ValueError(f"{name} has {rows} rows; expected 1 (broadcast) or {batch}")


def _output_hw(images: tf.Tensor, output_shape) -> tuple[tf.Tensor, tf.Tensor]:
    if output_shape is None:
        shape = tf.shape(images)
        return shape[1], shape[2]
    if len(output_shape) != 2:
        raise ValueError(f"output_shape must be (height, width), got {output_shape!r}")
    return tf.constant(int(output_shape[0])), tf.constant(int(output_shape[1]))


# --------------------------------------------------------------------------------------
# Coordinate mapping and rounding, matching ImageProjectiveTransformV3 exactly
# --------------------------------------------------------------------------------------


def _map_coordinate(coord: tf.Tensor, length: tf.Tensor, fill_mode: str) -> tf.Tensor:
    """Map input coordinates outside ``[0, length - 1]`` as the legacy kernel does."""
    if fill_mode == "constant":
        return coord
    n = tf.cast(length, coord.dtype)
    upper = n - 1.0
    if fill_mode == "nearest":
        return tf.clip_by_value(coord, 0.0, upper)
    if fill_mode == "reflect":
        # Reflect [abcd] to [dcba|abcd|dcba].
        size2 = 2.0 * n
        low = size2 * tf.floor(-coord / size2) + coord
        low = tf.where(low < -n, low + size2, -low - 1.0)
        high = coord - size2 * tf.floor(coord / size2)
        high = tf.where(high >= n, size2 - high - 1.0, high)
    else:  # wrap: [abcd] to [abcd|abcd|abcd]
        size = tf.maximum(n - 1.0, 1.0)
        low = coord + n * (tf.floor(-coord / size) + 1.0)
        high = coord - n * tf.floor(coord / size)
    mapped = tf.where(coord < 0.0, low, tf.where(coord > upper, high, coord))
    mapped = tf.where(n <= 1.0, tf.zeros_like(mapped), mapped)
    return tf.clip_by_value(mapped, 0.0, upper)


def _round_half_away(value: tf.Tensor) -> tf.Tensor:
    """``std::round``: halves round away from zero (``tf.round`` rounds to even)."""
    floor = tf.floor(value)
    frac = value - floor
    up = (frac > 0.5) | ((frac == 0.5) & (value >= 0.0))
    return floor + tf.cast(up, value.dtype)


_AXIS_EXPAND = {
    1: (slice(None), slice(None), None, None),  # (B, L) -> (B, L, 1, 1) for rows
    2: (slice(None), None, slice(None), None),  # (B, L) -> (B, 1, L, 1) for columns
}


def _exact_product(coefficient: tf.Tensor, pixel: tf.Tensor) -> tf.Tensor:
    """``coefficient * pixel`` rounded once, whatever the compiler fuses.

    XLA contracts ``a * x + b`` into a fused multiply-add, which rounds differently
    from the legacy kernel's separate multiply and add and moves sampling positions by
    an ulp (visible as ~1e-5 differences on rotated images). Splitting the coefficient
    into a 12-bit head (mantissa masked) and the remaining tail makes both partial
    products exact for integer pixel coordinates below 4096, so their sum is the
    correctly rounded product however it is fused. The gradient with respect to the
    coefficient is ``pixel``, carried by the tail.
    """
    bits = tf.bitcast(coefficient, tf.int32)
    head = tf.stop_gradient(tf.bitcast(tf.bitwise.bitwise_and(bits, -4096), tf.float32))
    tail = coefficient - head
    return head * pixel + tail * pixel


def _taps(coord: tf.Tensor, interpolation: str) -> list[tuple[tf.Tensor, tf.Tensor | None]]:
    """Integer sample positions and weights for one axis: [(index, weight), ...].

    Weights are computed as the legacy kernel does (``ceil - x`` and ``x - floor``);
    ``None`` means weight 1 (nearest). ``"bilinear_derivative"`` gives the bilinear
    taps with the derivative of their weights with respect to a translation offset
    (input coordinate = pixel - offset), used for offset gradients.
    """
    if interpolation == "nearest":
        return [(tf.cast(_round_half_away(coord), tf.int32), None)]
    floor = tf.floor(coord)
    index = tf.cast(floor, tf.int32)
    if interpolation == "bilinear_derivative":  # d weights / d offset (= -d / d coord)
        one = tf.ones_like(coord)
        return [(index, one), (index + 1, -one)]
    ceil = floor + 1.0
    return [(index, ceil - coord), (index + 1, coord - floor)]


def _sum_taps(taps, params, axis, expand, broadcast, fill_value):
    """Gather and weight each tap, then sum: ``sum_t w_t * value_t``.

    ``taps`` is ``[(index, valid, weight), ...]`` with (B', L) tensors (``weight`` None
    means 1, for nearest); ``index`` is already clipped into range and ``valid`` says
    whether the unclipped index was inside. A tap outside the image reads
    ``fill_value``, as in the legacy kernel; this is folded into the small (B', L)
    weights (``w * valid``) and a bias (``fill * w * (1 - valid)``) rather than a
    select on every output element, which keeps XLA's fused loop at two loads and two
    multiply-adds per output. Each tap is its own gather so that XLA fuses all of them
    into that single loop.

    A consequence: a non-finite input pixel at the image edge can leak (as NaN) into
    the fill region next to it, where the legacy op writes ``fill_value``.
    """
    dtype = params.dtype
    out, bias = None, None
    for index, valid, weight in taps:
        if broadcast:  # one transform for the whole batch
            value = tf.gather(params, index[0], axis=axis)
        else:
            value = tf.gather(params, index, axis=axis, batch_dims=1)
        weight = tf.ones_like(valid, tf.float32) if weight is None else weight
        inside = tf.where(valid, weight, 0.0)
        value = value * tf.cast(inside, dtype)[expand]
        out = value if out is None else out + value
        if fill_value != 0.0:
            outside = (weight - inside) * fill_value
            bias = outside if bias is None else bias + outside
    if bias is not None:
        out = out + tf.cast(bias, dtype)[expand]
    return out


# --------------------------------------------------------------------------------------
# Generic projective warp: every tap of every output pixel gathered from the flat image
# --------------------------------------------------------------------------------------


def _warp_generic(images, transforms, out_h, out_w, interpolation, fill_mode, fill_value):
    """images (B, H, W, C) real; transforms (B' in {1, B}, 8) float32."""
    shape = tf.shape(images)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    ys, xs = tf.meshgrid(
        tf.range(out_h, dtype=tf.float32), tf.range(out_w, dtype=tf.float32), indexing="ij"
    )
    xs = tf.reshape(xs, (1, -1))  # (1, P), P = out_h * out_w
    ys = tf.reshape(ys, (1, -1))
    t = [transforms[:, i : i + 1] for i in range(8)]  # each (B', 1)

    def affine(a, b, c):  # (a * x + b * y) + c, rounded as the legacy kernel does
        return (_exact_product(a, xs) + _exact_product(b, ys)) + c

    projection = affine(t[6], t[7], 1.0)
    infinite = projection == 0.0
    safe = tf.where(infinite, tf.ones_like(projection), projection)
    x_in = _map_coordinate(affine(t[0], t[1], t[2]) / safe, width, fill_mode)
    y_in = _map_coordinate(affine(t[3], t[4], t[5]) / safe, height, fill_mode)

    taps = []
    for yi, wy in _taps(y_in, interpolation):
        for xi, wx in _taps(x_in, interpolation):
            valid = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
            index = tf.clip_by_value(yi, 0, height - 1) * width + tf.clip_by_value(xi, 0, width - 1)
            taps.append((index, valid, None if wy is None else wy * wx))
    flat = tf.reshape(images, (batch, height * width, channels))
    expand = (slice(None), slice(None), None)  # (B', P) -> (B', P, 1)
    broadcast = transforms.shape[0] == 1
    out = _sum_taps(taps, flat, 1, expand, broadcast, fill_value)
    out = tf.where(infinite[..., None], tf.cast(fill_value, out.dtype), out)
    return tf.reshape(out, (batch, out_h, out_w, channels))


# --------------------------------------------------------------------------------------
# Translation fast path: separable, rows then columns, two taps each
# --------------------------------------------------------------------------------------


def _axis_taps(coord, length, interpolation, fill_mode):
    """Taps of a resample along one axis at ``coord`` (B', L): [(index, valid, weight)]."""
    coord = _map_coordinate(coord, length, fill_mode)
    return [
        (tf.clip_by_value(i, 0, length - 1), (i >= 0) & (i < length), w)
        for i, w in _taps(coord, interpolation)
    ]


def _resample_axis(images, coord, axis, interpolation, fill_mode, fill_value):
    """Resample (B, H, W, C) ``images`` along ``axis`` (1 = rows, 2 = columns) at input
    coordinates ``coord`` (B' in {1, B}, L)."""
    taps = _axis_taps(coord, tf.shape(images)[axis], interpolation, fill_mode)
    broadcast = coord.shape[0] == 1
    return _sum_taps(taps, images, axis, _AXIS_EXPAND[axis], broadcast, fill_value)


def _shift_coords(offsets, height, width):
    """Input coordinates of a translation: (B, H) rows and (B, W) columns."""
    y_in = tf.range(height, dtype=tf.float32)[None] - offsets[:, 1:2]
    x_in = tf.range(width, dtype=tf.float32)[None] - offsets[:, 0:1]
    return y_in, x_in


@tf.custom_gradient
def _translate_bilinear_zero(images, offsets):
    """Bilinear zero-fill translation of real (B, H, W, C) images by (B, 2) offsets.

    The gradient with respect to the images is the exact adjoint, the translation by
    ``-offsets``: backward costs one forward pass instead of a scatter-add. The gradient
    with respect to the offsets is that of the bilinear weights: per unit of offset the
    lower tap's weight grows by one and the upper tap's shrinks by one, so
    ``d out / d dx = rows(x0) - rows(x0 + 1)`` (column taps of the row-interpolated
    image) and ``d out / d dy`` is the column interpolation of the row-tap difference.
    """
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    y_in, x_in = _shift_coords(offsets, height, width)
    out = _resample_axis(
        _resample_axis(images, y_in, 1, "bilinear", "constant", 0.0),
        x_in,
        2,
        "bilinear",
        "constant",
        0.0,
    )

    def grad(upstream):
        grad_images = _translate_bilinear_zero(upstream, -offsets)
        rows = _resample_axis(images, y_in, 1, "bilinear", "constant", 0.0)
        d_rows = _resample_axis(images, y_in, 1, "bilinear_derivative", "constant", 0.0)
        d_dx = _resample_axis(rows, x_in, 2, "bilinear_derivative", "constant", 0.0)
        d_dy = _resample_axis(d_rows, x_in, 2, "bilinear", "constant", 0.0)
        grad_dx = tf.reduce_sum(upstream * d_dx, axis=(1, 2, 3))
        grad_dy = tf.reduce_sum(upstream * d_dy, axis=(1, 2, 3))
        return grad_images, tf.cast(tf.stack([grad_dx, grad_dy], axis=1), offsets.dtype)

    return out, grad


# --------------------------------------------------------------------------------------
# Legacy backend
# --------------------------------------------------------------------------------------


def _legacy_warp(images, transforms, out_h, out_w, interpolation, fill_mode, fill_value):
    if inside_xla_compilation():
        raise LegacyBackendUnderXLAError(
            "the legacy warp (ImageProjectiveTransformV3) has no XLA kernel and cannot run "
            'inside a jit_compile=True function; use backend="xla" (translate=xla), or '
            "compile without XLA (compile=graph)"
        )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.stack([out_h, out_w]),
        fill_value=tf.cast(fill_value, tf.float32),
        interpolation=interpolation.upper(),
        fill_mode=fill_mode.upper(),
    )


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _apply_real(fn, images: tf.Tensor) -> tf.Tensor:
    """Run ``fn`` on a real compute-dtype view of ``images``; restore dtype/complexness."""
    dtype = images.dtype
    real, is_complex = _split_complex(images)
    compute = _compute_dtype(real.dtype)
    out = fn(tf.cast(real, compute))
    if is_complex:
        out = tf.cast(out, real.dtype)
        real_part, imag_part = tf.split(out, 2, axis=-1)
        return tf.complex(real_part, imag_part)
    return tf.cast(out, dtype)


def projective_warp(
    images,
    transforms,
    *,
    interpolation: str = "bilinear",
    fill_mode: str = "constant",
    fill_value: float = 0.0,
    output_shape: Sequence[int] | None = None,
    backend: str = "xla",
) -> tf.Tensor:
    """Warp images by projective transforms, like ``ImageProjectiveTransformV3``.

    Parameters
    ----------
    images : tensor, (B, H, W, C)
        Float (any width; half types are computed in float32) or complex images.
    transforms : tensor, (8,), (B, 8), (3, 3) or (B, 3, 3)
        Maps output pixel coordinates to input coordinates (module docstring). A single
        transform is broadcast over the batch. A 3x3 matrix is normalised by its
        bottom-right entry.
    interpolation : {"bilinear", "nearest"}
        Nearest rounds halves away from zero, as the legacy kernel does.
    fill_mode : {"constant", "nearest", "reflect", "wrap"}
        How input coordinates outside the image are mapped; "constant" reads
        ``fill_value`` there.
    fill_value : float
        Value outside the image for ``fill_mode="constant"``.
    output_shape : (int, int), optional
        Output (height, width); default the input's.
    backend : {"xla", "legacy"}
        ``"legacy"`` calls ``ImageProjectiveTransformV3`` (no XLA, no transform
        gradient).

    Returns
    -------
    tensor, (B, out_h, out_w, C), the dtype of ``images``.

    Notes
    -----
    The xla backend is differentiable with respect to ``images`` and ``transforms``; the
    gradient with respect to the transform is that of the bilinear weights (the
    sampling positions themselves are piecewise constant).
    """
    _check_choice("interpolation", interpolation, INTERPOLATIONS)
    _check_choice("fill_mode", fill_mode, FILL_MODES)
    _check_choice("backend", backend, BACKENDS)
    fill_value = float(fill_value)
    images = _as_images(images)
    transforms = _as_flat_transforms(transforms)
    _check_batch("transforms", transforms.shape[0], images.shape[0])
    out_h, out_w = _output_hw(images, output_shape)

    if backend == "legacy":

        def warp(real):
            flat = tf.broadcast_to(transforms, (tf.shape(real)[0], 8))
            return _legacy_warp(real, flat, out_h, out_w, interpolation, fill_mode, fill_value)

        return _apply_real(warp, images)
    static = (
        interpolation,
        fill_mode,
        fill_value,
        None if output_shape is None else (int(output_shape[0]), int(output_shape[1])),
    )
    return run_under_xla(_projective_xla, images, transforms, static)


def _projective_xla(images, transforms, interpolation, fill_mode, fill_value, output_shape):
    out_h, out_w = _output_hw(images, output_shape)
    return _apply_real(
        lambda real: _warp_generic(
            real, transforms, out_h, out_w, interpolation, fill_mode, fill_value
        ),
        images,
    )


def translation_transforms(offsets) -> tf.Tensor:
    """(B, 2) offsets [dx, dy] -> (B, 8) ImageProjectiveTransformV3 transforms."""
    offsets = tf.cast(tf.convert_to_tensor(offsets), tf.float32)
    ones = tf.ones_like(offsets[:, 0])
    zeros = tf.zeros_like(ones)
    dx, dy = offsets[:, 0], offsets[:, 1]
    return tf.stack([ones, zeros, -dx, zeros, ones, -dy, zeros, zeros], axis=1)


def translate(
    images,
    offsets,
    *,
    backend: str = "xla",
    interpolation: str = "bilinear",
) -> tf.Tensor:
    """Translate images by sub-pixel offsets ``[dx, dy]`` with zero fill.

    ``out(y, x) = img(y - dy, x - dx)``: positive ``dx`` moves content right, positive
    ``dy`` moves it down (docs/design.md, section 3).

    Parameters
    ----------
    images : tensor, (B, H, W, C)
        Float or complex.
    offsets : tensor, (B, 2) or (1, 2) or (2,)
        ``[dx, dy]`` in pixels per image; a single row is broadcast over the batch.
    backend : {"xla", "legacy"}
        ``"xla"``: separable two-tap gathers, compiles under XLA, gradients for images
        and offsets. ``"legacy"``: ``ImageProjectiveTransformV3``; gradient for the
        images only (the offsets get ``None``), and it raises
        :class:`LegacyBackendUnderXLAError` inside an XLA-compiled function.
    interpolation : {"bilinear", "nearest"}

    Returns
    -------
    tensor, (B, H, W, C), the dtype of ``images``.
    """
    _check_choice("interpolation", interpolation, INTERPOLATIONS)
    _check_choice("backend", backend, BACKENDS)
    images = _as_images(images)
    offsets = tf.cast(tf.convert_to_tensor(offsets), tf.float32)
    if offsets.shape.rank == 1:
        offsets = offsets[None]
    if offsets.shape.rank != 2 or offsets.shape[-1] != 2:
        raise ValueError(f"offsets must have shape (batch, 2) as [dx, dy], got {offsets.shape}")
    _check_batch("offsets", offsets.shape[0], images.shape[0])
    offsets = tf.broadcast_to(offsets, (tf.shape(images)[0], 2))
    if backend == "legacy":

        def shift(real):
            height, width = tf.shape(real)[1], tf.shape(real)[2]
            transforms = translation_transforms(offsets)
            return _legacy_warp(real, transforms, height, width, interpolation, "constant", 0.0)

        return _apply_real(shift, images)
    return run_under_xla(_translate_xla, images, offsets, (interpolation,))


def _translate_xla(images, offsets, interpolation):
    def shift(real):
        if interpolation == "bilinear":
            return _translate_bilinear_zero(real, offsets)
        y_in, x_in = _shift_coords(offsets, tf.shape(real)[1], tf.shape(real)[2])
        rows = _resample_axis(real, y_in, 1, "nearest", "constant", 0.0)
        return _resample_axis(rows, x_in, 2, "nearest", "constant", 0.0)

    return _apply_real(shift, images)


def run_under_xla(function, images, params, static: tuple = (), *, params_gradient: bool = True):
    """``function(images, params, *static)``, always compiled by XLA.

    Inside a function XLA already compiles, it is traced inline (and fused with its
    neighbours). Anywhere else (eager code, a plain ``tf.function``, a Keras model with
    ``jit_compile=False``) it runs as its own XLA cluster: the gathers fuse into one
    loop instead of running as separate kernels, which is what makes the xla backend
    fast, while the surrounding graph (a CNN on oneDNN, say) is left as it is.
    ``static`` holds the hashable non-tensor arguments; one compiled function is kept
    per ``(function, static, params_gradient)``. With ``params_gradient=False`` the
    compiled backward pass returns no gradient for ``params`` (and skips its cost).
    """
    if inside_xla_compilation():
        return function(images, params, *static)
    return _compiled(function, static, params_gradient)(images, params)


@functools.cache
def _compiled(function, static: tuple, params_gradient: bool):
    """Forward and backward of ``function`` as XLA clusters, joined by a custom gradient.

    TensorFlow does not compile the gradient of a ``jit_compile=True`` function that is
    called from a graph that XLA does not compile; left alone, the backward pass would
    run unfused. Here the backward pass is its own compiled function (recomputing the
    cheap forward inside it), so training in a graph-mode model is fused both ways.
    """

    @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
    def forward(images, params):
        return function(images, params, *static)

    @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
    def backward(images, params, upstream):
        sources = [images, params] if params_gradient else [images]
        with tf.GradientTape() as tape:
            tape.watch(sources)
            out = function(images, params, *static)
        grads = tape.gradient(out, sources, output_gradients=upstream)
        return [tf.zeros_like(x) if g is None else g for x, g in zip(sources, grads, strict=True)]

    @tf.custom_gradient
    def run(images, params):
        def grad(upstream):
            grads = backward(images, params, upstream)
            return (grads[0], grads[1] if params_gradient else None)

        return forward(images, params), grad

    return run

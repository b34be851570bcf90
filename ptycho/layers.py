"""Serializable Keras layers for the physics of the PtychoPINN forward model.

Every layer stores its configuration in ``__init__``, computes in ``call`` and
round-trips through ``get_config``, so ``.keras`` files load with ``safe_mode=True``
after ``import ptycho`` and no custom-object dictionaries.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from ptycho.physics import far_field_amplitude_tf
from ptycho.stitch import reassemble_patches
from ptycho.warp import BACKENDS, INTERPOLATIONS, run_under_xla, translate

__all__ = [
    "AmplitudeScale",
    "CombineComplex",
    "CutPatches",
    "FarFieldAmplitude",
    "Illumination",
    "IntensityScale",
    "OffsetChannels",
    "ReassemblePatches",
    "Translation",
    "set_translate_backend",
]


@keras.saving.register_keras_serializable(package="ptycho")
class Translation(keras.layers.Layer):
    """Sub-pixel translation of image patches by per-sample offsets ``[dx, dy]``.

    ``out(y, x) = img(y - dy, x - dx)``, bilinear (or nearest), zero fill; see
    :func:`ptycho.warp.translate`.

    Parameters
    ----------
    backend : {"xla", "legacy"}
        Warp implementation. A runtime choice, not part of the weights: set
        ``layer.backend`` before the model is traced to switch it.
    interpolation : {"bilinear", "nearest"}
    jitter_stddev : float
        Standard deviation in pixels of Gaussian noise added to the offsets when
        called with ``training=True`` (position-error augmentation); 0 disables it.
    seed : int, optional
        Seed of the jitter.

    Call arguments
    --------------
    images : (B, H, W, C) float or complex
    offsets : (B, 2) or (1, 2), [dx, dy] in pixels
    training : bool
    """

    def __init__(
        self,
        backend: str = "xla",
        interpolation: str = "bilinear",
        jitter_stddev: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}"
            )
        if not jitter_stddev >= 0.0:
            raise ValueError(f"jitter_stddev must be >= 0 pixels, got {jitter_stddev!r}")
        self.backend = backend
        self.interpolation = interpolation
        self.jitter_stddev = float(jitter_stddev)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.jitter_stddev else None

    def build(self, images_shape=None, offsets_shape=None):
        self.built = True  # no weights (the jitter's seed state is made in __init__)

    def call(self, images, offsets, training=None):
        offsets = tf.cast(offsets, tf.float32)
        if training and self.seed_generator is not None:
            offsets = offsets + keras.random.normal(
                tf.shape(offsets), stddev=self.jitter_stddev, seed=self.seed_generator
            )
        return translate(images, offsets, backend=self.backend, interpolation=self.interpolation)

    def compute_output_shape(self, images_shape, offsets_shape=None):
        return images_shape

    def compute_output_spec(self, images, offsets, training=None):
        return keras.KerasTensor(images.shape, dtype=images.dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            backend=self.backend,
            interpolation=self.interpolation,
            jitter_stddev=self.jitter_stddev,
            seed=self.seed,
        )
        return config


def set_translate_backend(model: keras.Model, backend: str) -> int:
    """Set the warp backend of every warping layer (:class:`Translation`,
    :class:`ReassemblePatches`) inside ``model``.

    The backend is read when the model is traced, so call this before the first
    ``fit``/``predict`` (or recompile). Returns the number of layers changed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, WARPING_LAYERS):
            layer.backend = backend
            count += 1
    return count


@keras.saving.register_keras_serializable(package="ptycho")
class AmplitudeScale(keras.layers.Layer):
    """Multiply diffraction amplitudes by the dataset's normalisation factor.

    The factor is part of the model's configuration, so a saved model applies the
    same scale at inference as in training. (B, N, N, C) -> (B, N, N, C).
    """

    def __init__(self, factor: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"normalisation factor must be a positive number, got {factor}")
        self.factor = float(factor)

    def call(self, amplitudes):
        return tf.cast(amplitudes, tf.float32) * self.factor

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="ptycho")
class CombineComplex(keras.layers.Layer):
    """Polar combination ``A * exp(i * phase_scale * tanh(t))`` of the two decoder heads.

    (B, N, N, C) amplitude and (B, N, N, C) phase logits -> complex64 (B, N, N, C).
    (Polar form: PtychoPINN's ``A + i phi`` is not a transmission function.)
    """

    def __init__(self, phase_scale: float = math.pi, **kwargs):
        super().__init__(**kwargs)
        self.phase_scale = float(phase_scale)

    def call(self, amplitude, phase_logits):
        phase = self.phase_scale * tf.tanh(tf.cast(phase_logits, tf.float32))
        amplitude = tf.cast(amplitude, tf.float32)
        return tf.complex(amplitude * tf.cos(phase), amplitude * tf.sin(phase))

    def compute_output_spec(self, amplitude, phase_logits):
        return keras.KerasTensor(amplitude.shape, dtype="complex64")

    def get_config(self) -> dict:
        return {**super().get_config(), "phase_scale": self.phase_scale}


@keras.saving.register_keras_serializable(package="ptycho")
class ReassemblePatches(keras.layers.Layer):
    """Overlap constraint for gridsize > 1 (PtychoPINN's "object_big").

    Each of the C patches of a group is placed on a canvas of N + 2 * ``pad`` pixels,
    translated by its offset from the group centre, summed and divided by the overlap
    count (each patch counts over its central ``support`` x N square, where it is
    predicted); C patches are then cut back out by translating by minus the offsets and
    cropping the centre. The result is C patches of one consistent object, and the
    translations are where the warp backend sits in the training graph.

    Call: ``layer(patches, offsets)`` with patches (B, N, N, C) complex and offsets
    (B, C, 2) ``[dx, dy]`` pixels; returns (B, N, N, C) complex.
    """

    def __init__(self, pad: int = 16, support: float = 1.0, backend: str = "xla", **kwargs):
        super().__init__(**kwargs)
        if pad < 0:
            raise ValueError(f"canvas pad must be >= 0 pixels, got {pad}")
        if not 0 < support <= 1:
            raise ValueError(f"support must be a fraction of N in (0, 1], got {support}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.pad = int(pad)
        self.support = float(support)
        self.backend = backend

    def call(self, patches, offsets):
        offsets = tf.cast(offsets, tf.float32)
        if self.backend == "xla":  # one XLA cluster, also inside a graph-mode model
            return run_under_xla(
                reassemble_patches,
                patches,
                offsets,
                (self.pad, self.support),
                params_gradient=False,  # scan positions are inputs, not trained
            )
        return reassemble_patches(patches, offsets, self.pad, self.support, backend="legacy")

    def compute_output_spec(self, patches, offsets):
        return keras.KerasTensor(patches.shape, dtype=patches.dtype)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "pad": self.pad,
            "support": self.support,
            "backend": self.backend,
        }


@keras.saving.register_keras_serializable(package="ptycho")
class CutPatches(keras.layers.Layer):
    """One object per group -> the C patches of its members (PtychoPINN's
    ``object_big=False``).

    The object (B, N, N, 1) is the N x N window centred on the group centre; patch c is
    the window centred on member c, ``offsets[:, c]`` away, so it is the object
    translated by minus that offset. Returns (B, N, N, C).
    """

    def __init__(self, backend: str = "xla", **kwargs):
        super().__init__(**kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.backend = backend

    def call(self, obj, offsets):
        offsets = tf.cast(offsets, tf.float32)
        shape = tf.shape(obj)
        batch, n, channels = shape[0], shape[1], tf.shape(offsets)[1]
        copies = tf.repeat(obj, channels, axis=0)  # (B * C, N, N, 1), member-major per group
        moved = translate(copies, -tf.reshape(offsets, (-1, 2)), backend=self.backend)
        return tf.transpose(tf.reshape(moved, (batch, channels, n, n)), (0, 2, 3, 1))

    def compute_output_spec(self, obj, offsets):
        shape = (obj.shape[0], obj.shape[1], obj.shape[2], offsets.shape[1])
        return keras.KerasTensor(shape, dtype=obj.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "backend": self.backend}


@keras.saving.register_keras_serializable(package="ptycho")
class OffsetChannels(keras.layers.Layer):
    """The group's geometry as network input: (B, C, 2) offsets ``[dx, dy]`` in pixels ->
    (B, N, N, 2C) constant planes ``offset / scale``, concatenated to the patterns so the
    network knows where each channel's pattern was measured."""

    def __init__(self, n: int, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.n = int(n)
        self.scale = float(scale)

    def call(self, offsets):
        flat = tf.reshape(
            tf.cast(offsets, tf.float32) / self.scale, (-1, 1, 1, offsets.shape[1] * 2)
        )
        return tf.tile(flat, (1, self.n, self.n, 1))

    def compute_output_spec(self, offsets):
        return keras.KerasTensor((offsets.shape[0], self.n, self.n, offsets.shape[1] * 2))

    def get_config(self) -> dict:
        return {**super().get_config(), "n": self.n, "scale": self.scale}


WARPING_LAYERS = (Translation, ReassemblePatches, CutPatches)


@keras.saving.register_keras_serializable(package="ptycho")
class Illumination(keras.layers.Layer):
    """Exit waves ``P_k * O``: multiply (B, N, N, C) object patches by the probe's K
    modes, (B, N, N, C K) complex (the K modes of channel c together; K = 1: (B, N, N,
    C)).

    The probe is a weight (real and imaginary parts, (N, N) or (K, N, N)), trainable or
    fixed; it is saved with the model. ``mask_radius`` (fraction of N) multiplies it by
    a circular support.
    """

    def __init__(
        self,
        n: int,
        trainable_probe: bool = False,
        mask_radius: float | None = None,
        modes: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.n = int(n)
        self.modes = int(modes)
        self.trainable_probe = bool(trainable_probe)
        self.mask_radius = None if mask_radius is None else float(mask_radius)
        shape = (self.n, self.n) if self.modes == 1 else (self.modes, self.n, self.n)
        self.probe_real = self.add_weight(
            name="probe_real", shape=shape, initializer="zeros", trainable=self.trainable_probe
        )
        self.probe_imag = self.add_weight(
            name="probe_imag", shape=shape, initializer="zeros", trainable=self.trainable_probe
        )
        if self.mask_radius is None:
            self.mask = None
        else:
            coords = np.arange(self.n) - self.n / 2
            r = np.hypot(coords[None, :], coords[:, None])
            self.mask = tf.constant((r <= self.mask_radius * self.n).astype(np.float32))

    def set_probe(self, probe) -> None:
        probe = np.asarray(probe, np.complex64)
        if probe.shape != tuple(self.probe_real.shape):
            raise ValueError(
                f"probe must have shape {tuple(self.probe_real.shape)}, got {probe.shape}"
            )
        self.probe_real.assign(probe.real)
        self.probe_imag.assign(probe.imag)

    @property
    def probe(self) -> tf.Tensor:
        """(N, N) or (K, N, N) complex64, masked."""
        real, imag = self.probe_real, self.probe_imag
        if self.mask is not None:
            real, imag = real * self.mask, imag * self.mask
        return tf.complex(tf.convert_to_tensor(real), tf.convert_to_tensor(imag))

    def call(self, patches):
        patches = tf.cast(patches, tf.complex64)
        if self.modes == 1:
            return patches * self.probe[None, :, :, None]
        modes = tf.transpose(self.probe, (1, 2, 0))  # (N, N, K)
        waves = patches[..., None] * modes[None, :, :, None, :]  # (B, N, N, C, K)
        shape = tf.shape(patches)
        return tf.reshape(waves, [shape[0], shape[1], shape[2], shape[3] * self.modes])

    def compute_output_spec(self, patches):
        channels = None if patches.shape[-1] is None else patches.shape[-1] * self.modes
        return keras.KerasTensor((*patches.shape[:-1], channels), dtype="complex64")

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "n": self.n,
            "trainable_probe": self.trainable_probe,
            "mask_radius": self.mask_radius,
            "modes": self.modes,
        }


@keras.saving.register_keras_serializable(package="ptycho")
class FarFieldAmplitude(keras.layers.Layer):
    """``|fftshift(fft2(x)) / N|`` per channel: (B, N, N, C) complex -> float32. With
    ``modes`` K > 1 the input holds K modes per channel (:class:`Illumination`) and the
    amplitude is ``sqrt(sum_k |.|^2)``, (B, N, N, C / K): the modes add incoherently."""

    def __init__(self, modes: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.modes = int(modes)

    def call(self, exit_waves):
        amplitudes = far_field_amplitude_tf(exit_waves)
        if self.modes == 1:
            return amplitudes
        shape = tf.shape(amplitudes)
        per_mode = tf.reshape(amplitudes, [shape[0], shape[1], shape[2], -1, self.modes])
        # The tiny term keeps the gradient finite (0) where every mode is dark.
        return tf.sqrt(tf.reduce_sum(per_mode**2, axis=-1) + 1e-30)

    def compute_output_spec(self, exit_waves):
        channels = exit_waves.shape[-1]
        if channels is not None:
            channels //= self.modes
        return keras.KerasTensor((*exit_waves.shape[:-1], channels), dtype="float32")

    def get_config(self) -> dict:
        return {**super().get_config(), "modes": self.modes}


@keras.saving.register_keras_serializable(package="ptycho")
class IntensityScale(keras.layers.Layer):
    """Multiply amplitudes by a trainable ``exp(log_scale)`` (intensity by its square).

    Maps the physics' amplitudes to the units of the normalised measurements.
    """

    def __init__(self, initial_log_scale: float = 0.0, trainable_scale: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.initial_log_scale = float(initial_log_scale)
        self.trainable_scale = bool(trainable_scale)
        self.log_scale = self.add_weight(
            name="log_scale",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_log_scale),
            trainable=self.trainable_scale,
        )

    def call(self, amplitudes):
        return amplitudes * tf.exp(tf.convert_to_tensor(self.log_scale))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "initial_log_scale": self.initial_log_scale,
            "trainable_scale": self.trainable_scale,
        }

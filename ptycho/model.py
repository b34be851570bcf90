"""The PtychoPINN network: CNN encoder, amplitude and phase decoders, differentiable physics.

Data flow (shapes for N x N patterns and C = gridsize^2 positions per sample)::

    diffraction (B, N, N, C) raw amplitudes
      -> AmplitudeScale (dataset normalisation factor, stored in the model)
      -> encoder: [Conv3x3-ReLU x2, MaxPool2] x L            (B, N / 2^L, N / 2^L, F)
      -> amplitude decoder, phase decoder: [Conv3x3-ReLU x2, UpSample2] x L, Conv3x3
      -> CombineComplex: A exp(i pi tanh(t))                  object patches (B, N, N, C)
      -> ReassemblePatches with offsets (B, C, 2)             (gridsize > 1 only)
      -> Illumination (probe) -> FarFieldAmplitude -> IntensityScale
      -> predicted amplitudes (B, N, N, C), in the units of the normalised data

The model is trained unsupervised: the loss compares the predicted amplitudes with the
(normalised) measured ones. Every piece is a registered Keras layer, so ``.keras``
files load with ``safe_mode=True``; the warp backend is a runtime choice
(:func:`ptycho.layers.set_translate_backend`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum

import keras
import numpy as np
import tensorflow as tf

from ptycho import probes
from ptycho.errors import choice, require
from ptycho.hardware import CompileMode, resolve_precision, run_mode
from ptycho.layers import (
    WARPING_LAYERS,
    AmplitudeScale,
    CombineComplex,
    CutPatches,
    FarFieldAmplitude,
    Illumination,
    IntensityScale,
    OffsetChannels,
    ReassemblePatches,
    set_translate_backend,
)
from ptycho.warp import BACKENDS, check_compilable

__all__ = [
    "PATTERN_SIZES",
    "AmplitudeActivation",
    "ModelConfig",
    "ObjectOutput",
    "ObjectSupport",
    "Precision",
    "PtychoLoss",
    "build_cnn_only",
    "build_model",
    "compile_model",
    "load_model",
    "translate_backends",
]

PATTERN_SIZES = (64, 128, 256)
INITIAL_MODE_POWER = 0.1
"""Fraction of the power the modes a trainable probe adds start with."""


class AmplitudeActivation(StrEnum):
    softplus = "softplus"
    sigmoid = "sigmoid"
    relu = "relu"
    exponential = "exponential"


class ObjectSupport(StrEnum):
    half = "half"
    full = "full"


class ObjectOutput(StrEnum):
    patches = "patches"
    group = "group"


class Precision(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


@dataclass
class ModelConfig:
    """The ``model`` section: architecture and physics of the network."""

    n: int | None = None
    """Pattern size N: 64, 128 or 256; null: the data's (``data.n`` or 64 for simulated
    scans, the file's patterns after ``data.crop``/``data.bin``)."""
    gridsize: int = 2
    """g: each sample is C = g^2 neighbouring scan positions."""
    filters: int = 16
    """Base width of the encoder (doubled per level)."""
    amplitude_activation: AmplitudeActivation = AmplitudeActivation.softplus
    """Amplitude head: ``softplus`` is positive and does not saturate; ``sigmoid`` keeps
    ``|O|`` in (0, 1) but saturates at 1, where training can stall for good."""
    probe_trainable: bool = False
    """Refine the probe with the network."""
    probe_modes: int | None = None
    """K mutually incoherent probe modes in the physics (the patterns the sum of their
    intensities; the CNN is unchanged); null: the probe's own (a refined run's
    ``reconstruction.npz`` through ``data.probe_path`` carries its modes). More modes
    than the probe has are started from it (:func:`ptycho.probes.initial_modes`), which
    needs ``probe_trainable``."""
    probe_mask_radius: float | None = None
    """Circular probe support, fraction of N (null: no mask)."""
    canvas_pad: int | None = None
    """Pixels of canvas around a group's patches in the overlap constraint (null: 0 for
    ``object_support=half``, where offsets up to N/4 stay inside the window; N/4 for
    ``full``)."""
    object_support: ObjectSupport = ObjectSupport.half
    """``half``: predict the central N/2 x N/2 of each patch, zero outside (PtychoPINN's
    padded object: right for a probe within half the window); ``full``: all N x N."""
    object_output: ObjectOutput = ObjectOutput.patches
    """``patches``: C patches merged by the overlap constraint (PtychoPINN's
    ``object_big=True``); ``group``: one object per group, cut at the C positions."""
    offset_input: bool = False
    """Give the network the group's offsets as 2C constant input planes (offset / (N/4)),
    so that on irregular scans it knows where each pattern is."""
    precision: Precision = Precision.auto
    """The CNN's hidden layers: ``float32``, ``bfloat16`` (Keras' ``mixed_bfloat16``) or
    ``auto``, bfloat16 where the hardware and compiler run it natively
    (:func:`ptycho.hardware.resolve_precision`). Heads, physics and loss stay float32."""

    def check(self) -> None:
        """``ValueError`` naming the first field out of range."""
        require(
            [
                (
                    self.n is None or self.n in PATTERN_SIZES,
                    f"n={self.n}: must be 64, 128 or 256, or null (the data's)",
                ),
                choice("amplitude_activation", self.amplitude_activation, AmplitudeActivation),
                choice("object_support", self.object_support, ObjectSupport),
                choice("object_output", self.object_output, ObjectOutput),
                choice("precision", self.precision, Precision),
                (self.gridsize >= 1, f"gridsize={self.gridsize}: must be >= 1"),
                (
                    self.probe_modes is None or self.probe_modes >= 1,
                    f"probe_modes={self.probe_modes}: must be >= 1, or null (the probe's)",
                ),
                (self.filters >= 1, f"filters={self.filters}: must be >= 1"),
                (
                    self.probe_mask_radius is None or 0 < self.probe_mask_radius,
                    f"probe_mask_radius={self.probe_mask_radius}: must be > 0 (fraction of "
                    "N) or null",
                ),
                (
                    self.canvas_pad is None or self.canvas_pad >= 0,
                    f"canvas_pad={self.canvas_pad}: must be >= 0 or null",
                ),
            ]
        )

    def resolved(self, compile_mode: str, n: int | None = None) -> ModelConfig:
        """This configuration with ``precision=auto`` resolved for this machine and the
        compile mode the network will run under, and ``n`` the data's when unset."""
        precision = Precision(resolve_precision(self.precision, compile_mode))
        return replace(self, precision=precision, n=self.n or n)

    def check_modes(self, probe_modes: int) -> None:
        """``ValueError`` (one line, the fix) when a probe of ``probe_modes`` modes
        cannot give the ``probe_modes`` asked for (:func:`ptycho.probes.check_modes`)."""
        probes.check_modes(
            "model.probe_modes",
            self.probe_modes,
            probe_modes,
            self.probe_trainable,
            "only a trainable probe can fit: set model.probe_trainable=true",
        )

    @property
    def channels(self) -> int:
        return self.gridsize * self.gridsize

    @property
    def object_channels(self) -> int:
        """Object patches the decoders predict: C, or 1 for one object per group."""
        return self.channels if self.object_output == ObjectOutput.patches else 1

    @property
    def levels(self) -> int:
        """Pooling levels: the bottleneck is 8 x 8 for every N."""
        return int(math.log2(self.n)) - 3


def _checked(config: ModelConfig) -> ModelConfig:
    config.check()
    if config.precision == Precision.auto:
        raise ValueError(
            "model precision 'auto' is resolved for a compile mode before a model is built: "
            "config.resolved(compile_mode)"
        )
    if config.n is None:
        raise ValueError("model n is null: set it (config.resolved(mode, n) takes the data's)")
    return config


@keras.saving.register_keras_serializable(package="ptycho")
class PtychoLoss(keras.losses.Loss):
    """Poisson negative log-likelihood of intensities, plus optional amplitude MAE.

    With measured amplitudes ``a`` and predicted ``p`` (same normalised units), the
    Poisson term is the deviance ``p^2 - a^2 - a^2 log(p^2 / a^2)`` averaged over
    pixels: the negative log-likelihood of counts ``a^2`` under rate ``p^2`` up to a
    constant (and up to the constant normalisation factor squared), zero at a perfect
    fit. The MAE term is ``|p - a|``. Pixels whose measured value is negative (the
    pipeline's mark for masked pixels) count nowhere.
    """

    def __init__(
        self,
        poisson_weight: float = 1.0,
        mae_weight: float = 0.0,
        name: str = "ptycho_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if poisson_weight < 0 or mae_weight < 0 or poisson_weight + mae_weight == 0:
            raise ValueError(
                "loss weights must be >= 0 and not both zero, got "
                f"poisson={poisson_weight}, mae={mae_weight}"
            )
        self.poisson_weight = float(poisson_weight)
        self.mae_weight = float(mae_weight)

    def call(self, y_true, y_pred):
        measured = tf.cast(y_true, tf.float32)
        predicted = tf.cast(y_pred, tf.float32)
        counted = tf.cast(measured >= 0, tf.float32)  # 1 everywhere without a mask
        measured = tf.maximum(measured, 0.0)
        loss = 0.0
        if self.poisson_weight:
            rate = tf.square(predicted) + 1e-6
            counts = tf.square(measured)
            safe = tf.where(counts > 0, counts, tf.ones_like(counts))
            deviance = rate - counts + counts * (tf.math.log(safe) - tf.math.log(rate))
            loss += self.poisson_weight * tf.reduce_mean(deviance * counted, axis=(1, 2, 3))
        if self.mae_weight:
            error = tf.abs(predicted - measured) * counted
            loss += self.mae_weight * tf.reduce_mean(error, axis=(1, 2, 3))
        return loss

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "poisson_weight": self.poisson_weight,
            "mae_weight": self.mae_weight,
        }


def _conv(filters: int, name: str, activation="relu", dtype=None):
    return keras.layers.Conv2D(
        filters, 3, padding="same", activation=activation, name=name, dtype=dtype
    )


def _hidden_dtype(config: ModelConfig):
    """Dtype policy of the CNN's hidden layers; heads and physics stay float32."""
    bfloat16 = config.precision == Precision.bfloat16
    return keras.DTypePolicy("mixed_bfloat16" if bfloat16 else "float32")


def _decoder(x, config: ModelConfig, head: str, activation):
    """Decoder head: (B, 8, 8, F) -> (B, N, N, C).

    With ``object_support="half"`` the head stops one level early and predicts the
    central N/2 x N/2 of the patch, zero-padded to N: the illuminated region of a probe
    that fits in half the window, whose far field is then oversampled twofold.
    """
    last = 1 if config.object_support == ObjectSupport.half else 0
    hidden = _hidden_dtype(config)
    for level in reversed(range(last, config.levels)):
        filters = config.filters * 2**level
        x = _conv(filters, f"{head}_conv{level}a", dtype=hidden)(x)
        x = _conv(filters, f"{head}_conv{level}b", dtype=hidden)(x)
        x = keras.layers.UpSampling2D(2, name=f"{head}_up{level}", dtype=hidden)(x)
    x = _conv(config.object_channels, f"{head}_out", activation=activation, dtype="float32")(x)
    if last:
        x = keras.layers.ZeroPadding2D(config.n // 4, name=f"{head}_pad")(x)
    return x


def _network(diffraction, offsets, config: ModelConfig, norm_factor: float):
    """The CNN: normalised amplitudes (and, with ``offset_input``, the group's offsets)
    -> (amplitude, phase logits), each (B, N, N, C) (or (B, N, N, 1) for one object per
    group)."""
    x = AmplitudeScale(norm_factor, name="normalise")(diffraction)
    if config.offset_input and offsets is not None:
        planes = OffsetChannels(config.n, config.n / 4, name="offset_channels")(offsets)
        x = keras.layers.Concatenate(name="with_offsets")([x, planes])
    hidden = _hidden_dtype(config)
    for level in range(config.levels):
        filters = config.filters * 2**level
        x = _conv(filters, f"encoder_conv{level}a", dtype=hidden)(x)
        x = _conv(filters, f"encoder_conv{level}b", dtype=hidden)(x)
        x = keras.layers.MaxPooling2D(2, name=f"encoder_pool{level}", dtype=hidden)(x)
    amplitude = _decoder(x, config, "amplitude", str(config.amplitude_activation))
    phase_logits = _decoder(x, config, "phase", None)
    return amplitude, phase_logits


def build_cnn_only(config: ModelConfig, *, norm_factor: float = 1.0) -> keras.Model:
    """The same network with the physics and warp removed: the lower bound of a step.

    Benchmarks only: the two heads are added and trained against the same target and
    loss as the full model, so the step does the network's work and nothing else.
    """
    config = _checked(config)
    n, c = config.n, config.channels
    diffraction = keras.Input((n, n, c), name="diffraction")
    amplitude, phase_logits = _network(diffraction, None, config, norm_factor)
    out = keras.layers.Add(name="amplitude")([amplitude, phase_logits])
    return keras.Model({"diffraction": diffraction}, {"amplitude": out}, name="cnn_only")


def initial_log_scale(probe: np.ndarray, n: int) -> float:
    """Log intensity scale at which an object of modulus 1 matches the normalised data.

    Normalised data carry a mean energy of (N/2)^2 per pattern, and the unitary far
    field keeps the exit wave's energy ``sum |P|^2``.
    """
    energy = float(np.sum(np.abs(probe) ** 2))
    if not energy > 0:
        raise ValueError("the probe is zero everywhere")
    return math.log(n / 2) - 0.5 * math.log(energy)


def build_model(
    config: ModelConfig,
    *,
    probe: np.ndarray,
    norm_factor: float,
    translate_backend: str = "xla",
) -> tuple[keras.Model, keras.Model]:
    """Build the training model and the inference model (shared weights).

    Parameters
    ----------
    config : ModelConfig
        With a concrete precision (:meth:`ModelConfig.resolved`).
    probe : (N, N) complex, or (K, N, N) modes
        Initial probe (fixed unless ``config.probe_trainable``).
    norm_factor : float
        Dataset normalisation factor (:func:`ptycho.data.normalisation_factor` of the
        training scan); stored in the model.
    translate_backend : {"xla", "legacy"}

    Returns
    -------
    training_model
        ``{"diffraction": (B, N, N, C)[, "offsets": (B, C, 2)]}`` ->
        ``{"amplitude": (B, N, N, C), "intensity": (B, N, N, C), "object": (B, N, N, C)
        complex}``; the loss goes on ``"amplitude"``.
    inference_model
        The same inputs -> object patches (B, N, N, C) complex64 (after the overlap
        constraint when gridsize > 1).
    """
    if translate_backend not in BACKENDS:
        raise ValueError(f"translate must be one of {list(BACKENDS)}, got {translate_backend!r}")
    probe = np.asarray(probe, np.complex64)
    config = _checked(replace(config, n=config.n or probe.shape[-1]))  # n null: the probe's
    n, c = config.n, config.channels
    if probe.shape[-2:] != (n, n) or probe.ndim not in (2, 3):
        raise ValueError(
            f"probe must be ({n}, {n}) or (K, {n}, {n}) for model.n={n}, got {probe.shape}"
        )
    modes = probes.as_modes(probe)
    config.check_modes(len(modes))
    k = config.probe_modes or len(modes)
    if k != len(modes):
        modes = probes.initial_modes(modes[0], k, INITIAL_MODE_POWER)
    probe = probes.squeezed(modes)

    diffraction = keras.Input((n, n, c), name="diffraction")
    inputs = {"diffraction": diffraction}
    offsets = None
    if c > 1:
        offsets = keras.Input((c, 2), name="offsets")
        inputs["offsets"] = offsets
    amplitude, phase_logits = _network(diffraction, offsets, config, norm_factor)
    patches = CombineComplex(name="object")(amplitude, phase_logits)
    if c > 1 and config.object_output == ObjectOutput.group:
        patches = CutPatches(backend=translate_backend, name="cut_patches")(patches, offsets)
    elif c > 1:
        half = config.object_support == ObjectSupport.half
        pad = config.canvas_pad
        if pad is None:  # half support: offsets up to N/4 stay inside the window
            pad = 0 if half else n // 4
        support = 0.5 if half else 1.0
        reassemble = ReassemblePatches(
            pad=pad, support=support, backend=translate_backend, name="reassemble"
        )
        patches = reassemble(patches, offsets)
    illumination = Illumination(
        n,
        trainable_probe=config.probe_trainable,
        mask_radius=config.probe_mask_radius,
        modes=k,
        name="illumination",
    )
    far = FarFieldAmplitude(modes=k, name="far_field")(illumination(patches))
    predicted = IntensityScale(initial_log_scale(probe, n), name="amplitude")(far)
    intensity = keras.layers.Multiply(name="intensity")([predicted, predicted])
    illumination.set_probe(probe)
    training = keras.Model(
        inputs,
        {"amplitude": predicted, "intensity": intensity, "object": patches},
        name="ptychopinn",
    )
    inference = keras.Model(inputs, patches, name="ptychopinn_inference")
    return training, inference


def compile_model(
    model: keras.Model,
    mode: str,
    *,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 1e-3,
    poisson_weight: float = 1.0,
    mae_weight: float = 0.0,
    optimizer_state: keras.optimizers.Optimizer | None = None,
) -> keras.Model:
    """Compile for ``mode`` in {"jit", "graph", "eager"} with Adam and :class:`PtychoLoss`.

    ``jit`` sets ``jit_compile=True`` and verifies Keras kept it (Keras silently drops
    XLA for some layers and under op determinism); a model whose translations use the
    legacy backend is refused for ``jit`` (:func:`ptycho.warp.check_compilable`).

    ``optimizer_state``: an optimizer of the same model (from a checkpoint) whose step
    count and Adam moments the new optimizer continues from; the learning rate (a number
    or a schedule) is always ``learning_rate``, so a run can resume with another one.
    """
    mode = run_mode(mode)
    for backend in translate_backends(model):
        check_compilable(backend, mode)
    optimizer = keras.optimizers.Adam(learning_rate)
    if optimizer_state is not None:
        _continue_optimizer(optimizer, optimizer_state, model.trainable_variables)
    model.compile(
        optimizer=optimizer,
        loss={"amplitude": PtychoLoss(poisson_weight, mae_weight)},
        jit_compile=(mode == CompileMode.jit),
        run_eagerly=(mode == CompileMode.eager),
    )
    if mode == CompileMode.jit and model.jit_compile is not True:
        raise RuntimeError(
            "Keras turned XLA off for this model (a layer with supports_jit=False, or op "
            "determinism enabled); compile=jit cannot be honoured"
        )
    return model


def _continue_optimizer(optimizer, source, variables) -> None:
    """Copy the step count and moments of ``source`` into ``optimizer`` (built here)."""
    optimizer.build(variables)
    state = [v for v in optimizer.variables if v.name != "learning_rate"]
    saved = {v.name: v for v in source.variables}
    missing = [v.name for v in state if v.name not in saved]
    if missing:
        raise ValueError(
            f"the checkpoint's optimizer has no state for {missing[:3]}: it does not "
            "belong to this model"
        )
    for variable in state:
        variable.assign(saved[variable.name])


def translate_backends(model: keras.Model) -> set[str]:
    """The warp backends of the warping layers inside ``model``."""
    return {
        layer.backend
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, WARPING_LAYERS)
    }


def load_model(path, *, translate_backend: str | None = None) -> keras.Model:
    """Load a saved model (``safe_mode=True``), optionally switching the warp backend."""
    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    if translate_backend is not None:
        set_translate_backend(model, translate_backend)
    return model

"""Serializable Keras layers for the physics of the PtychoPINN forward model.

Every layer stores its configuration in ``__init__``, computes in ``call`` and
round-trips through ``get_config``, so ``.keras`` files load with ``safe_mode=True``
after ``import ptycho`` and no custom-object dictionaries.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ptycho.warp import BACKENDS, INTERPOLATIONS, translate

__all__ = ["Translation"]


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

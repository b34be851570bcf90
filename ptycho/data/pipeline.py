"""Streaming training batches with ``tf.data``.

A sample is a group of C positions: network input the (N, N, C) measured diffraction
amplitudes and (for C > 1) the (C, 2) offsets of the positions from the group centre;
target the same amplitudes scaled by the dataset's normalisation factor (the model
applies that factor to its input itself, so a saved model needs nothing else).

With a background (``Scan.background``) the network sees ``sqrt(max(a^2 - b, 0))``
(:meth:`ptycho.data.scan.Scan.signal`), input and target alike. Pixels the scan's mask
excludes (``Scan.valid``) read 0 in the input (as stored) and
-1 in the target, which :class:`ptycho.model.PtychoLoss` leaves out of the loss.

Only the (G, C) index table is shuffled; the amplitudes of a batch are gathered when
the batch is needed, so no group is materialised ahead of time.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ptycho.data.grouping import group_offsets
from ptycho.data.scan import Scan

__all__ = ["make_dataset", "normalisation_factor"]


def normalisation_factor(
    diffraction: np.ndarray, *, background: np.ndarray | None = None, chunk: int = 1024
) -> float:
    """Dataset-level amplitude scale: ``sqrt((N/2)^2 / mean_j sum |a_j|^2)``.

    Scaling every pattern by this factor makes the mean total intensity per pattern
    ``(N/2)^2`` (PtychoPINN's convention), whatever the photon count; the model stores
    it so that inference applies the same factor. Computed in chunks (no full copy), on
    the counts without the ``background`` when there is one (what the network sees).
    """
    diffraction = np.asarray(diffraction)
    m, n = diffraction.shape[0], diffraction.shape[1]
    total = 0.0
    for start in range(0, m, chunk):
        block = diffraction[start : start + chunk].astype(np.float64)
        energy = block * block
        if background is not None:
            energy = np.maximum(energy - background, 0.0)
        total += float(np.sum(energy))
    mean_energy = total / m
    if not mean_energy > 0:
        raise ValueError("diffraction amplitudes are all zero: cannot normalise the scan")
    return float(np.sqrt((n / 2) ** 2 / mean_energy))


def make_dataset(
    scan: Scan,
    groups: np.ndarray,
    *,
    norm_factor: float,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = False,
    epochs: int | None = 1,
    start_epoch: int = 0,
) -> tf.data.Dataset:
    """Batches of ``({"diffraction": (B, N, N, C), "offsets": (B, C, 2)}, {"amplitude":
    (B, N, N, C)})``.

    ``diffraction`` holds the measured amplitudes; ``"offsets"`` is present only when
    C > 1. The target is the same amplitudes times ``norm_factor``: the model is
    unsupervised, trained to reproduce its (normalised) input through the physics.

    Parameters
    ----------
    scan : Scan
    groups : (G, C) int
        From :func:`ptycho.data.grouping.group_neighbours`.
    norm_factor : float
        From :func:`normalisation_factor` of the *training* scan.
    batch_size : int
    shuffle : bool
        Shuffle the groups every epoch. The order of epoch ``e`` depends only on
        ``(seed, e)`` (a stateless shuffle), so a resumed run sees the same batches as
        an uninterrupted one.
    drop_remainder : bool
        Drop the last partial batch of each epoch (fixed shapes for XLA).
    epochs : int or None
        Number of epochs the dataset spans; None repeats forever (use with Keras'
        ``steps_per_epoch``).
    start_epoch : int
        Epoch the first batch belongs to (for resuming).
    """
    groups = np.asarray(groups, np.int64)
    if groups.ndim != 2:
        raise ValueError(f"groups must be (G, C), got shape {groups.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _, offsets = group_offsets(scan.xcoords, scan.ycoords, groups)
    diffraction = tf.convert_to_tensor(scan.diffraction)  # (M, N, N), held once
    group_table = tf.constant(groups)
    offset_table = tf.constant(offsets.astype(np.float32))
    factor = tf.constant(norm_factor, tf.float32)
    with_offsets = groups.shape[1] > 1
    count = len(groups)
    valid = None if scan.valid is None else tf.constant(scan.valid)  # (N, N) or (M, N, N)
    background = None if scan.background is None else tf.constant(scan.background)

    def epoch_batches(epoch):
        order = tf.range(count, dtype=tf.int64)
        if shuffle:
            key = tf.stack([tf.constant(seed, tf.int64), epoch])
            order = tf.random.experimental.stateless_shuffle(order, seed=key)
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder)

    def load(order):
        amplitudes = tf.gather(diffraction, tf.gather(group_table, order))  # (B, C, N, N)
        if background is not None:
            amplitudes = tf.sqrt(tf.maximum(tf.square(amplitudes) - background, 0.0))
        amplitudes = tf.transpose(amplitudes, (0, 2, 3, 1))  # (B, N, N, C)
        inputs = {"diffraction": amplitudes}
        if with_offsets:
            inputs["offsets"] = tf.gather(offset_table, order)
        target = amplitudes * factor
        if valid is not None:
            measured = (
                valid[..., None]
                if valid.shape.rank == 2
                else tf.transpose(tf.gather(valid, tf.gather(group_table, order)), (0, 2, 3, 1))
            )
            target = tf.where(measured, target, -tf.ones_like(target))
        return inputs, {"amplitude": target}

    if epochs is None:
        epoch_numbers = tf.data.Dataset.counter(start_epoch)
    else:
        epoch_numbers = tf.data.Dataset.range(start_epoch, start_epoch + epochs)
    dataset = epoch_numbers.flat_map(epoch_batches)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)

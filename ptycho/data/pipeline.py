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
the batch is needed, so no group is materialised ahead of time. A streamed scan
(:mod:`ptycho.data.stream`) is read from its file a window of neighbouring groups at a
time, the windows and the groups within them shuffled (docs/large-scans.md).
"""

from __future__ import annotations

import itertools

import numpy as np
import tensorflow as tf

from ptycho.data.grouping import group_offsets
from ptycho.data.scan import Scan
from ptycho.data.stream import ordered_windows, shuffled_windows, window_items

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
    if not hasattr(diffraction, "shape"):  # a list; Patterns are read a chunk at a time
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
    offsets = offsets.astype(np.float32)
    how = dict(
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_remainder=drop_remainder,
        start_epoch=start_epoch,
        epochs=epochs,
    )
    if scan.streamed:
        batches = _streamed_batches(scan, groups, offsets, **how)
    else:
        batches = _memory_batches(scan, groups, offsets, **how)
    with_offsets = groups.shape[1] > 1
    factor = tf.constant(norm_factor, tf.float32)
    background = None if scan.background is None else tf.constant(scan.background)

    def sample(amplitudes, shifts, valid=None):
        """(B, C, N, N) amplitudes as stored, (B, C, 2) offsets, (B, C, N, N) or (N, N)
        valid pixels -> the model's inputs and target."""
        if background is not None:
            amplitudes = tf.sqrt(tf.maximum(tf.square(amplitudes) - background, 0.0))
        amplitudes = tf.transpose(amplitudes, (0, 2, 3, 1))  # (B, N, N, C)
        inputs = {"diffraction": amplitudes}
        if with_offsets:
            inputs["offsets"] = shifts
        target = amplitudes * factor
        if valid is not None:
            measured = (
                valid[..., None] if valid.shape.rank == 2 else tf.transpose(valid, (0, 2, 3, 1))
            )
            target = tf.where(measured, target, -tf.ones_like(target))
        return inputs, {"amplitude": target}

    dataset = batches.map(sample, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _memory_batches(
    scan, groups, offsets, *, batch_size, shuffle, seed, drop_remainder, start_epoch, epochs
):
    """Batches gathered from the patterns held once as a tensor; the (G, C) index table
    shuffled per epoch by a stateless shuffle keyed ``(seed, epoch)``."""
    diffraction = tf.convert_to_tensor(scan.diffraction)  # (M, N, N), held once
    group_table = tf.constant(groups)
    offset_table = tf.constant(offsets)
    count = len(groups)
    valid = None if scan.valid is None else tf.constant(scan.valid)  # (N, N) or (M, N, N)

    def epoch_batches(epoch):
        order = tf.range(count, dtype=tf.int64)
        if shuffle:
            key = tf.stack([tf.constant(seed, tf.int64), epoch])
            order = tf.random.experimental.stateless_shuffle(order, seed=key)
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder)

    def load(order):
        members = tf.gather(group_table, order)
        amplitudes = tf.gather(diffraction, members)  # (B, C, N, N)
        shifts = tf.gather(offset_table, order)
        if valid is None:
            return amplitudes, shifts
        return amplitudes, shifts, valid if valid.shape.rank == 2 else tf.gather(valid, members)

    if epochs is None:
        numbers = tf.data.Dataset.counter(start_epoch)
    else:
        numbers = tf.data.Dataset.range(start_epoch, start_epoch + epochs)
    return numbers.flat_map(epoch_batches).map(load, num_parallel_calls=tf.data.AUTOTUNE)


def _streamed_batches(
    scan, groups, offsets, *, batch_size, shuffle, seed, drop_remainder, start_epoch, epochs
):
    """Batches read from the scan's file a window at a time: the groups sorted by their
    first member (neighbours are read together), shuffled by :func:`ptycho.data.stream.
    shuffled_windows` keyed ``(seed, epoch)``: blocks of neighbouring groups in a random
    order, 16 blocks per window shuffled together; batches run on across windows."""
    order = np.argsort(groups.min(axis=1), kind="stable")
    groups, offsets = groups[order], offsets[order]
    count, c, n = len(groups), groups.shape[1], scan.n
    window = window_items(c, n, multiple=batch_size)

    def windows(epoch):
        if shuffle:
            yield from shuffled_windows(count, window, np.random.default_rng([seed, epoch]))
        else:
            yield from ordered_windows(count, window)

    def generate():
        numbers = (
            itertools.count(start_epoch)
            if epochs is None
            else range(start_epoch, start_epoch + epochs)
        )
        for epoch in numbers:
            pending = None
            for items in windows(epoch):
                members = groups[items]
                loaded = [scan.diffraction[members], offsets[items]]
                if scan.masked:
                    loaded.append(scan.valid_pixels(members))
                if pending is not None:
                    loaded = [np.concatenate(pair) for pair in zip(pending, loaded, strict=True)]
                full = len(loaded[0]) // batch_size
                if full:  # the window's whole batches in one call: (k, B, ...)
                    yield tuple(
                        part[: full * batch_size].reshape(full, batch_size, *part.shape[1:])
                        for part in loaded
                    )
                pending = [part[full * batch_size :] for part in loaded]
            if pending is not None and len(pending[0]) and not drop_remainder:
                yield tuple(part[None] for part in pending)

    signature = [
        tf.TensorSpec((None, None, c, n, n), tf.float32),
        tf.TensorSpec((None, None, c, 2), tf.float32),
    ]
    if scan.masked:
        signature.append(tf.TensorSpec((None, None, c, n, n), tf.bool))
    # One Python call per window (its batches stacked), not one per batch: fewer trips
    # through the interpreter holding the GIL beside the training loop.
    stream = tf.data.Dataset.from_generator(generate, output_signature=tuple(signature))
    batches = stream.unbatch()
    if drop_remainder:
        size = tf.TensorShape([batch_size])
        batches = batches.map(
            lambda *parts: tuple(tf.ensure_shape(p, size.concatenate(p.shape[1:])) for p in parts)
        )
    return batches

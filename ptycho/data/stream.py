"""Scans larger than memory: patterns read from their HDF5 file when they are needed
(docs/large-scans.md).

:class:`Patterns` stands where a Scan's in-memory ``diffraction`` array would: it has
its shape and dtype, and ``patterns[a:b]`` or ``patterns[index_array]`` reads those
patterns from the file and prepares them (:func:`ptycho.data.prepare.prepare`'s steps,
applied per read), so only the patterns in use are ever in memory. Reads of nearby
patterns are merged into one contiguous read.

:func:`shuffled_windows` is the order every streamed pass uses: the items (positions,
groups) in blocks of neighbours, the blocks in a random order, several blocks at a time
shuffled together. Each window is read with a few contiguous reads, and a minibatch
drawn from it mixes positions from ``blocks_per_window`` places of the scan.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["Patterns", "Source", "ordered_windows", "shuffled_windows", "window_items"]

WINDOW_BYTES = 2**25
"""Patterns per streamed window, in bytes of float32 (32 MB): the working set of a
streamed pass, whatever the scan's size."""
BLOCKS_PER_WINDOW = 16
"""Blocks of neighbouring items shuffled together in a window."""
_MERGE_GAP = 64  # patterns: reads closer than this are merged into one


@dataclass(frozen=True)
class Source:
    """Where streamed frames live: an HDF5 ``path`` and the ``dataset`` in it; a 4-D
    (nx, ny, F, F) dataset is read as (nx ny, F, F) (CXI rasters)."""

    path: str
    dataset: str


class Patterns:
    """(M, N, N) float32 patterns read from ``source`` on demand.

    Parameters
    ----------
    source : Source
    shape : (M, N, N)
        The prepared patterns' shape.
    prepare : callable
        ``frames (k, F, F) as stored -> (amplitudes (k, N, N) float32, valid (k, N, N)
        bool or None)``: the preparation of a block of frames.
    per_pattern : bool
        Whether some patterns have pixels of their own masked (bad or saturated values):
        :meth:`valid` then reads them.
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(
        self,
        source: Source,
        shape: tuple[int, int, int],
        prepare: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]],
        *,
        per_pattern: bool = False,
    ):
        self.source, self.shape, self.per_pattern = (
            source,
            tuple(int(s) for s in shape),
            per_pattern,
        )
        self._prepare = prepare
        self._lock = threading.Lock()
        self._handle = None
        self._pid = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def __repr__(self) -> str:
        return f"Patterns({self.source.path}:{self.source.dataset}, shape={self.shape})"

    # ----------------------------------------------------------------------------------

    def _dataset(self):
        """The open dataset (opened once per process: a forked child reopens it)."""
        if self._handle is None or self._pid != os.getpid():
            import h5py

            # h5py's default chunk cache: whole-chunk reads (ours) bypass it, which
            # measured 3x faster than through a 32 MB cache.
            handle = h5py.File(self.source.path, "r")
            dataset = handle[self.source.dataset]
            self._handle, self._pid, self._data = handle, os.getpid(), dataset
        return self._data

    def _raw(self, start: int, stop: int) -> np.ndarray:
        data = self._dataset()
        if data.ndim == 4:  # (nx, ny, F, F) raster
            ny = data.shape[1]
            return np.stack([data[k // ny, k % ny] for k in range(start, stop)])
        return data[start:stop]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Patterns ``[start, stop)`` and their own valid pixels (None: only the
        detector's mask applies)."""
        start, stop = max(0, start), min(stop, len(self))
        if stop <= start:
            n = self.shape[1]
            empty = np.zeros((0, n, n), np.float32)
            return empty, (np.zeros((0, n, n), bool) if self.per_pattern else None)
        with self._lock:  # one reader at a time per stream (h5py serialises anyway)
            raw = self._raw(start, stop)
        amplitudes, valid = self._prepare(raw)
        if valid is None and self.per_pattern:
            valid = np.ones(amplitudes.shape, bool)
        return amplitudes, valid

    def _gather(self, index: np.ndarray, *, valid: bool):
        """The patterns (or valid pixels) of a flat index array, in its order."""
        if len(index) == 0:
            return self.read(0, 0)[1 if valid else 0]
        if index.min() < -len(self) or index.max() >= len(self):
            raise IndexError(f"pattern index out of range for {len(self)} patterns")
        index = np.where(index < 0, index + len(self), index)
        ordered = bool(np.all(np.diff(index) > 0))
        wanted, where = (index, None) if ordered else np.unique(index, return_inverse=True)
        # Contiguous runs, merging gaps shorter than _MERGE_GAP (one read each).
        breaks = np.flatnonzero(np.diff(wanted) > _MERGE_GAP) + 1
        parts = []
        for run in np.split(wanted, breaks):
            block = self.read(int(run[0]), int(run[-1]) + 1)[1 if valid else 0]
            parts.append(block if len(block) == len(run) else block[run - run[0]])
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out if where is None else out[where]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self.read(start, stop)[0]
            key = np.arange(start, stop, step)
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= key < len(self):
                raise IndexError(f"pattern {key} out of range for {len(self)} patterns")
            key = int(key) % len(self)
            return self.read(key, key + 1)[0][0]
        index = np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if index.dtype.kind not in "iu":
            raise IndexError(f"patterns are indexed by integers or slices, got {index.dtype}")
        flat = self._gather(index.reshape(-1), valid=False)
        return flat.reshape(*index.shape, *self.shape[1:])

    def valid(self, indices) -> np.ndarray | None:
        """(..., N, N) bool: the pixels of patterns ``indices`` their own values leave
        usable (None when no pattern has masked values of its own)."""
        if not self.per_pattern:
            return None
        index = np.asarray(indices)
        flat = self._gather(index.reshape(-1), valid=True)
        return flat.reshape(*index.shape, *self.shape[1:])

    def chunks(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, patterns)`` of consecutive blocks covering the scan."""
        size = size or window_items(1, self.shape[1])
        for start in range(0, len(self), size):
            yield start, self.read(start, start + size)[0]

    def __array__(self, dtype=None, copy=None):
        """The whole scan in memory (only for scans that fit: small ones, tests)."""
        out = np.empty(self.shape, np.float32)
        for start, block in self.chunks():
            out[start : start + len(block)] = block
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_handle=None, _pid=None, _lock=None)
        state.pop("_data", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def window_items(items_per_sample: int, n: int, *, multiple: int = 1) -> int:
    """Items (of ``items_per_sample`` N x N float32 patterns each) in a window of
    :data:`WINDOW_BYTES`, a multiple of ``multiple`` (the minibatch), at least one."""
    items = WINDOW_BYTES // (items_per_sample * n * n * 4)
    return max(multiple, items // multiple * multiple)


def ordered_windows(count: int, window: int) -> Iterator[np.ndarray]:
    """``range(count)`` in consecutive windows of ``window`` items (unshuffled passes)."""
    for start in range(0, count, window):
        yield np.arange(start, min(start + window, count))


def shuffled_windows(
    count: int, window: int, rng: np.random.Generator, *, blocks: int = BLOCKS_PER_WINDOW
) -> Iterator[np.ndarray]:
    """A random order of ``range(count)`` in windows of about ``window`` items: the items
    in blocks of ``window / blocks`` consecutive ones, the blocks shuffled, ``blocks``
    blocks per window, the items of a window shuffled together. Items must be sorted so
    that consecutive ones are read together (positions in scan order; groups by their
    first member)."""
    block = max(1, window // blocks)
    starts = rng.permutation(np.arange(0, count, block))
    for first in range(0, len(starts), blocks):
        chosen = starts[first : first + blocks]
        items = np.concatenate([np.arange(s, min(s + block, count)) for s in chosen])
        yield rng.permutation(items)

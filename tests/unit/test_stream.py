"""Streamed scans (ptycho.data.stream): patterns read from the file when used give what
the in-memory path gives (every preparation step, training batches, inference,
refinement), and no stage reads a streamed scan whole."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import ptycho.refine
from ptycho.data import load_scan, make_dataset, save_scan, simulate
from ptycho.data.cxi import write_cxi
from ptycho.data.grouping import group_positions
from ptycho.data.prepare import ELECTRON_VOLT, PLANCK_TIMES_C, PrepareOptions
from ptycho.data.stream import Patterns, shuffled_windows
from ptycho.inference import reconstruct
from ptycho.model import ModelConfig, build_model
from ptycho.refine import RefineOptions, Refiner

MEMORY, STREAM = PrepareOptions(stream=False), PrepareOptions(stream=True)


@pytest.fixture(scope="module")
def scan():
    return simulate(n=64, n_positions=100, step=0.125, nphotons=1e6, seed=3)


@pytest.fixture(scope="module")
def h5(scan, tmp_path_factory):
    return save_scan(scan, tmp_path_factory.mktemp("stream") / "scan.h5")


@pytest.fixture
def never_whole(monkeypatch):
    """Reading a streamed scan whole fails the test."""

    def whole(self, dtype=None, copy=None):
        raise AssertionError("a streamed scan was read whole")

    monkeypatch.setattr(Patterns, "__array__", whole)


def both(path, **options):
    memory = load_scan(path, options=PrepareOptions(stream=False, **options))
    streamed = load_scan(path, options=PrepareOptions(stream=True, **options))
    assert not memory.streamed and streamed.streamed
    return memory, streamed


def test_patterns_index_like_the_array(scan, h5):
    memory, streamed = both(h5)
    np.testing.assert_array_equal(memory.diffraction, scan.diffraction)
    patterns = streamed.diffraction
    assert patterns.shape == scan.diffraction.shape and len(patterns) == scan.n_positions
    for key in (
        7,
        -1,
        slice(10, 30),
        slice(5, 90, 7),
        np.array([3, 99, 3, 0, 50]),
        np.array([[1, 2], [80, 79]]),
        np.arange(100) % 2 == 0,
    ):
        np.testing.assert_array_equal(patterns[key], scan.diffraction[key])
    with pytest.raises(IndexError):
        patterns[np.array([100])]
    with pytest.raises(IndexError):
        patterns[-101]


def test_every_preparation_step_streams_as_it_prepares_in_memory(scan, tmp_path):
    """CXI counts in the corner (fftshift), a detector mask, bad and saturated values,
    a dark frame, a crop around the centre and 2 x 2 binning: the same patterns, masks
    and background whether read whole or streamed."""
    counts = np.fft.ifftshift(scan.diffraction**2, axes=(1, 2)).astype(np.float32)
    counts = np.pad(counts, ((0, 0), (8, 8), (8, 8)))  # 80 px frames, shifted back later
    counts[4, 9, 9] = np.nan
    counts[6, 20, 21] = -3.0
    counts += 2.0  # a dark current of 2 counts
    excluded = np.zeros((80, 80), bool)
    excluded[30, :4] = True
    wavelength = PLANCK_TIMES_C / (8000 * ELECTRON_VOLT)
    pixel = wavelength * 2.0 / (64 * 75e-6)
    path = tmp_path / "scan.cxi"
    write_cxi(
        path,
        counts,
        -scan.positions * pixel,
        energy=8000 * ELECTRON_VOLT,
        distance=2.0,
        pixel=75e-6,
        probe=np.pad(scan.probe, 8),
        excluded=excluded,
        dark=np.full((80, 80), 2.0, np.float32),
    )
    saturation = float(np.quantile(counts[np.isfinite(counts)], 0.9999))
    for background_mode in ("model", "subtract"):
        memory, streamed = both(
            path,
            crop=64,
            bin=2,
            saturation=saturation,
            background_mode=background_mode,
            mask_hot_pixels=False,
        )
        assert memory.valid.ndim == 3  # bad and saturated values: masks of their own
        index = np.arange(memory.n_positions)
        np.testing.assert_array_equal(streamed.diffraction[index], memory.diffraction)
        np.testing.assert_array_equal(streamed.valid_pixels(index), memory.valid)
        np.testing.assert_array_equal(streamed.signal(index), memory.signal(index))
        part = np.array([9, 4, 6])
        np.testing.assert_array_equal(streamed.subset(part).valid, memory.subset(part).valid)
        if background_mode == "model":
            np.testing.assert_array_equal(streamed.background, memory.background)
        else:
            assert streamed.background is None and memory.background is None
        np.testing.assert_allclose(streamed.positions, memory.positions)


def test_stream_auto_streams_above_the_threshold(h5):
    assert not load_scan(h5).streamed  # 1.6 MB: in memory
    assert load_scan(h5, options=PrepareOptions(stream_above_gb=1e-4)).streamed


def test_shuffled_windows_are_a_permutation_of_runs_of_neighbours():
    rng = np.random.default_rng(0)
    windows = list(shuffled_windows(1000, 160, rng, blocks=4))
    order = np.concatenate(windows)
    np.testing.assert_array_equal(np.sort(order), np.arange(1000))
    assert not np.array_equal(order, np.arange(1000))
    for window in windows:  # 4 whole blocks of 40 consecutive items (fewer at the end)
        blocks, sizes = np.unique(window // 40, return_counts=True)
        assert len(blocks) <= 4 and (sizes == 40).all()
        assert not np.array_equal(window, np.sort(window))  # shuffled within the window
    again = np.concatenate(list(shuffled_windows(1000, 160, np.random.default_rng(0), blocks=4)))
    np.testing.assert_array_equal(again, order)


def _samples(dataset):
    """(diffraction, offsets, target) of every sample, in order."""
    parts = [[], [], []]
    for inputs, target in dataset:
        parts[0].append(inputs["diffraction"].numpy())
        parts[1].append(inputs["offsets"].numpy())
        parts[2].append(target["amplitude"].numpy())
    return [np.concatenate(p) for p in parts]


def test_training_batches_are_the_in_memory_ones(h5, never_whole):
    memory, streamed = both(h5)
    groups = group_positions(memory.xcoords, memory.ycoords, 2)
    groups = groups[np.argsort(groups.min(axis=1), kind="stable")]
    options = dict(norm_factor=0.5, batch_size=8, seed=1)
    # Unshuffled, groups sorted by their first member: the same batches in the same order.
    expected = _samples(make_dataset(memory, groups, shuffle=False, **options))
    got = _samples(make_dataset(streamed, groups, shuffle=False, **options))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
    # Shuffled: every group once per epoch, in another order each epoch, the same order
    # for the same (seed, epoch), so a resumed run sees the batches it would have seen.
    two = _samples(make_dataset(streamed, groups, shuffle=True, epochs=2, **options))
    first, second = (part[: len(groups)] for part in two), (part[len(groups) :] for part in two)
    first, second = list(first), list(second)
    key = lambda part: np.lexsort(part.reshape(len(part), -1).T[::-1])  # noqa: E731
    for epoch in (first, second):
        order = key(epoch[0])
        np.testing.assert_array_equal(epoch[0][order], expected[0][key(expected[0])])
    assert not np.array_equal(first[0], second[0])
    resumed = _samples(make_dataset(streamed, groups, shuffle=True, start_epoch=1, **options))
    np.testing.assert_array_equal(resumed[0], second[0])


def test_a_reconstruction_streams_to_the_in_memory_result(h5, never_whole):
    memory, streamed = both(h5)
    config = ModelConfig(n=64, filters=4, precision="float32")
    model, _ = build_model(config, probe=memory.probe, norm_factor=0.01)
    results = [
        reconstruct(model, s, compile_mode="graph", batch_size=16) for s in (memory, streamed)
    ]
    np.testing.assert_array_equal(results[0].obj, results[1].obj)
    assert results[0].r_factor == results[1].r_factor


def test_refinement_streams_to_the_in_memory_result(h5, monkeypatch, never_whole):
    memory, streamed = both(h5)
    options = RefineOptions(mode="object", iterations=3, batch_size=16, eval_every=3)
    reference = Refiner(memory, options, compile_mode="graph")
    np.testing.assert_allclose(
        Refiner(streamed, options, compile_mode="graph").totals(), reference.totals(), rtol=1e-6
    )
    expected = reference.run()
    # In the in-memory order (one shuffled window): the same steps, the same object.
    with monkeypatch.context() as patch:
        patch.setattr(ptycho.refine, "shuffled_windows", lambda m, w, rng: [rng.permutation(m)])
        same = Refiner(streamed, options, compile_mode="graph").run()
    np.testing.assert_array_equal(same.obj, expected.obj)
    # In windows of neighbours: as good a fit.
    windowed = Refiner(streamed, options, compile_mode="graph").run()
    assert windowed.r_factor == pytest.approx(expected.r_factor, rel=0.1)
    assert windowed.r_factor < 0.5 * expected.history[0]["r_factor"]


def test_convert_writes_a_streamable_h5(scan, tmp_path):
    from ptycho.data.convert import main

    npz = save_scan(scan, tmp_path / "scan.npz")
    assert main([str(npz), str(tmp_path / "scan.h5")]) == 0
    with h5py.File(tmp_path / "scan.h5") as handle:
        assert handle["diff3d"].chunks[0] <= 64
    streamed = load_scan(tmp_path / "scan.h5", options=STREAM)
    np.testing.assert_array_equal(streamed.diffraction[np.arange(100)], scan.diffraction)
    assert main([str(tmp_path / "missing.npz"), str(tmp_path / "x.h5")]) == 1
    assert not (tmp_path / "x.h5").exists()

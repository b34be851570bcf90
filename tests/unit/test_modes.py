"""Probe modes (ptycho/probes.py): the modes' algebra against numpy, the simulator's
partially coherent patterns, the network's K-mode physics against a numpy forward model,
its save and reload, and the refinement keeping its modes orthogonal and recovering
their powers. The loss and gradients with modes against numpy and finite differences:
tests/unit/test_refine.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ptycho import probes
from ptycho.data import simulate
from ptycho.data.simulate import make_probe
from ptycho.model import ModelConfig, build_model, load_model
from ptycho.refine import RefineOptions, Refiner

N = 32


def random_modes(k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(k, N, N)) + 1j * rng.normal(size=(k, N, N))).astype(np.complex64)


def test_orthogonalise_keeps_every_pattern_and_sorts_the_modes_by_power():
    modes = random_modes(3)
    found = probes.orthogonalise(modes)
    overlap = found.reshape(3, -1).astype(np.complex128)
    overlap = overlap @ overlap.conj().T
    assert np.abs(overlap - np.diag(np.diag(overlap))).max() < 1e-4 * np.abs(overlap).max()
    power = np.real(np.diag(overlap))
    assert np.all(np.diff(power) <= 0)
    # A unitary mixture: the total intensity, hence every pattern sum_k |F(P_k O)|^2.
    np.testing.assert_allclose(probes.intensity(found), probes.intensity(modes), rtol=1e-4)
    obj = np.exp(1j * np.random.default_rng(1).normal(size=(N, N)))
    pattern = lambda m: np.sum(np.abs(np.fft.fft2(m * obj)) ** 2, axis=0)  # noqa: E731
    np.testing.assert_allclose(pattern(found), pattern(modes), rtol=1e-3)
    # The eigenvalues of the modes' overlap matrix are the powers found.
    flat = modes.reshape(3, -1).astype(np.complex128)
    expected = np.sort(np.linalg.eigvalsh(flat @ flat.conj().T))[::-1]
    np.testing.assert_allclose(power, expected, rtol=1e-4)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_initial_modes_start_from_the_guess_with_the_power_asked_for(k):
    guess = make_probe(N, kind="fresnel", radius=0.25)
    modes = probes.initial_modes(guess, k, 0.2)
    assert modes.shape == (k, N, N)
    np.testing.assert_allclose(
        modes[0], guess * np.sqrt(0.8), atol=1e-6 * np.abs(guess).max()
    )  # the guess itself
    shares = probes.powers(modes)
    assert shares[0] == pytest.approx(0.8, abs=1e-5)
    assert shares[1:].sum() == pytest.approx(0.2, abs=1e-5)
    flat = modes.reshape(k, -1).astype(np.complex128)
    overlap = np.abs(flat @ flat.conj().T)
    assert np.abs(overlap - np.diag(np.diag(overlap))).max() < 1e-5 * overlap.max()
    total = np.sum(np.abs(guess.astype(np.complex128)) ** 2)
    assert np.sum(np.abs(modes.astype(np.complex128)) ** 2) == pytest.approx(total, rel=1e-5)


def test_a_partially_coherent_simulation_sums_its_modes_intensities():
    """Noiseless patterns of a 3-mode beam against numpy: the integer-position patches
    of the truth times each mode, intensities added (whole-pixel raster: no shift)."""
    scan = simulate(
        n=N, n_positions=16, probe_modes=3, coherence=0.4, step=0.25, nphotons=None, seed=3
    )
    assert scan.probe.shape == (3, N, N) and scan.probe_modes == 3
    shares = 0.4 ** np.arange(3)
    np.testing.assert_allclose(probes.powers(scan.probe), shares / shares.sum(), rtol=1e-5)
    single = simulate(n=N, n_positions=16, step=0.25, nphotons=None, seed=3).probe
    # The beam's power is the coherent probe's, and the modes are orthogonal.
    assert np.sum(probes.intensity(scan.probe)) == pytest.approx(
        np.sum(np.abs(single.astype(np.complex128)) ** 2), rel=1e-5
    )
    for j in (0, 7, 15):
        row, col = (int(round(v - N / 2)) for v in (scan.ycoords[j], scan.xcoords[j]))
        patch = scan.object[row : row + N, col : col + N].astype(np.complex128)
        far = np.fft.fftshift(np.fft.fft2(scan.probe * patch), axes=(-2, -1)) / N
        expected = np.sqrt(np.sum(np.abs(far) ** 2, axis=0))
        np.testing.assert_allclose(scan.diffraction[j], expected, rtol=1e-4, atol=1e-6)


def test_the_network_sums_its_modes_intensities_and_reloads_with_them(tmp_path):
    scan = simulate(n=64, n_positions=16, probe_modes=3, nphotons=None, seed=2)
    config = ModelConfig(precision="float32", filters=4).resolved("graph", 64)
    training, _ = build_model(config, probe=scan.probe, norm_factor=1.0)
    rng = np.random.default_rng(0)
    inputs = {
        "diffraction": rng.random((2, 64, 64, 4)).astype(np.float32),
        "offsets": rng.normal(0, 2, (2, 4, 2)).astype(np.float32),
    }
    out = training(inputs)
    # numpy: the object patches (after the overlap constraint) times each mode, the far
    # fields' intensities added, times the model's intensity scale.
    patches = np.asarray(out["object"]).astype(np.complex128)  # (B, N, N, C)
    modes = scan.probe.astype(np.complex128)
    waves = modes[None, :, :, :, None] * patches[:, None]  # (B, K, N, N, C)
    far = np.fft.fftshift(np.fft.fft2(waves, axes=(2, 3)), axes=(2, 3)) / 64
    scale = np.exp(float(training.get_layer("amplitude").log_scale.numpy()))
    expected = scale * np.sqrt(np.sum(np.abs(far) ** 2, axis=1))
    np.testing.assert_allclose(np.asarray(out["amplitude"]), expected, rtol=2e-3, atol=1e-4)
    # Saved and reloaded (safe mode) with its modes.
    training.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    assert tuple(loaded.get_layer("illumination").probe.shape) == (3, 64, 64)
    np.testing.assert_array_equal(np.asarray(loaded(inputs)["amplitude"]), out["amplitude"])


def test_the_network_refuses_modes_it_cannot_have():
    modes = simulate(n=64, n_positions=4, probe_modes=3, nphotons=None).probe
    config = ModelConfig(precision="float32", filters=4).resolved("graph", 64)
    with pytest.raises(ValueError, match=r"^model.probe_modes=2 but the probe has 3 modes"):
        build_model(replace(config, probe_modes=2), probe=modes, norm_factor=1.0)
    with pytest.raises(ValueError, match=r"only a trainable probe can fit"):
        build_model(replace(config, probe_modes=2), probe=modes[0], norm_factor=1.0)
    trainable = replace(config, probe_modes=2, probe_trainable=True)
    training, _ = build_model(trainable, probe=modes[0], norm_factor=1.0)
    assert tuple(training.get_layer("illumination").probe.shape) == (2, 64, 64)
    with pytest.raises(ValueError, match=r"probe_modes=0: must be >= 1"):
        ModelConfig(probe_modes=0).check()


def test_refinement_recovers_the_powers_of_two_modes_and_keeps_them_orthogonal():
    """A 2-mode beam (77 / 23 %), refined with 2 modes from the first one alone."""
    scan = simulate(
        n=N, n_positions=100, object_kind="image", images=("coins", "text"),
        probe="fresnel", probe_radius=0.3, scan="grid", step=0.25, jitter=0.02,
        phase_range=(-0.5, 0.5), probe_modes=2, coherence=0.3, nphotons=1e7, seed=4,
    )  # fmt: skip
    first = scan.replace(probe=scan.probe[0])
    options = RefineOptions(mode="full", probe_modes=2, iterations=40, batch_size=16)
    refiner = Refiner(first, options)
    assert refiner.probe.shape == (2, N, N, 2)
    result = refiner.run()
    found, true = probes.powers(result.probe), probes.powers(scan.probe)
    np.testing.assert_allclose(found, true, rtol=0.1)  # measured: 77.4 / 22.6 against 76.9 / 23.1
    flat = result.probe.reshape(2, -1).astype(np.complex128)
    overlap = np.abs(flat @ flat.conj().T)
    assert overlap[0, 1] < 1e-4 * overlap[0, 0]
    assert result.history[-1]["mode_1_power"] == pytest.approx(found[1], rel=1e-3)
    # One mode fits the blurred patterns worse.
    single = Refiner(first, RefineOptions(mode="full", iterations=40, batch_size=16)).run()
    assert single.r_factor > 1.2 * result.r_factor


def test_one_mode_is_the_single_probe_path_bit_for_bit():
    scan = simulate(n=N, n_positions=36, step=0.25, jitter=0.02, nphotons=1e7, seed=5)
    runs = [
        Refiner(scan, RefineOptions(mode="full", iterations=4, batch_size=12, probe_modes=k)).run()
        for k in (None, 1)
    ]
    np.testing.assert_array_equal(runs[0].obj, runs[1].obj)
    np.testing.assert_array_equal(runs[0].probe, runs[1].probe)
    assert runs[0].probe.shape == (N, N)  # stored as one (N, N) probe


def test_refinement_refuses_modes_it_cannot_have():
    scan = simulate(n=N, n_positions=16, step=0.25, nphotons=1e7, probe_modes=3)
    with pytest.raises(ValueError, match=r"^refine.probe_modes=2 but the probe has 3 modes"):
        Refiner(scan, RefineOptions(mode="full", probe_modes=2))
    single = scan.replace(probe=scan.probe[0])
    with pytest.raises(ValueError, match=r"which only refine=full refines \(refine=object\)"):
        Refiner(single, RefineOptions(mode="object", probe_modes=3))
    with pytest.raises(ValueError, match=r"^probe_modes=0: must be >= 1"):
        RefineOptions(probe_modes=0).check()
    with pytest.raises(ValueError, match=r"Scan.probe: expected shape \(32, 32\), or \(K, 32"):
        scan.replace(probe=np.ones((3, 16, 16), np.complex64))


def test_the_beamline_preset_can_have_a_partially_coherent_beam():
    """Its ideal counts against numpy: the truth's patches under each true mode, the
    intensities added (Poisson: the total over the scan within 3 sigma)."""
    from ptycho.data.beamline import BeamlineSpec, simulate_beamline
    from ptycho.stitch import extract_patches

    spec = BeamlineSpec(n=64, frame=128, side=6, gap=(15, 2), beamstop=2.0, probe_modes=2)
    ideal = simulate_beamline(spec).ideal
    modes = ideal.metadata["true_probe"].astype(np.complex128)  # in count units
    assert modes.shape == (2, 64, 64)
    np.testing.assert_allclose(probes.powers(modes), [1 / 1.3, 0.3 / 1.3], rtol=1e-5)
    patches = extract_patches(ideal.object, ideal.xcoords, ideal.ycoords, 64)
    far = np.fft.fftshift(np.fft.fft2(modes[:, None] * patches), axes=(-2, -1)) / 64
    expected = np.sum(np.abs(far) ** 2, axis=0)
    counts = ideal.diffraction.astype(np.float64) ** 2
    assert abs(counts.sum() - expected.sum()) < 3 * np.sqrt(expected.sum())
    bright = expected > 100  # per pixel, where Poisson noise is small against the rate
    assert np.abs(counts[bright] - expected[bright]).mean() < 0.1 * expected[bright].mean()

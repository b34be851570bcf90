"""Scan data: simulation physics, noise, files, validation, grouping, batching."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.ndimage

from ptycho.data import (
    Scan,
    ScanFileError,
    group_offsets,
    group_positions,
    load_scan,
    make_dataset,
    make_object,
    make_probe,
    normalisation_factor,
    save_scan,
    scan_positions,
    simulate,
    tile_groups,
)
from ptycho.data.simulate import fourier_patches
from ptycho.stitch import extract_patches


def numpy_patch(obj: np.ndarray, x: float, y: float, n: int) -> np.ndarray:
    """Bilinear N x N window centred on (x, y), zero outside: scipy, independently."""
    rows = y - n / 2 + np.arange(n)
    cols = x - n / 2 + np.arange(n)
    grid = np.meshgrid(rows, cols, indexing="ij")

    def sample(part):
        return scipy.ndimage.map_coordinates(part, grid, order=1, mode="grid-constant", cval=0.0)

    return sample(obj.real.astype(np.float64)) + 1j * sample(obj.imag.astype(np.float64))


def fourier_patch(obj: np.ndarray, x: float, y: float, n: int) -> np.ndarray:
    """N x N window centred on (x, y), the whole object (continued by reflection)
    shifted through its spectrum by scipy, independently of the simulator's windows."""
    padded = np.pad(obj.astype(np.complex128), n, mode="reflect")
    row, col = int(np.floor(y - n / 2)), int(np.floor(x - n / 2))
    shift = (row - (y - n / 2), col - (x - n / 2))  # move the point (y, x) onto the grid
    moved = np.fft.ifft2(scipy.ndimage.fourier_shift(np.fft.fft2(padded), shift))
    return moved[row + n : row + 2 * n, col + n : col + 2 * n]


def direct_amplitudes(scan: Scan, patch=numpy_patch) -> np.ndarray:
    n = scan.n
    out = []
    for x, y in zip(scan.xcoords, scan.ycoords, strict=True):
        exit_wave = scan.probe.astype(np.complex128) * patch(scan.object, x, y, n)
        out.append(np.abs(np.fft.fftshift(np.fft.fft2(exit_wave))) / n)
    return np.array(out)


# --------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "jitter, subpixel, tolerance",
    # Fourier: against the whole object shifted by scipy, on a smooth object; the two
    # differ next to the object's edges, which scipy continues by reflection.
    [(0.0, "fourier", 1e-4), (0.05, "bilinear", 1e-4), (0.05, "fourier", 2e-3)],
    ids=["integer", "subpixel-bilinear", "subpixel-fourier"],
)
def test_noiseless_amplitudes_equal_the_direct_far_field(jitter, subpixel, tolerance):
    kind = "grf" if subpixel == "fourier" else "lines"
    scan = simulate(
        n=32, n_positions=16, step=0.25, jitter=jitter, nphotons=None, seed=3,
        subpixel=subpixel, object_kind=kind,
    )  # fmt: skip
    integer = np.allclose(scan.xcoords, np.round(scan.xcoords))
    assert integer == (jitter == 0.0)
    expected = direct_amplitudes(scan, numpy_patch if subpixel == "bilinear" else fourier_patch)
    scale = np.abs(expected).max()
    error = np.max(np.abs(scan.diffraction - expected))
    assert error <= tolerance * scale
    if jitter:  # the two models differ: the test tells them apart
        other = direct_amplitudes(scan, fourier_patch if subpixel == "bilinear" else numpy_patch)
        assert np.max(np.abs(scan.diffraction - other)) > 3 * error


def test_fourier_patches_shift_a_smooth_object_exactly():
    """Against the analytic object at the shifted points; the warp's bilinear patches
    are 40x further off."""
    rows, cols = np.mgrid[:160, :160].astype(np.float64)

    def smooth(y, x):
        amplitude = 1 + 0.3 * np.cos(2 * np.pi * (0.05 * x + 0.03 * y))
        return amplitude * np.exp(0.5j * np.sin(2 * np.pi * (0.02 * x - 0.04 * y)))

    rng = np.random.default_rng(0)
    x, y = rng.uniform(30, 130, 12), rng.uniform(30, 130, 12)
    exact = fourier_patches(smooth(rows, cols), x, y, 32)
    bilinear = extract_patches(smooth(rows, cols).astype(np.complex64), x, y, 32)
    for j in range(12):
        truth = smooth((y[j] - 16 + np.arange(32))[:, None], (x[j] - 16 + np.arange(32))[None])
        assert np.abs(exact[j] - truth).max() < 5e-4
        assert np.abs(bilinear[j] - truth).max() > 20 * np.abs(exact[j] - truth).max()


def test_far_field_is_unitary():
    scan = simulate(n=32, n_positions=9, nphotons=None, seed=1, object_kind="grf")
    for j in range(scan.n_positions):
        exit_wave = scan.probe * numpy_patch(scan.object, scan.xcoords[j], scan.ycoords[j], 32)
        assert np.sum(scan.diffraction[j].astype(np.float64) ** 2) == pytest.approx(
            np.sum(np.abs(exit_wave) ** 2), rel=1e-5
        )


def test_poisson_counts_have_the_requested_mean_and_poisson_variance():
    nphotons = 2e4
    noisy = simulate(n=32, n_positions=64, nphotons=nphotons, seed=5)
    clean = simulate(n=32, n_positions=64, nphotons=None, seed=5)  # same object and path
    np.testing.assert_array_equal(noisy.object, clean.object)
    counts = noisy.diffraction.astype(np.float64) ** 2
    assert np.allclose(counts, np.round(counts), atol=1e-2)  # amplitudes are sqrt(integers)
    assert counts.sum(axis=(1, 2)).mean() == pytest.approx(nphotons, rel=0.02)
    intensity = clean.diffraction.astype(np.float64) ** 2
    expected = intensity * nphotons / intensity.sum(axis=(1, 2)).mean()
    bright = expected > 5
    residual = counts[bright] - expected[bright]
    assert abs(residual.mean()) < 0.05 * np.sqrt(expected[bright].mean())
    assert np.mean(residual**2 / expected[bright]) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("kind", ["lines", "grf", "image"])
def test_objects_have_independent_amplitude_and_phase_in_range(kind):
    obj = make_object(
        (96, 80), kind=kind, amplitude_range=(0.2, 1.0), phase_range=(-1.0, 0.5), seed=2
    )
    amplitude, phase = np.abs(obj), np.angle(obj)
    assert obj.shape == (96, 80) and obj.dtype == np.complex64
    assert amplitude.min() >= 0.2 - 1e-6 and amplitude.max() <= 1.0 + 1e-6
    assert phase.min() >= -1.0 - 1e-6 and phase.max() <= 0.5 + 1e-6
    assert amplitude.std() > 0.05 and phase.std() > 0.05
    assert abs(np.corrcoef(amplitude.ravel(), phase.ravel())[0, 1]) < 0.5
    other = make_object((96, 80), kind=kind, seed=3)
    assert not np.allclose(other, obj)


def test_multiscale_line_blur_is_a_weighted_sum_of_blurs():
    from ptycho.data.simulate import lines_texture

    def texture(**kwargs):
        return lines_texture((120, 100), np.random.default_rng(5), **kwargs)

    single = texture(blur=2.0)
    np.testing.assert_array_equal(single, texture(blur=(2.0,)))
    # Weights of one repeated blur only scale the sum, which normalisation removes.
    np.testing.assert_allclose(
        texture(blur=(2.0, 2.0), blur_weights=(0.3, 0.7)), single, atol=1e-12
    )
    # PtychoPINN's blurs (1, 5, 10) x (1, 2, 5): mostly smooth structure.
    smooth = texture(blur=(1.0, 5.0, 10.0), blur_weights=(1.0, 2.0, 5.0))
    sharp = texture(blur=1.0)
    assert smooth.min() >= 0 and smooth.max() <= 1
    lag5 = [np.corrcoef(t[:, :-5].ravel(), t[:, 5:].ravel())[0, 1] for t in (sharp, smooth)]
    assert lag5[0] < 0.3 and lag5[1] > 0.6  # correlated over 5 pixels only when smooth
    with pytest.raises(ValueError, match="equal length"):
        texture(blur=(1.0, 5.0), blur_weights=(1.0,))
    with pytest.raises(ValueError, match=">= 0"):
        texture(blur=(-1.0,))
    obj = make_object((64, 64), line_blur=(1.0, 5.0, 10.0), line_blur_weights=(1, 2, 5))
    assert obj.shape == (64, 64) and np.all(np.isfinite(obj))


def test_probe_kinds():
    disk, fresnel, gauss = (
        make_probe(64, kind=k, radius=0.25) for k in ("disk", "fresnel", "gaussian")
    )
    for probe in (disk, fresnel, gauss):
        assert probe.shape == (64, 64) and probe.dtype == np.complex64
        assert np.abs(probe).max() == pytest.approx(1.0)
    centre = np.abs(disk)[32, 32]
    assert centre == pytest.approx(1.0, abs=1e-3) and np.abs(disk)[32, 60] < 1e-3
    assert np.ptp(np.angle(disk[np.abs(disk) > 0.5])) < 1e-6  # flat phase
    assert np.ptp(np.angle(fresnel[np.abs(fresnel) > 0.3])) > 0.5  # curved phase
    radius = np.hypot(*np.meshgrid(np.arange(64) - 32, np.arange(64) - 32))
    assert np.abs(gauss)[radius > 20].max() < 0.05


@pytest.mark.parametrize("kind", ["grid", "spiral", "random"])
def test_scan_paths(kind):
    x, y = scan_positions(100, kind=kind, step=10.0, seed=1)
    assert x.shape == y.shape == (100,) and x.min() == 0 and y.min() == 0
    points = np.stack([x, y], 1)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(100) * 1e9
    nearest = distances.min(axis=1)
    if kind == "grid":
        np.testing.assert_allclose(nearest, 10.0)
    elif kind == "spiral":
        assert 0.7 * 10 < np.median(nearest) < 1.3 * 10
    else:
        assert x.max() <= 100 and y.max() <= 100


def test_simulated_patches_lie_inside_the_object_and_train_test_differ():
    train = simulate(n=32, n_positions=25, seed=0, scan="spiral", probe="fresnel")
    test = simulate(n=32, n_positions=25, seed=1, scan="spiral", probe="fresnel")
    height, width = train.object.shape
    assert train.xcoords.min() - 16 >= 0 and train.xcoords.max() + 16 <= width
    assert train.ycoords.min() - 16 >= 0 and train.ycoords.max() + 16 <= height
    assert not np.allclose(np.abs(train.object[:32, :32]), np.abs(test.object[:32, :32]))


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def assert_same_scan(a: Scan, b: Scan):
    for name in ("diffraction", "probe", "xcoords", "ycoords", "object", "scan_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype == getattr(b, name).dtype, name
    assert a.nphotons == b.nphotons


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".hdf5"])
def test_round_trip_is_exact(tmp_path, suffix):
    scan = simulate(n=16, n_positions=10, jitter=0.1, seed=4, nphotons=1e5)
    path = save_scan(scan, tmp_path / f"scan{suffix}")
    loaded = load_scan(path)
    assert_same_scan(scan, loaded)
    if suffix != ".npz":
        assert loaded.seed == 4
        with h5py.File(path) as handle:
            assert handle["xcoords"].attrs["units"].startswith("object pixels")
            assert handle.attrs["nphotons"] == 1e5
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_npz_we_write_has_ptychopinn_rawdata_keys(tmp_path):
    scan = simulate(n=16, n_positions=4, seed=0)
    save_scan(scan, tmp_path / "scan.npz")
    with np.load(tmp_path / "scan.npz", allow_pickle=False) as data:
        rawdata_keys = {
            "xcoords",
            "ycoords",
            "xcoords_start",
            "ycoords_start",
            "diff3d",
            "probeGuess",
            "scan_index",
            "objectGuess",
        }
        assert rawdata_keys <= set(data.files)
        assert data["diff3d"].shape == (4, 16, 16) and data["probeGuess"].dtype == np.complex64


def test_a_ptychopinn_style_npz_loads(tmp_path):
    rng = np.random.default_rng(0)
    m, n = 6, 16
    np.savez(
        tmp_path / "pinn.npz",
        xcoords=rng.uniform(10, 20, m),
        ycoords=rng.uniform(10, 20, m),
        xcoords_start=rng.uniform(10, 20, m),
        ycoords_start=rng.uniform(10, 20, m),
        diffraction=rng.uniform(0, 3, (m, n, n)),  # the alias, float64 as often written
        probeGuess=(rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))),
        objectGuess=np.ones((40, 40), np.complex128),
        scan_index=np.zeros(m, np.int32),
    )
    scan = load_scan(tmp_path / "pinn.npz")
    assert scan.diffraction.dtype == np.float32 and scan.n == n and scan.object.shape == (40, 40)
    with np.load(tmp_path / "pinn.npz") as raw:
        # x is xcoords and y is ycoords (not the *_start keys, not swapped); the
        # diffraction is taken as amplitudes, as stored (not squared, not rooted).
        np.testing.assert_array_equal(scan.xcoords, raw["xcoords"])
        np.testing.assert_array_equal(scan.ycoords, raw["ycoords"])
        np.testing.assert_allclose(scan.diffraction, raw["diffraction"], rtol=1e-6)
        np.testing.assert_allclose(scan.probe, raw["probeGuess"], rtol=1e-6)
        np.testing.assert_array_equal(scan.object, raw["objectGuess"])


def test_hand_written_cxi_loads_with_right_positions_and_amplitudes(tmp_path):
    rng = np.random.default_rng(1)
    m, n = 5, 16
    intensities = rng.poisson(50.0, (m, n, n)).astype(np.float32)
    energy_j = 8000 * 1.602176634e-19  # 8 keV
    distance, pixel = 2.0, 75e-6
    wavelength = 6.62607015e-34 * 299792458.0 / energy_j
    object_pixel = wavelength * distance / (n * pixel)
    shifts_px = np.array([[0, 0], [3.5, 0], [0, 7.25], [10, 2], [4, 4]])
    translation = np.zeros((m, 3))
    translation[:, :2] = -shifts_px * object_pixel  # sample moves opposite to the beam
    probe = np.ones((n, n), np.complex64)
    with h5py.File(tmp_path / "scan.cxi", "w") as f:
        f["cxi_version"] = 150
        f["entry_1/data_1/data"] = intensities
        f["entry_1/sample_1/geometry_1/translation"] = translation
        f["entry_1/instrument_1/source_1/energy"] = energy_j
        f["entry_1/instrument_1/source_1/probe"] = probe
        f["entry_1/instrument_1/detector_1/distance"] = distance
        f["entry_1/instrument_1/detector_1/x_pixel_size"] = pixel
    scan = load_scan(tmp_path / "scan.cxi")
    np.testing.assert_allclose(scan.diffraction, np.sqrt(intensities), rtol=1e-6)
    np.testing.assert_allclose(scan.xcoords, shifts_px[:, 0] + n / 2, atol=1e-9)
    np.testing.assert_allclose(scan.ycoords, shifts_px[:, 1] + n / 2, atol=1e-9)
    assert scan.metadata["object_pixel_size_m"] == pytest.approx(object_pixel)


def test_cxi_positions_fall_back_to_data_1_translation(tmp_path):
    m, n = 3, 16
    energy_j, distance, pixel = 8000 * 1.602176634e-19, 2.0, 75e-6
    object_pixel = 6.62607015e-34 * 299792458.0 / energy_j * distance / (n * pixel)
    shifts_px = np.array([[0.0, 0.0], [2.5, 1.0], [6.0, 4.0]])
    with h5py.File(tmp_path / "scan.cxi", "w") as f:
        f["entry_1/data_1/data"] = np.ones((m, n, n), np.float32)
        f["entry_1/data_1/translation"] = -shifts_px * object_pixel  # no sample_1 geometry
        f["entry_1/instrument_1/source_1/energy"] = energy_j
        f["entry_1/instrument_1/detector_1/distance"] = distance
        f["entry_1/instrument_1/detector_1/x_pixel_size"] = pixel
    probe = (np.arange(n * n).reshape(n, n) * (1 + 1j)).astype(np.complex64)
    scan = load_scan(tmp_path / "scan.cxi", probe=probe)  # the file has no probe
    np.testing.assert_allclose(scan.xcoords, shifts_px[:, 0] + n / 2, atol=1e-9)
    np.testing.assert_allclose(scan.ycoords, shifts_px[:, 1] + n / 2, atol=1e-9)
    np.testing.assert_array_equal(scan.probe, probe)


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_a_given_probe_replaces_the_files_probe(tmp_path, suffix):
    scan = simulate(n=16, n_positions=4, seed=0)
    path = save_scan(scan, tmp_path / f"scan{suffix}")
    other = make_probe(16, kind="fresnel", radius=0.3)
    assert not np.allclose(other, scan.probe)
    np.testing.assert_array_equal(load_scan(path, probe=other).probe, other)
    np.testing.assert_array_equal(load_scan(path).probe, scan.probe)


def test_loader_errors_name_the_file_and_the_problem(tmp_path):
    scan = simulate(n=16, n_positions=4, seed=0)
    good = save_scan(scan, tmp_path / "good.npz")
    with pytest.raises(ScanFileError, match="no such file"):
        load_scan(tmp_path / "absent.npz")
    with pytest.raises(ScanFileError, match="unknown scan format"):
        load_scan(tmp_path / "scan.mat")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ScanFileError, match="corrupt.npz"):
        load_scan(corrupt)
    np.savez(
        tmp_path / "nokey.npz", diff3d=scan.diffraction, xcoords=scan.xcoords, ycoords=scan.ycoords
    )
    with pytest.raises(
        ScanFileError, match=r"no probe \(probeGuess\); give one with data.probe_path"
    ):
        load_scan(tmp_path / "nokey.npz")
    pickled = tmp_path / "pickled.npz"
    np.savez(
        pickled,
        diff3d=np.array([{"a": 1}], dtype=object),
        probeGuess=scan.probe,
        xcoords=scan.xcoords,
        ycoords=scan.ycoords,
    )
    with pytest.raises(ScanFileError, match="pickle"):
        load_scan(pickled)
    np.savez(
        tmp_path / "nan.npz",
        diff3d=np.full((4, 16, 16), np.nan, np.float32),
        probeGuess=scan.probe,
        xcoords=scan.xcoords,
        ycoords=scan.ycoords,
    )
    with pytest.raises(ScanFileError, match=r"nan\.npz: pattern 0 holds no usable value"):
        load_scan(tmp_path / "nan.npz")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(ScanFileError, match="cannot read"):
        load_scan(tmp_path / "junk.h5")


def test_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    scan = simulate(n=16, n_positions=4, seed=0)
    target = save_scan(scan, tmp_path / "scan.npz")
    before = target.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", explode)
    with pytest.raises(OSError, match="disk full"):
        save_scan(simulate(n=16, n_positions=9, seed=1), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.npz"]


# --------------------------------------------------------------------------------------
# Validation: each failure names the field
# --------------------------------------------------------------------------------------


def valid_fields(m=4, n=16):
    return dict(
        diffraction=np.ones((m, n, n), np.float32),
        probe=np.ones((n, n), np.complex64),
        xcoords=np.full(m, 20.0),
        ycoords=np.full(m, 20.0),
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(diffraction=np.ones((4, 16, 12))), r"diffraction: expected amplitudes of shape"),
        (dict(diffraction=np.ones((0, 16, 16))), r"diffraction: the scan is empty"),
        (dict(diffraction=np.ones((4, 15, 15)), probe=np.ones((15, 15))), r"even and >= 16"),
        (dict(diffraction=np.ones((4, 8, 8)), probe=np.ones((8, 8))), r"even and >= 16"),
        (dict(diffraction=np.ones((4, 16, 16), np.complex64)), r"diffraction: expected real"),
        (dict(diffraction=np.full((4, 16, 16), np.inf)), r"diffraction: non-finite"),
        (dict(diffraction=-np.ones((4, 16, 16))), r"diffraction: negative amplitude"),
        (dict(probe=np.ones((16, 18))), r"probe: expected shape \(16, 16\)"),
        (dict(probe=np.full((16, 16), np.nan)), r"probe: contains NaN"),
        (dict(xcoords=np.zeros(3)), r"xcoords: expected shape \(4,\)"),
        (dict(ycoords=np.array([0, 1, np.nan, 2])), r"ycoords: contains NaN"),
        (dict(xcoords=np.array(["a"] * 4)), r"xcoords: expected real numbers"),
        (dict(object=np.ones((10, 10))), r"outside the object of shape \(10, 10\)"),
        (dict(object=np.ones((4, 40, 40))), r"object: expected a 2-D"),
        (dict(scan_index=np.zeros(3, int)), r"scan_index: expected integers of shape"),
        (dict(nphotons=-5.0), r"nphotons: expected a positive number"),
    ],
)
def test_every_validation_error(change, match):
    fields = valid_fields() | change
    with pytest.raises(ValueError, match=match):
        Scan(**fields)


def test_scan_is_immutable_and_coerces_without_copying():
    fields = valid_fields()
    scan = Scan(**fields)
    assert np.shares_memory(scan.diffraction, fields["diffraction"])
    with pytest.raises(ValueError):
        scan.diffraction[0, 0, 0] = 5.0
    with pytest.raises(AttributeError):
        scan.nphotons = 3.0
    assert scan.n == 16 and scan.n_positions == 4 and scan.positions.shape == (4, 2)


# --------------------------------------------------------------------------------------
# Grouping and pipeline
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gridsize", [2, 3])
@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_raster_groups_have_one_geometry_in_a_fixed_order(gridsize, jitter):
    """Every sample of a raster is a g x g block of lattice neighbours in row-major
    order: the same offsets (up to the jitter) in the same channels, and every
    position is in some block."""
    step = 8.0
    rng = np.random.default_rng(3)
    x, y = scan_positions(100, kind="grid", step=step, seed=1)
    x, y = x + rng.normal(0, jitter, x.shape), y + rng.normal(0, jitter, y.shape)
    groups = group_positions(x, y, gridsize)
    assert groups.shape == ((10 - gridsize + 1) ** 2, gridsize**2)
    assert set(groups.ravel()) == set(range(100))
    _, offsets = group_offsets(x, y, groups)
    rows, cols = np.divmod(np.arange(gridsize**2), gridsize)
    ideal = step * (np.stack([cols, rows], axis=1) - (gridsize - 1) / 2)  # [dx, dy], row-major
    np.testing.assert_allclose(
        offsets, np.broadcast_to(ideal, offsets.shape), atol=4 * jitter + 1e-9
    )
    # The same anchor in the lattice (row, column) = index, independently of the tree:
    side = 10
    anchors = groups[:, 0]
    expected = np.array(
        [a + side * r + c for a in anchors for r, c in zip(rows, cols, strict=True)]
    )
    np.testing.assert_array_equal(groups.ravel(), expected)


@pytest.mark.parametrize("kind", ["spiral", "random"])
def test_irregular_groups_are_the_nearest_neighbours_ordered_by_angle(kind):
    x, y = scan_positions(200, kind=kind, step=8.0, seed=2)
    groups = group_positions(x, y, gridsize=2)
    assert groups.shape == (200, 4)
    distances = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    points = np.stack([x, y], axis=1)
    for seed_index, group in enumerate(groups):
        assert set(group) == set(np.argsort(distances[seed_index], kind="stable")[:4])
        offsets = points[group] - points[group].mean(axis=0)
        angles = np.arctan2(offsets[:, 1], offsets[:, 0])
        assert np.all(np.diff(angles) >= 0)  # left, up, right, down (y points down)
    with pytest.raises(ValueError, match="grouping=block needs a raster"):
        group_positions(x, y, gridsize=2, method="block")


def test_lattice_groups_of_a_dense_irregular_scan_have_the_asked_spacing():
    """A jittered spiral 1.3 px apart grouped on a 4 px lattice: every member within
    0.45 spacing of its lattice point (anchor + 4 px (column, row), row-major, checked
    against brute-force distances), about one group per position; ``auto`` picks it on
    scans denser than half the spacing and not on sparser ones; on a raster of the
    same step it is ``block``."""
    x, y = scan_positions(900, kind="spiral", step=1.3, jitter=0.4, seed=4)
    spacing = 4.0
    groups = group_positions(x, y, 2, method="lattice", spacing=spacing)
    assert len(groups) > 0.8 * len(x)
    points = np.stack([x, y], axis=1)
    lattice = spacing * np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    targets = points[groups[:, 0]][:, None] + lattice[None]
    for group, target in zip(groups[:50], targets[:50], strict=True):
        distance = np.hypot(*(points[:, None] - target[None]).transpose(2, 0, 1))
        np.testing.assert_array_equal(group, distance.argmin(axis=0))
    assert np.hypot(*(points[groups] - targets).transpose(2, 0, 1)).max() < 0.45 * spacing
    np.testing.assert_array_equal(group_positions(x, y, 2, spacing=spacing), groups)
    sparse_x, sparse_y = scan_positions(200, kind="spiral", step=8.0, seed=2)
    np.testing.assert_array_equal(
        group_positions(sparse_x, sparse_y, 2, spacing=spacing),
        group_positions(sparse_x, sparse_y, 2, method="nearest"),
    )
    raster_x, raster_y = scan_positions(100, kind="grid", step=spacing)
    np.testing.assert_array_equal(
        group_positions(raster_x, raster_y, 2, method="lattice", spacing=spacing),
        group_positions(raster_x, raster_y, 2, method="block"),
    )
    with pytest.raises(ValueError, match="needs a spacing"):
        group_positions(x, y, 2, method="lattice")
    with pytest.raises(ValueError, match="no 2 x 2 block of spacing 90"):
        group_positions(x, y, 2, method="lattice", spacing=90.0)


def test_a_raster_can_be_grouped_as_nearest_neighbours_and_n_groups_draws_groups():
    x, y = scan_positions(64, kind="grid", step=8.0)
    nearest = group_positions(x, y, gridsize=2, method="nearest")
    assert nearest.shape == (64, 4) and (nearest != group_positions(x, y, 2)[:1]).any()
    drawn = group_positions(x, y, gridsize=2, n_groups=300, seed=9)
    assert drawn.shape == (300, 4)
    blocks = {tuple(g) for g in group_positions(x, y, gridsize=2)}
    assert {tuple(g) for g in drawn} <= blocks
    np.testing.assert_array_equal(drawn, group_positions(x, y, 2, n_groups=300, seed=9))
    assert not np.array_equal(drawn, group_positions(x, y, 2, n_groups=300, seed=10))


def test_offsets_sum_to_zero_and_gridsize_one_is_per_pattern():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 50, 30), rng.uniform(0, 50, 30)
    groups = group_positions(x, y, gridsize=3)
    centres, offsets = group_offsets(x, y, groups)
    np.testing.assert_allclose(offsets.sum(axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(centres[:, 0] + offsets[:, 0, 0], x[groups[:, 0]])
    np.testing.assert_array_equal(group_positions(x, y, gridsize=1), np.arange(30)[:, None])
    with pytest.raises(ValueError, match="gridsize must be >= 1"):
        group_positions(x, y, gridsize=0)
    with pytest.raises(ValueError, match="fewer than the 16 a group"):
        group_positions(x[:10], y[:10], gridsize=4)
    with pytest.raises(ValueError, match="grouping method"):
        group_positions(x, y, gridsize=2, method="random")


def test_normalisation_factor_sets_mean_energy_and_pipeline_streams_batches():
    scan = simulate(n=16, n_positions=25, seed=0, nphotons=1e6)
    factor = normalisation_factor(scan.diffraction)
    energy = np.sum((scan.diffraction.astype(np.float64) * factor) ** 2, axis=(1, 2)).mean()
    assert energy == pytest.approx((16 / 2) ** 2, rel=1e-6)

    groups = group_positions(scan.xcoords, scan.ycoords, gridsize=2, method="nearest")
    _, offsets = group_offsets(scan.xcoords, scan.ycoords, groups)
    expected = np.moveaxis(scan.diffraction[groups], 1, -1) * np.float32(factor)  # (G,N,N,C)

    ordered = make_dataset(scan, groups, norm_factor=factor, batch_size=8, shuffle=False)
    batches = list(ordered)
    assert [b[0]["diffraction"].shape[0] for b in batches] == [8, 8, 8, 1]
    targets = np.concatenate([b[1]["amplitude"].numpy() for b in batches])
    np.testing.assert_allclose(targets, expected, rtol=1e-6)
    np.testing.assert_allclose(
        np.concatenate([b[0]["offsets"].numpy() for b in batches]), offsets, rtol=1e-6
    )
    for features, target in batches:  # unsupervised: the target is the scaled input
        np.testing.assert_allclose(
            features["diffraction"].numpy() * np.float32(factor), target["amplitude"], rtol=1e-6
        )

    def epoch(seed):
        dataset = make_dataset(scan, groups, norm_factor=factor, batch_size=8, seed=seed)
        return np.concatenate([b[1]["amplitude"].numpy() for b in dataset])

    shuffled = epoch(seed=1)
    lookup = {expected[g].tobytes(): g for g in range(len(groups))}
    order = [lookup[sample.tobytes()] for sample in shuffled]
    assert sorted(order) == list(range(25)) and order != list(range(25))
    np.testing.assert_array_equal(epoch(seed=1), shuffled)  # deterministic for a seed


def test_gridsize_one_batches_carry_no_offsets():
    scan = simulate(n=16, n_positions=9, seed=0)
    groups = group_positions(scan.xcoords, scan.ycoords, gridsize=1)
    inputs, target = next(iter(make_dataset(scan, groups, norm_factor=2.0, batch_size=4)))
    assert set(inputs) == {"diffraction"} and inputs["diffraction"].shape == (4, 16, 16, 1)
    assert set(target) == {"amplitude"}


@pytest.mark.parametrize(("side", "gridsize"), [(8, 2), (9, 2), (9, 3), (7, 3)])
def test_tiled_raster_groups_predict_every_position_once_where_the_side_allows(side, gridsize):
    """A side that is a multiple of g is tiled exactly (each position in one group);
    otherwise every position is still covered and only the last g rows and columns are
    predicted more than once."""
    rows, cols = np.divmod(np.arange(side * side), side)
    x, y = 10.0 + 4.0 * cols, 10.0 + 4.0 * rows
    groups = group_positions(x, y, gridsize)
    tiled = tile_groups(groups, side * side)
    assert set(map(tuple, tiled)) <= set(map(tuple, groups))  # a subset, same groups
    times = np.bincount(tiled.ravel(), minlength=side * side)
    assert times.min() == 1
    if side % gridsize == 0:
        assert times.max() == 1 and len(tiled) == (side // gridsize) ** 2
    else:
        # The extra groups are the last g rows and columns' blocks.
        covered_once = (rows < side - gridsize) & (cols < side - gridsize)
        assert (times[covered_once] == 1).all()
        assert len(tiled) < len(groups)


def test_tiled_irregular_groups_cover_every_position_with_fewer_groups():
    scan = simulate(n=64, n_positions=300, scan="spiral", step=0.1, nphotons=None, seed=4)
    groups = group_positions(scan.xcoords, scan.ycoords, 2)
    tiled = tile_groups(groups, scan.n_positions)
    assert np.bincount(tiled.ravel(), minlength=scan.n_positions).min() == 1
    assert len(tiled) < 0.5 * len(groups)

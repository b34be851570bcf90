"""Measured data: preparing detector frames (centre, crop, bin, fftshift, masks,
background, positions, probes), the CXI / NeXus / ptychodus formats, and masked pixels
counting nowhere. Each checked against NumPy written out independently, or an analytic
answer."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
import tensorflow as tf

from ptycho.data import ScanFileError, load_scan, save_scan, simulate
from ptycho.data.beamline import zone_plate_probe
from ptycho.data.io import load_probe
from ptycho.data.prepare import (
    ELECTRON_VOLT,
    PLANCK_TIMES_C,
    PrepareOptions,
    find_centre,
    hot_and_dead,
    resample_probe,
)
from ptycho.data.ptychodus import read_product, write_product
from ptycho.figures import diffraction_image
from ptycho.metrics import poisson_nll, r_factor
from ptycho.model import PtychoLoss
from ptycho.refine import RefineOptions, Refiner
from tests.conftest import write_npz


@pytest.fixture(scope="module")
def small():
    """A noiseless-ish 32 px scan in counts (amplitudes sqrt(counts))."""
    return simulate(n=32, n_positions=25, step=0.125, nphotons=1e6, seed=4)


def npz(path, scan, diffraction=None, **extra):
    arrays = {
        "diff3d": scan.diffraction if diffraction is None else diffraction,
        "probeGuess": scan.probe,
        "xcoords": scan.xcoords,
        "ycoords": scan.ycoords,
        **extra,
    }
    return write_npz(path, **arrays)


# --------------------------------------------------------------------------------------
# Zero frequency, centre, crop, bin
# --------------------------------------------------------------------------------------


def test_patterns_stored_with_zero_frequency_in_the_corner_are_shifted_back(
    small, tmp_path, caplog
):
    corner = np.fft.ifftshift(small.diffraction, axes=(1, 2))
    with caplog.at_level(logging.INFO):
        scan = load_scan(npz(tmp_path / "corner.npz", small, corner))
    np.testing.assert_array_equal(scan.diffraction, small.diffraction)
    assert scan.metadata["fftshift"] is True and "fftshifted" in caplog.text
    kept = load_scan(tmp_path / "corner.npz", options=PrepareOptions(fftshift=False))
    np.testing.assert_array_equal(kept.diffraction, corner)
    # A centred file is left alone (and not copied).
    assert load_scan(npz(tmp_path / "centred.npz", small)).metadata["fftshift"] is False


@pytest.mark.parametrize("centre", [(40.0, 57.0), (71.5, 64.0)])
def test_the_centre_of_symmetry_is_found_despite_a_gap(centre):
    rows, cols = np.mgrid[:128, :128].astype(float)
    r = np.hypot(rows - centre[0], cols - centre[1])
    angle = np.arctan2(rows - centre[0], cols - centre[1])
    pattern = np.exp(-(((r - 14) / 3) ** 2)) * (1 + 0.5 * np.cos(2 * angle)) + 0.3 * np.exp(-r / 5)
    valid = np.ones_like(pattern, bool)
    valid[int(centre[0]) + 9 : int(centre[0]) + 12] = False  # a module gap below the centre
    found = find_centre(pattern * valid, valid)
    assert np.allclose(found, centre, atol=0.5)
    # The centre of mass of the same pattern is pulled off by the gap.
    mass = pattern * valid
    com = (np.sum(rows * mass) / mass.sum(), np.sum(cols * mass) / mass.sum())
    assert abs(com[0] - centre[0]) > 0.5


def test_crop_and_bin_cut_the_window_around_the_centre_and_sum_blocks(small, tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, (small.n_positions, 96, 96)).astype(np.float32)
    centre = (52, 41)
    counts[:, centre[0] - 16 : centre[0] + 16, centre[1] - 16 : centre[1] + 16] += (
        small.diffraction**2
    )
    path = npz(tmp_path / "big.npz", small, np.sqrt(counts))
    options = PrepareOptions(crop=32, mask_hot_pixels=False)
    scan = load_scan(path, options=options)
    window = counts[:, centre[0] - 16 : centre[0] + 16, centre[1] - 16 : centre[1] + 16]
    np.testing.assert_allclose(scan.diffraction**2, window, rtol=1e-5)
    assert np.round(scan.metadata["centre"]).tolist() == [52, 41] and scan.n == 32
    # Positions: the object pixel grows by 96 / 32.
    np.testing.assert_allclose(
        scan.xcoords, small.xcoords * 32 / 96 + scan.metadata["position_offset_px"][0]
    )
    binned = load_scan(
        path,
        options=PrepareOptions(crop=64, bin=2, mask_hot_pixels=False),
        probe=small.probe[::1, ::1],
    )
    expected = counts[:, centre[0] - 32 : centre[0] + 32, centre[1] - 32 : centre[1] + 32]
    expected = expected.reshape(-1, 32, 2, 32, 2).sum(axis=(2, 4))
    np.testing.assert_allclose(binned.diffraction**2, expected, rtol=1e-5)


def test_a_probe_at_the_frames_sampling_is_resampled_with_them():
    # The same zone plate at a 128 px frame and at a 64 px window: identical far fields.
    fine = zone_plate_probe(128, pupil=0.1, central_stop=0.4, defocus=6.0)
    coarse = zone_plate_probe(64, pupil=0.2, central_stop=0.4, defocus=6.0)
    resampled = resample_probe(fine, 64, 64)
    scale = np.vdot(coarse, resampled) / np.vdot(coarse, coarse)
    assert abs(abs(scale) - 1) < 0.05  # the modulus is kept, not rescaled
    np.testing.assert_allclose(resampled / scale, coarse, atol=1e-4)
    # Binning keeps the sampling and the centre of the field of view.
    np.testing.assert_array_equal(resample_probe(fine, 128, 64), fine[32:96, 32:96])


def test_hot_and_dead_pixels_are_found_and_nothing_else():
    total = simulate(n=64, n_positions=36, probe="disk", nphotons=1e6, seed=2).diffraction ** 2
    total = total.sum(axis=0).astype(np.float64)
    hot, dead = hot_and_dead(total)
    assert not hot.any() and not dead.any()  # a sharp-edged disk probe, nothing flagged
    broken = total.copy()
    broken[10, 12] = 50 * total.max()
    broken[32, 30] = 0.0  # in the bright field
    hot, dead = hot_and_dead(broken)
    assert np.argwhere(hot).tolist() == [[10, 12]] and np.argwhere(dead).tolist() == [[32, 30]]


# --------------------------------------------------------------------------------------
# Masks and bad values
# --------------------------------------------------------------------------------------


def test_bad_values_and_saturation_are_masked_in_their_pattern(small, tmp_path, caplog):
    amplitudes = small.diffraction.copy()
    amplitudes[3, 5, 6] = np.nan
    amplitudes[4, 7, 7] = -1.0
    path = npz(tmp_path / "bad.npz", small, amplitudes)
    with caplog.at_level(logging.INFO):
        scan = load_scan(path, options=PrepareOptions(mask_hot_pixels=False))
    assert scan.valid.shape == (small.n_positions, 32, 32)
    assert np.argwhere(~scan.valid).tolist() == [[3, 5, 6], [4, 7, 7]]
    assert scan.diffraction[3, 5, 6] == 0 and "2 non-finite or negative" in caplog.text
    limit = float(np.quantile(small.diffraction**2, 0.999))
    saturated = load_scan(
        npz(tmp_path / "sat.npz", small),
        options=PrepareOptions(saturation=limit, mask_hot_pixels=False),
    )
    np.testing.assert_array_equal(~saturated.valid, small.diffraction**2 >= limit)


def test_a_mask_file_excludes_its_pixels_and_a_wrong_shape_is_refused(small, tmp_path):
    excluded = np.zeros((32, 32), bool)
    excluded[14:18, 14:18] = True  # a beamstop
    np.save(tmp_path / "mask.npy", excluded)
    scan = load_scan(
        npz(tmp_path / "s.npz", small), options=PrepareOptions(mask=str(tmp_path / "mask.npy"))
    )
    np.testing.assert_array_equal(scan.valid, ~excluded)
    assert not scan.diffraction[:, 14:18, 14:18].any()
    np.save(tmp_path / "wrong.npy", np.zeros((30, 30), bool))
    with pytest.raises(
        ScanFileError, match=r"data.mask .* is \(30, 30\) but the frames are 32 x 32"
    ):
        load_scan(tmp_path / "s.npz", options=PrepareOptions(mask=str(tmp_path / "wrong.npy")))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (PrepareOptions(crop=64), r"frames are 32 x 32, smaller than data.crop=64"),
        (PrepareOptions(crop=24, bin=5), r"data.bin=5 does not divide"),
        (PrepareOptions(crop=28, center=[2, 16]), r"window around the centre \(2.0, 16.0\) leaves"),
        (PrepareOptions(center=[40, 3]), r"data.center \(40.0, 3.0\) lies outside the 32 x 32"),
    ],
)
def test_impossible_windows_are_one_line_naming_the_field(small, tmp_path, options, match):
    with pytest.raises(ScanFileError, match=match):
        load_scan(npz(tmp_path / "s.npz", small), options=options)


def test_prepare_options_check_names_each_field():
    for options, match in [
        (PrepareOptions(crop=15), "crop=15: must be an even number"),
        (PrepareOptions(bin=0), "bin=0: must be >= 1"),
        (PrepareOptions(fftshift="maybe"), "fftshift=maybe: must be auto, true or false"),
        (PrepareOptions(mask="/no/mask.npy"), "mask=/no/mask.npy: no such file"),
        (PrepareOptions(saturation=0), "saturation=0: must be > 0"),
        (PrepareOptions(background=-1), "background=-1: must be auto"),
        (PrepareOptions(center=[1]), r"center=\[1\]: must be auto or \[row, col\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            options.check()


# --------------------------------------------------------------------------------------
# Positions and probes
# --------------------------------------------------------------------------------------


def test_positions_in_any_origin_are_placed_in_the_frame(small, tmp_path, caplog):
    x, y = small.xcoords - small.xcoords.mean(), small.ycoords - small.ycoords.mean() - 100
    path = write_npz(
        tmp_path / "zero.npz",
        diff3d=small.diffraction,
        probeGuess=small.probe,
        xcoords=x,
        ycoords=y,
    )
    with caplog.at_level(logging.INFO):
        scan = load_scan(path)
    assert scan.xcoords.min() - 16 == 0 and scan.ycoords.min() - 16 == 0
    np.testing.assert_allclose(scan.xcoords - x, scan.xcoords[0] - x[0])  # one shift for all
    assert "positions shifted by" in caplog.text
    metres = write_npz(
        tmp_path / "m.npz",
        diff3d=small.diffraction,
        probeGuess=small.probe,
        xcoords=x * 1e-8,
        ycoords=y * 1e-8,
    )
    with pytest.raises(ScanFileError, match="look like metres"):
        load_scan(metres)


def test_probe_files_of_every_kind_are_read(small, tmp_path):
    probe = small.probe * 3
    np.save(tmp_path / "p.npy", probe)
    np.savez(tmp_path / "reconstruction.npz", obj=np.ones((4, 4), np.complex64), probe=probe)
    save_scan(small.replace(probe=probe), tmp_path / "scan.h5")
    write_product(
        tmp_path / "product.h5",
        obj=np.ones((40, 40)),
        probe=probe,
        xcoords=small.xcoords,
        ycoords=small.ycoords,
        pixel_size=1e-8,
    )
    for name in ("p.npy", "reconstruction.npz", "scan.h5", "product.h5"):
        np.testing.assert_allclose(load_probe(tmp_path / name), probe, rtol=1e-6)
    with pytest.raises(ScanFileError, match="probe.npz: no 'probe'"):
        np.savez(tmp_path / "probe.npz", other=np.ones(3))
        load_probe(tmp_path / "probe.npz")
    with pytest.raises(ScanFileError, match=r"the probe is 16 x 16 but the patterns are 32 x 32"):
        load_scan(npz(tmp_path / "s.npz", small), probe=small.probe[:16, :16])


def test_ptychodus_products_round_trip_in_metres(small, tmp_path):
    obj = (np.random.default_rng(0).normal(size=(50, 60)) + 1j).astype(np.complex64)
    write_product(
        tmp_path / "p.h5",
        obj=obj,
        probe=small.probe,
        xcoords=small.xcoords,
        ycoords=small.ycoords,
        pixel_size=2e-8,
        distance=1.5,
        energy_ev=9000.0,
    )
    product = read_product(tmp_path / "p.h5")
    np.testing.assert_allclose(product.positions, small.positions * 2e-8)
    np.testing.assert_array_equal(product.object, obj)
    assert product.probe.shape == (1, 32, 32) and product.distance == 1.5
    # ptychodus' mapping: x_m = centre_x + pixel (x_px - W / 2) gives back the pixels.
    x_px = (product.positions[:, 0] - product.object_centre[0]) / product.pixel_size + 60 / 2
    np.testing.assert_allclose(x_px, small.xcoords)
    with pytest.raises(ScanFileError, match="ptychodus product .* no diffraction patterns"):
        load_scan(tmp_path / "p.h5")


# --------------------------------------------------------------------------------------
# NeXus NXcxi_ptycho, written here from the application definition
# --------------------------------------------------------------------------------------


def write_nexus(
    path, counts, translation_um, *, energy_ev, distance_mm, pixel_um, excluded, centre
):
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 160
        entry = f.create_group("entry_1")
        entry.attrs["NX_class"] = "NXentry"
        entry["definition"] = "NXcxi_ptycho"
        entry["title"] = "test scan"
        instrument = entry.create_group("instrument_1")
        source = instrument.create_group("source_1")
        source["name"] = "synchrotron"
        source["energy"] = 3e9 * ELECTRON_VOLT  # the machine's, not the beam's
        source["probe"] = "x-ray"
        source["type"] = "Synchrotron X-ray Source"
        beam = instrument.create_group("beam_1")
        beam["energy"] = energy_ev
        beam["energy"].attrs["units"] = "eV"
        detector = instrument.create_group("detector_1")
        detector["data"] = counts
        for name, value, unit in (
            ("distance", distance_mm, "mm"),
            ("x_pixel_size", pixel_um, "um"),
            ("y_pixel_size", pixel_um, "um"),
            ("beam_center_x", centre[1] * pixel_um, "um"),
            ("beam_center_y", centre[0] * pixel_um, "um"),
        ):
            detector[name] = value
            detector[name].attrs["units"] = unit
        position = np.zeros((len(counts), 3))
        position[:, :2] = translation_um
        detector["translation"] = position
        detector["translation"].attrs["units"] = "um"
        detector["pixel_mask"] = excluded.astype(np.uint32)
        data = entry.create_group("data_1")
        data["data"] = detector["data"]
        data["translation"] = detector["translation"]
        sample = entry.create_group("sample_1")
        sample.create_group("geometry_1")["translation"] = detector["translation"]


def test_nexus_nxcxi_ptycho_is_read_with_units_mask_and_beam_centre(small, tmp_path):
    energy_ev, distance_mm, pixel_um = 6200.0, 1500.0, 55.0
    frame, centre = 48, (22, 27)
    counts = np.zeros((small.n_positions, frame, frame), np.uint32)
    counts[:, centre[0] - 16 : centre[0] + 16, centre[1] - 16 : centre[1] + 16] = np.round(
        small.diffraction**2
    )
    excluded = np.zeros((frame, frame), bool)
    excluded[centre[0] - 1 : centre[0] + 1, :] = True
    wavelength = PLANCK_TIMES_C / (energy_ev * ELECTRON_VOLT)
    pixel = wavelength * distance_mm * 1e-3 / (32 * pixel_um * 1e-6)  # for the 32 px window
    translation_um = -(small.positions - 500.0) * pixel * 1e6
    write_nexus(
        tmp_path / "scan.nxs",
        counts,
        translation_um,
        energy_ev=energy_ev,
        distance_mm=distance_mm,
        pixel_um=pixel_um,
        excluded=excluded,
        centre=centre,
    )
    scan = load_scan(tmp_path / "scan.nxs", probe=small.probe, options=PrepareOptions(crop=32))
    assert scan.metadata["centre_from"] == "the file's beam centre"
    np.testing.assert_allclose(scan.metadata["object_pixel_size_m"], pixel)
    shift = scan.positions - small.positions  # placed in the frame: one integer shift
    np.testing.assert_allclose(shift, np.round(shift[:1]).repeat(len(shift), 0), atol=1e-6)
    np.testing.assert_array_equal(
        scan.valid, ~excluded[centre[0] - 16 : centre[0] + 16, centre[1] - 16 : centre[1] + 16]
    )
    expected = np.where(scan.valid, np.sqrt(np.round(small.diffraction**2)), 0)
    np.testing.assert_allclose(scan.diffraction, expected, rtol=1e-6)


# --------------------------------------------------------------------------------------
# Masked pixels count nowhere; the background is part of the model
# --------------------------------------------------------------------------------------


def test_the_training_loss_leaves_masked_pixels_out():
    rng = np.random.default_rng(1)
    measured = rng.uniform(0.1, 2, (2, 8, 8, 4)).astype(np.float32)
    predicted = rng.uniform(0.1, 2, (2, 8, 8, 4)).astype(np.float32)
    valid = rng.random((2, 8, 8, 4)) > 0.3
    target = np.where(valid, measured, -1.0).astype(np.float32)
    for poisson, mae in ((1.0, 0.0), (0.0, 1.0)):
        loss = PtychoLoss(poisson, mae).call(tf.constant(target), tf.constant(predicted)).numpy()
        rate, counts = predicted.astype(np.float64) ** 2 + 1e-6, measured.astype(np.float64) ** 2
        deviance = rate - counts + counts * (np.log(counts) - np.log(rate))
        term = deviance if poisson else np.abs(predicted - measured)
        expected = np.where(valid, term, 0).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_masked_pixels_do_not_move_the_refinement(small):
    valid = np.ones((32, 32), bool)
    valid[10:13, 4:9] = False
    clean = small.replace(diffraction=small.diffraction * valid, valid=valid)
    garbage = small.diffraction.copy()
    garbage[:, ~valid] = 1e3  # whatever is stored there counts nowhere
    dirty = small.replace(diffraction=garbage, valid=valid)
    options = RefineOptions(mode="object", iterations=3, batch_size=8)
    a = Refiner(clean, options, compile_mode="graph").run()
    b = Refiner(dirty, options, compile_mode="graph").run()
    np.testing.assert_allclose(a.obj, b.obj, atol=1e-6)
    assert a.r_factor == pytest.approx(b.r_factor, rel=1e-6)


def test_metrics_and_the_background_model_against_numpy(small):
    rng = np.random.default_rng(3)
    predicted, measured = rng.uniform(0, 3, (2, 5, 5)), rng.uniform(0, 3, (2, 5, 5))
    valid = rng.random((5, 5)) > 0.4
    assert r_factor(predicted, measured, valid) == pytest.approx(
        np.abs(predicted - measured)[:, valid].sum() / measured[:, valid].sum()
    )
    rate, counts = predicted[:, valid] ** 2 + 1e-12, measured[:, valid] ** 2
    assert poisson_nll(predicted, measured, valid) == pytest.approx(
        np.mean(rate - counts * np.log(rate))
    )
    # Counts = |Psi|^2 + b exactly: with b modelled the true object fits them (R ~ 0);
    # without it, it does not.
    background = np.full((32, 32), 5.0, np.float32)
    exact = simulate(n=32, n_positions=25, step=0.125, nphotons=None, seed=4)
    scale = 1e6 / np.sum(exact.diffraction**2, axis=(1, 2)).mean()
    counts = exact.diffraction.astype(np.float64) ** 2 * scale + background
    with_background = exact.replace(
        diffraction=np.sqrt(counts).astype(np.float32), background=background
    )
    options = RefineOptions(mode="object")
    fitted = Refiner(with_background, options, initial=exact.object, compile_mode="graph")
    ignored = Refiner(
        with_background.replace(background=None),
        options,
        initial=exact.object,
        compile_mode="graph",
    )
    r_with = fitted._record(0, 0.0, None, None)["r_factor"]
    r_without = ignored._record(0, 0.0, None, None)["r_factor"]
    assert r_with < 1e-3 < 0.01 < r_without


def test_the_diffraction_image_shows_the_mask():
    measured, predicted = np.ones((8, 8)), np.ones((8, 8))
    valid = np.ones((8, 8), bool)
    valid[2, 3] = False
    image = diffraction_image([(measured, predicted, valid), (measured, predicted, valid)])
    assert image.shape == (1, 24, 18, 1)
    mask_row = image[0, 16:24, :8, 0]
    np.testing.assert_array_equal(mask_row == 1, ~valid)
    assert diffraction_image([(measured, predicted)]).shape == (1, 16, 8, 1)


def test_a_nexus_raster_is_read_in_scan_order(small, tmp_path):
    counts = np.round(small.diffraction**2).astype(np.uint32)  # 25 = 5 x 5 positions
    wavelength = PLANCK_TIMES_C / (8000 * ELECTRON_VOLT)
    pixel = wavelength * 2.0 / (32 * 75e-6)
    translation_um = -small.positions * pixel * 1e6
    write_nexus(
        tmp_path / "flat.nxs",
        counts,
        translation_um,
        energy_ev=8000,
        distance_mm=2000,
        pixel_um=75,
        excluded=np.zeros((32, 32), bool),
        centre=(16, 16),
    )
    with h5py.File(tmp_path / "flat.nxs", "a") as f:
        del f["entry_1/instrument_1/detector_1/data"], f["entry_1/data_1/data"]
        f["entry_1/instrument_1/detector_1/data"] = counts.reshape(5, 5, 32, 32)
    scan = load_scan(tmp_path / "flat.nxs", probe=small.probe)
    np.testing.assert_allclose(scan.diffraction**2, counts, rtol=1e-6)


def test_a_dark_frame_is_modelled_or_subtracted(small, tmp_path):
    rng = np.random.default_rng(7)
    dark = rng.uniform(1, 4, (32, 32)).astype(np.float32)
    counts = np.round(small.diffraction**2) + rng.poisson(
        np.broadcast_to(dark, small.diffraction.shape)
    )
    np.save(tmp_path / "dark.npy", dark)
    path = npz(tmp_path / "dark.npz", small, np.sqrt(counts).astype(np.float32))
    options = PrepareOptions(background=str(tmp_path / "dark.npy"), mask_hot_pixels=False)
    modelled = load_scan(path, options=options)
    np.testing.assert_allclose(modelled.diffraction**2, counts, rtol=1e-5)  # kept as measured
    np.testing.assert_array_equal(modelled.background, dark)
    np.testing.assert_allclose(
        modelled.signal(range(3)) ** 2, np.maximum(counts[:3] - dark, 0), rtol=1e-5, atol=1e-4
    )
    options.background_mode = "subtract"
    subtracted = load_scan(path, options=options)
    assert subtracted.background is None
    np.testing.assert_allclose(
        subtracted.diffraction**2, np.maximum(counts - dark, 0), rtol=1e-5, atol=1e-4
    )
    constant = load_scan(path, options=PrepareOptions(background=2.5, mask_hot_pixels=False))
    np.testing.assert_array_equal(constant.background, np.full((32, 32), 2.5))

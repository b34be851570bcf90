"""Physics refinement, the solver (ptycho/refine.py): the loss against a numpy forward
model, its gradients against finite differences, fixed points and recovery on small
simulations, refusals. The stage in the applications: tests/app/test_refine_app.py."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from ptycho import metrics
from ptycho.data import simulate
from ptycho.progress import Progress
from ptycho.refine import RefineOptions, Refiner
from ptycho.scoring import Scorer, scan_region
from ptycho.stages import refine as stage_refine
from ptycho.stitch import stitch_patches
from tests.unit.test_reconstruction import given_object

N = 32


def small_scan(nphotons=None, **changes):
    settings = dict(
        n=N,
        n_positions=64,
        object_kind="grf",
        probe="fresnel",
        probe_radius=0.3,
        scan="grid",
        step=0.25,
        jitter=0.02,
        phase_range=(-0.5, 0.5),
        nphotons=nphotons,
        seed=4,
    )
    return simulate(**{**settings, **changes})


def options(**changes) -> RefineOptions:
    return RefineOptions(**{"mode": "object", "smoothness": 0.0, **changes})


def amp_ssim(scan, obj) -> float:
    return metrics.compare(scan.object, obj, region=scan_region(scan))["amp_ssim"]


def numpy_window(refiner: Refiner, j: int) -> tuple[int, int, int]:
    """(row, col, side) of the canvas window position j's patch is taken from: the
    N x N window at the nearest pixel (``fourier``), or the (N + 1) x (N + 1) window of
    the bilinear taps at the pixel below (``bilinear``)."""
    x, y = refiner.positions()[j] + refiner.pad - N / 2
    if refiner.options.subpixel == "bilinear":
        return int(np.floor(y)), int(np.floor(x)), N + 1
    return int(np.floor(y + 0.5)), int(np.floor(x + 0.5)), N


def numpy_prior(refiner: Refiner, index: np.ndarray) -> float:
    """The smoothness prior's share of positions ``index``: each pixel pair of a window
    (neighbours across and down) weighted by one over the number of the scan's windows
    that hold both, so the shares of every position add up to the whole prior
    ``sum |grad O|^2`` over the pairs the scan covers; for a canvas moved whole
    (``dense``), the share ``len(index) / M`` of that whole prior."""
    canvas = refiner.object_canvas().astype(np.float64)
    across_count = np.zeros(canvas.shape[:2])
    down_count = np.zeros(canvas.shape[:2])
    windows = [numpy_window(refiner, j) for j in range(refiner.scan.n_positions)]
    for row, col, side in windows:
        across_count[row : row + side, col : col + side - 1] += 1
        down_count[row : row + side - 1, col : col + side] += 1
    if refiner.dense:
        across = np.sum(np.diff(canvas, axis=1) ** 2, -1)[across_count[:, :-1] > 0]
        down = np.sum(np.diff(canvas, axis=0) ** 2, -1)[down_count[:-1] > 0]
        share = len(index) / refiner.scan.n_positions
        return refiner.options.smoothness * share * float(across.sum() + down.sum())
    total = 0.0
    for j in index:
        row, col, side = windows[j]
        patch = canvas[row : row + side, col : col + side]
        across = np.sum((patch[:, 1:] - patch[:, :-1]) ** 2, -1)
        down = np.sum((patch[1:] - patch[:-1]) ** 2, -1)
        total += np.sum(across / across_count[row : row + side, col : col + side - 1])
        total += np.sum(down / down_count[row : row + side - 1, col : col + side])
    return refiner.options.smoothness * total


def numpy_patch_and_modes(refiner: Refiner, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Position j's object patch and (K, N, N) probe modes in the refiner's model:
    ``bilinear``: patch sampled by scipy at the exact position, modes as they are;
    ``fourier``: the window at the nearest pixel, each mode shifted by the remainder with
    scipy's Fourier shift."""
    canvas = refiner.object_canvas().astype(np.float64)
    obj = canvas[..., 0] + 1j * canvas[..., 1]
    probe = refiner.probe.numpy().astype(np.float64)
    modes = probe[..., 0] + 1j * probe[..., 1]
    x, y = refiner.positions()[j] + refiner.pad
    if refiner.options.subpixel == "bilinear":
        grid = np.meshgrid(y - N / 2 + np.arange(N), x - N / 2 + np.arange(N), indexing="ij")
        patch = scipy.ndimage.map_coordinates(obj.real, grid, order=1) + 1j * (
            scipy.ndimage.map_coordinates(obj.imag, grid, order=1)
        )
        return patch, modes
    row, col = int(np.floor(y - N / 2 + 0.5)), int(np.floor(x - N / 2 + 0.5))
    shift = (y - N / 2 - row, x - N / 2 - col)
    shifted = [np.fft.ifft2(scipy.ndimage.fourier_shift(np.fft.fft2(m), shift)) for m in modes]
    return obj[row : row + N, col : col + N], np.stack(shifted)


def numpy_loss(refiner: Refiner, index: np.ndarray) -> float:
    """The truncated Poisson loss of positions ``index``: the patterns ``sum_k |P_k O|^2``
    through the unitary numpy FFT (docs/design.md, section 3), plus the smoothness
    prior's share of those positions."""
    counts = np.square(refiner.scan.diffraction.astype(np.float64))
    cut_factor = 1.0 + refiner.options.truncation
    total = 0.0
    for j in index:
        patch, modes = numpy_patch_and_modes(refiner, j)
        far = np.fft.fftshift(np.fft.fft2(modes * patch), axes=(-2, -1)) / N
        intensity = np.sum(np.abs(far) ** 2, axis=0)
        n = counts[j]
        cut = n / cut_factor
        safe = np.maximum(intensity, cut)
        exact = safe - n * np.log(np.where(safe > 0, safe, 1.0))
        linear = np.where(intensity < cut, (1 - cut_factor) * (intensity - cut), 0.0)
        total += float(np.sum(exact + linear))
    return total + numpy_prior(refiner, index)


@pytest.mark.parametrize(
    "subpixel, modes, dense",
    [
        ("fourier", 1, True),
        ("fourier", 1, False),
        ("bilinear", 1, True),
        ("bilinear", 1, False),
        ("fourier", 3, True),
        ("bilinear", 2, True),
    ],
)
def test_the_minibatch_loss_is_the_poisson_likelihood_of_a_numpy_forward_model(
    subpixel, modes, dense
):
    scan = small_scan(nphotons=1e5)
    rng = np.random.default_rng(0)
    start = scan.object * np.exp(0.3j) * 0.8 + 0.05 * rng.normal(size=scan.object.shape)
    settings = options(
        mode="full", batch_size=8, subpixel=subpixel, probe_modes=modes, smoothness=5.0
    )
    refiner = Refiner(scan, settings, initial=start, compile_mode="eager", dense=dense)
    index = np.array([0, 5, 9, 17, 30, 41, 50, 63], np.int32)
    loss, _ = refiner.gradients(tf.constant(index))
    assert float(loss) == pytest.approx(numpy_loss(refiner, index), rel=2e-5)


def inner_positions(refiner: Refiner, count: int) -> np.ndarray:
    """Positions whose sub-pixel remainders stay away from a window change (0 and 1 for
    ``bilinear``, +-1/2 for ``fourier``)."""
    fractions = (refiner.positions() - N / 2) % 1.0
    if refiner.options.subpixel == "fourier":
        inner = (fractions < 0.4) | (fractions > 0.6)
    else:
        inner = (fractions > 0.1) & (fractions < 0.9)
    return np.flatnonzero(np.all(inner, axis=1))[:count]


@pytest.mark.parametrize(
    "subpixel, modes, dense",
    [("fourier", 1, True), ("fourier", 1, False), ("bilinear", 1, False), ("fourier", 2, True)],
)
def test_gradients_match_finite_differences(subpixel, modes, dense):
    """Object, probe modes and positions (through the probe's Fourier shift or the
    warp's offset gradient), with the smoothness prior on, against central differences
    of the float64 numpy model."""
    scan = small_scan(nphotons=1e4)
    rng = np.random.default_rng(1)
    start = scan.object * 0.9 + 0.05 * rng.normal(size=scan.object.shape)
    settings = options(
        mode="full", batch_size=4, smoothness=5.0, subpixel=subpixel, probe_modes=modes
    )
    refiner = Refiner(scan, settings, initial=start, compile_mode="eager", dense=dense)
    inner = inner_positions(refiner, 4)
    index = tf.constant(inner.astype(np.int32))
    _, (grad_canvas, grad_probe, grad_positions) = refiner.gradients(index)

    class Canvas:  # the canvas as a variable: read and written whole
        shape = refiner.object_canvas().shape
        numpy = refiner.object_canvas
        assign = refiner.set_object_canvas

    def central(variable, change):
        saved = variable.numpy()
        values = []
        for sign in (1, -1):
            variable.assign(saved + sign * change)
            values.append(numpy_loss(refiner, inner))
        variable.assign(saved)
        return values[0] - values[1]

    changes = [(Canvas, grad_canvas, None)]
    for k in range(modes):  # each mode on its own: the weak ones too
        only = np.zeros(refiner.probe.shape)
        only[k] = 1.0
        changes.append((refiner.probe, grad_probe, only))
    for variable, gradient, part in changes:
        # Along the gradient plus as much noise: a random direction alone can make the
        # derivative cancel to the float32 rounding of its sum.
        gradient = gradient.numpy() * (1.0 if part is None else part)
        noise = rng.normal(size=variable.shape) * (1.0 if part is None else part)
        direction = gradient / np.abs(gradient).max() + noise / np.abs(noise).max()
        eps = 1e-3 * float(np.abs(variable.numpy()).max())
        numeric = central(variable, eps * direction) / (2 * eps)
        analytic = float(np.sum(gradient * direction))
        assert analytic == pytest.approx(numeric, rel=1e-2)

    eps = 1e-2  # pixels; the loss is smooth while the window stays where it is
    for row, j in enumerate(inner):
        for axis in (0, 1):
            change = np.zeros((scan.n_positions, 2))
            change[j, axis] = eps
            numeric = central(refiner.correction, change) / (2 * eps)
            assert float(grad_positions.numpy()[row, axis]) == pytest.approx(numeric, rel=1e-2)


@pytest.mark.parametrize("dense", [True, False])
def test_steps_are_heavy_ball_momentum_on_the_preconditioned_gradient(dense):
    """Every pixel moves at every step by its velocity, ``v = mu v + step g / D`` with
    ``D = 4 (sum_batch |P|^2 + regularisation max |P|^2)``, in numpy over the whole
    canvas; the refiner's steps (every tile, or only the tiles under the windows with
    the momentum owed to the others paid later) give the same canvas."""
    scan = small_scan(nphotons=1e6)
    settings = options(batch_size=8, momentum=0.8)
    refiner = Refiner(scan, settings, dense=dense)
    assert refiner.dense is dense
    reference = Refiner(scan, settings, compile_mode="eager")
    probe = reference.probe.numpy().astype(np.float64)
    power = np.sum(probe**2, axis=(0, 3))
    canvas = refiner.object_canvas().astype(np.float64)
    velocity = np.zeros_like(canvas)
    order = np.random.default_rng(3).permutation(scan.n_positions)
    # A few steps in one region, then steps elsewhere: the first region's pixels keep
    # moving by their momentum alone.
    batches = [order[:8], order[8:16], np.arange(8), np.arange(56, 64), order[16:24]]
    for step, index in zip([1.0, 0.7, 0.5, 0.9, 0.3], batches, strict=True):
        reference.set_object_canvas(canvas)
        _, (gradient, _, _) = reference.gradients(tf.constant(index.astype(np.int32)))
        illumination = np.zeros(canvas.shape[:2])
        for j in index:
            row, col, side = numpy_window(reference, j)
            illumination[row : row + side, col : col + side] += power
        denominator = 4 * (illumination + settings.regularisation * power.max())
        velocity = 0.8 * velocity + step * gradient.numpy() / denominator[..., None]
        canvas = canvas - velocity
        batch = tf.constant(index.astype(np.int32))
        refiner._step(batch, *refiner.measured(batch), *map(tf.constant, (step, 0.0, 0.0)))
    assert np.abs(velocity).max() > 1e-3  # the steps moved the object
    np.testing.assert_allclose(refiner.object_canvas(), canvas, atol=2e-5 * np.abs(canvas).max())


@pytest.mark.parametrize("subpixel", ["fourier", "bilinear"])
def test_refinement_from_the_truth_stays_at_the_truth(subpixel):
    """Each sub-pixel model at patterns simulated with the matching physics: the
    simulator's exact shift of the object (its own code, not the probe's shift) for
    ``fourier``, the warp for ``bilinear``. The probe's far field lies inside the
    detector (an aliased exit wave shifted is not the same field: docs/refinement.md)."""
    scan = small_scan(subpixel=subpixel, probe="gaussian")
    settings = options(iterations=10, batch_size=16, subpixel=subpixel)
    refiner = Refiner(scan, settings, initial=scan.object)
    result = refiner.run()
    assert result.r_factor < 0.01
    assert amp_ssim(scan, result.obj) > 0.995
    obj, mask = result.obj, result.mask
    region = scan_region(scan)
    error = np.abs(obj[region] - scan.object[region])[mask[region]]
    assert float(np.median(error)) < 0.01
    # The mask is the illuminated region (as the stitcher finds it), 0 outside it.
    stitched_mask = stitch_patches(
        np.ones((scan.n_positions, N, N)), scan.xcoords, scan.ycoords, obj.shape, probe=scan.probe
    )[1]
    assert np.mean(mask == stitched_mask) > 0.99 and 0 < mask.mean() < 1
    assert np.all(obj[~mask] == 0)
    # Written in the scan's frame: the positions it was given.
    assert np.allclose(result.xcoords, scan.xcoords) and np.allclose(result.ycoords, scan.ycoords)


def test_a_flat_start_reconstructs_the_object():
    """A complete iterative reconstruction: from amplitude 1, phase 0."""
    scan = small_scan(nphotons=1e7)
    result = Refiner(scan, RefineOptions(mode="object", iterations=40, batch_size=16)).run()
    assert amp_ssim(scan, result.obj) > 0.9
    assert result.history[-1]["r_factor"] < 0.5 * result.history[0]["r_factor"]
    # The probe comes back in the scan's units (the fitted count scale taken out).
    assert np.allclose(result.probe, scan.probe, atol=1e-5 * np.abs(scan.probe).max())


def test_the_smoothness_prior_stays_stable_on_a_sparse_low_dose_scan():
    """Few positions, 1e3 photons, footprints that touch: the prior's pull (its weight
    shared over few minibatches) is large against the dim illumination; an explicit
    step by the illumination alone diverged at iteration 7. With the prior's curvature
    in the preconditioner the object improves on the flat start and stays finite."""
    scan = simulate(n=64, n_positions=64, step=0.5, probe_radius=0.25, nphotons=1e3, seed=1)
    result = Refiner(scan, RefineOptions(mode="object", iterations=20)).run()
    assert np.isfinite(result.obj).all()
    assert amp_ssim(scan, result.obj) > amp_ssim(scan, np.ones_like(scan.object)) + 0.1


def test_after_the_network_the_refinement_starts_from_its_amplitude_unless_asked():
    """A start with the right amplitude and a slow phase drift (what the network's
    stitched groups leave): 20 iterations do not remove the drift from the start's
    phase (``refine.network_phase=true``); from its amplitude with a flat phase (the
    default) the phase is found."""
    scan = small_scan(nphotons=1e7)
    rows, cols = np.mgrid[: scan.object.shape[0], : scan.object.shape[1]]
    drift = 0.8 * np.sin(2 * np.pi * cols / scan.object.shape[1]) * rows / rows.max()
    obj = (scan.object * np.exp(1j * drift)).astype(np.complex64)
    start = given_object(obj, np.ones(obj.shape, bool), scan)
    phase = {}
    for keep in (True, False):
        options = RefineOptions(mode="object", iterations=20, batch_size=16, network_phase=keep)
        result = stage_refine.run(
            Scorer(scan),
            options,
            start=start,
            backend="xla",
            compile_mode="jit",
            stream=io.StringIO(),
        )
        phase[keep] = result.metrics["phase_ssim"]
    assert phase[False] > phase[True] + 0.1, phase


@pytest.mark.parametrize(
    "subpixel, probe, tolerance",
    # The Fresnel probe's far field fills the detector: the exit wave is aliased, and
    # the probe's shift is then not the object's (docs/refinement.md); the Gaussian
    # probe's is not, and pins positions less well whatever the model (0.13 px both).
    [("bilinear", "fresnel", 0.1), ("fourier", "gaussian", 0.15)],
)
def test_known_position_errors_are_recovered(subpixel, probe, tolerance):
    scan = small_scan(subpixel=subpixel, probe=probe)
    rng = np.random.default_rng(2)
    error = rng.normal(0.0, 1.0 / math.sqrt(2), (scan.n_positions, 2))
    wrong = scan.replace(xcoords=scan.xcoords + error[:, 0], ycoords=scan.ycoords + error[:, 1])
    refiner = Refiner(
        wrong,
        options(
            mode="positions", iterations=80, batch_size=16, position_start=0, subpixel=subpixel
        ),
        initial=scan.object,
    )
    result = refiner.run(true_positions=scan.positions)
    found = np.stack([result.xcoords, result.ycoords], 1) - scan.positions
    assert np.allclose(found.mean(0), error.mean(0), atol=0.05)  # only the common shift
    remaining = found - found.mean(0)
    before = error - error.mean(0)
    rms = lambda e: float(np.sqrt(np.mean(np.sum(e**2, 1))))  # noqa: E731
    assert rms(before) > 0.8
    assert rms(remaining) < tolerance
    assert result.history[-1]["position_rmse"] == pytest.approx(rms(remaining), rel=1e-3)
    assert np.abs(refiner.correction.numpy().mean(0)).max() < 1e-4


def test_the_legacy_warp_refines_objects_as_the_xla_warp_does_and_refuses_positions():
    scan = small_scan(nphotons=1e7)
    settings = options(iterations=5, batch_size=16, subpixel="bilinear")
    xla = Refiner(scan, settings, compile_mode="graph").run()
    legacy = Refiner(scan, settings, backend="legacy", compile_mode="graph").run()
    assert np.abs(xla.obj - legacy.obj).max() < 1e-3
    with pytest.raises(ValueError, match="use refine.subpixel=fourier, translate=xla"):
        Refiner(
            scan,
            options(mode="positions", subpixel="bilinear"),
            backend="legacy",
            compile_mode="graph",
        )
    # The Fourier shift needs no warp: positions move whatever the warp.
    moved = Refiner(
        scan,
        options(mode="positions", iterations=4, position_start=0),
        backend="legacy",
        compile_mode="graph",
    ).run()
    assert np.abs(moved.xcoords - scan.xcoords).max() > 0


def test_patches_reaching_beyond_the_frame_are_refined_too():
    """A frame smaller than the patches reach (an objectGuess cropped to the scanned
    area): the canvas grows a margin, the result keeps the frame."""
    scan = small_scan(nphotons=1e7)
    frame = (60, 50)
    result = Refiner(scan, options(iterations=2, batch_size=16), shape=frame).run()
    assert result.obj.shape == result.mask.shape == frame
    assert math.isfinite(result.r_factor) and result.mask.mean() > 0.8
    whole = Refiner(scan, options(iterations=2, batch_size=16)).run()  # the full frame
    assert result.r_factor == pytest.approx(whole.r_factor, rel=1e-4)
    same = whole.obj[: frame[0], : frame[1]][result.mask]
    assert np.abs(result.obj[result.mask] - same).max() < 1e-4


@pytest.mark.parametrize("dense", [True, False])
def test_a_refinement_continued_from_a_checkpoint_takes_the_same_steps(tmp_path, dense):
    """Stopped after iteration 3 of 6 and continued in a new Refiner from the file the
    checkpoint wrote, the refinement ends where the uninterrupted one does: object,
    positions, probe and every progress record (refine=full moves all of them; the
    sparse step also leaves momentum owed to tiles it did not touch)."""
    from ptycho import checkpoints

    scan = small_scan(nphotons=1e6)
    settings = options(
        mode="full",
        iterations=6,
        batch_size=8,
        position_start=1,
        probe_start=1,
        eval_every=2,
        checkpoint_seconds=0.0,  # after every iteration
    )
    states = []
    whole = Refiner(scan, settings, dense=dense).run(on_checkpoint=states.append)
    assert [state.iteration for state in states] == [1, 2, 3, 4, 5]  # none after the last
    checkpoints.save_refinement(tmp_path, states[2])
    saved = checkpoints.refinement(tmp_path, True, settings)
    resumed = Refiner(scan, settings, dense=dense).run(resume=saved)
    assert resumed.iterations == 6
    np.testing.assert_array_equal(resumed.obj, whole.obj)
    np.testing.assert_array_equal(resumed.probe, whole.probe)
    np.testing.assert_array_equal(resumed.xcoords, whole.xcoords)
    for mine, theirs in zip(resumed.history, whole.history, strict=True):
        assert {k: v for k, v in mine.items() if k != "seconds"} == {
            k: v for k, v in theirs.items() if k != "seconds"
        }
    assert np.abs(whole.xcoords - scan.xcoords).max() > 1e-3  # the positions moved


def test_a_checkpoint_of_other_settings_or_another_scan_is_refused(tmp_path):
    from ptycho import checkpoints
    from ptycho.errors import ConfigError
    from ptycho.refine import StateMismatch

    scan = small_scan(nphotons=1e6)
    settings = options(iterations=3, batch_size=8, checkpoint_seconds=0.0)
    states = []
    Refiner(scan, settings).run(on_checkpoint=states.append)
    checkpoints.save_refinement(tmp_path, states[0])
    with pytest.raises(ConfigError, match="resume=true"):
        checkpoints.refinement(tmp_path, False, settings)
    with pytest.raises(ConfigError, match=r"refine\.batch_size=8 then, 16 now"):
        checkpoints.refinement(tmp_path, True, options(iterations=3, batch_size=16))
    other = small_scan(nphotons=1e6, n_positions=49)
    with pytest.raises(StateMismatch, match="patterns 64, this refinement has 49"):
        Refiner(other, settings).run(resume=checkpoints.refinement(tmp_path, True, settings))
    # max_seconds, eval_every and checkpoint_seconds may change
    assert checkpoints.refinement(tmp_path, True, options(iterations=3, batch_size=8, eval_every=9))
    checkpoints.refinement_path(tmp_path).write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="cannot read the refinement checkpoint"):
        checkpoints.refinement(tmp_path, True, settings)


def test_max_seconds_stops_after_the_iteration_that_crosses_it():
    scan = small_scan(nphotons=1e7)
    result = Refiner(scan, options(iterations=50, batch_size=16, max_seconds=1e-6)).run()
    assert result.iterations == 1
    assert [r["iteration"] for r in result.history] == [0, 1]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log(caplog):
    terminal = FakeTerminal()
    bar = Progress(10, "refine=object", stream=terminal)
    bar.update(5, "R 0.1")
    bar.close()
    assert terminal.getvalue().startswith("\rrefine=object [############------------] 5/10 R 0.1")
    assert terminal.getvalue().endswith("\n")
    pipe = io.StringIO()
    with caplog.at_level(logging.INFO, logger="ptycho.progress"):
        lines = Progress(10, "refine=object", stream=pipe)
        lines.update(5, "R 0.1")
        lines.close()
    assert pipe.getvalue() == ""
    assert "refine=object 5/10: R 0.1" in caplog.text

"""Physics refinement: the object (and the scan positions, and the probe) fitted to the
measured counts through the forward model (docs/design.md, section 7; docs/refinement.md).

This module is the solver: its options, its variables and compiled steps, and its
result. Running it as a stage of an application (progress, TensorBoard, curves, ground
truth) is :mod:`ptycho.stages.refine`.

The object is a canvas variable; patch j is its integer window at ``position_j`` and the
sub-pixel remainder ``f`` goes either to the probe modes, shifted exactly through their
spectra (``subpixel="fourier"``: the exit wave ``P_k(r - f) O(w + r)`` is the wave
``P_k(r) O(w + f + r)`` moved by ``f``, the same far-field intensity), or to the window,
shifted by the project's :func:`ptycho.warp.translate` (``subpixel="bilinear"``, the
network's interpolation). The far-field intensity is the sum over the K probe modes of
``|F(P_k O)|^2`` (docs/design.md, section 3; K = 1: one coherent probe). The loss is the
Poisson negative log-likelihood of the counts ``a^2`` under the rates ``s I``, summed
over a minibatch of positions; one step (gather, shifts, FFTs, loss, gradients, update)
is one compiled function, XLA-compiled with ``compile_mode="jit"``. A step reads and
writes only the canvas tiles under its minibatch's windows (docs/large-scans.md): its
cost does not grow with the object, so a pass over the scan is linear in the number of
positions. The positions'
gradient comes through the probe's phase ramp (``fourier``) or the warp's offset
gradient (``bilinear``, which is why that model needs ``backend="xla"`` to move them).
The counts are kept with the zero frequency in the corner, so the step needs no
fftshift.

Update rules (chosen by measurement: ``benchmarks/refine.py``,
``benchmarks/results/refine_cpu.jsonl``):

- object: the gradient divided by ``4 (sum_batch |P_j|^2 + regularisation max |P|^2)``,
  the minibatch's illumination (the Gauss-Newton diagonal of the loss at the solution,
  as ePIE and LSQML precondition), plus the smoothness prior's own curvature (without
  it the prior's step diverges where few positions at low dose light the object
  dimly); with step 1 near the solution this is the projection onto the measured
  moduli, in parallel over the minibatch. Heavy-ball
  momentum carries the slow low-frequency phase along (applied lazily: a pixel no
  window touches is owed its momentum steps, paid in closed form when a step or a read
  next needs it, exactly as if every pixel moved at every step); the step follows a
  cosine from ``step`` to ``step * final_step`` over the iterations, which removes the
  minibatch noise of the last iterates.
- positions: a normalised gradient step (RMS of each position's gradient), at most
  ``max_position_step`` pixels per step, each correction bounded by
  ``max_position_correction`` and their mean taken out after every pass (a common
  shift of every position is unobservable).
- probe: the gradient of each mode divided by ``4 (sum_batch |o_j|^2 + ...)``; with
  K > 1 the modes are made orthogonal and sorted by power every
  ``orthogonalise_every`` iterations and at the end (a unitary mixture: every
  predicted pattern unchanged).

Far from the solution the Poisson gradient ``(1 - n / I) Psi`` is unbounded where the
model's intensity ``I`` is much smaller than the counts ``n``; below ``I = n / (1 +
truncation)`` the loss is continued linearly (a truncated Poisson likelihood, as in
truncated Wirtinger flow), so steps stay bounded. At the solution it is the Poisson
likelihood itself. An optional smoothness prior ``smoothness * sum |grad O|^2`` (in
photon-count units: it matters at low dose and fades at high dose) keeps the
maximum-likelihood object from fitting the noise of low-dose data. It is split over the
positions like the likelihood: position j's share is the sum over the neighbouring
pixel pairs inside its window, each weighted by one over the number of windows that
hold the pair (:func:`pair_weights`), so the shares of one pass add up to the prior
over the scanned object and a step's share stays inside its windows.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np
import tensorflow as tf

from ptycho import probes
from ptycho.data.scan import Scan
from ptycho.data.stream import ordered_windows, shuffled_windows, window_items
from ptycho.errors import choice, require
from ptycho.hardware import compiled, pipelined
from ptycho.physics import Subpixel
from ptycho.reconstruction import Reconstruction
from ptycho.stitch import illumination, object_shape_for
from ptycho.warp import Backend, check_compilable, translate

__all__ = [
    "RefineLoss",
    "RefineMode",
    "RefineOptions",
    "RefineResult",
    "RefineState",
    "Refiner",
    "StateMismatch",
    "Subpixel",
    "amplitude_loss",
    "poisson_loss",
]

log = logging.getLogger(__name__)


class RefineMode(StrEnum):
    off = "off"
    object = "object"
    positions = "positions"
    full = "full"


class RefineLoss(StrEnum):
    poisson = "poisson"
    amplitude = "amplitude"


@dataclass
class RefineOptions:
    """The ``refine`` section: physics refinement after the network, or alone."""

    mode: RefineMode = RefineMode.off
    """``off``; ``object``; ``positions`` (object and scan positions); ``full`` (also the
    probe). With ``subpixel=bilinear`` positions need ``translate=xla`` (the legacy warp
    has no offset gradient)."""
    iterations: int = 30
    """Passes over every scan position."""
    network_phase: bool = False
    """After the network: start from its object (true) or from its amplitude with a
    flat phase (false). The network's phase carries low-frequency errors (a constant per
    group, stitched into a slow drift) that 30 iterations do not remove, and on sparse
    scans it is worse than none (docs/refinement.md)."""
    max_seconds: float | None = None
    """Stop after the iteration that crosses this time (null: never)."""
    batch_size: int = 64
    """Positions per compiled step."""
    loss: RefineLoss = RefineLoss.poisson
    """``poisson`` (counts) or ``amplitude`` (Gaussian on ``sqrt(counts)``)."""
    subpixel: Subpixel = Subpixel.fourier
    """Sub-pixel positions: ``fourier`` (the object's integer window, the remainder
    applied to the probe by an exact Fourier shift) or ``bilinear`` (the window
    shifted by the project's warp, ``translate``)."""
    probe_modes: int | None = None
    """K mutually incoherent probe modes (partial coherence; patterns are the sum of
    the modes' intensities); null: the probe's own (1 for one probe). More modes than
    the probe has are started from it (:func:`ptycho.probes.initial_modes`), which
    needs ``mode=full``."""
    mode_power: float = 0.1
    """Fraction of the power the added modes carry at the start."""
    orthogonalise_every: int = 5
    """Iterations between orthogonalisations of the modes (sorted by power)."""
    step: float = 1.0
    """Object step, in units of the preconditioned (Gauss-Newton) step."""
    final_step: float = 0.02
    """The step's cosine schedule ends at ``step * final_step``."""
    momentum: float = 0.8
    """Heavy-ball momentum of the object update."""
    regularisation: float = 1.0
    """Preconditioner damping: ``sum |P|^2 + regularisation * max |P|^2``."""
    truncation: float = 1.0
    """The Poisson gradient factor ``1 - n/I`` is bounded below by ``-truncation``."""
    smoothness: float = 30.0
    """Weight of the prior ``sum |grad O|^2``, in photon-count units (matters at low dose)."""
    position_start: int = 3
    """First iteration that moves positions."""
    position_step: float = 0.8
    """Pixels per unit normalised position gradient."""
    max_position_step: float = 0.4
    """Pixels, per step."""
    max_position_correction: float = 8.0
    """Pixels, in all."""
    probe_start: int = 3
    """First iteration that updates the probe (``mode=full``)."""
    probe_step: float = 2.0
    """Probe step, in units of its preconditioned step."""
    eval_every: int = 5
    """Iterations between progress points (terminal, TensorBoard, ``refine.png``)."""
    seed: int = 0
    """Order of the minibatches."""
    checkpoint_seconds: float | None = 60.0
    """Seconds between checkpoints of the refinement in the run folder
    (``checkpoints/refine.npz``, after the iteration that crosses them; ``resume=true``
    continues from the last): 0 after every iteration, null none."""

    def check(self) -> None:
        """``ValueError`` naming the first field out of range."""
        require(
            [
                choice("mode", self.mode, RefineMode),
                choice("loss", self.loss, RefineLoss),
                choice("subpixel", self.subpixel, Subpixel),
                (
                    self.probe_modes is None or self.probe_modes >= 1,
                    f"probe_modes={self.probe_modes}: must be >= 1, or null (the probe's)",
                ),
                (0 < self.mode_power < 1, f"mode_power={self.mode_power}: must be in (0, 1)"),
                (
                    self.orthogonalise_every >= 1,
                    f"orthogonalise_every={self.orthogonalise_every}: must be >= 1",
                ),
                (self.iterations >= 1, f"iterations={self.iterations}: must be >= 1"),
                (
                    self.max_seconds is None or self.max_seconds > 0,
                    f"max_seconds={self.max_seconds}: must be > 0 or null",
                ),
                (self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1"),
                (self.step > 0, f"step={self.step}: must be > 0"),
                (0 < self.final_step <= 1, f"final_step={self.final_step}: must be in (0, 1]"),
                (0 <= self.momentum < 1, f"momentum={self.momentum}: must be in [0, 1)"),
                (self.regularisation > 0, f"regularisation={self.regularisation}: must be > 0"),
                (self.truncation > 0, f"truncation={self.truncation}: must be > 0"),
                (self.smoothness >= 0, f"smoothness={self.smoothness}: must be >= 0"),
                (self.position_step > 0, f"position_step={self.position_step}: must be > 0"),
                (
                    self.max_position_step > 0,
                    f"max_position_step={self.max_position_step}: must be > 0 (pixels)",
                ),
                (
                    self.max_position_correction > 0,
                    f"max_position_correction={self.max_position_correction}: must be > 0 (pixels)",
                ),
                (self.probe_step > 0, f"probe_step={self.probe_step}: must be > 0"),
                (self.position_start >= 0, f"position_start={self.position_start}: must be >= 0"),
                (self.probe_start >= 0, f"probe_start={self.probe_start}: must be >= 0"),
                (self.eval_every >= 1, f"eval_every={self.eval_every}: must be >= 1"),
                (
                    self.checkpoint_seconds is None or self.checkpoint_seconds >= 0,
                    f"checkpoint_seconds={self.checkpoint_seconds}: must be >= 0 or null",
                ),
            ]
        )

    @property
    def refines_positions(self) -> bool:
        return self.mode in (RefineMode.positions, RefineMode.full)

    @property
    def refines_probe(self) -> bool:
        return self.mode == RefineMode.full

    def check_modes(self, probe_modes: int) -> None:
        """``ValueError`` (one line, the fix) when a probe of ``probe_modes`` modes
        cannot give the ``probe_modes`` asked for (:func:`ptycho.probes.check_modes`)."""
        probes.check_modes(
            "refine.probe_modes",
            self.probe_modes,
            probe_modes,
            self.refines_probe,
            f"only refine=full refines (refine={self.mode}): use refine=full",
        )

    def check_backend(self, backend: str) -> None:
        """The rule of modes and warps: moving positions through the warp
        (``subpixel=bilinear``) needs the offsets' gradient, which the legacy warp does
        not have (``ValueError`` naming the fix)."""
        require(
            [
                (
                    backend != Backend.legacy
                    or not self.refines_positions
                    or self.subpixel != Subpixel.bilinear,
                    f"refine={self.mode} with refine.subpixel=bilinear moves the scan "
                    "positions through the warp's offset gradient, which translate=legacy "
                    "does not have: use refine.subpixel=fourier, translate=xla, or "
                    "refine=object",
                )
            ]
        )


@dataclass(kw_only=True)
class RefineResult(Reconstruction):
    """The refined :class:`~ptycho.reconstruction.Reconstruction` (the positions and probe
    used at the end; ``seconds``: the steps and their progress passes, not ground-truth
    scoring) and the progress records."""

    iterations: int
    mode: str
    history: list = field(default_factory=list)


# Options that may differ when a refinement is continued: they change what is reported
# or when it stops, not the steps.
RESUMABLE = ("max_seconds", "eval_every", "checkpoint_seconds")
# The variables that hold a refinement's progress (RefineState.arrays).
STATE_VARIABLES = (
    "canvas",
    "velocity",
    "updates",
    "touched",
    "correction",
    "position_rms",
    "probe",
)


@dataclass
class RefineState:
    """Where a refinement stands after an iteration, enough to continue it as if it
    had not stopped (:meth:`Refiner.state`, :meth:`Refiner.run` ``resume``; written and
    read by :mod:`ptycho.checkpoints`)."""

    iteration: int
    """Iterations done."""
    seconds: float
    history: list
    """The progress records so far."""
    rng: dict
    """The minibatch order's generator state."""
    arrays: dict
    """:data:`STATE_VARIABLES` (the tiles' momentum still owed with them: ``touched``
    and ``updates``) and ``probe_units`` (the fitted count scale)."""
    key: dict
    """What must match to continue (:meth:`Refiner.key`)."""


class StateMismatch(ValueError):
    """A saved :class:`RefineState` belongs to another refinement (says what differs)."""


def options_key(options: RefineOptions) -> dict:
    """The options a continued refinement must share with the one that saved its state:
    all but :data:`RESUMABLE`, as JSON values."""
    return {
        name: str(value) if isinstance(value, StrEnum) else value
        for name, value in asdict(options).items()
        if name not in RESUMABLE
    }


def check_options(saved: dict, options: RefineOptions) -> None:
    """:class:`StateMismatch` naming the settings that differ between a saved state's
    options (:func:`options_key`) and ``options``."""
    changed = [
        f"refine.{name}={saved.get(name)} then, {value} now"
        for name, value in options_key(options).items()
        if saved.get(name) != value
    ]
    if changed:
        raise StateMismatch(f"it was written with other settings ({'; '.join(changed)})")


def poisson_loss(intensity, counts, truncation: float):
    """Per-pixel Poisson NLL ``I - n log I`` of counts ``n`` under rates ``I`` (no
    ``log n!``), continued linearly below ``I_c = n / (1 + truncation)`` so that its
    gradient ``1 - n / I`` never falls below ``-truncation``. Equal to the Poisson NLL
    wherever ``I >= I_c`` (in particular at and near the solution ``I = n``)."""
    tiny = 1e-12
    cut = counts / (1.0 + truncation)
    safe = tf.maximum(intensity, cut + tiny)
    exact = safe - counts * tf.math.log(safe + tiny)
    slope = 1.0 - counts / (cut + tiny)
    return exact + tf.where(intensity < cut, slope * (intensity - cut), tf.zeros_like(intensity))


def amplitude_loss(intensity, counts):
    """Gaussian likelihood on amplitudes, ``2 (|Psi| - sqrt(n))^2`` (the factor 2 gives
    it the Poisson loss's curvature at the solution, so one step size serves both)."""
    return 2.0 * (tf.sqrt(intensity + 1e-12) - tf.sqrt(counts)) ** 2


def _window_prior(values, weights):
    """The smoothness prior of windows ``values`` (B, S, S, 2) and its curvature:
    ``sum w_x |O(r + e_x) - O(r)|^2 + w_y |O(r + e_y) - O(r)|^2`` over the pixel pairs
    inside each window, ``weights`` (B, S, S, 2) holding ``(w_x, w_y)`` at the pair's
    first pixel; and, per window pixel (B, S, S), the sum of the weights of its pairs
    (the prior's second derivative is twice it, for the real and imaginary parts)."""
    across = values[:, :, 1:] - values[:, :, :-1]
    down = values[:, 1:] - values[:, :-1]
    w_across, w_down = weights[:, :, :-1, 0], weights[:, :-1, :, 1]
    roughness = tf.reduce_sum(w_across[..., None] * across**2) + tf.reduce_sum(
        w_down[..., None] * down**2
    )
    incident = (
        tf.pad(w_across, [[0, 0], [0, 0], [0, 1]])
        + tf.pad(w_across, [[0, 0], [0, 0], [1, 0]])
        + tf.pad(w_down, [[0, 0], [0, 1], [0, 0]])
        + tf.pad(w_down, [[0, 0], [1, 0], [0, 0]])
    )
    return roughness, incident


def _trailing_sums(array: np.ndarray, length: int, axis: int) -> np.ndarray:
    """``out[i] = sum(array[i - length + 1 : i + 1])`` along ``axis`` (zeros before 0)."""
    total = np.cumsum(array, axis=axis, dtype=np.int32)
    earlier = np.zeros_like(total)
    count = array.shape[axis] - length
    if count > 0:
        target = [slice(None)] * array.ndim
        source = [slice(None)] * array.ndim
        target[axis], source[axis] = slice(length, None), slice(0, count)
        earlier[tuple(target)] = total[tuple(source)]
    return total - earlier


def pair_weights(corners: np.ndarray, span: int, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 2) float32 ``(1 / c_x, 1 / c_y)``: ``c_x`` at pixel r is the number of
    windows (``span`` x ``span``, top-left ``corners`` (M, 2) [col, row]) that hold both
    r and r + e_x, ``c_y`` likewise; 0 where none does. Weighted so, the windows' priors
    (:func:`_window_prior`) add up to the prior of the whole object over one pass of
    every position."""
    height, width = shape
    rows = np.clip(corners[:, 1], 0, height - 1)
    cols = np.clip(corners[:, 0], 0, width - 1)
    starts = np.bincount(rows * width + cols, minlength=height * width)
    starts = starts.astype(np.int32).reshape(height, width)
    out = np.zeros((height, width, 2), np.float32)
    for channel, (down, across) in enumerate(((span, span - 1), (span - 1, span))):
        count = _trailing_sums(_trailing_sums(starts, down, 0), across, 1)
        np.divide(1.0, count, out=out[..., channel], where=count > 0)
    return out


TILE = 8
"""Side of the canvas's tiles, pixels (:class:`Refiner`)."""
DENSE_RATIO = 1.5
"""A canvas of at most this many times the tiles a step's windows cover is moved
whole at every step (:class:`Refiner`, ``dense``)."""


def _tiled(array: np.ndarray, tiles: tuple[int, int]) -> np.ndarray:
    """(rows, cols, TILE, TILE, C) float32 tiles of ``array`` (H, W, C), padded at the
    end with its last row and column to ``tiles``."""
    height, width = tiles[0] * TILE, tiles[1] * TILE
    rows, cols = array.shape[:2]
    padded = np.pad(array, [(0, height - rows), (0, width - cols), (0, 0)], mode="edge")
    shaped = padded.reshape(tiles[0], TILE, tiles[1], TILE, -1).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(shaped, np.float32)


def _untiled(tiles):
    """(rows x TILE, cols x TILE, C) tensor of ``tiles`` (rows, cols, TILE, TILE, C)."""
    rows, cols, _, _, channels = tiles.shape
    whole = tf.transpose(tiles, (0, 2, 1, 3, 4))
    return tf.reshape(whole, (rows * TILE, cols * TILE, channels))


def _owed_momentum(momentum: float, lag):
    """``(carried, decay)`` of ``lag`` updates of heavy-ball momentum on a pixel no
    gradient reached: ``O -= carried v`` (``mu + mu^2 + ... + mu^lag``) and ``v *=
    decay`` (``mu^lag``), each with three trailing unit axes (a tile's pixels)."""
    decay = tf.pow(tf.constant(momentum, tf.float32), tf.cast(lag, tf.float32))
    decay = decay[..., None, None, None]
    return momentum * (1.0 - decay) / (1.0 - momentum), decay


def _fft_order(array: np.ndarray) -> np.ndarray:
    """float32 ``array`` (..., N, N) with its zero frequency moved to the corner."""
    return np.fft.ifftshift(np.asarray(array, np.float32), axes=(-2, -1))


def _squared_fft_order(amplitudes: np.ndarray) -> np.ndarray:
    """``_fft_order(amplitudes ** 2)`` in one pass (a quadrant at a time)."""
    out = np.empty(amplitudes.shape, np.float32)
    n = amplitudes.shape[-1]
    low, high = slice(0, n - n // 2), slice(n - n // 2, n)  # ifftshift: high half first
    front, back = slice(0, n // 2), slice(n // 2, n)
    for rows_in, rows_out in ((high, front), (low, back)):
        for cols_in, cols_out in ((high, front), (low, back)):
            np.square(amplitudes[..., rows_in, cols_in], out=out[..., rows_out, cols_out])
    return out


def _rows(counts, weight, index):
    """Rows ``index`` of (counts (M, N, N), weight (N, N) or (M, N, N) or None)."""
    if weight is not None and weight.shape.rank == 3:
        weight = tf.gather(weight, index)
    return tf.gather(counts, index), weight


def _cosine(step: float, final: float, fraction: float) -> float:
    return step * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0))))


class Refiner:
    """The variables and compiled steps of one refinement.

    Parameters
    ----------
    scan : Scan
        Measured amplitudes, probe and (initial) positions.
    options : RefineOptions
    initial : (H, W) complex, optional
        Starting object in the positions' frame (e.g. the network's stitched output:
        pixels it did not cover take its mean); None starts flat (1 + 0j).
    shape : (H, W), optional
        Object frame; default ``initial``'s, else the ground truth's, else just large
        enough for every patch.
    backend : {"xla", "legacy"}
        Warp of the patch extraction; positions need ``"xla"``.
    compile_mode : {"jit", "graph", "eager"}
    distribution : ptycho.distribute.Distribution, optional
        Several workers (``distribute=multiworker``): every step, each worker takes its
        ``batch_size`` of the global minibatch of ``batch_size x workers`` positions,
        and the workers pool their windows' object gradients and preconditioners (tile
        by tile) and sum the probe's and the loss, then apply the same update: K workers
        take K times fewer steps per iteration. Each worker moves the positions of its
        own minibatches; they are exchanged after every iteration.
    dense : bool, optional
        Move every canvas tile at every step (true) or only the tiles under the
        minibatch's windows (false; the same result, momentum owed to the others paid
        lazily); None: dense when the canvas has at most :data:`DENSE_RATIO` times the
        tiles a step's windows cover (small objects, where a whole update is cheaper
        than the bookkeeping).
    """

    def __init__(
        self,
        scan: Scan,
        options: RefineOptions,
        *,
        initial: np.ndarray | None = None,
        shape: tuple[int, int] | None = None,
        backend: str = "xla",
        compile_mode: str = "jit",
        distribution=None,
        dense: bool | None = None,
    ):
        options.check()
        if options.mode == RefineMode.off:
            raise ValueError("mode=off: nothing to refine")
        self.distribution = distribution
        self.workers = 1 if distribution is None else distribution.workers
        self.worker = 0 if distribution is None else distribution.worker
        self._moved = None  # positions this worker moved in the iteration (several workers)
        self.stop_requested = False  # a Ctrl-C on this worker (several workers)
        options.check_backend(backend)
        if options.subpixel == Subpixel.bilinear:
            check_compilable(backend, compile_mode)
        self.scan, self.options, self.backend = scan, options, backend
        n, m = scan.n, scan.n_positions
        self.n = n
        if shape is None:
            if initial is not None:
                shape = initial.shape
            elif scan.object is not None:
                shape = scan.object.shape
            else:
                shape = object_shape_for(scan.xcoords, scan.ycoords, n)
        self.shape = (int(shape[0]), int(shape[1]))
        # A margin around the frame so that every patch, moved by its largest position
        # correction (and its bilinear taps), stays inside the canvas.
        overhang = max(
            0.0,
            n / 2 - min(scan.xcoords.min(), scan.ycoords.min()),
            scan.xcoords.max() + n / 2 + 1 - self.shape[1],
            scan.ycoords.max() + n / 2 + 1 - self.shape[0],
        )
        self.pad = int(math.ceil(overhang + options.max_position_correction)) + 2
        self.batch_size = min(options.batch_size, m)
        height, width = self.shape[0] + 2 * self.pad, self.shape[1] + 2 * self.pad

        start = np.ones((height, width), np.complex64)
        if initial is not None:
            initial = np.asarray(initial, np.complex64)
            if initial.shape != self.shape:
                raise ValueError(f"initial object is {initial.shape}, the frame {self.shape}")
            filled = initial != 0
            fill = initial[filled].mean() if filled.any() else 1.0
            start[:] = fill
            inner = start[self.pad : self.pad + self.shape[0], self.pad : self.pad + self.shape[1]]
            inner[filled] = initial[filled]
        self.canvas_shape = (height, width)
        # The canvas is stored in tiles of TILE x TILE pixels, (rows, cols, TILE, TILE,
        # 2), a tile's margin beyond it, so that a step moves whole tiles: the tiles
        # under its minibatch's windows, gathered and scattered as blocks. A step's cost
        # does not grow with the object. The momentum of the other tiles is owed to
        # them: each tile's canvas and velocity are current as of update `touched`, and
        # are brought up to date (the velocity's geometric decay, in closed form) when a
        # step reads them (_caught_up), or all at once before the canvas is read whole
        # (flush). Pixels of a tile outside every window get the momentum step alone,
        # as they would in a step over the whole canvas.
        self.tiles = (height // TILE + 2, width // TILE + 2)
        self.canvas = tf.Variable(_tiled(np.stack([start.real, start.imag], -1), self.tiles))
        self.velocity = tf.Variable(tf.zeros_like(self.canvas))
        self.updates = tf.Variable(0, dtype=tf.int32)
        self.touched = tf.Variable(tf.zeros(self.tiles, tf.int32))
        # A canvas of few tiles against those a step's windows cover (their copies
        # counted) is cheaper to move whole, every tile every step (`dense`).
        per_step = self.batch_size * self.workers * self._block_side() ** 2
        self.dense = (
            self.tiles[0] * self.tiles[1] <= DENSE_RATIO * per_step if dense is None else dense
        )
        # Per-pixel sums over a step's windows (gradient, preconditioner), zero between steps.
        self._sums = None if self.dense else tf.Variable(tf.zeros((*self.tiles, TILE, TILE, 3)))
        # The smoothness prior's pair weights (pair_weights), from the current windows.
        self.prior_weights = (
            tf.Variable(tf.zeros((*self.tiles, TILE, TILE, 2))) if options.smoothness else None
        )
        # The counts, background and mask are kept in the FFT's order (zero frequency in
        # the corner), so the far field needs no fftshift: sums are order-free. A
        # streamed scan's counts are read a window at a time (_minibatches).
        self.counts = (
            None
            if scan.streamed
            else tf.constant(_squared_fft_order(np.asarray(scan.diffraction, np.float32)))
        )
        # Counts ~ Poisson(I + background): the dark counts are part of the model.
        self.background = (
            None if scan.background is None else tf.constant(_fft_order(scan.background))
        )
        # Masked pixels (Scan.valid False) count in no sum: weight 0.
        self.valid = None if scan.valid is None else tf.constant(_fft_order(scan.valid))
        if scan.valid is None:
            self.pixels = m * n * n
        else:
            self.pixels = int(scan.valid.sum()) * (m if scan.valid.ndim == 2 else 1)
        own_masks = scan.streamed and scan.masks_per_pattern
        if own_masks:  # summed over the patterns below
            self.pixels = 0
        self.base = tf.constant(
            np.stack([scan.xcoords, scan.ycoords], 1).astype(np.float32) + self.pad
        )
        self.correction = tf.Variable(tf.zeros((m, 2)))
        self.position_rms = tf.Variable(tf.zeros((m,)))
        modes = self._starting_modes(scan.probe, options)
        self.modes = len(modes)
        self.probe = tf.Variable(np.stack([modes.real, modes.imag], -1).astype(np.float32))
        # Frequencies (cycles per pixel) of the probe's Fourier shift (subpixel=fourier).
        self.frequencies = tf.constant(np.fft.fftfreq(n).astype(np.float32))
        # The counts' scale s (photons per unit |Psi|^2) is folded into the probe: fitted
        # once so that the starting object predicts the measured total (below).
        self.probe_units = 1.0
        # The loss of a perfect fit (I = n), so that the reported loss is 0 there.
        total = saturated = 0.0
        for first in range(0, m, 1024):  # in chunks: long scans stay small in float64
            counts = np.square(scan.diffraction[first : first + 1024], dtype=np.float64)
            total += float(counts.sum())
            if own_masks:
                self.pixels += int(scan.valid_pixels(np.arange(first, first + len(counts))).sum())
            saturated += float(np.sum(counts - counts * np.log(np.where(counts > 0, counts, 1))))
        per_pattern = total / m
        if options.loss == RefineLoss.poisson and per_pattern < 1000:
            log.warning(
                "the patterns hold %.3g counts each on average: the Poisson likelihood and "
                "refine.smoothness assume photon counts (amplitudes sqrt(counts)); for "
                "normalised amplitudes use refine.loss=amplitude refine.smoothness=0",
                per_pattern,
            )
        self._saturated = saturated if options.loss == RefineLoss.poisson else 0.0
        self._forward = compiled(self._forward_impl, compile_mode)
        self._flush = compiled(self._flush_impl, "graph")
        self._clear = compiled(self._clear_impl, compile_mode)
        if self.workers == 1:
            self._update = compiled(self._update_impl, compile_mode)
        else:  # the local terms and the update compiled; the sum between them is not
            self._local = compiled(self._local_impl, compile_mode)
            self._apply = compiled(self._apply_impl, compile_mode)
        self._update_prior_weights()
        self._fit_probe_scale()

    @staticmethod
    def _starting_modes(probe, options: RefineOptions) -> np.ndarray:
        """(K, N, N) complex64 modes: the probe's own, or more started from its first."""
        modes = probes.as_modes(np.asarray(probe, np.complex64))
        options.check_modes(len(modes))
        wanted = options.probe_modes or len(modes)
        if wanted == len(modes):
            return modes
        return probes.initial_modes(modes[0], wanted, options.mode_power)

    # ----------------------------------------------------------------------------------
    # The forward model on a minibatch
    # ----------------------------------------------------------------------------------

    def _span(self) -> int:
        """Side of a window: N (``fourier``), N + 1 (``bilinear``: the warp's taps)."""
        return self.n if self.options.subpixel == Subpixel.fourier else self.n + 1

    def _corners(self, positions):
        """Integer top-left corners [col, row] of the windows at ``positions`` (canvas
        frame) and the sub-pixel remainders [fx, fy]: ``fourier``: windows at the nearest
        pixel, remainders in [-1/2, 1/2); ``bilinear``: at the pixel below, in [0, 1).
        Works on tensors and on NumPy arrays."""
        corner = positions - self.n / 2
        fourier = self.options.subpixel == Subpixel.fourier
        if isinstance(corner, np.ndarray):
            whole = np.floor(corner + 0.5) if fourier else np.floor(corner)
            return whole.astype(np.int64), corner - whole
        whole = tf.floor(corner + 0.5) if fourier else tf.floor(corner)
        return tf.cast(whole, tf.int32), corner - whole

    def _blocks(self, index):
        """The windows of positions ``index``: the tiles that hold them, (B, T, T, 2)
        [row, col] (T tiles a side, :meth:`_block_side`), each window's top-left pixel
        within its block (B, 2) [row, col], and the sub-pixel remainders (B, 2) [fx, fy]
        (:meth:`_corners`), from the current positions."""
        positions = tf.gather(self.base, index) + tf.gather(self.correction, index)
        whole, fraction = self._corners(positions)
        corner = whole[:, ::-1]  # [row, col]
        first = corner // TILE
        side = self._block_side()
        steps = tf.range(side)
        rows = tf.broadcast_to(steps[:, None], (side, side))[None]
        cols = tf.broadcast_to(steps[None, :], (side, side))[None]
        tiles = tf.stack([first[:, 0, None, None] + rows, first[:, 1, None, None] + cols], axis=-1)
        return tiles, corner - first * TILE, fraction

    def _block_side(self) -> int:
        """Tiles a side of the block that holds any window of :meth:`_span` pixels."""
        return (self._span() + TILE - 2) // TILE + 1

    def _cut(self, blocks, offset):
        """The windows (B, S, S, C) at ``offset`` (B, 2) [row, col] of tile ``blocks``
        (B, T, T, TILE, TILE, C)."""
        side, span = self._block_side() * TILE, self._span()
        shape = tf.shape(blocks)
        pixels = tf.reshape(
            tf.transpose(blocks, (0, 1, 3, 2, 4, 5)), (shape[0], side, side, shape[-1])
        )
        rows = offset[:, 0:1] + tf.range(span)[None]
        cols = offset[:, 1:2] + tf.range(span)[None]
        pixels = tf.gather(pixels, rows, axis=1, batch_dims=1)
        return tf.gather(pixels, cols, axis=2, batch_dims=1)

    def _place(self, windows, offset):
        """Tile blocks (B, T, T, TILE, TILE, C) holding ``windows`` (B, S, S, C) at
        ``offset`` and zeros around them (the transpose of :meth:`_cut`)."""
        tiles, span = self._block_side(), self._span()
        side = tiles * TILE
        within = tf.range(side)[None] - offset[:, :, None]  # (B, 2, side)
        inside = tf.cast((within >= 0) & (within < span), windows.dtype)
        within = tf.clip_by_value(within, 0, span - 1)
        placed = tf.gather(windows, within[:, 0], axis=1, batch_dims=1)
        placed = tf.gather(placed, within[:, 1], axis=2, batch_dims=1)
        placed *= inside[:, 0, :, None, None] * inside[:, 1, None, :, None]
        shape = tf.shape(windows)
        placed = tf.reshape(placed, (shape[0], tiles, TILE, tiles, TILE, shape[-1]))
        return tf.transpose(placed, (0, 1, 3, 2, 4, 5))

    def _caught_up(self, tiles):
        """The canvas and velocity tiles at ``tiles`` (..., 2) as of the last update:
        the momentum steps a tile's velocity has owed it since it was last touched,
        ``O -= v (mu + mu^2 + ... + mu^k)`` and ``v *= mu^k``, in closed form."""
        canvas = tf.gather_nd(tf.convert_to_tensor(self.canvas), tiles)
        velocity = tf.gather_nd(tf.convert_to_tensor(self.velocity), tiles)
        if self.dense:  # every tile moves at every step: none is behind
            return canvas, velocity
        lag = self.updates - tf.gather_nd(tf.convert_to_tensor(self.touched), tiles)
        carried, decay = _owed_momentum(self.options.momentum, lag)
        return canvas - carried * velocity, decay * velocity

    def _flush_impl(self):
        """Every tile brought up to date (:meth:`_caught_up` of the whole canvas)."""
        carried, decay = _owed_momentum(self.options.momentum, self.updates - self.touched)
        self.canvas.assign_sub(carried * self.velocity)
        self.velocity.assign(decay * self.velocity)
        self.touched.assign(tf.fill(tf.shape(self.touched), self.updates))
        return self.updates

    def flush(self) -> None:
        """Bring the whole canvas up to date (before it is read whole)."""
        self._flush()

    def object_canvas(self) -> np.ndarray:
        """(H', W', 2) float32: the canvas (the frame and its margin), up to date."""
        self.flush()
        height, width = self.canvas_shape
        return _untiled(self.canvas).numpy()[:height, :width]

    def set_object_canvas(self, canvas: np.ndarray) -> None:
        """Replace the canvas (H', W', 2) (its momentum kept)."""
        self.flush()
        self.canvas.assign(_tiled(np.asarray(canvas, np.float32), self.tiles))

    def _update_prior_weights(self) -> None:
        """The smoothness prior's pair weights (:func:`pair_weights`) of the current
        windows (the same on every worker: the positions are shared between passes)."""
        if self.prior_weights is None:
            return
        whole, _ = self._corners((self.base + self.correction).numpy())
        shape = (self.tiles[0] * TILE, self.tiles[1] * TILE)
        weights = pair_weights(whole, self._span(), shape)
        if self.dense:  # the whole canvas's covered pairs, a share at every step
            weights = (weights > 0).astype(np.float32)
        self.prior_weights.assign(_tiled(weights, self.tiles))

    def _canvas_prior(self, size):
        """``dense``: the prior's share ``size / M`` of the covered pairs of the whole
        canvas (the same sum over a pass as the windows' shares), as (value, gradient
        and curvature tiles (rows, cols, TILE, TILE, 3))."""
        options = self.options
        rows, cols = self.tiles
        share = options.smoothness * tf.cast(size, tf.float32) / self.scan.n_positions
        canvas = _untiled(tf.convert_to_tensor(self.canvas))[None]
        with tf.GradientTape() as tape:
            tape.watch(canvas)
            weights = _untiled(tf.convert_to_tensor(self.prior_weights))[None]
            roughness, incident = _window_prior(canvas, weights)
        terms = tf.concat([tape.gradient(roughness, canvas), 2.0 * incident[..., None]], -1)
        terms = tf.reshape(share * terms[0], (rows, TILE, cols, TILE, 3))
        return share * roughness, tf.transpose(terms, (0, 2, 1, 3, 4))

    def _patches(self, windows, fraction):
        """(B, N, N) complex object patches from the windows' values (B, S, S, 2)
        (``bilinear``: shifted by the remainders through the warp)."""
        n = self.n
        if self.options.subpixel == Subpixel.bilinear:
            windows = translate(windows, -fraction, backend=self.backend)[:, :n, :n]
        return tf.complex(windows[..., 0], windows[..., 1])

    def _illuminations(self, probe, fraction):
        """The probe modes that light each patch, complex: (B, K, N, N) shifted by the
        remainders ``P_k(r - f)`` (``fourier``: the exit wave ``P_k(r - f) O(w + r)`` is
        ``P_k(r) O(w + f + r)`` moved by ``f``, which leaves its far-field intensity
        unchanged), or (1, K, N, N) as they are (``bilinear``)."""
        modes = tf.complex(probe[..., 0], probe[..., 1])
        if self.options.subpixel == Subpixel.bilinear:
            return modes[None]
        angle = -2.0 * math.pi * fraction[:, :, None] * self.frequencies[None, None, :]
        ramp = tf.complex(tf.cos(angle), tf.sin(angle))  # (B, 2, N): [x, y]
        ramp = ramp[:, 1, :, None] * ramp[:, 0, None, :]  # (B, N rows, N cols)
        return tf.signal.ifft2d(tf.signal.fft2d(modes)[None] * ramp[:, None])

    def _intensity(self, illuminations, patches):
        """(B, N, N) far-field intensity ``sum_k |fft2(P_k O) / N|^2``, zero frequency in
        the corner (the order the counts are kept in)."""
        wave = illuminations * patches[:, None]
        far = tf.signal.fft2d(wave) / self.n
        return tf.reduce_sum(tf.math.real(far) ** 2 + tf.math.imag(far) ** 2, axis=1)

    def _measurable(self, intensity):
        """The model's expected counts: the sample's intensity plus the background."""
        return intensity if self.background is None else intensity + self.background

    def _loss(self, intensity, counts):
        intensity = self._measurable(intensity)
        if self.options.loss == RefineLoss.amplitude:
            return amplitude_loss(intensity, counts)
        return poisson_loss(intensity, counts, self.options.truncation)

    def measured(self, index):
        """(counts (B, N, N), weight) of positions ``index``, in the FFT's order: weight
        1 for the pixels that count, 0 for masked ones ((N, N) or (B, N, N)), or None
        when every pixel counts. Read from the file for a streamed scan."""
        if self.counts is not None:
            return _rows(self.counts, self.valid, index)
        return self._read(np.asarray(index))

    def _read(self, index: np.ndarray):
        """(counts, weight) of positions ``index`` read from a streamed scan."""
        counts = tf.constant(_squared_fft_order(self.scan.diffraction[index]))
        if not self.scan.masked:
            return counts, None
        if not self.scan.masks_per_pattern:
            return counts, self.valid
        return counts, tf.constant(_fft_order(self.scan.valid_pixels(index)))

    def _forward_impl(self, index, counts, weight):
        """Per position of the minibatch (B, 6): sums of the loss, the Poisson NLL,
        |sqrt(I) - a|, a, I and the counts (``counts`` and ``weight`` of the minibatch:
        :meth:`measured`)."""
        tiles, offset, fraction = self._blocks(index)
        intensity = self._intensity(
            self._illuminations(tf.convert_to_tensor(self.probe), fraction),
            self._patches(self._cut(self._caught_up(tiles)[0], offset), fraction),
        )
        expected = self._measurable(intensity)
        terms = [
            self._loss(intensity, counts),
            expected - counts * tf.math.log(expected + 1e-12),
            tf.abs(tf.sqrt(expected) - tf.sqrt(counts)),
            tf.sqrt(counts),
            intensity,
            counts if self.background is None else counts - self.background,
        ]
        if weight is not None:
            terms = [term * weight for term in terms]
        return tf.stack([tf.reduce_sum(term, axis=(1, 2)) for term in terms], axis=1)

    def _window_gradients(self, index, counts, weight, wrt):
        """The minibatch's loss (its patterns' likelihood plus its windows' share of the
        smoothness prior, :func:`_window_prior`; with ``dense`` the prior's share is
        :meth:`_canvas_prior`, added by the caller) and its gradients with respect to the
        windows' values (B, S, S, 2), the probe modes (K, N, N, 2) and the positions of
        ``index`` (B, 2) [x, y]; and the windows' (tiles, offsets, patches, prior
        curvature (B, S, S) or None) (:meth:`_blocks`). Gradients not in ``wrt`` are
        zeros and cost nothing: XLA drops their part of the backward pass."""
        options = self.options
        tiles, offset, fraction = self._blocks(index)
        values = self._cut(self._caught_up(tiles)[0], offset)
        probe = tf.convert_to_tensor(self.probe)
        # d loss / d position = d loss / d fraction: the integer part only picks the
        # window; within it the remainder moves with the position.
        sources = {"canvas": values, "probe": probe, "positions": fraction}
        curvature = None
        with tf.GradientTape() as tape:
            tape.watch([sources[name] for name in wrt])
            patches = self._patches(values, fraction)
            illuminations = self._illuminations(probe, fraction)
            loss = self._loss(self._intensity(illuminations, patches), counts)
            loss = tf.reduce_sum(loss if weight is None else loss * weight)
            if options.smoothness and not self.dense:  # dense: _canvas_prior
                prior = tf.gather_nd(tf.convert_to_tensor(self.prior_weights), tiles)
                roughness, incident = _window_prior(values, self._cut(prior, offset))
                loss += options.smoothness * roughness
                curvature = 2.0 * options.smoothness * incident
        found = dict(zip(wrt, tape.gradient(loss, [sources[name] for name in wrt]), strict=True))
        grads = [  # the legacy warp has no gradient for the positions (None)
            tf.zeros_like(value) if found.get(name) is None else tf.convert_to_tensor(found[name])
            for name, value in sources.items()
        ]
        return loss, grads, (tiles, offset, patches, curvature)

    def gradients(self, index, *, wrt=("canvas", "probe", "positions"), measured=None):
        """The minibatch loss (:meth:`_window_gradients`) and its gradients with respect
        to the canvas (H', W', 2, the windows' gradients added where they overlap), the
        probe modes (K, N, N, 2) and the positions of ``index`` (B, 2) [x, y], at the
        current variables. ``measured``: the minibatch's (counts, weight) (default:
        :meth:`measured` of ``index``)."""
        counts, weight = self.measured(index) if measured is None else measured
        loss, (grad_windows, *rest), (tiles, offset, *_) = self._window_gradients(
            index, counts, weight, wrt
        )
        blocks = self._place(grad_windows, offset)
        grad_tiles = tf.tensor_scatter_nd_add(tf.zeros_like(self.canvas), tiles, blocks)
        if self.options.smoothness and self.dense:
            roughness, terms = self._canvas_prior(tf.shape(index)[0])
            loss, grad_tiles = loss + roughness, grad_tiles + terms[..., :2]
        height, width = self.canvas_shape
        return loss, [_untiled(grad_tiles)[:height, :width], *rest]

    def _step(self, index, counts, weight, *steps):
        """One minibatch update of every variable being refined (steps 0 leave one
        alone); returns the minibatch's loss."""
        if self.workers > 1:
            return self._distributed_step(index, counts, weight, *steps)
        loss, where = self._update(index, counts, weight, *steps)
        if not self.dense:
            self._clear(where)
        return loss

    def _update_impl(self, index, counts, weight, object_step, position_step, probe_step):
        """:meth:`_step` on one worker: the loss and the tiles whose sums to clear."""
        shared, pixels, gradient = self._local_impl(index, counts, weight)
        loss = self._apply_impl(
            index, shared, pixels, gradient, object_step, position_step, probe_step
        )
        return loss, pixels[0]

    def _clear_impl(self, where):
        """Zero the per-pixel sums of tiles ``where`` (a call of its own: a second scatter
        into the sums in the step's compiled function makes XLA copy them whole)."""
        self._sums.scatter_nd_update(where, tf.zeros((tf.shape(where)[0], TILE, TILE, 3)))
        return tf.shape(where)[0]

    def _local_impl(self, index, counts, weight):
        """What one worker's minibatch gives the update: ``shared`` = (loss, probe
        gradient, object power), which the workers add up; ``pixels`` = (the tiles under
        the windows (L, 2) [row, col], their terms (L, TILE, TILE, 3): the object
        gradient and the preconditioner's share), which the workers pool; and the
        gradient of its own positions."""
        options = self.options
        wrt = (
            ["canvas"]
            + ["positions"] * options.refines_positions
            + ["probe"] * options.refines_probe
        )
        loss, (grad_windows, grad_probe, gradient), (tiles, offset, patches, curvature) = (
            self._window_gradients(index, counts, weight, wrt)
        )
        # The illumination sum_k |P_k|^2 of each window pixel (the modes unshifted: the
        # remainders move them by half a pixel at most) and the prior's curvature: the
        # object's preconditioner, once summed per pixel over the minibatch.
        intensity = tf.reduce_sum(self.probe**2, axis=(0, 3))
        if options.subpixel == Subpixel.bilinear:  # the (N + 1) x (N + 1) window
            intensity = tf.pad(intensity, [[0, 1], [0, 1]])
        denominator = tf.broadcast_to(4.0 * intensity, tf.shape(grad_windows)[:3])
        if curvature is not None:
            denominator += curvature
        terms = self._place(tf.concat([grad_windows, denominator[..., None]], -1), offset)
        pixels = (tf.reshape(tiles, (-1, 2)), tf.reshape(terms, (-1, TILE, TILE, 3)))
        # The minibatch's object intensity, the probe's preconditioner.
        object_power = tf.reduce_sum(tf.math.real(patches) ** 2 + tf.math.imag(patches) ** 2, 0)
        return (loss, grad_probe, object_power), pixels, gradient

    def _apply_impl(self, index, shared, pixels, gradient, object_step, position_step, probe_step):
        """The update of the (global) minibatch from the workers' summed ``shared``
        terms, their pooled window ``pixels`` and this worker's positions' ``gradient``;
        returns the loss. The object changes on the tiles under the windows only (every
        tile with ``dense``)."""
        options = self.options
        loss, grad_probe, object_power = shared
        size = tf.cast(tf.shape(index)[0] * self.workers, tf.float32)  # the global minibatch
        intensity = tf.reduce_sum(self.probe**2, axis=(0, 3))

        # Object: each pixel's gradient summed over the windows holding it, over the
        # summed illumination (and prior curvature), a heavy-ball step.
        where, terms = pixels
        damping = 4.0 * options.regularisation * tf.reduce_max(intensity)
        if self.dense:  # every tile moves
            totals = tf.tensor_scatter_nd_add(tf.zeros((*self.tiles, TILE, TILE, 3)), where, terms)
            if options.smoothness:
                roughness, prior = self._canvas_prior(size)
                loss, totals = loss + roughness, totals + prior
            velocity = self._velocity(self.velocity, totals, damping, object_step)
            self.velocity.assign(velocity)
            self.canvas.assign_sub(velocity)
        else:  # the tiles under the windows move; every copy of a tile computes the
            # same totals and update, so duplicate writes agree
            self._sums.scatter_nd_add(where, terms)  # zeroed again by _clear
            totals = tf.gather_nd(tf.convert_to_tensor(self._sums), where)
            values, velocity = self._caught_up(where)
            velocity = self._velocity(velocity, totals, damping, object_step)
            self.velocity.scatter_nd_update(where, velocity)
            self.canvas.scatter_nd_update(where, values - velocity)
            self.updates.assign_add(1)
            self.touched.scatter_nd_update(where, tf.fill(tf.shape(where)[:1], self.updates))

        # Positions: a normalised step per position, each correction bounded (the
        # corrections' mean is taken out after every pass: _centre_corrections).
        power = tf.reduce_sum(gradient**2, -1)
        rms = tf.gather(self.position_rms, index)
        rms = tf.where(rms > 0, 0.9 * rms + 0.1 * power, power)
        self.position_rms.scatter_nd_update(index[:, None], rms)
        move = -position_step * gradient / (tf.sqrt(rms)[:, None] + 1e-12)
        move = tf.clip_by_value(move, -options.max_position_step, options.max_position_step)
        limit = options.max_position_correction
        moved = tf.clip_by_value(tf.gather(self.correction, index) + move, -limit, limit)
        self.correction.scatter_nd_update(index[:, None], moved)

        # Probe: preconditioned by the minibatch's object intensity.
        mean_power = tf.reduce_max(object_power) / size
        probe_denominator = 4.0 * (object_power + options.regularisation * mean_power)
        self.probe.assign_sub(probe_step * grad_probe / probe_denominator[None, ..., None])
        return loss

    def _velocity(self, velocity, totals, damping, object_step):
        """The heavy-ball velocity after a step: ``totals`` (..., 3) hold each pixel's
        summed gradient and preconditioner."""
        denominator = totals[..., 2:] + damping
        return self.options.momentum * velocity + object_step * totals[..., :2] / denominator

    def _centre_corrections(self):
        """Hold the corrections' mean at zero and each within ``max_position_correction``."""
        correction = self.correction - tf.reduce_mean(self.correction, axis=0, keepdims=True)
        limit = self.options.max_position_correction
        self.correction.assign(tf.clip_by_value(correction, -limit, limit))

    def _distributed_step(self, index, counts, weight, *steps):
        """:meth:`_step` across workers: the local terms, summed (and the window
        pixels pooled) over the workers, then the same update on every worker."""
        shared, (where, terms), gradient = self._local(index, counts, weight)
        # A stop requested on any worker travels with the step's sums: all stop here.
        *shared, stops = self.distribution.all_sum([*shared, np.float32(self.stop_requested)])
        if stops > 0:
            if not self.stop_requested:
                log.warning("another worker was interrupted: stopping the refinement")
            raise KeyboardInterrupt
        # Tile indices travel as float32 (exact below 2^24).
        where = self.distribution.all_gather(tf.cast(where, tf.float32)).reshape(-1, 2)
        terms = self.distribution.all_gather(terms).reshape(-1, TILE, TILE, 3)
        pooled = (tf.constant(where.astype(np.int32)), tf.constant(terms))
        loss = self._apply(index, tuple(shared), pooled, gradient, *steps)
        if not self.dense:
            self._clear(pooled[0])
        return loss

    def request_stop(self) -> None:
        """Stop the refinement at the next step on every worker (a Ctrl-C on one; safe
        from a signal handler): each raises ``KeyboardInterrupt`` there, so that none
        waits for the others. With one worker Ctrl-C interrupts at once instead."""
        self.stop_requested = True

    def _sync_positions(self, start: np.ndarray, rms: np.ndarray, moved: np.ndarray) -> None:
        """After an iteration on several workers: each position's correction (and step
        statistics) from the worker(s) that moved it, then centred and bounded."""
        mine = moved[:, None].astype(np.float32)
        delta = (self.correction.numpy() - start) * mine
        count, delta, own_rms = self.distribution.all_sum(
            [moved.astype(np.float32), delta, self.position_rms.numpy() * moved]
        )
        self.correction.assign(start + delta / np.maximum(count, 1)[:, None])
        self.position_rms.assign(np.where(count > 0, own_rms / np.maximum(count, 1), rms))
        self._centre_corrections()

    # ----------------------------------------------------------------------------------
    # Driving the steps
    # ----------------------------------------------------------------------------------

    def _minibatches(self, windows):
        """``(index, counts, weight, size)`` of this worker's fixed-size minibatches over
        each window of positions in turn. A window is cut into global steps of
        ``batch_size x workers`` positions, worker k taking the k-th ``batch_size`` of
        each; the last step is topped up from the window's start (every step has one
        shape and compiles once), ``size`` saying how many rows are new. A streamed
        scan's window is read from the file at once, the next one while this one is
        used (its positions are read in a few contiguous runs:
        :func:`ptycho.data.stream.shuffled_windows`)."""
        streamed = self.counts is None
        planned = pipelined(lambda window: (window, self._plan(window)), windows, streamed)
        for window, (takes, rows, data) in planned:
            for take, size in takes:
                index = window[take]
                if self._moved is not None:  # top-up rows too: this worker moved them
                    self._moved[index] = True
                batch = tf.constant(index.astype(np.int32))
                if not streamed:
                    counts, weight = self.measured(batch)
                else:
                    counts, weight = _rows(*data, tf.constant(np.searchsorted(rows, index)))
                yield batch, counts, weight, size

    def _plan(self, window: np.ndarray):
        """``(takes, rows, data)`` of a window: this worker's minibatches as (indices into
        the window, rows that are new), the sorted positions they use, and their
        (counts, weight) read from the file for a streamed scan (else None)."""
        size, workers, length = self.batch_size, self.workers, len(window)
        takes = []
        for step in range(math.ceil(length / (size * workers))):
            first = (step * workers + self.worker) * size
            takes.append(
                (np.arange(first, first + size) % length, max(0, min(size, length - first)))
            )
        if self.counts is not None:
            return takes, None, None
        rows = np.unique(window[np.concatenate([take for take, _ in takes])])
        return takes, rows, self._read(rows)

    def _windows_of(self, order: np.ndarray | None = None):
        """Windows of positions: ``order`` whole when the counts are in memory (None:
        scan order), else windows of :data:`ptycho.data.stream.WINDOW_BYTES`; shuffled
        by ``shuffled_windows`` when ``order`` is a random generator."""
        m = self.scan.n_positions
        if self.counts is not None:
            return [np.arange(m) if order is None else order.permutation(m)]
        window = window_items(1, self.n, multiple=self.batch_size)
        if order is None:
            return ordered_windows(m, window)
        return shuffled_windows(m, window, order)

    def totals(self) -> np.ndarray:
        """Sums over every position: loss, Poisson NLL, |sqrt(I) - a|, a, I, counts
        (each worker sums its share; the shares added up)."""
        out = np.zeros(6)
        for index, counts, weight, size in self._minibatches(self._windows_of()):
            sums = self._forward(index, counts, weight).numpy()[:size]
            out += sums.astype(np.float64).sum(0)
        return self.distribution.all_sum([out])[0] if self.workers > 1 else out

    def _fit_probe_scale(self) -> None:
        """Scale the probe so the starting object predicts the measured total counts."""
        *_, intensity, counts = self.totals()
        if not (intensity > 0 and counts > 0):
            raise ValueError("the starting object and probe predict no intensity")
        factor = math.sqrt(counts / intensity)
        self.probe.assign(self.probe * factor)
        self.probe_units *= factor

    def positions(self) -> np.ndarray:
        """(M, 2) current positions [x, y] in the object frame."""
        return (self.base + self.correction).numpy().astype(np.float64) - self.pad

    def current_probe(self) -> np.ndarray:
        """(N, N) complex64 probe, or (K, N, N) modes, in the scan's units (the fitted
        count scale removed)."""
        probe = self.probe.numpy() / self.probe_units
        return probes.squeezed((probe[..., 0] + 1j * probe[..., 1]).astype(np.complex64))

    def orthogonalise(self) -> None:
        """Make the modes orthogonal and sort them by power (:func:`ptycho.probes.
        orthogonalise`: every predicted pattern is unchanged)."""
        probe = self.probe.numpy()
        modes = probes.orthogonalise(probe[..., 0] + 1j * probe[..., 1])
        self.probe.assign(np.stack([modes.real, modes.imag], -1).astype(np.float32))

    def current_object(self) -> tuple[np.ndarray, np.ndarray]:
        """(object, mask) in the frame: pixels no position illuminates (summed |P|^2
        below 1e-3 of its maximum) are 0 and False."""
        canvas = self.object_canvas()
        pad, (height, width) = self.pad, self.shape
        obj = (canvas[..., 0] + 1j * canvas[..., 1])[pad : pad + height, pad : pad + width]
        probe = self.current_probe()
        positions = self.positions()
        coverage = illumination(positions[:, 0], positions[:, 1], probe, self.shape)
        mask = coverage > 1e-3 * probes.intensity(probe).max()
        return np.where(mask, obj, 0).astype(np.complex64), mask

    def key(self) -> dict:
        """What a saved state must share with this refinement to continue it: the scan's
        size, the canvas and the options (:func:`options_key`)."""
        return {
            "patterns": self.scan.n_positions,
            "n": self.n,
            "canvas": list(self.canvas_shape),
            "modes": self.modes,
            "options": options_key(self.options),
        }

    def state(self, iteration: int, seconds: float, history: list, rng) -> RefineState:
        """This refinement after ``iteration`` iterations (``rng``: the minibatch
        order's generator)."""
        arrays = {name: getattr(self, name).numpy() for name in STATE_VARIABLES}
        arrays["probe_units"] = np.float64(self.probe_units)
        return RefineState(
            iteration, seconds, list(history), rng.bit_generator.state, arrays, self.key()
        )

    def _restore(self, state: RefineState) -> None:
        """Take over ``state``'s variables (:class:`StateMismatch` naming what differs
        when it belongs to another refinement)."""
        key = self.key()
        for name in ("patterns", "n", "canvas", "modes"):
            if state.key.get(name) != key[name]:
                raise StateMismatch(
                    f"it was written for {name} {state.key.get(name)}, this refinement has "
                    f"{key[name]}"
                )
        check_options(state.key["options"], self.options)
        for name in STATE_VARIABLES:
            getattr(self, name).assign(state.arrays[name])
        self.probe_units = float(state.arrays["probe_units"])
        self._update_prior_weights()  # of the saved positions

    def _check_same_start(self, done: int) -> None:
        """Every worker starts from the same iteration (each reads the run folder's
        checkpoint; a worker that did not find it would take other steps): ``ValueError``
        naming what each found."""
        starts = self.distribution.all_gather(np.array(done, np.int64))
        if len(set(starts.tolist())) > 1:
            found = ", ".join(f"worker {k}: {int(i)}" for k, i in enumerate(starts))
            raise ValueError(
                f"the workers continue the refinement from different iterations ({found}): "
                "give every worker the same hydra.run.dir, on a file system they share"
            )

    def run(
        self, *, score=None, true_positions=None, on_record=None, resume=None, on_checkpoint=None
    ) -> RefineResult:
        """Refine for ``options.iterations`` (or until ``options.max_seconds``).

        ``score(obj) -> dict`` adds ground-truth metrics to the progress records (its
        time is not counted); ``true_positions`` (M, 2) adds the rms position error
        after removing the common shift; ``on_record(record)`` receives each record
        (iteration, seconds, loss, r_factor, ...), every ``options.eval_every``
        iterations and at the end. ``resume``: a :class:`RefineState` to continue from
        (the same steps as if the run had not stopped); ``on_checkpoint(state)``
        receives the state after the iteration that crosses every
        ``options.checkpoint_seconds`` (not after the last).
        """
        options = self.options
        rng = np.random.default_rng(options.seed)
        started = time.perf_counter()
        if resume is not None:
            self._restore(resume)
            rng.bit_generator.state = resume.rng
            history, seconds, done = list(resume.history), resume.seconds, resume.iteration
            log.debug("refinement resumed after iteration %d", done)
        else:
            history, seconds, done = [], 0.0, 0
        if self.workers > 1:
            self._check_same_start(done)
        if resume is None:
            history.append(self._record(0, 0.0, score, true_positions))
            history[-1].pop("_pass_seconds")
            if on_record:
                on_record(history[-1])
        saved = time.perf_counter()
        for iteration in range(done, options.iterations):
            begin = time.perf_counter()
            fraction = iteration / options.iterations
            object_step = _cosine(options.step, options.final_step, fraction)
            position_step = probe_step = 0.0
            if options.refines_positions and iteration >= options.position_start:
                position_step = _cosine(options.position_step, options.final_step, fraction)
            if options.refines_probe and iteration >= options.probe_start:
                probe_step = _cosine(options.probe_step, options.final_step, fraction)
            steps = (tf.constant(object_step), tf.constant(position_step), tf.constant(probe_step))
            loss = 0.0
            synced = self.workers > 1 and options.refines_positions
            if synced:
                start = (self.correction.numpy(), self.position_rms.numpy())
                self._moved = np.zeros(self.scan.n_positions, bool)
            for index, counts, weight, _ in self._minibatches(self._windows_of(rng)):
                loss = self._step(index, counts, weight, *steps)
            if synced:
                self._sync_positions(*start, self._moved)
                self._moved = None
            elif position_step:
                self._centre_corrections()
            if position_step:  # the windows moved: the prior's weights follow them
                self._update_prior_weights()
            if not math.isfinite(float(loss)):
                raise FloatingPointError(
                    f"the refinement diverged at iteration {iteration + 1} (loss {float(loss)}); "
                    "lower refine.step"
                )
            done = iteration + 1
            out_of_time = (
                options.max_seconds is not None
                and seconds + time.perf_counter() - begin >= options.max_seconds
            )
            if self.workers > 1 and options.max_seconds is not None:
                out_of_time = self.distribution.agree(out_of_time)  # all stop, or none
            last = done == options.iterations or out_of_time
            if self.modes > 1 and probe_step and (done % options.orthogonalise_every == 0 or last):
                self.orthogonalise()  # the last records and the result: orthogonal modes
            seconds += time.perf_counter() - begin
            if done % options.eval_every == 0 or done == options.iterations or out_of_time:
                record = self._record(done, seconds, score, true_positions)
                seconds += record.pop("_pass_seconds")
                record["seconds"] = seconds
                history.append(record)
                if on_record:
                    on_record(record)
            if out_of_time:
                break
            every = options.checkpoint_seconds
            due = every is not None and time.perf_counter() - saved >= every
            if on_checkpoint and due and done < options.iterations:
                on_checkpoint(self.state(done, seconds, history, rng))
                saved = time.perf_counter()
        obj, mask = self.current_object()
        positions = self.positions()
        final = history[-1]
        wall = time.perf_counter() - started
        log.debug("refinement: %d iterations, %.1f s (%.1f s with metrics)", done, seconds, wall)
        return RefineResult(
            obj=obj,
            mask=mask,
            xcoords=positions[:, 0],
            ycoords=positions[:, 1],
            probe=self.current_probe(),
            r_factor=final["r_factor"],
            poisson_nll=final["poisson_nll"],
            seconds=seconds,
            stage=f"refine={options.mode}",
            iterations=done,
            mode=str(options.mode),
            history=history,
        )

    def _record(self, iteration: int, seconds: float, score, true_positions) -> dict:
        begin = time.perf_counter()
        loss, nll, abs_error, measured, _, _ = self.totals()
        pixels = self.pixels
        record = {
            "iteration": iteration,
            "seconds": seconds,
            "loss": (loss - self._saturated) / pixels,
            "r_factor": abs_error / measured if measured > 0 else math.nan,
            "poisson_nll": nll / pixels,
            "_pass_seconds": time.perf_counter() - begin,
        }
        if self.modes > 1:
            shares = probes.powers(self.current_probe())
            record.update({f"mode_{k}_power": float(share) for k, share in enumerate(shares)})
        if true_positions is not None:
            error = self.positions() - np.asarray(true_positions, np.float64)
            error -= error.mean(axis=0)
            record["position_rmse"] = float(np.sqrt(np.mean(np.sum(error**2, axis=1))))
        if score is not None:
            record.update(score(self.current_object()[0]))
        return record

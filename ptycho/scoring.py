"""Scoring a reconstruction of a scan: data consistency always, ground truth when known.

:mod:`ptycho.metrics` holds the measures (pure functions of arrays); this module applies
them to a reconstruction of a :class:`~ptycho.data.Scan` the way every stage does: on the
region the scan reached (:func:`scan_region`), after the registration and offset removal
of the ``metrics`` section (:class:`MetricsOptions`). One :class:`Scorer` per scan serves
the network's evaluations, the refinement's progress points and the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
from scipy.spatial import cKDTree

from ptycho import metrics
from ptycho.data.grouping import scan_step
from ptycho.data.scan import Scan
from ptycho.reconstruction import Reconstruction
from ptycho.stitch import illumination

__all__ = [
    "Comparison",
    "MetricsOptions",
    "Scorer",
    "compare_to_truth",
    "SCORED_FRACTION",
    "scan_region",
]


@dataclass
class MetricsOptions:
    """The ``metrics`` section: how a reconstruction is compared with ground truth."""

    register: bool = True
    """Sub-pixel registration (phase cross-correlation of the amplitudes) before scoring."""
    remove_phase_ramp: bool = False
    """Also remove a phase plane (the global phase offset is always removed)."""


SCORED_FRACTION = 0.25
"""Summed probe intensity, as a fraction of its maximum, that counts a pixel as lit."""


def scan_region(scan: Scan, fraction: float = SCORED_FRACTION) -> tuple[slice, slice]:
    """The scored region: the largest axis-aligned rectangle of lit pixels inside the
    bounding box of the patch centres.

    A pixel is lit where the summed probe intensity of every position
    (:func:`ptycho.stitch.illumination`) reaches ``fraction`` of its maximum, with holes
    narrower than a scan step closed (the gaps between footprints of a sparse scan,
    which are part of the scanned area). On a raster that is the whole box; on a Fermat
    spiral (a disk of positions) the unscanned corners stay out; on a dense irregular
    scan, whose positions leave gaps much wider than their median spacing, the region
    is what the beam reached (docs/design.md, section 6). A scan without a probe falls
    back to the pixels within two scan steps of a position."""
    rows = slice(int(math.floor(scan.ycoords.min())), int(math.ceil(scan.ycoords.max())) + 1)
    cols = slice(int(math.floor(scan.xcoords.min())), int(math.ceil(scan.xcoords.max())) + 1)
    step = max(scan_step(scan.xcoords, scan.ycoords), 1.0)
    if scan.probe is None:
        yy, xx = np.mgrid[rows, cols]
        centres = cKDTree(np.stack([scan.xcoords, scan.ycoords], axis=1))
        distance, _ = centres.query(np.stack([xx.ravel(), yy.ravel()], axis=1))
        covered = (distance <= 2.0 * step).reshape(xx.shape)
    else:
        shape = (rows.stop + scan.n, cols.stop + scan.n)
        coverage = illumination(scan.xcoords, scan.ycoords, scan.probe, shape)
        lit = coverage >= fraction * coverage.max()
        # A closing by a disk of one scan step: dilate, then erode what was dilated.
        near = scipy.ndimage.distance_transform_edt(~lit) <= step
        covered = (scipy.ndimage.distance_transform_edt(near) > step)[rows, cols]
    inner_rows, inner_cols = metrics.largest_rectangle(covered)
    return (
        slice(rows.start + inner_rows.start, rows.start + inner_rows.stop),
        slice(cols.start + inner_cols.start, cols.start + inner_cols.stop),
    )


class Comparison(dict):
    """Arrays of one reconstruction against its ground truth on the scored region:
    ``amplitude_truth``, ``phase_truth``, ``amplitude``, ``phase`` (aligned),
    ``amplitude_error``, ``phase_error`` (wrapped, rad) and ``frc`` (frequency as a
    fraction of Nyquist, ``amplitude``, ``phase`` or None for a flat phase, ``half_bit``)."""


def compare_to_truth(
    truth: np.ndarray,
    obj: np.ndarray,
    region: tuple[slice, slice],
    *,
    register: bool = True,
    remove_phase_ramp: bool = False,
) -> Comparison:
    """The :class:`Comparison` of ``obj`` with ``truth`` on ``region`` after the
    alignment the metrics use (:func:`ptycho.metrics.align`)."""
    reference, image = np.asarray(truth)[region], np.asarray(obj)[region]
    aligned, _ = metrics.align(
        reference, image, register=register, remove_phase_ramp=remove_phase_ramp
    )
    ref_phase, phase = np.angle(reference), np.angle(aligned)
    frequency, amp_curve, half_bit = metrics.frc(np.abs(reference), np.abs(aligned))
    phase_curve = None
    if float(np.std(ref_phase)) >= metrics.PHASE_STRUCTURE:
        phase_curve = metrics.frc(ref_phase, phase)[1]
    return Comparison(
        amplitude_truth=np.abs(reference),
        phase_truth=ref_phase,
        amplitude=np.abs(aligned),
        phase=phase,
        amplitude_error=np.abs(aligned) - np.abs(reference),
        phase_error=np.angle(np.exp(1j * (phase - ref_phase))),
        frc={
            "frequency": frequency,
            "amplitude": amp_curve,
            "phase": phase_curve,
            "half_bit": half_bit,
        },
    )


class Scorer:
    """Scores reconstructions of one ``scan`` (its scored region found once).

    Parameters
    ----------
    scan : Scan
        With ``object`` for ground-truth metrics (and ``metadata["true_positions"]`` for
        the position error of refined positions).
    options : MetricsOptions
    """

    def __init__(self, scan: Scan, options: MetricsOptions | None = None):
        self.scan = scan
        self.options = options or MetricsOptions()
        self.region = scan_region(scan) if scan.object is not None else None

    @property
    def has_truth(self) -> bool:
        return self.region is not None

    def truth(self, obj: np.ndarray) -> dict:
        """Ground-truth metrics of ``obj`` (:func:`ptycho.metrics.compare`); {} without
        ground truth."""
        if self.region is None:
            return {}
        return metrics.compare(
            self.scan.object,
            obj,
            region=self.region,
            register=self.options.register,
            remove_phase_ramp=self.options.remove_phase_ramp,
        )

    def compare(self, obj: np.ndarray) -> Comparison:
        """The :class:`Comparison` of ``obj`` with the ground truth (which must exist)."""
        if self.region is None:
            raise ValueError("the scan has no ground truth (objectGuess) to compare with")
        return compare_to_truth(
            self.scan.object,
            obj,
            self.region,
            register=self.options.register,
            remove_phase_ramp=self.options.remove_phase_ramp,
        )

    def score(self, result: Reconstruction) -> dict:
        """Data consistency and ground truth of ``result``, stored in ``result.metrics``
        and returned."""
        result.metrics = {
            "r_factor": result.r_factor,
            "poisson_nll": result.poisson_nll,
            **self.truth(result.obj),
        }
        return result.metrics

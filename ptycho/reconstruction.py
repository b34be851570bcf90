"""The result of a reconstruction stage: what every stage gives and every writer takes.

The network (:func:`ptycho.inference.reconstruct`) and the physics refinement
(:meth:`ptycho.refine.Refiner.run`) both return a :class:`Reconstruction`; their own
details (network evaluations and traces; iterations and the progress history) are in
subclasses beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Reconstruction"]


@dataclass(kw_only=True)
class Reconstruction:
    """An object reconstructed from a scan, in the scan's pixel frame.

    Attributes
    ----------
    obj : (H, W) complex64
        Pixel (y, x) is object coordinate (y, x) of the positions; 0 where ``mask`` is
        False.
    mask : (H, W) bool
        Pixels the reconstruction covered.
    xcoords, ycoords : (M,) float64
        The positions the reconstruction used (refined ones after position refinement),
        in the scan's order.
    probe : (N, N) complex64
        The probe it used, in the scan's units.
    r_factor, poisson_nll : float
        Data consistency: ``sum | |Psi| - a | / sum a`` and the mean Poisson NLL.
    seconds : float
        The stage's own time (not process start-up, not ground-truth scoring).
    stage : str
        What made it: ``"network"``, ``"refine=object"``, ...
    metrics : dict
        Its scores (:meth:`ptycho.scoring.Scorer.score`): ``r_factor``, ``poisson_nll``
        and, with ground truth, ``amp_ssim``, ``phase_psnr``, ...
    """

    obj: np.ndarray
    mask: np.ndarray
    xcoords: np.ndarray
    ycoords: np.ndarray
    probe: np.ndarray
    r_factor: float
    poisson_nll: float
    seconds: float
    stage: str
    metrics: dict = field(default_factory=dict)

    @property
    def patterns(self) -> int:
        return int(len(self.xcoords))

    @property
    def patterns_per_s(self) -> float:
        return self.patterns / self.seconds if self.seconds > 0 else math.inf

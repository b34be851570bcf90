"""The last stage: a run's reconstruction and metrics on disk.

``reconstruction.npz`` (``obj``, ``mask``, ``amplitude``, ``phase``, the positions and
probe used), ``reconstruction.png`` (with ground truth: truth / reconstruction / error;
without: amplitude, phase, illumination coverage), ``frc.png`` (with ground truth) and
``metrics.json``; with ``outputs.format=ptychodus`` also ``reconstruction.h5``, a
ptychodus product (:mod:`ptycho.data.ptychodus`) that opens in ptychodus. Every file is
written to a temporary name and renamed when complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ptycho import figures
from ptycho.data.ptychodus import write_product
from ptycho.errors import choice, require
from ptycho.outputs import save_reconstruction, write_json
from ptycho.reconstruction import Reconstruction
from ptycho.scoring import Scorer
from ptycho.stitch import illumination

__all__ = ["OutputFormat", "OutputOptions", "headline", "write_run"]


class OutputFormat(StrEnum):
    npz = "npz"
    ptychodus = "ptychodus"


@dataclass
class OutputOptions:
    """The ``outputs`` section: what a run writes besides its figures and metrics."""

    format: OutputFormat = OutputFormat.npz
    """``npz``: ``reconstruction.npz``; ``ptychodus``: also ``reconstruction.h5``, a
    ptychodus product (object, probe, positions in metres when the data's geometry is
    known, else 1 pixel = 1 m)."""

    def check(self) -> None:
        require([choice("format", self.format, OutputFormat)])


HEADLINE_KEYS = ("amp_ssim", "phase_ssim", "amp_psnr", "phase_psnr")


def headline(result: Reconstruction, label: str) -> str:
    """One line naming the result and its main figures (the log's last word on a run)."""
    values = result.metrics
    parts = [label, f"R-factor {values['r_factor']:.4f}"]
    parts += [f"{key} {values[key]:.3f}" for key in HEADLINE_KEYS if key in values]
    return "  ".join(parts)


def write_run(
    run_dir: Path,
    result: Reconstruction,
    scorer: Scorer,
    label: str,
    summary: dict,
    options: OutputOptions | None = None,
):
    """Write the final ``result`` of a run (its last stage) and ``summary`` as
    ``metrics.json`` into ``run_dir``; ``label`` titles the figures."""
    options = options or OutputOptions()
    run_dir = Path(run_dir)
    save_reconstruction(
        result.obj,
        result.mask,
        run_dir / "reconstruction.npz",
        xcoords=result.xcoords,
        ycoords=result.ycoords,
        probe=result.probe,
    )
    comparison = coverage = None
    if scorer.has_truth:
        comparison = scorer.compare(result.obj)
        figures.save_frc_png(comparison, run_dir / "frc.png", title=label)
    else:
        coverage = illumination(result.xcoords, result.ycoords, result.probe, result.obj.shape)
    figures.save_reconstruction_png(
        result.obj,
        result.mask,
        run_dir / "reconstruction.png",
        title=label,
        values=result.metrics,
        comparison=comparison,
        coverage=coverage,
    )
    if options.format == OutputFormat.ptychodus:
        geometry = scorer.scan.metadata
        write_product(
            run_dir / "reconstruction.h5",
            obj=result.obj,
            probe=result.probe,
            xcoords=result.xcoords,
            ycoords=result.ycoords,
            pixel_size=geometry.get("object_pixel_size_m"),
            name=label,
            comments=f"PtychoPINN-XLA {result.stage}; source {scorer.scan.source}",
            distance=geometry.get("distance_m", 0.0),
            energy_ev=geometry.get("energy_ev", 0.0),
        )
    write_json(summary, run_dir / "metrics.json")

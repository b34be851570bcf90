"""Scan data: the Scan value, file formats, simulation, grouping and batching."""

from ptycho.data.grouping import GROUPINGS, group_offsets, group_positions, scan_step, tile_groups
from ptycho.data.io import ScanFileError, load_scan, save_scan
from ptycho.data.pipeline import make_dataset, normalisation_factor
from ptycho.data.scan import Scan
from ptycho.data.simulate import make_object, make_probe, scan_positions, simulate

__all__ = [
    "GROUPINGS",
    "Scan",
    "ScanFileError",
    "group_offsets",
    "group_positions",
    "tile_groups",
    "load_scan",
    "make_dataset",
    "make_object",
    "make_probe",
    "normalisation_factor",
    "save_scan",
    "scan_positions",
    "scan_step",
    "simulate",
]

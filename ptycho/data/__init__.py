"""Scan data: the Scan value, file formats, simulation, where a run's scans come from,
grouping and batching."""

from ptycho.data.grouping import (
    GROUPINGS,
    Grouping,
    group_offsets,
    group_positions,
    scan_step,
    tile_groups,
)
from ptycho.data.io import ScanFileError, load_scan, save_scan
from ptycho.data.pipeline import make_dataset, normalisation_factor
from ptycho.data.scan import Scan
from ptycho.data.simulate import SimulationSpec, make_object, make_probe, scan_positions, simulate
from ptycho.data.sources import DataOptions, DataSource, Scans, load_scans, load_test_scan

__all__ = [
    "GROUPINGS",
    "DataOptions",
    "DataSource",
    "Grouping",
    "Scan",
    "ScanFileError",
    "Scans",
    "SimulationSpec",
    "group_offsets",
    "group_positions",
    "load_scan",
    "load_scans",
    "load_test_scan",
    "make_dataset",
    "make_object",
    "make_probe",
    "normalisation_factor",
    "save_scan",
    "scan_positions",
    "scan_step",
    "simulate",
    "tile_groups",
]

"""Ptychodus "product" HDF5 files: a probe, an object and probe positions in metres,
with geometry attributes, as APS's ptychodus (the GUI that runs PtychoPINN at the
beamlines) reads and writes them.

Layout (ptychodus' ``H5ProductFileIO``): root attributes ``name``, ``comments``,
``detector_object_distance_m``, ``probe_energy_eV``, ``probe_photon_count``,
``exposure_time_s``, ``mass_attenuation_m2_kg``; datasets ``probe_position_indexes``,
``probe_position_x_m``, ``probe_position_y_m``; ``probe`` (K, N, N) complex with
attributes ``pixel_width_m``/``pixel_height_m``; ``object`` (layers, H, W) complex with
``center_x_m``/``center_y_m`` and the pixel size; ``object_layer_spacing_m``,
``loss_epochs``, ``loss_values``. Object pixel (row, col) is at ``x = center_x +
pixel (col - W / 2)``, ``y = center_y + pixel (row - H / 2)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptycho.outputs import atomic_path

__all__ = ["Product", "is_product", "read_product", "write_product"]


@dataclass(frozen=True)
class Product:
    """What a product holds, positions as [x, y] metres."""

    probe: np.ndarray  # (K, N, N) complex
    positions: np.ndarray  # (M, 2) metres
    object: np.ndarray  # (H, W) complex (the first layer)
    pixel_size: float  # metres per object pixel
    object_centre: tuple[float, float]  # (x, y) metres
    distance: float
    energy_ev: float
    losses: np.ndarray


def is_product(handle) -> bool:
    """Whether an open HDF5 file is a ptychodus product."""
    return "probe_position_x_m" in handle and "probe" in handle


def read_product(path: str | os.PathLike) -> Product:
    import h5py

    with h5py.File(path, "r") as handle:
        if not is_product(handle):
            raise ValueError(f"{path}: not a ptychodus product (no probe_position_x_m, probe)")
        probe = np.asarray(handle["probe"][()])
        if probe.ndim == 2:
            probe = probe[None]
        elif probe.ndim == 4:  # (OPR modes, modes, N, N)
            probe = probe[0]
        obj = np.asarray(handle["object"][()])
        obj = obj[0] if obj.ndim == 3 else obj
        attrs = handle["object"].attrs
        positions = np.stack(
            [handle["probe_position_x_m"][()], handle["probe_position_y_m"][()]], axis=1
        )
        losses = handle["loss_values"][()] if "loss_values" in handle else np.zeros(0)
        return Product(
            probe=probe,
            positions=np.asarray(positions, np.float64),
            object=obj,
            pixel_size=float(attrs.get("pixel_width_m", handle["probe"].attrs["pixel_width_m"])),
            object_centre=(
                float(attrs.get("center_x_m", 0.0)),
                float(attrs.get("center_y_m", 0.0)),
            ),
            distance=float(handle.attrs.get("detector_object_distance_m", 0.0)),
            energy_ev=float(handle.attrs.get("probe_energy_eV", 0.0)),
            losses=np.asarray(losses, np.float64),
        )


def write_product(
    path: str | os.PathLike,
    *,
    obj: np.ndarray,
    probe: np.ndarray,
    xcoords: np.ndarray,
    ycoords: np.ndarray,
    pixel_size: float | None,
    name: str = "",
    comments: str = "",
    distance: float = 0.0,
    energy_ev: float = 0.0,
    losses=(),
) -> Path:
    """Write a reconstruction as a product (atomically). Positions are patch centres in
    object pixels; with ``pixel_size`` (metres) they and the object's centre are given
    in metres, without it in pixels as metres of 1 pixel = 1 m (said in ``comments``)."""
    import h5py

    path = Path(path)
    obj = np.asarray(obj, np.complex64)
    probe = np.asarray(probe, np.complex64)
    probe = probe[None] if probe.ndim == 2 else probe
    pixel = pixel_size or 1.0
    if not pixel_size:
        comments = (comments + "; " if comments else "") + "pixel size unknown: 1 pixel = 1 m"
    height, width = obj.shape
    centre_x, centre_y = width / 2 * pixel, height / 2 * pixel  # pixel (0, 0) at 0 m
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs["name"] = name
        handle.attrs["comments"] = comments
        handle.attrs["detector_object_distance_m"] = distance
        handle.attrs["probe_energy_eV"] = energy_ev
        handle.attrs["probe_photon_count"] = float(np.sum(np.abs(probe) ** 2))
        handle.attrs["exposure_time_s"] = 0.0
        handle.attrs["mass_attenuation_m2_kg"] = 0.0
        handle["probe_position_indexes"] = np.arange(len(xcoords))
        handle["probe_position_x_m"] = np.asarray(xcoords, np.float64) * pixel
        handle["probe_position_y_m"] = np.asarray(ycoords, np.float64) * pixel
        stored = handle.create_dataset("probe", data=probe)
        stored.attrs["pixel_width_m"] = pixel
        stored.attrs["pixel_height_m"] = pixel
        stored = handle.create_dataset("object", data=obj[None])
        stored.attrs["center_x_m"] = centre_x
        stored.attrs["center_y_m"] = centre_y
        stored.attrs["pixel_width_m"] = pixel
        stored.attrs["pixel_height_m"] = pixel
        handle["object_layer_spacing_m"] = np.zeros(0)
        losses = np.asarray(losses, np.float64)
        handle["loss_epochs"] = np.arange(len(losses))
        handle["loss_values"] = losses
    return path

"""Grouping neighbouring scan positions into the C = g^2 channels of one sample.

For ``gridsize`` g > 1, each training sample is C = g * g neighbouring scan positions;
the network sees their C diffraction patterns as channels, and their offsets from the
group centre enter the model's overlap constraint. The network can only learn if it can
tell which channel sits where (docs/design.md, section 4), so every group has the same shape
and the same member order wherever possible:

``"block"``
    Raster scans: g x g blocks of lattice neighbours, in row-major order (for g = 2:
    top-left, top-right, bottom-left, bottom-right), every sample the same geometry
    (PtychoPINN's nested 2 x 2 grid).
``"nearest"``
    Irregular scans (Fermat spirals, random, jittered instrument positions): each
    position and its C - 1 nearest neighbours, ordered by angle around the group
    centre (starting from the left, then up, right and down: clockwise on screen, where
    y points down). Geometry varies from sample to sample; the order is canonical.
``"lattice"``
    Any scan, given a spacing s: g x g blocks anchored at every position, each member
    the position nearest to a point of the block's lattice (anchor + s * (column, row),
    within 0.45 s of it), in row-major order as ``"block"``. On a raster of step s that
    is ``"block"``; on a dense irregular scan (positions much closer than s, as a
    position-corrected fly scan gives) every sample has about the same shape and its
    members are s apart, where ``"nearest"`` would group positions a pixel apart whose
    patterns differ too little for the overlap constraint to matter.
``"auto"``
    ``"block"`` when the positions form a raster (every position is in some g x g
    block of its lattice neighbours); ``"lattice"`` when a spacing is given and the
    positions are closer than half of it (a dense irregular scan); ``"nearest"``
    otherwise. Training and inference
    call it on their own scans and so group the same kind of scan the same way.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "GROUPINGS",
    "Grouping",
    "group_offsets",
    "group_positions",
    "scan_step",
    "tile_groups",
]


class Grouping(StrEnum):
    """How positions become the C channels of a sample (module docstring)."""

    auto = "auto"
    block = "block"
    nearest = "nearest"
    lattice = "lattice"


GROUPINGS = tuple(Grouping)
LATTICE_TOLERANCE = 0.45  # fraction of the step: how far a raster neighbour may stray


def scan_step(xcoords: np.ndarray, ycoords: np.ndarray) -> float:
    """Median distance from a position to its nearest neighbour, in pixels."""
    points = np.stack([np.asarray(xcoords, np.float64), np.asarray(ycoords, np.float64)], 1)
    if len(points) < 2:
        return 0.0
    distance, _ = cKDTree(points).query(points, k=2)
    return float(np.median(distance[:, 1]))


def _blocks(
    points: np.ndarray, gridsize: int, tree: cKDTree, step: float | None = None
) -> np.ndarray:
    """(G, C) g x g blocks of spacing ``step`` (default: the scan's step) anchored at
    every position that has all its lattice neighbours (row-major); (0, C) when the
    step is zero."""
    step = scan_step(points[:, 0], points[:, 1]) if step is None else step
    c = gridsize * gridsize
    if not step > 0:
        return np.zeros((0, c), np.int64)
    rows, cols = np.divmod(np.arange(c), gridsize)
    lattice = step * np.stack([cols, rows], axis=1)  # (C, 2) [dx, dy] from the anchor
    targets = points[:, None, :] + lattice[None]  # (M, C, 2)
    distance, index = tree.query(targets.reshape(-1, 2))
    distance, index = distance.reshape(-1, c), index.reshape(-1, c)
    found = (distance < LATTICE_TOLERANCE * step).all(axis=1)
    distinct = np.array([len(set(row)) == c for row in index])
    return index[found & distinct].astype(np.int64)


def _lattice_blocks(points: np.ndarray, gridsize: int, spacing: float) -> np.ndarray:
    """``"lattice"`` groups: :func:`_blocks` of spacing ``spacing`` on any scan."""
    groups = _blocks(points, gridsize, cKDTree(points), spacing)
    if not len(groups):
        raise ValueError(
            f"no {gridsize} x {gridsize} block of spacing {spacing:g} px has a position "
            f"within {LATTICE_TOLERANCE} spacings of each of its points: use a spacing "
            "near the scan's step (data.group_step), or grouping=nearest"
        )
    return groups


def _canonical_order(points: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Members of each group sorted by angle around the group centre."""
    members = points[groups]  # (G, C, 2)
    offsets = members - members.mean(axis=1, keepdims=True)
    angle = np.arctan2(offsets[..., 1], offsets[..., 0])  # (-pi, pi], 0 pointing right
    return np.take_along_axis(groups, np.argsort(angle, axis=1, kind="stable"), axis=1)


def group_positions(
    xcoords: np.ndarray,
    ycoords: np.ndarray,
    gridsize: int,
    *,
    method: str = "auto",
    n_groups: int | None = None,
    seed: int = 0,
    spacing: float | None = None,
) -> np.ndarray:
    """Indices of groups of C = gridsize**2 neighbouring positions, in a fixed order.

    Parameters
    ----------
    xcoords, ycoords : (M,) float
        Positions in pixels (x = column, y = row).
    gridsize : int
        g >= 1; g = 1 gives one group per position, ``[[0], [1], ...]``.
    method : {"auto", "block", "nearest", "lattice"}
        See the module docstring. ``"block"`` raises ``ValueError`` when the positions
        are not a raster, ``"lattice"`` without a ``spacing``.
    n_groups : int, optional
        Keep G groups drawn at random (without replacement while G <= the number of
        groups found, with replacement beyond); default all of them.
    seed : int
        Makes the draw of ``n_groups`` deterministic.
    spacing : float, optional
        Pixels between the members of a ``"lattice"`` block (``"auto"`` uses it on
        dense irregular scans).

    Returns
    -------
    (G, C) int64 indices into the positions.
    """
    if method not in GROUPINGS:
        raise ValueError(f"grouping method must be one of {list(GROUPINGS)}, got {method!r}")
    if gridsize < 1:
        raise ValueError(f"gridsize must be >= 1, got {gridsize}")
    points = np.stack([np.asarray(xcoords, np.float64), np.asarray(ycoords, np.float64)], 1)
    m, c = len(points), gridsize * gridsize
    if m < c:
        raise ValueError(
            f"the scan has {m} positions, fewer than the {c} a group of gridsize {gridsize} needs"
        )
    if method == Grouping.lattice and not (spacing and spacing > 0):
        raise ValueError(f"grouping=lattice needs a spacing > 0 pixels, got {spacing}")
    if c == 1:
        groups = np.arange(m, dtype=np.int64)[:, None]
    elif method == Grouping.lattice:
        groups = _lattice_blocks(points, gridsize, spacing)
    else:
        tree = cKDTree(points)
        groups = _blocks(points, gridsize, tree) if method != "nearest" else None
        is_raster = groups is not None and len(np.unique(groups)) == m
        if method == "block" and not is_raster:
            raise ValueError(
                f"grouping=block needs a raster scan: {m - len(np.unique(groups))} of {m} "
                f"positions are in no {gridsize} x {gridsize} block of lattice neighbours; "
                "use grouping=nearest (or auto)"
            )
        dense = spacing and scan_step(points[:, 0], points[:, 1]) < spacing / 2
        if not is_raster and method == Grouping.auto and dense:
            groups = _lattice_blocks(points, gridsize, spacing)
        elif not is_raster:
            _, nearest = tree.query(points, k=c)  # (M, C), the position itself first
            groups = _canonical_order(points, nearest.astype(np.int64))
    if n_groups is None:
        return groups
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(groups), size=n_groups, replace=n_groups > len(groups))
    return groups[chosen]


def group_offsets(
    xcoords: np.ndarray, ycoords: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Group centres and member offsets from them.

    Returns
    -------
    centres : (G, 2) float64
        Mean [x, y] of each group's positions.
    offsets : (G, C, 2) float64
        ``[dx, dy]`` of each member relative to its group centre (they sum to zero).
    """
    positions = np.stack([np.asarray(xcoords), np.asarray(ycoords)], axis=1)[groups]
    centres = positions.mean(axis=1)
    return centres, positions - centres[:, None, :]


def tile_groups(groups: np.ndarray, n_positions: int) -> np.ndarray:
    """A subset of ``groups`` that covers every position, each once where possible.

    First pass, in the groups' order: keep a group when none of its members is covered
    yet (on a raster with g x g blocks in row-major order: the blocks of a g-spaced
    lattice, an exact tiling); second pass: keep a group when some member is still
    uncovered (the last rows and columns of a raster whose side is not a multiple of
    g, and the gaps of irregular scans). Positions in no group stay uncovered.

    Returns
    -------
    (G', C) int64, in the original order.
    """
    groups = np.asarray(groups, np.int64)
    covered = np.zeros(n_positions, bool)
    keep = np.zeros(len(groups), bool)
    for first_pass in (True, False):
        for index, members in enumerate(groups):
            if keep[index]:
                continue
            hit = covered[members]
            if (first_pass and not hit.any()) or (not first_pass and not hit.all()):
                keep[index] = True
                covered[members] = True
    return groups[keep]

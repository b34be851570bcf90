"""Grouping neighbouring scan positions into the C = g^2 channels of one sample.

For ``gridsize`` g > 1, PtychoPINN trains on groups of C = g * g neighbouring scan
positions; their offsets from the group centre enter the model's overlap constraint.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["group_neighbours", "group_offsets"]


def group_neighbours(
    xcoords: np.ndarray,
    ycoords: np.ndarray,
    gridsize: int,
    *,
    k_neighbours: int | None = None,
    n_groups: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices of groups of C = gridsize**2 neighbouring positions.

    Each group starts at a seed position and adds C - 1 positions drawn (without
    replacement) from the seed's ``k_neighbours - 1`` nearest other positions (k-d
    tree, scipy's ``cKDTree``). With ``k_neighbours == C`` a group is exactly the seed
    and its C - 1 nearest neighbours.

    Parameters
    ----------
    xcoords, ycoords : (M,) float
        Positions in pixels.
    gridsize : int
        g >= 1; g = 1 gives one group per position, ``[[0], [1], ...]``.
    k_neighbours : int, optional
        K >= C, the neighbourhood a group is drawn from; default C.
    n_groups : int, optional
        Number of groups G; default M (every position seeds one group). Seeds are drawn
        without replacement while G <= M, with replacement beyond.
    seed : int
        Makes the choice of seeds and members deterministic.

    Returns
    -------
    (G, C) int64, each row sorted by distance from its seed (the seed first).
    """
    xcoords = np.asarray(xcoords, np.float64)
    ycoords = np.asarray(ycoords, np.float64)
    m = len(xcoords)
    if gridsize < 1:
        raise ValueError(f"gridsize must be >= 1, got {gridsize}")
    c = gridsize * gridsize
    k = c if k_neighbours is None else int(k_neighbours)
    if k < c:
        raise ValueError(f"k_neighbours must be >= C = gridsize^2 = {c}, got {k}")
    if m < k:
        raise ValueError(
            f"the scan has {m} positions, fewer than the {k} neighbours a group of gridsize "
            f"{gridsize} needs"
        )
    rng = np.random.default_rng(seed)
    g = m if n_groups is None else int(n_groups)
    if g < 1:
        raise ValueError(f"n_groups must be >= 1, got {g}")
    if g == m and n_groups is None:
        seeds = np.arange(m)
    else:
        seeds = rng.choice(m, size=g, replace=g > m)
    if c == 1:
        return seeds[:, None].astype(np.int64)
    points = np.stack([xcoords, ycoords], axis=1)
    _, neighbours = cKDTree(points).query(points[seeds], k=k)  # (G, K), seed first
    neighbours = neighbours.astype(np.int64)
    if k == c:
        return neighbours
    # Seed plus C - 1 of its K - 1 nearest others, kept in order of distance.
    picks = np.argsort(rng.random((g, k - 1)), axis=1)[:, : c - 1] + 1
    picks.sort(axis=1)
    chosen = np.concatenate([np.zeros((g, 1), np.int64), picks], axis=1)
    return np.take_along_axis(neighbours, chosen, axis=1)


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

"""Where a run's scans come from: the ``data`` section and the scans it gives.

Simulated scans (the embedded default: a training scan and a test scan of a different
object) or files (``.npz``, ``.h5``/``.hdf5``, ``.cxi``; an optional separate test scan and
a probe taken from another file). The section also says how positions are grouped into
the network's samples, for training and reconstruction alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path

import numpy as np

from ptycho.data.grouping import Grouping, group_positions
from ptycho.data.io import ScanFileError, load_probe, load_scan
from ptycho.data.prepare import PrepareOptions
from ptycho.data.scan import Scan
from ptycho.data.simulate import SimulationSpec, simulate
from ptycho.errors import DataError, require

__all__ = ["DataOptions", "DataSource", "Scans", "load_scans", "load_test_scan"]

log = logging.getLogger(__name__)


class DataSource(StrEnum):
    simulate = "simulate"
    file = "file"


@dataclass
class DataOptions(PrepareOptions, SimulationSpec):
    """The ``data`` section. With ``source=simulate`` the :class:`SimulationSpec` fields
    describe the training scan, and ``test_*`` what differs for the test scan; with
    ``source=file`` the :class:`PrepareOptions` fields say how the file's frames become
    patterns (docs/measured-data.md)."""

    source: DataSource = DataSource.simulate
    """``simulate`` (the spec's fields) or ``file`` (``path``)."""
    path: str | None = None
    """Scan file (``.npz`` with PtychoPINN's keys, ``.h5``/``.hdf5``, ``.cxi``, NeXus
    ``.nxs``)."""
    test_path: str | None = None
    """A separate scan to reconstruct and score; default: the training scan."""
    probe_path: str | None = None
    """A probe replacing the scan's (or supplying a missing one): a run's
    ``reconstruction.npz``, a ptychodus product, a ``.npy``, or a scan file."""
    n: int | None = None
    """Pattern size of simulated scans; null: the model's (``model.n`` in train.py, the
    checkpoint's in infer.py, 64 without one)."""
    test_positions: int = 1600
    """Positions of the simulated test scan."""
    test_images: list[str] = field(default_factory=lambda: ["coins", "text"])
    """Images of the simulated test object (``object_kind=image``)."""
    test_seed: int | None = 1
    """Seed of the simulated test scan (a different object); null: the test scan is the
    training scan itself (trained on and reconstructed, as with one measured scan)."""
    grouping: Grouping = Grouping.auto
    """How positions become the C channels of a sample: ``block`` (g x g raster blocks),
    ``nearest`` (angle-ordered nearest neighbours, any scan), ``lattice`` (g x g blocks
    of spacing ``group_step`` on any scan) or ``auto`` (block on rasters, lattice on
    scans denser than half ``group_step``, nearest otherwise)."""
    group_step: float | None = 0.0625
    """Spacing of ``lattice`` groups, fraction of N (0.0625: the default raster's 4 px at
    N 64, PtychoPINN's +-2 px groups); null: ``auto`` never picks ``lattice``."""
    n_groups: int | None = None
    """Keep this many training groups (random, seeded by ``seed``); null: all."""

    def check(self) -> None:
        """``ValueError`` naming the first field out of range or file that is missing."""
        files = self.source == DataSource.file
        require(
            [
                (
                    not files or bool(self.path),
                    "path is required for a file scan: data=npz data.path=scan.npz",
                ),
                *(
                    (
                        not getattr(self, name) or Path(getattr(self, name)).is_file(),
                        f"{name}={getattr(self, name)}: no such file",
                    )
                    for name in ("path", "test_path", "probe_path")
                ),
                (
                    self.n_groups is None or self.n_groups >= 1,
                    f"n_groups={self.n_groups}: must be >= 1 or null",
                ),
                (self.test_positions >= 1, f"test_positions={self.test_positions}: must be >= 1"),
                (
                    self.group_step is None or self.group_step > 0,
                    f"group_step={self.group_step}: must be > 0 (fraction of N) or null",
                ),
                (
                    self.grouping != Grouping.lattice or self.group_step is not None,
                    "grouping=lattice needs data.group_step (fraction of N), e.g. 0.0625",
                ),
            ]
        )
        if files:
            PrepareOptions.check(self)
        else:
            self.simulation(self.pattern_size()).check()

    def pattern_size(self, n: int | None = None) -> int:
        """N of the simulated scans: ``n`` (the model's) when given, else ``data.n``,
        else 64."""
        return n or self.n or 64

    def simulation(self, n: int, *, test: bool = False) -> SimulationSpec:
        """The spec of the simulated training (or test) scan at pattern size ``n``."""
        spec = SimulationSpec(**{f.name: getattr(self, f.name) for f in fields(SimulationSpec)})
        spec = replace(spec, n=n)
        if test and self.test_seed is not None:
            spec = replace(
                spec,
                n_positions=self.test_positions,
                images=list(self.test_images),
                seed=self.test_seed,
            )
        return spec

    def groups(self, scan: Scan, gridsize: int) -> np.ndarray:
        """The training samples of ``scan``: (G, C) groups of its positions."""
        try:
            groups = group_positions(
                scan.xcoords,
                scan.ycoords,
                gridsize,
                method=self.grouping,
                n_groups=self.n_groups,
                seed=self.seed,
                spacing=None if self.group_step is None else self.group_step * scan.n,
            )
        except ValueError as error:
            raise DataError(f"data.grouping={self.grouping}: {error}") from error
        log.info(
            "data.grouping=%s: %d groups of %d positions", self.grouping, len(groups), gridsize**2
        )
        return groups


@dataclass(frozen=True)
class Scans:
    """A run's scans: the one to train on and the one to reconstruct and score (the same
    object when there is no separate test scan)."""

    train: Scan
    test: Scan

    @property
    def separate_test(self) -> bool:
        return self.test is not self.train


def load_scans(options: DataOptions, n: int | None = None) -> Scans:
    """The scans of the ``data`` section for training. Simulated scans have pattern size
    ``n`` (or ``options.n``, or 64); file scans are prepared to pattern size ``n`` when
    it is given (a window of the frame; :class:`DataError` when they cannot be), else to
    the size the file, ``crop`` and ``bin`` give. A separate test file is prepared to
    the training scan's size."""
    if options.source == DataSource.simulate:
        train = simulate(options.simulation(options.pattern_size(n)))
        if options.test_seed is None:  # reconstruct the scan the network is trained on
            return Scans(train, train)
        return Scans(train, load_test_scan(options, n))
    train = _load_file(options, "path", n)
    if not options.test_path:
        return Scans(train, train)
    return Scans(train, _load_file(options, "test_path", train.n))


def load_test_scan(options: DataOptions, n: int | None = None) -> Scan:
    """The one scan a reconstruction (``infer.py``) needs: the simulated test scan at
    pattern size ``n`` (or ``options.n``, or 64), or the file ``data.path`` prepared to
    pattern size ``n`` (the model's) when given."""
    if options.source == DataSource.simulate:
        return simulate(options.simulation(options.pattern_size(n), test=True))
    return _load_file(options, "path", n)


def _load_file(options: DataOptions, key: str, n: int | None) -> Scan:
    probe = None
    if options.probe_path:
        try:
            probe = load_probe(options.probe_path)
        except ScanFileError as error:
            raise ScanFileError(f"data.probe_path={error}") from error
    return load_scan(
        getattr(options, key),
        probe=probe,
        options=options,
        n=n,
        name=f"data.{key}={getattr(options, key)}",
    )

"""``benchmarks/sparse.py``: a cell of the overlap x dose grid at a tiny size (the code
path, not the figures), and its figure."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_script

METHODS = {"network", "network+refine", "refine", "epie"}


@pytest.mark.slow
def test_a_tiny_cell_gives_four_scored_methods_and_the_figure(tmp_path):
    result = run_script(
        "benchmarks/sparse.py",
        "--json",
        "--geometry",
        "touching",
        "--dose",
        "1e3",
        "--minutes",
        "0.1",
        "--epie-iterations",
        "2",
        "--set",
        "debug=smoke",
        "refine.iterations=2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {row["method"] for row in rows} == METHODS
    for row in rows:
        assert row["geometry"] == "touching" and row["dose"] == 1e3
        assert row["overlap"] == 0.0  # step 0.5 N, aperture radius 0.25 N: they touch
        assert row["loss"] == "poisson"  # the low-dose loss
        for key in ("amp_ssim", "phase_ssim", "r_factor", "seconds"):
            assert math.isfinite(row[key]), (row["method"], key)
    seconds = {row["method"]: row["seconds"] for row in rows}
    assert seconds["network+refine"] > seconds["network"]  # the network's time is included

    figure = tmp_path / "sparse.png"
    plotted = run_script("benchmarks/sparse.py", "--plot", str(figure), input_text=result.stdout)
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

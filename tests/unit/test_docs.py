"""The generated documents are current: docs/configuration.md against the sections'
dataclasses and conf/, the tables of docs/benchmarks.md and README.md against
benchmarks/results/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)
    spec.loader.exec_module(module)
    return module


def test_configuration_md_lists_every_key_as_the_code_defines_it():
    generate = load(ROOT / "docs" / "generate.py")
    text = generate.render()
    assert (ROOT / "docs" / "configuration.md").read_text() == text, (
        "docs/configuration.md is stale: run python docs/generate.py"
    )
    # Every field of every section is there, with its default.
    from ptycho.config import TrainConfig

    assert "| `refine.momentum` | float | `0.8` |" in text
    assert "| `compile.mode` | `auto` \\| `jit` \\| `graph` \\| `eager` | `auto` |" in text
    assert len([line for line in text.splitlines() if line.startswith("| `model.")]) == len(
        TrainConfig().model.__dataclass_fields__
    )


def test_benchmark_tables_are_built_from_the_results_files():
    table = load(ROOT / "benchmarks" / "table.py")
    for doc in table.DOCS:
        current = doc.read_text()
        assert table.render_doc(current) == current, (
            f"{doc} is stale: run python benchmarks/table.py --docs"
        )
    rows = table.flat_table([{"a": 1, "b": 2.5}, {"a": 3}], ["a", "b"])
    assert rows == ["| a | b |", "| --- | --- |", "| 1 | 2.5 |", "| 3 |  |"]
    records = [
        {"cell": "x", "method": "m", "a": 0.5, "b": 0.25},
        {"cell": "x", "method": "n", "a": 0.75, "b": 0.125},
        {"cell": "y", "method": "n", "a": 1, "b": 2},
    ]
    assert table.spread_table(records, ["cell"], "method:a,b") == [
        "| cell | m: a / b | n: a / b |",
        "| --- | --- | --- |",
        "| x | 0.5 / 0.25 | 0.75 / 0.125 |",
        "| y |  | 1 / 2 |",
    ]

"""Benchmark results (``--json`` lines) as Markdown tables, and the tables of
docs/benchmarks.md, docs/measured-data.md, docs/large-scans.md and README.md rebuilt
from them.

    python benchmarks/table.py benchmarks/results/warp_cpu.jsonl --pivot   # one file
    python benchmarks/table.py --docs            # rewrite the tables in those documents
    python benchmarks/table.py --docs --check    # exit 1 if they are stale

In those documents a table is the text between a marker line
``<!-- table FILE [pivot] [columns=a,b] [where=key:value ...] [spread=f:x,y] -->`` and
the next ``<!-- end table -->``; the prose around it is written by hand. ``pivot`` puts
the configurations (``translate+compile``) in columns with the throughput in the cells
and a ratio column; otherwise every record is a row (``columns`` chooses and orders the
fields, ``where`` keeps records whose field has that value). ``spread=method:a,b`` makes
one row per value of ``columns`` and one column per value of ``method``, holding
``a / b`` of that record.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = (
    ROOT / "docs" / "benchmarks.md",
    ROOT / "docs" / "measured-data.md",
    ROOT / "docs" / "large-scans.md",
    ROOT / "README.md",
)
RATE_FIELDS = ("images_per_s", "samples_per_s", "patterns_per_s")
MARKER = re.compile(r"^<!-- table (?P<spec>.+?) -->$")
END = "<!-- end table -->"


def read_records(path: Path) -> list[dict]:
    return [
        json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")
    ]


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def flat_table(records: list[dict], columns: list[str] | None = None) -> list[str]:
    """Every record a row; ``columns`` (default: every field but ``curve``) in order."""
    if columns is None:
        columns = []
        for record in records:
            columns += [key for key in record if key not in columns and key != "curve"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for record in records:
        lines.append("| " + " | ".join(cell(record.get(key)) for key in columns) + " |")
    return lines


def pivot_table(records: list[dict], ratio=("xla+jit", "legacy+graph")) -> list[str]:
    """Configurations (``backend``/``translate`` + ``compile``) as columns, the throughput
    field in the cells, and ``ratio[0] / ratio[1]``."""
    rate = next(f for f in RATE_FIELDS if f in records[0])
    skip = {rate, "backend", "translate", "compile", "median_ms", "step_ms_median"}
    rows, columns = {}, []
    for record in records:
        column = f"{record.get('backend', record.get('translate'))}+{record['compile']}"
        if record.get("op") == "copy":  # reference: shown beside the translate rows
            record = {**record, "op": "translate"}
        key = tuple((k, v) for k, v in record.items() if k not in skip)
        rows.setdefault(key, {})[column] = record[rate]
        if column not in columns:
            columns.append(column)
    fields = [k for k, _ in next(iter(rows))]
    num, den = ratio
    lines = [
        "| " + " | ".join(fields + columns + [f"{num} / {den}"]) + " |",
        "|" + " --- |" * (len(fields) + len(columns) + 1),
    ]
    for key, cells in rows.items():
        value = cells[num] / cells[den] if num in cells and den in cells else None
        values = [str(v) for _, v in key] + [
            f"{cells[c]:,.0f}" if c in cells else "" for c in columns
        ]
        lines.append("| " + " | ".join(values + [f"{value:.2f}x" if value else ""]) + " |")
    return lines


def spread_table(records: list[dict], columns: list[str], spread: str) -> list[str]:
    """One row per distinct value of ``columns``; one column per value of the field
    ``spread`` names (``field:a,b``), each cell ``a / b`` of that row's record."""
    field, values = spread.split(":", 1)
    shown = values.split(",")
    rows, heads = {}, []
    for record in records:
        key = tuple(record.get(c) for c in columns)
        rows.setdefault(key, {})[record[field]] = " / ".join(cell(record.get(v)) for v in shown)
        if record[field] not in heads:
            heads.append(record[field])
    lines = [
        "| " + " | ".join(columns + [f"{h}: {' / '.join(shown)}" for h in heads]) + " |",
        "|" + " --- |" * (len(columns) + len(heads)),
    ]
    for key, cells in rows.items():
        values_ = [cell(v) for v in key] + [cells.get(h, "") for h in heads]
        lines.append("| " + " | ".join(values_) + " |")
    return lines


def table(spec: str) -> list[str]:
    """The table a marker's ``spec`` names (module docstring)."""
    words = spec.split()
    records = read_records(ROOT / words[0])
    columns, pivot, spread = None, False, None
    for word in words[1:]:
        if word == "pivot":
            pivot = True
        elif word.startswith("spread="):
            spread = word.removeprefix("spread=")
        elif word.startswith("columns="):
            columns = word.removeprefix("columns=").split(",")
        elif word.startswith("where="):
            key, value = word.removeprefix("where=").split(":", 1)
            records = [r for r in records if str(r.get(key)) == value]
        else:
            raise ValueError(f"unknown table option {word!r} in {spec!r}")
    if not records:
        raise ValueError(f"no records for {spec!r}")
    if spread:
        return spread_table(records, columns or [], spread)
    return pivot_table(records) if pivot else flat_table(records, columns)


def render_doc(text: str) -> str:
    """``text`` with every marked table rebuilt from its results file."""
    out, inside = [], False
    for line in text.splitlines():
        if inside:  # the old table and its end marker: replaced
            inside = line != END
            continue
        match = MARKER.match(line)
        out.append(line)
        if match:
            out += table(match["spec"])
            out.append(END)
            inside = True
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="a file of JSON lines, '-' for stdin")
    parser.add_argument("--pivot", action="store_true", help="configurations as columns")
    parser.add_argument("--docs", action="store_true", help="rebuild the documents' tables")
    parser.add_argument("--check", action="store_true", help="with --docs: exit 1 if stale")
    args = parser.parse_args(argv)
    if args.docs:
        stale = []
        for doc in DOCS:
            current = doc.read_text()
            rendered = render_doc(current)
            if rendered != current:
                stale.append(doc)
                if not args.check:
                    doc.write_text(rendered)
        if args.check and stale:
            names = ", ".join(str(doc) for doc in stale)
            print(f"{names} stale: run python benchmarks/table.py --docs", file=sys.stderr)
            return 1
        return 0
    if args.path == "-":
        records = [json.loads(line) for line in sys.stdin if line.startswith("{")]
    else:
        records = read_records(Path(args.path))
    print("\n".join(pivot_table(records) if args.pivot else flat_table(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

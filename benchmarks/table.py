"""Render a benchmark's ``--json`` lines as a Markdown table: ``python benchmarks/table.py FILE``.

Rows are the non-throughput fields, columns the configurations (``backend+compile``
or ``translate+compile``), cells the throughput field.
"""

from __future__ import annotations

import argparse
import json
import sys

RATE_FIELDS = ("images_per_s", "samples_per_s", "patterns_per_s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="file of JSON lines, '-' for stdin")
    parser.add_argument(
        "--ratio",
        nargs=2,
        metavar=("NUM", "DEN"),
        default=("xla+jit", "legacy+graph"),
        help="columns to divide",
    )
    args = parser.parse_args(argv)
    lines = sys.stdin if args.path == "-" else open(args.path)  # noqa: SIM115
    records = [json.loads(line) for line in lines if line.startswith("{")]
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
    num, den = args.ratio
    print("| " + " | ".join(fields + columns + [f"{num} / {den}"]) + " |")
    print("|" + "---|" * (len(fields) + len(columns) + 1))
    for key, cells in rows.items():
        ratio = cells[num] / cells[den] if num in cells and den in cells else None
        values = [str(v) for _, v in key] + [
            f"{cells[c]:,.0f}" if c in cells else "" for c in columns
        ]
        print("| " + " | ".join(values + [f"{ratio:.2f}x" if ratio else ""]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

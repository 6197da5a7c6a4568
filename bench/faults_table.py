"""Render the fault table from results/faults.jsonl.

    python -m bench.faults_table [--file PATH] [--all]

The fault tests (tests/faults/, tests/overload/) append one JSON line per
fault and run; by default the table shows the latest line for each fault,
in the order the faults were first recorded. Columns: requests sent,
failed, refused (overload only: the promised answer, not a failure), p99
latency before and during the fault window, the longest time without a
successful call, and the recovery time (what it measures differs per fault
and is listed under the table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.results import results_path

DEFAULT = results_path("faults.jsonl")
COLUMNS = [("fault", "fault"), ("requests_sent", "requests sent"), ("failed", "failed"),
           ("refused", "refused (RESOURCE_EXHAUSTED)"),
           ("p99_before_ms", "p99 before (ms)"), ("p99_during_fault_ms", "p99 during fault (ms)"),
           ("max_stall_s", "longest stall (s)"), ("recovery_s", "recovery (s)")]


def load(path: Path, latest_only: bool = True) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not latest_only:
        return rows
    latest: dict[str, dict] = {}
    for row in rows:
        latest[row["fault"]] = row
    order = list(dict.fromkeys(r["fault"] for r in rows))
    return [latest[f] for f in order]


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(key)) for key, _ in COLUMNS) + " |")
    lines.append("")
    lines.append("Recovery time, per fault:")
    for row in rows:
        lines.append(f"- {row['fault']}: {row.get('recovery_means', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT, help="JSON lines file (default %(default)s)")
    parser.add_argument("--all", action="store_true", help="every recorded run, not only the latest per fault")
    args = parser.parse_args(argv)
    if not args.file.exists():
        print(f"{args.file} does not exist: run `pytest tests/faults` first", file=sys.stderr)
        return 1
    print(render(load(args.file, latest_only=not args.all)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

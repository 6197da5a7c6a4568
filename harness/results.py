"""Where result files go: `<repo>/results/` (git-ignored), one folder for every
run that leaves figures behind, whether a benchmark (`python -m bench ...`)
or a test that measures as it checks (the fault, overload and chaos suites).

Neither `bench/` nor `tests/` owns it, so a test records its figures without
reaching into the benchmarks' tree, and `bench.faults_table` reads what the
fault suite wrote from the same place. Scripts that take `--out` default to
a path under it.
"""

from __future__ import annotations

from pathlib import Path

from harness.procs import ROOT

RESULTS_DIR = ROOT / "results"


def results_path(name: str) -> Path:
    """`results/<name>`; the folder is created when a file is written, not here."""
    return RESULTS_DIR / name

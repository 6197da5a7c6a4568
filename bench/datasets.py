"""Where the benchmark and evaluation data live, resolved when asked (never at import).

`$SUTRA_BENCH_DATA` if set; else the shared data folder beside the checkout
(`../shared/data`, which holds the full set); else the copies committed in
`bench/data/` (the STS-B test split and the Quora corpus), so a plain clone
can run `make bench` and the quality evaluation.
"""

from __future__ import annotations

from pathlib import Path

# The lookup is shared with the replica's tuner and calibration (which must not import bench).
from mlbase.data_files import (BUNDLED, CORPUS_FILE, DATA_ENV, ROOT, data_dir, data_file,  # noqa: F401
                               distinct_lines)


def corpus_lines(folder: Path | None = None, name: str = CORPUS_FILE) -> list[str]:
    path = (folder or data_dir()) / name
    if not path.exists():
        raise SystemExit(f"benchmark corpus {path} not found (set {DATA_ENV} to a data folder)")
    return distinct_lines(path)

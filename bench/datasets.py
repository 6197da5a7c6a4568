"""Where the benchmark and evaluation data live, resolved when asked (never at import).

`$SUTRA_BENCH_DATA` if set; else the shared data folder beside the checkout
(`../shared/data`, which holds the full set); else the copies committed in
`bench/data/` (the STS-B test split and the Quora corpus), so a plain clone
can run `make bench` and the quality evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "SUTRA_BENCH_DATA"
BUNDLED = ROOT / "bench" / "data"


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(DATA_ENV):
        return Path(env[DATA_ENV])
    shared = ROOT.parent / "shared" / "data"
    return shared if (shared / "corpus.txt").exists() else BUNDLED


def data_file(name: str, env: Mapping[str, str] | None = None) -> Path:
    return data_dir(env) / name


CORPUS_FILE = "corpus.txt"


def distinct_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of `path`, first occurrence only, in file order."""
    seen: set[str] = set()
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and line not in seen:
            seen.add(line)
            out.append(line)
    return out


def corpus_lines(folder: Path | None = None, name: str = CORPUS_FILE) -> list[str]:
    path = (folder or data_dir()) / name
    if not path.exists():
        raise SystemExit(f"benchmark corpus {path} not found (set {DATA_ENV} to a data folder)")
    return distinct_lines(path)

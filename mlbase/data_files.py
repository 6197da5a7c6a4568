"""Where evaluation and calibration text lives, resolved when asked (never at import).

`$SUTRA_BENCH_DATA` if set; else the shared data folder beside the checkout
(`../shared/data`, which holds the full set: STS-B train/dev/test, Quora, AG
News); else the copies committed in `bench/data/` (the STS-B test split and
the Quora corpus), so a plain clone, and the image, can still evaluate and
calibrate. The replica's tuner and static-int8 calibration need these files
without importing the benchmarks, so the lookup lives here and `bench.datasets`
re-exports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "SUTRA_BENCH_DATA"
BUNDLED = ROOT / "bench" / "data"
CORPUS_FILE = "corpus.txt"
STS_TEST_FILE = "sts-test.tsv"
# STS-B train split, one sentence per line (shared/data only): text for calibration.
STS_TRAIN_SENTENCES_FILE = "stsb-train-sentences.txt"


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(DATA_ENV):
        return Path(env[DATA_ENV])
    shared = ROOT.parent / "shared" / "data"
    return shared if (shared / CORPUS_FILE).exists() else BUNDLED


def data_file(name: str, env: Mapping[str, str] | None = None) -> Path:
    return data_dir(env) / name


def first_existing(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> Path:
    """The first of `names` present in the data folder (or the bundled copies); the last name's
    path if none is (so the caller's error names a file)."""
    for folder in (data_dir(env), BUNDLED):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return data_dir(env) / names[-1]


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

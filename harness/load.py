"""Steady client load with a record of every call, and the figures the fault
table reports.

`Load` runs a few threads, each sending Embed calls of fresh texts (so every
call reaches a replica unless a test says otherwise) back to back, and keeps
(start, end, status, cache hits) for each call. The figures are taken from
those records afterwards, so measuring adds nothing to the calls themselves.
The one steady-load driver of the project: tests, bench.rollout (texts from a
working set) and tools/containers/compose_check (its own TLS stub, a bounded
number of calls) all run it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from harness.results import results_path
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

FAULTS = results_path("faults.jsonl")


@dataclass(frozen=True)
class Call:
    start: float
    end: float
    code: str  # "OK" or a status code name; "BAD_REPLY" for a reply of the wrong shape
    hits: int = 0  # texts of the request answered from L1 or L2

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.code == "OK"


class Load:
    """`threads` closed-loop clients; each call embeds `texts` fresh texts at width `width` (0: the native one).

    `make_texts(thread, n)` replaces the fresh texts (the `n`th call of thread
    `thread`, n from 1); `stub` replaces the plaintext channel to `address`
    (a caller's own, e.g. with TLS: it is not closed here); with `max_calls`
    the threads stop after that many calls in all. A failure's "CODE: details"
    goes to `details`."""

    def __init__(self, address: str | None = None, threads: int = 4, texts: int = 2, timeout: float = 30.0,
                 width: int = 64, *, stub: pb_grpc.EmbeddingServiceStub | None = None,
                 make_texts: Callable[[int, int], list[str]] | None = None, max_calls: int | None = None) -> None:
        self.channel = grpc.insecure_channel(address) if stub is None else None
        self.stub = stub or pb_grpc.EmbeddingServiceStub(self.channel)
        self.texts = texts
        self.make_texts = make_texts or self._fresh_texts
        self.timeout = timeout
        self.width = width
        self.max_calls = max_calls
        self.calls: list[Call] = []
        self.details: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _fresh_texts(self, index: int, n: int) -> list[str]:
        return [f"fault load {uuid.uuid4().hex} {index} {n} {k}" for k in range(self.texts)]

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            if self.max_calls is not None:
                with self._lock:
                    if len(self.calls) >= self.max_calls:
                        return
            n += 1
            texts = self.make_texts(index, n)
            start = time.monotonic()
            detail, hits = "", 0
            try:
                reply = self.stub.Embed(pb.EmbedRequest(inputs=texts, dimensions=self.width), timeout=self.timeout)
                good = len(reply.embeddings) == len(texts) and all(
                    len(e.values) == self.width if self.width else len(e.values) > 0 for e in reply.embeddings)
                code = "OK" if good else "BAD_REPLY"
                hits = reply.usage.l1_hits + reply.usage.l2_hits
            except grpc.RpcError as exc:
                code, detail = exc.code().name, exc.details() or ""
            call = Call(start, time.monotonic(), code, hits)
            with self._lock:
                self.calls.append(call)
                if code != "OK":
                    self.details.append(f"{code}: {detail}")

    def __enter__(self) -> "Load":
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(self.timeout + 30)
        if self.channel is not None:
            self.channel.close()

    @property
    def ok(self) -> int:
        return sum(1 for c in self.calls if c.ok)

    def failures(self) -> list[Call]:
        return [c for c in self.calls if not c.ok]

    def wait_for(self, count: int, timeout: float = 120.0) -> None:
        """Block until `count` more calls have succeeded."""
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.ok >= target, (f"load stalled at {self.ok} successes (wanted {target}); "
                                   f"failures: {self.details[:5]}")


def p(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def overlapping(calls: list[Call], start: float, end: float) -> list[Call]:
    """Calls in flight at some moment of [start, end]."""
    return [c for c in calls if c.start <= end and c.end >= start]


def max_stall(calls: list[Call], start: float, end: float) -> float:
    """Longest time within [start, end] in which no call succeeded: how long clients saw no progress."""
    marks = [start] + sorted(c.end for c in calls if c.ok and start <= c.end <= end) + [end]
    return max(b - a for a, b in zip(marks, marks[1:]))


def measure(fault: str, calls: list[Call], fault_start: float, fault_end: float, *, recovery_s: float | None,
            recovery_means: str, **extra) -> dict:
    """The table's row for one fault: totals over the run, p99 over the fault window."""
    before = [c.latency for c in calls if c.ok and c.end < fault_start]
    during = overlapping(calls, fault_start, fault_end)
    row = {
        "fault": fault,
        "requests_sent": len(calls),
        "failed": sum(1 for c in calls if not c.ok),
        "failed_codes": sorted({c.code for c in calls if not c.ok}),
        "p50_before_ms": _ms(p(before, 50)),
        "p99_before_ms": _ms(p(before, 99)),
        "requests_during_fault": len(during),
        "p99_during_fault_ms": _ms(p([c.latency for c in during], 99)),
        "max_during_fault_ms": _ms(max((c.latency for c in during), default=None)),
        "fault_window_s": round(fault_end - fault_start, 3),
        "max_stall_s": round(max_stall(calls, fault_start, fault_end), 3),
        "recovery_s": None if recovery_s is None else round(recovery_s, 3),
        "recovery_means": recovery_means,
        **extra,
    }
    record(row)
    return row


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def record(row: dict, path: Path = FAULTS) -> None:
    """Append one JSON line (with the time) to results/faults.jsonl and print it."""
    row = {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **row}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))

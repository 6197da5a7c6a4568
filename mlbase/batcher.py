"""Dynamic batching: many concurrent requests, one inference thread.

Requests hand in already tokenized texts. A single worker thread takes
everything pending as one *generation* (after a short wait window when it was
idle, so that requests arriving together share batches), sorts the
generation by token length and cuts it into the micro-batches that cost
least (padded tokens plus a fixed cost per forward pass), bounded by a number
of texts and by padded tokens (texts x longest text), so that short texts
are not padded to the length of long ones. Every text of a generation
is done before the next generation starts, so no request waits behind a
stream of later ones.

The queue is bounded in texts: `reserve` refuses at once (Overloaded ->
RESOURCE_EXHAUSTED) when admitting a request would exceed it. A request
whose caller went away (cancelled, deadline) is skipped by the worker: its
future's done-callback marks it abandoned, however the caller ended.

A small request (`BatchLimits.inline_tokens`) that finds the replica idle,
nothing running, nothing queued and no pass ended in the last
`inline_idle_ms`, is computed on its caller's event loop instead: the lone
query of interactive traffic then skips the two thread hand-offs (to the
inference thread and back). The idle gap is what tells a lone caller from a
busy replica: under load the next request comes within a fraction of a
millisecond of the last pass (it was waiting), and it goes to the thread,
where requests batch. One flag (`_busy`) makes the thread and an inline pass
take turns, so there is still one forward pass at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from common import tracing
from common.errors import Overloaded, Unavailable
from common.histogram import COUNT_BUCKETS, TOKEN_BUCKETS, Histogram
from mlbase.backends.tokens import Encoded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 64
    # Bound on padded tokens per micro-batch: texts x longest text.
    max_batch_tokens: int = 8192
    # How long an idle worker waits for more requests before starting. 0: it never waits; texts
    # that arrive while a batch computes form the next batch (adaptive batching).
    wait_ms: float = 0.0
    # Texts admitted (queued or being computed) at once.
    max_queue: int = 8192
    # Fixed cost of one forward pass, in padded tokens: trades fewer batches against less padding.
    overhead_tokens: int = 32
    # A request of at most this many padded tokens (texts x longest) that finds the replica idle
    # (nothing running, nothing queued, no pass ended within inline_idle_ms) is computed on the
    # caller's event loop: no hand-off to the thread and back. 0: every request goes to the thread.
    inline_tokens: int = 64
    # A lone caller's next text comes milliseconds after the last pass ended (its answer travels
    # back, the next request comes in); one waiting behind a busy replica comes within a fraction
    # of a millisecond, and should batch on the thread.
    inline_idle_ms: float = 1.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_tokens < 1 or self.max_queue < 1:
            raise ValueError("batch size, batch tokens and queue size must be at least 1")
        if self.wait_ms < 0 or self.overhead_tokens < 0 or self.inline_tokens < 0 or self.inline_idle_ms < 0:
            raise ValueError("wait window, batch overhead and the inline bounds must not be negative")


@dataclass(eq=False)
class _Request:
    out: np.ndarray
    remaining: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    # Set by the event loop on cancellation, by the worker on failure; read by the worker.
    abandoned: bool = False
    queued: float = field(default_factory=time.monotonic)
    # Tracing on only: the forward passes that computed its texts, appended by the worker as
    # (started, ended, its texts, batch texts), monotonic; the caller turns them into spans.
    passes: list[tuple[float, float, int, int]] | None = None


@dataclass(slots=True)
class _Item:
    encoded: Encoded
    request: _Request
    row: int


@dataclass
class BatchStats:
    """Counters and histograms, written by the worker thread only; /metrics renders them
    (mlbase/metrics.py) from the endpoint's thread."""

    batches: int = 0
    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    generations: int = 0
    failed_batches: int = 0
    inline_batches: int = 0  # forward passes completed on the caller's event loop (BatchLimits.inline_tokens)
    sizes: list[int] = field(default_factory=list)
    batch_texts: Histogram = field(default_factory=lambda: Histogram(COUNT_BUCKETS))
    batch_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))  # padding included
    queue_wait: Histogram = field(default_factory=Histogram)  # seconds, per text: submitted -> its batch starts
    inference: Histogram = field(default_factory=Histogram)  # seconds per forward pass
    # CPU seconds of the inference thread in forward passes (time.thread_time): beside the wall time
    # above it shows contention, and with one thread per replica it is the model's whole CPU cost.
    inference_cpu: float = 0.0


def plan_batches(items: Sequence[_Item], limits: BatchLimits) -> list[list[_Item]]:
    """Sort by token length, longest first (ties keep arrival order), and cut
    the sorted run into micro-batches that minimise estimated compute.

    A batch of n texts whose longest has L tokens costs about
    `overhead_tokens + n * L` (every text is padded to L; each forward pass
    has a fixed cost). Over contiguous ranges of the sorted run that cost is
    minimised exactly by dynamic programming, subject to at most
    `max_batch_size` texts and `max_batch_tokens` padded tokens per batch (a
    single text over the token budget still forms a batch of its own). On
    short-text workloads this pads 10-25% less than cutting every
    `max_batch_size` texts, for well under 1% of the inference time.
    """
    ordered = sorted(items, key=lambda it: -it.encoded.length)
    lengths = [it.encoded.length for it in ordered]
    n = len(ordered)
    size_cap, token_cap, overhead = limits.max_batch_size, limits.max_batch_tokens, limits.overhead_tokens
    best = [0] * (n + 1)  # best[k]: least cost of the first k texts
    start = [0] * (n + 1)  # start[k]: where the last batch of that plan begins
    for k in range(1, n + 1):
        best_cost, best_start = None, k - 1
        for s in range(k - 1, max(0, k - size_cap) - 1, -1):
            padded = (k - s) * lengths[s]
            if padded > token_cap and k - s > 1:
                break  # longer ranges only pad more
            cost = best[s] + overhead + padded
            if best_cost is None or cost <= best_cost:  # ties: the larger batch
                best_cost, best_start = cost, s
        best[k], start[k] = best_cost, best_start
    batches: list[list[_Item]] = []
    k = n
    while k > 0:
        batches.append(ordered[start[k]:k])
        k = start[k]
    batches.reverse()
    return batches


def _resolve_all(requests: list[_Request]) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_result(request.out)


def _abandon_if_cancelled(request: _Request) -> Callable[[asyncio.Future], None]:
    def callback(future: asyncio.Future) -> None:
        if future.cancelled():
            request.abandoned = True
    return callback


def _fail(request: _Request, exc: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(exc)


def _note_pass(batch: list[_Item], started: float, ended: float) -> None:
    """Worker thread: tell each traced request of `batch` that this forward pass computed texts of it."""
    counts: dict[_Request, int] = {}
    for it in batch:
        if it.request.passes is not None:
            counts[it.request] = counts.get(it.request, 0) + 1
    for request, texts in counts.items():
        request.passes.append((started, ended, texts, len(batch)))


def _trace(request: _Request, texts: int) -> None:
    """Event loop, as the request ends: its queue wait and forward passes as spans of the current
    (the Embed call's) trace, with the times the worker thread measured."""
    passes = list(request.passes)
    first = passes[0][0] if passes else time.monotonic()
    tracing.record("replica.queue", tracing.epoch_ns(request.queued), tracing.epoch_ns(first),
                   attributes={"sutra.texts": texts})
    for started, ended, own, size in passes:
        tracing.record("replica.inference", tracing.epoch_ns(started), tracing.epoch_ns(ended),
                       attributes={"sutra.texts": own, "sutra.batch_texts": size})


class InferenceBatcher:
    """Owns the inference thread; `embed` is the backend's forward pass."""

    def __init__(self, embed: Callable[[Sequence[Encoded]], np.ndarray], width: int, limits: BatchLimits) -> None:
        self._embed = embed
        self._width = width
        self.limits = limits
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        # A forward pass is running (on the inference thread, or inline on an event loop); under _cond.
        self._busy = False
        self._last_pass_end = float("-inf")  # monotonic; under _cond
        self._closing = False
        self._admitted = 0  # event-loop thread only
        self._thread: threading.Thread | None = None

    @property
    def admitted(self) -> int:
        """Texts queued or being computed."""
        return self._admitted

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlbase-inference", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def reserve(self, count: int) -> Iterator[None]:
        """Admit `count` texts for the duration of the block, or refuse at once."""
        if self._closing:
            raise Unavailable("replica is shutting down; retry on another replica")
        if self._admitted + count > self.limits.max_queue:
            raise Overloaded(f"queue full: {self._admitted} texts queued, {count} more would exceed "
                             f"--max-queue {self.limits.max_queue}; retry on another replica")
        self._admitted += count
        try:
            yield
        finally:
            self._admitted -= count

    async def submit(self, items: Sequence[Encoded]) -> np.ndarray:
        """Embed tokenized texts; float32 (len(items), width) in the given order."""
        loop = asyncio.get_running_loop()
        request = _Request(np.empty((len(items), self._width), dtype=np.float32), len(items),
                           loop, loop.create_future(), passes=[] if tracing.enabled() else None)
        if not items:
            return request.out
        if (len(items) * max(e.length for e in items) <= self.limits.inline_tokens
                and len(items) <= self.limits.max_batch_size and self._claim()):
            return self._inline(request, items)
        # However the caller ends (cancelled, deadline, answered), the worker learns it from the
        # future itself: no path through this coroutine has to remember to say so.
        request.future.add_done_callback(_abandon_if_cancelled(request))
        with self._cond:
            if self._closing:
                raise Unavailable("replica is shutting down; retry on another replica")
            self._pending.extend(_Item(e, request, row) for row, e in enumerate(items))
            self._cond.notify()
        try:
            return await request.future
        finally:
            if request.passes is not None:
                _trace(request, len(items))

    def _claim(self) -> bool:
        """Take the right to run the next forward pass here, if nothing runs, nothing waits and the
        replica has been idle for `inline_idle_ms`."""
        with self._cond:
            if self._busy or self._pending or self._closing:
                return False
            if time.monotonic() - self._last_pass_end < self.limits.inline_idle_ms / 1000:
                return False
            self._busy = True
            return True

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._last_pass_end = time.monotonic()
            if self._pending or self._closing:
                self._cond.notify()

    def _inline(self, request: _Request, items: Sequence[Encoded]) -> np.ndarray:
        """A small request on an idle replica, computed here on the event loop: the loop is held for
        one short forward pass, and the two thread hand-offs (to the inference thread and back),
        each a wake-up and a context switch, are saved. Requests arriving meanwhile queue for the
        inference thread as usual."""
        try:
            request.out[:] = self._forward([_Item(e, request, row) for row, e in enumerate(items)])
            self.stats.inline_batches += 1
        finally:
            self._release()
            if request.passes is not None:
                _trace(request, len(items))
        return request.out

    async def close(self) -> None:
        """Stop taking requests, finish what is queued, join the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _take_generation(self) -> list[_Item] | None:
        with self._cond:
            while self._busy or (not self._pending and not self._closing):
                self._cond.wait()
            if not self._pending:
                return None  # closing and drained
            if self.limits.wait_ms > 0 and len(self._pending) < self.limits.max_batch_size:
                deadline = time.monotonic() + self.limits.wait_ms / 1000
                while len(self._pending) < self.limits.max_batch_size and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            generation, self._pending = self._pending, []
            self._busy = True
            return generation

    def _run(self) -> None:
        while (generation := self._take_generation()) is not None:
            try:
                self.stats.generations += 1
                for batch in plan_batches([it for it in generation if not it.request.abandoned], self.limits):
                    batch = [it for it in batch if not it.request.abandoned]
                    if batch:
                        self._run_batch(batch)
            finally:
                self._release()
        log.debug("inference thread done")

    def _run_batch(self, batch: list[_Item]) -> None:
        try:
            vectors = self._forward(batch)
        except Exception as exc:  # the backend failed: fail these requests, keep serving
            for request in {id(it.request): it.request for it in batch}.values():
                request.abandoned = True
                request.loop.call_soon_threadsafe(_fail, request, exc)
            return
        finished: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
        for k, it in enumerate(batch):
            request = it.request
            request.out[it.row] = vectors[k]
            request.remaining -= 1
            if request.remaining == 0:
                finished.setdefault(request.loop, []).append(request)
        # One wake-up per loop for the whole batch: each call_soon_threadsafe writes to the loop's
        # self-pipe, which cost about 8% of a replica's CPU with one wake-up per finished request.
        for loop, requests in finished.items():
            loop.call_soon_threadsafe(_resolve_all, requests)

    def _forward(self, batch: list[_Item]) -> np.ndarray:
        """One forward pass, timed and counted; a backend failure is logged, counted and raised."""
        stats = self.stats
        started = time.monotonic()
        for it in batch:
            stats.queue_wait.observe(started - it.request.queued)
        cpu = time.thread_time()
        try:
            vectors = self._embed([it.encoded for it in batch])
        except Exception:
            stats.failed_batches += 1
            log.exception("inference failed for a batch of %d texts", len(batch))
            raise
        ended = time.monotonic()
        stats.inference_cpu += time.thread_time() - cpu
        stats.inference.observe(ended - started)
        if tracing.enabled():
            _note_pass(batch, started, ended)
        padded = len(batch) * max(it.encoded.length for it in batch)
        stats.batches += 1
        stats.texts += len(batch)
        stats.tokens += sum(it.encoded.length for it in batch)
        stats.padded_tokens += padded
        stats.batch_texts.observe(len(batch))
        stats.batch_tokens.observe(padded)
        stats.sizes.append(len(batch))
        if len(stats.sizes) > 1024:
            del stats.sizes[:512]
        return vectors

"""Every text on its way to a model replica, owned in one place.

Callers never touch in-flight state. `InFlight.request` (or `join`, for a
text already in flight) hands back one *waiter* future per text; a caller
only awaits its waiters or cancels them. Everything else (the key table,
the queue, the batches and their slots) changes in synchronous callbacks on
the event loop, so no cancellation can interrupt a change half-way:

- a waiter's done-callback detaches it from its flight: a queued flight
  left without waiters is dropped, and a running batch left without any
  waiter is cancelled, so abandoned work stops;
- a batch task's done-callback settles every waiter of the batch, forgets
  its flights, frees its slot and dispatches the next batch.

Release therefore happens however a task ends: finished, failed, cancelled
while running, or cancelled before its first step, which never runs a
coroutine's `finally` (the wedge of issue 10: eight such leaks stopped every
cache miss for good). A batch also has a hard time bound, so a peer that
hangs without failing holds a slot for at most its timeout.

Like text-embeddings-inference's queue, one owner decides what runs; unlike
it, there is no owner task to die: dispatch (`_pump`) is a plain function
called when work arrives, when a batch ends and when a batching window
closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import SpanKind

from common import tracing
from common.errors import Overloaded, Unavailable

log = logging.getLogger(__name__)

# compute(texts, timeout_seconds) -> (full vectors (n, D), set of truncated positions)
Compute = Callable[[list[str], float], Awaitable[tuple[np.ndarray, set[int]]]]
# on_done(keys, full vectors, truncated positions): fill the caches, once per computed batch.
OnDone = Callable[[list[bytes], np.ndarray, set[int]], None]

# A batch may overrun its callers' latest deadline by this much before it is cut off: the
# compute function enforces the deadline itself; this only bounds a peer that ignores it.
_HARD_BOUND_SLACK_S = 1.0
# A running batch with this long left before it gives up is joined whatever the newcomer's
# deadline; one closer to its cut-off is joined only by callers it covers (Batch.covers).
JOIN_MARGIN_S = 1.0


@dataclass(eq=False)
class Flight:
    """One text being computed; `waiters` maps each waiter future to its absolute deadline."""

    key: bytes
    text: str
    queued_at: float
    waiters: dict[asyncio.Future, float | None] = field(default_factory=dict)
    batch: "Batch | None" = None
    # Trace contexts of the callers that waited on it (tracing on only): its batch's spans descend
    # from the first and link the others.
    callers: list = field(default_factory=list)


@dataclass(eq=False)
class Batch:
    flights: list[Flight]
    task: asyncio.Task | None = None
    abandoned: bool = False
    # Absolute time (time.monotonic) at which the batch gives up, fixed at launch from the
    # latest deadline of its waiters then; None = a waiter had none (the default timeout).
    deadline: float | None = None

    def live(self) -> bool:
        return any(f.waiters for f in self.flights)

    def fix_deadline(self) -> None:
        deadlines = [d for f in self.flights for d in f.waiters.values()]
        self.deadline = None if not deadlines or any(d is None for d in deadlines) else max(deadlines)

    def timeout(self, default: float) -> float:
        """Seconds the batch may take: until its deadline, or `default` if it has none."""
        return default if self.deadline is None else self.deadline - time.monotonic()

    def covers(self, deadline: float | None) -> bool:
        """Whether a caller with `deadline` can wait on this batch without being cut short by it:
        a patient follower must not inherit an impatient leader's cut-off (10 ms). A batch with
        at least JOIN_MARGIN_S left is joined anyway: it all but surely ends before that, and
        callers whose deadlines differ by a few ms must keep sharing one computation."""
        if self.deadline is None or (deadline is not None and deadline <= self.deadline):
            return True
        return self.deadline - time.monotonic() >= JOIN_MARGIN_S


class InFlight:
    def __init__(self, compute: Compute, on_done: OnDone, *, max_batch: int, window_s: float,
                 concurrency: int, default_timeout_s: float, max_pending: int) -> None:
        self._compute = compute
        self._on_done = on_done
        self._max_batch = max_batch
        self._window_s = window_s
        self.concurrency = concurrency
        self._default_timeout_s = default_timeout_s
        self._max_pending = max_pending
        self._table: dict[bytes, Flight] = {}
        self._queue: dict[Flight, None] = {}  # insertion-ordered set: O(1) removal of a dropped flight
        self._batches: set[Batch] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        # Monotonic time of the last sign of progress: a batch ending, or work arriving when idle.
        self.last_progress = time.monotonic()

    # -- what /metrics and the health watchdog read ---------------------------------------------
    @property
    def pending(self) -> int:
        """Texts queued or being computed that a new caller could join."""
        return len(self._table)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Batches in flight to ML-base (including ones cancelled but not yet finished)."""
        return len(self._batches)

    @property
    def free_slots(self) -> int:
        return self.concurrency - len(self._batches)

    @property
    def idle(self) -> bool:
        return not self._table and not self._queue and not self._batches

    def stalled_for(self) -> float:
        """Seconds that work has been pending without any batch ending (0 when idle)."""
        if self.idle:
            return 0.0
        return time.monotonic() - self.last_progress

    # -- the caller's side: wait or detach ------------------------------------------------------
    def _joinable(self, key: bytes, deadline: float | None) -> Flight | None:
        """The flight of `key` a caller with `deadline` can wait on: queued (its batch's deadline is
        fixed at launch, with this caller counted), or running with a deadline that covers it."""
        flight = self._table.get(key)
        if flight is None or (flight.batch is not None and not flight.batch.covers(deadline)):
            return None
        return flight

    def join(self, key: bytes, deadline: float | None) -> asyncio.Future | None:
        """A waiter on the computation of `key` already in flight, or None if there is none that
        can serve a caller with `deadline`."""
        flight = self._joinable(key, deadline)
        return None if flight is None else self._attach(flight, deadline)

    def request(self, keys: Sequence[bytes], texts: Sequence[str],
                deadline: float | None) -> tuple[list[asyncio.Future], int]:
        """One waiter per key, joining a flight in progress or queueing a new one; and how many
        joined a flight already in progress.

        Each waiter resolves to (full vector, truncated), or fails with the
        batch's error; cancelling a waiter detaches it. Raises Overloaded
        (nothing joined) when the new texts would exceed `max_pending`.
        """
        if self._closed:
            raise Unavailable("the frontend is shutting down; retry on another instance")
        new = sum(1 for k in set(keys) if self._joinable(k, deadline) is None)
        if new and len(self._table) + new > self._max_pending:
            raise Overloaded(f"too much pending work ({len(self._table)} texts waiting for the model, "
                             f"limit {self._max_pending}); retry with backoff")
        if self.idle:
            self.last_progress = time.monotonic()
        waiters = []
        joined = 0
        for key, text in zip(keys, texts):
            flight = self._joinable(key, deadline)
            if flight is None:  # none in flight, or one whose batch gives up before this caller would
                flight = self._table[key] = Flight(key, text, asyncio.get_running_loop().time())
                self._queue[flight] = None
            else:
                joined += 1
            waiters.append(self._attach(flight, deadline))
        self._pump()
        return waiters, joined

    def _attach(self, flight: Flight, deadline: float | None) -> asyncio.Future:
        waiter = asyncio.get_running_loop().create_future()
        flight.waiters[waiter] = deadline
        caller = tracing.current()
        if caller is not None:
            flight.callers.append(caller)
        waiter.add_done_callback(functools.partial(self._detach, flight))
        return waiter

    def _detach(self, flight: Flight, waiter: asyncio.Future) -> None:
        flight.waiters.pop(waiter, None)
        if flight.waiters:
            return
        batch = flight.batch
        if batch is None:
            if flight in self._queue:  # still queued: nobody wants it any more
                del self._queue[flight]
                self._forget(flight)
        elif not batch.abandoned and not batch.live() and batch.task is not None and not batch.task.done():
            batch.abandoned = True
            for f in batch.flights:  # a newcomer for one of these texts starts a fresh flight
                self._forget(f)
            batch.task.cancel()

    def _forget(self, flight: Flight) -> None:
        if self._table.get(flight.key) is flight:
            del self._table[flight.key]

    # -- the owner's side: dispatch and settle --------------------------------------------------
    def _pump(self) -> None:
        """Start batches while there is queued work and a free slot; called on every change.

        Adaptive batching: with nothing in flight a batch starts at once (a lone query does not pay
        the window); while batches run, a part-filled batch waits up to the window for company,
        since ML-base is busy anyway and fewer, fuller batches cost it less."""
        loop = asyncio.get_running_loop()
        while self._queue and len(self._batches) < self.concurrency and not self._closed:
            if self._batches and len(self._queue) < self._max_batch and self._window_s > 0:
                due = next(iter(self._queue)).queued_at + self._window_s
                if loop.time() < due:
                    if self._timer is None:
                        self._timer = loop.call_at(due, self._window_closed)
                    return
            flights = []
            while self._queue and len(flights) < self._max_batch:
                flight = next(iter(self._queue))
                del self._queue[flight]
                if flight.waiters:
                    flights.append(flight)
                else:
                    self._forget(flight)
            if flights:
                self._launch(flights)

    def _window_closed(self) -> None:
        self._timer = None
        self._pump()

    def _launch(self, flights: list[Flight]) -> None:
        batch = Batch(flights)
        for flight in flights:
            flight.batch = batch
        batch.fix_deadline()
        timeout = batch.timeout(self._default_timeout_s)
        loop = asyncio.get_running_loop()
        callers = tracing.distinct(c for f in flights for c in f.callers) if tracing.enabled() else None
        if callers:
            tracing.record("inflight.queue", tracing.epoch_ns(min(f.queued_at for f in flights)), time.time_ns(),
                           attributes={"sutra.texts": len(flights)}, callers=callers)
        batch.task = loop.create_task(self._bounded([f.text for f in flights], timeout, callers), name="mlbase-batch")
        self._batches.add(batch)
        batch.task.add_done_callback(functools.partial(self._settle, batch))

    async def _bounded(self, texts: list[str], timeout: float, callers: list | None) -> tuple[np.ndarray, set[int]]:
        """The compute call, cut off past its time; with tracing on, inside the batch's ML-base span
        (which the call's metadata carries to the replica), in the trace of the first of `callers`."""
        with tracing.span("mlbase.embed", kind=SpanKind.CLIENT, attributes={"sutra.texts": len(texts)},
                          callers=callers):
            # In this task, not wait_for's inner one: an error raised as the batch is cancelled is
            # then the task's own, never a lost "exception was never retrieved".
            async with asyncio.timeout(max(0.0, timeout) + _HARD_BOUND_SLACK_S):
                return await self._compute(texts, timeout)

    def _settle(self, batch: Batch, task: asyncio.Task) -> None:
        """The batch ended, however: settle its waiters, forget its flights, free its slot."""
        self._batches.discard(batch)
        self.last_progress = time.monotonic()
        for flight in batch.flights:
            self._forget(flight)
        outcome: BaseException | tuple[np.ndarray, set[int]]
        if task.cancelled():
            outcome = Unavailable("the computation was cancelled (frontend shutting down); retry")
        elif task.exception() is not None:
            exc = task.exception()
            outcome = (Unavailable(f"no model replica answered within {_HARD_BOUND_SLACK_S:g}s past the deadline")
                       if isinstance(exc, asyncio.TimeoutError) else exc)
        else:
            outcome = task.result()
        try:
            if isinstance(outcome, BaseException):
                _fail(batch.flights, outcome)
            else:
                full, truncated = outcome
                for i, flight in enumerate(batch.flights):
                    for waiter in list(flight.waiters):
                        if not waiter.done():
                            waiter.set_result((full[i], i in truncated))
                self._on_done([f.key for f in batch.flights], full, truncated)
        except Exception:  # a callback raising would otherwise leave waiters unsettled for good
            log.exception("settling a batch failed")
            _fail(batch.flights, Unavailable("internal error while finishing a batch; retry"))
        finally:
            self._pump()

    async def close(self, reason: Exception | None = None) -> None:
        """Stop dispatching; fail queued work and cancel running batches (their waiters fail, with
        `reason` when given: the engine retires a model's table with FingerprintChanged)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if reason is not None:
            _fail([f for b in self._batches for f in b.flights], reason)
        _fail(list(self._queue), reason or Unavailable("the frontend is shutting down; retry on another instance"))
        for flight in list(self._queue):
            self._forget(flight)
        self._queue.clear()
        tasks = [b.task for b in self._batches if b.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def check(self) -> list[str]:
        """Broken invariants, for tests: every known flight is queued or in a running batch."""
        problems = []
        running = {id(f) for b in self._batches for f in b.flights}
        for key, flight in self._table.items():
            if flight not in self._queue and id(flight) not in running:
                problems.append(f"flight {key.hex()} is neither queued nor running")
        for flight in self._queue:
            if self._table.get(flight.key) is not flight:
                problems.append(f"queued flight {flight.key.hex()} is not in the table")
        if len(self._batches) > self.concurrency:
            problems.append(f"{len(self._batches)} batches running, limit {self.concurrency}")
        if self._queue and len(self._batches) < self.concurrency and self._timer is None and not self._closed:
            problems.append("work is queued, a slot is free, and nothing will dispatch it")
        return problems


def _fail(flights: Sequence[Flight], exc: BaseException) -> None:
    """Settle every waiter of `flights` not yet settled with `exc`."""
    for flight in flights:
        for waiter in list(flight.waiters):
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: its caller may have moved on

"""Collects cache misses from concurrent requests into batches for ML-base.

Flights are queued; one loop task takes up to `max_batch` of them after a
short window (so misses from requests arriving together share a batch) and
runs each batch as its own task, at most `concurrency` at a time. A batch's
timeout is the latest deadline among the callers waiting on it, so no
caller's work is cut short by another's. Results settle every flight's
future and are handed to `on_done` (fill L1, queue the L2 write-back) once,
whatever the number of waiters.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from embedding.singleflight import Batch, Flight, SingleFlight

log = logging.getLogger(__name__)

# compute(texts, timeout_seconds) -> (full vectors (n, D), set of truncated positions)
Compute = Callable[[list[str], float], Awaitable[tuple[np.ndarray, set[int]]]]
OnDone = Callable[[list[Flight], np.ndarray, set[int]], None]


class Batcher:
    def __init__(self, table: SingleFlight, compute: Compute, on_done: OnDone, *, max_batch: int,
                 window_s: float, concurrency: int, default_timeout_s: float) -> None:
        self._table = table
        self._compute = compute
        self._on_done = on_done
        self._max_batch = max_batch
        self._window_s = window_s
        self._slots = asyncio.Semaphore(concurrency)
        self._default_timeout_s = default_timeout_s
        self._queue: deque[Flight] = deque()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, flight: Flight) -> None:
        self._queue.append(flight)
        self._wake.set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Stop taking work; cancel running batches and fail whatever is still queued."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            flight = self._queue.popleft()
            _settle_error(flight, asyncio.CancelledError())
            self._table.finish(flight)

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._run_batch(batch), name="mlbase-batch")
            batch.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _next_batch(self) -> Batch:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if len(self._queue) < self._max_batch and self._window_s > 0:
                await asyncio.sleep(self._window_s)
            flights: list[Flight] = []
            while self._queue and len(flights) < self._max_batch:
                flight = self._queue.popleft()
                if flight.waiters <= 0:  # every caller left before it was sent
                    _settle_error(flight, asyncio.CancelledError())
                    self._table.finish(flight)
                    continue
                flights.append(flight)
            if flights:
                batch = Batch(flights)
                for flight in flights:
                    flight.batch = batch
                return batch

    async def _run_batch(self, batch: Batch) -> None:
        flights = batch.flights
        try:
            timeout = batch.timeout(self._default_timeout_s)
            full, truncated = await self._compute([f.text for f in flights], timeout)
            for i, flight in enumerate(flights):
                if not flight.future.done():
                    flight.future.set_result((full[i], i in truncated))
            try:
                self._on_done(flights, full, truncated)
            except Exception:
                log.exception("filling the caches after a batch failed")
        except asyncio.CancelledError as exc:
            for flight in flights:
                _settle_error(flight, exc)
            raise
        except Exception as exc:  # noqa: BLE001 - every waiter gets the batch's error
            for flight in flights:
                _settle_error(flight, exc)
        finally:
            for flight in flights:
                self._table.finish(flight)
            self._slots.release()


def _settle_error(flight: Flight, exc: BaseException) -> None:
    fut = flight.future
    if fut.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        fut.cancel()
    else:
        fut.set_exception(exc)
        fut.exception()  # mark retrieved: a flight may have no waiter left to read it

"""Single-flight: one computation per uncached key, however many callers ask.

A `Flight` is one text on its way to a model replica. Callers that miss both
cache levels join the key's flight if there is one, or start it; each waits
on the flight's future with `asyncio.wait` (never by awaiting the future
directly, so a cancelled caller does not cancel the shared computation).

Leaving is explicit: a caller that is cancelled or times out calls `leave`.
A flight whose last waiter left before it was sent is skipped by the
batcher; a batch whose flights have all lost their waiters is cancelled, so
abandoned work stops, while a batch anyone still waits on runs to the end.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class Flight:
    key: bytes
    text: str
    future: asyncio.Future
    waiters: int = 0
    # Latest absolute deadline (time.monotonic) among its waiters; None = a waiter without one.
    deadline: float | None = 0.0
    batch: "Batch | None" = None

    @property
    def doomed(self) -> bool:
        """Its batch is being cancelled: a newcomer must start a fresh flight."""
        return self.batch is not None and self.batch.cancelled


@dataclass(eq=False)
class Batch:
    flights: list[Flight]
    task: asyncio.Task | None = None
    cancelled: bool = False
    started: float = field(default_factory=time.monotonic)

    def live(self) -> bool:
        return any(f.waiters > 0 for f in self.flights)

    def timeout(self, default: float) -> float:
        """Seconds the batch may take: the latest caller deadline, or `default` if any has none."""
        deadlines = [f.deadline for f in self.flights if f.waiters > 0]
        if not deadlines or any(d is None for d in deadlines):
            return default
        return max(deadlines) - time.monotonic()


class SingleFlight:
    def __init__(self) -> None:
        self._flights: dict[bytes, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: bytes) -> Flight | None:
        flight = self._flights.get(key)
        if flight is None or flight.doomed or flight.future.done():
            return None
        return flight

    def start(self, key: bytes, text: str) -> Flight:
        flight = Flight(key, text, asyncio.get_running_loop().create_future())
        self._flights[key] = flight
        return flight

    @staticmethod
    def join(flight: Flight, deadline: float | None) -> None:
        if flight.waiters == 0:
            flight.deadline = deadline
        elif flight.deadline is not None:
            flight.deadline = None if deadline is None else max(flight.deadline, deadline)
        flight.waiters += 1

    @staticmethod
    def leave(flight: Flight) -> None:
        """A waiter gave up; cancel its batch if nobody else waits on any of it."""
        flight.waiters -= 1
        batch = flight.batch
        if flight.waiters == 0 and batch is not None and not batch.cancelled and not batch.live():
            batch.cancelled = True
            if batch.task is not None and not batch.task.done():
                batch.task.cancel()

    def finish(self, flight: Flight) -> None:
        """Forget the flight (its future is settled or it was abandoned)."""
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

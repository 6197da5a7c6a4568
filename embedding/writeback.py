"""Write-back of computed vectors to L2, off the reply path and bounded.

`offer` never waits: entries go into a bounded queue, and when it is full
they are dropped and counted (a slow or dead shard must not grow the
frontend's memory). One worker drains the queue in batches of up to
`batch` entries, grouped per shard, one Store call each. After its first
entry it lingers (`linger_s`, ended early by a full batch or by close) so
that later entries join the same call: every Store costs the frontend and
the shard a gRPC call whatever it carries (at 8 cold clients, 20 ms cut the
shard's CPU per request by about a quarter); the shards are
chosen when the batch is stored (`L2Client.store`: each entry's `copies`
owners among the shards of that moment), so a change of the shard set
while entries wait sends them where lookups will look. A failed store
(a shard whose breaker is open fails at once) costs the entries and an error
count, never the worker; should the worker die anyway, it is logged and
started again, so write-back never silently stops. On shutdown
`close(flush_s)` stores what is queued, for at most `flush_s` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from embedding.l2_client import L2Client
from embedding.stats import Stats

log = logging.getLogger(__name__)

_STOP = object()


class WriteBack:
    def __init__(self, l2: L2Client, stats: Stats, *, capacity: int, batch: int, timeout_s: float = 5.0,
                 linger_s: float = 0.0) -> None:
        self._l2 = l2
        self._stats = stats
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, capacity))
        self._capacity = capacity
        self._batch = batch
        self._timeout_s = timeout_s
        self._linger_s = linger_s
        self._lingering: asyncio.Future | None = None  # settled early by a full batch or by close()
        self._held = 0  # entries the worker has taken from the queue and not yet stored
        # A Store this full ends the linger at once (the queue's bound may be below the batch).
        self._full_at = max(1, min(batch, capacity))
        self._worker: asyncio.Task | None = None
        self._closing = False
        self.restarts = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queued(self) -> int:
        """Entries offered and not yet stored (or failed): the queue and what the worker holds."""
        return self._queue.qsize() + self._held

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="l2-writeback")
        self._worker.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task) -> None:
        self._held = 0  # a worker that ended holds nothing (what it held is lost)
        if task.cancelled() or task.exception() is None or self._closing:
            return
        log.error("L2 write-back worker died; starting it again", exc_info=task.exception())
        self.restarts += 1
        if self._queue.empty():
            self._idle.set()  # what it held is lost; drained() must not wait for it
        self.start()

    def offer(self, key: bytes, value: bytes) -> bool:
        """Queue one entry; False (and counted) if the queue is full."""
        if self._capacity <= 0:
            self._stats.l2_writes_dropped += 1
            return False
        try:
            self._queue.put_nowait((key, value))
        except asyncio.QueueFull:
            self._stats.l2_writes_dropped += 1
            return False
        self._idle.clear()
        if self._lingering is not None and 1 + self._queue.qsize() >= self._full_at:
            self._stop_lingering()
        return True

    async def _linger(self) -> None:
        """Wait `linger_s` for more entries to join the Store, less when a batch fills or on close."""
        loop = asyncio.get_running_loop()
        self._lingering = loop.create_future()
        timer = loop.call_later(self._linger_s, self._stop_lingering)
        try:
            await self._lingering
        finally:
            timer.cancel()
            self._lingering = None

    def _stop_lingering(self) -> None:
        if self._lingering is not None and not self._lingering.done():
            self._lingering.set_result(None)

    async def drained(self) -> None:
        """Wait until everything offered so far has been stored (or failed)."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if item is _STOP:
                self._idle.set()
                return
            self._held = 1
            if self._linger_s > 0 and not self._closing and 1 + self._queue.qsize() < self._full_at:
                await self._linger()
            items = [item]
            stop = False
            while len(items) < self._batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is _STOP:
                    stop = True
                    break
                items.append(nxt)
            self._held = len(items)
            try:
                await self._store(items)
            finally:
                self._held = 0
            if stop:
                self._idle.set()
                return
            if self._queue.empty():
                self._idle.set()

    async def _store(self, items: list[tuple[bytes, bytes]]) -> None:
        """One Store per owning shard; a failed one is counted as an L2 error, never raised."""
        stored, failed = await self._l2.store(items, self._timeout_s)
        self._stats.l2_writes += stored
        self._stats.l2.errors += failed

    async def close(self, flush_s: float) -> None:
        """Store what is queued within `flush_s` seconds, then stop the worker."""
        if self._worker is None:
            return
        self._closing = True
        self._stop_lingering()
        deadline = time.monotonic() + flush_s
        try:
            await asyncio.wait_for(self._queue.put(_STOP), max(0.01, flush_s))
        except asyncio.TimeoutError:
            pass
        try:
            await asyncio.wait_for(asyncio.shield(self._worker), max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, asyncio.CancelledError):
            # (while closing, the queue may also hold the stop marker: one more than the entries)
            log.warning("write-back flush ran out of time; about %d entries not stored", self.queued)
        except Exception:  # noqa: BLE001 - died while flushing (not restarted once closing)
            log.exception("L2 write-back worker failed while flushing; about %d entries not stored", self.queued)
        finally:
            if not self._worker.done():
                self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

"""The shard's engine: request validation, counters, and the hop from the
event loop to the RocksDB worker threads. Transport-free; `server.py`
converts protobuf messages to and from these calls.

rocksdict holds the GIL while RocksDB runs a multi-get (measured: two
threads doing multi-gets get no speed-up over one), so the worker pool does
not add read parallelism; it keeps the disk off the event loop for writes
(which do release the GIL around fsync) and for reads that miss the caches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cacheshard.settings import ShardSettings
from cacheshard.store import ShardStore, StoreError
from cacheshard.values import ValueChecker
from common.errors import InvalidInput, Unavailable

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """Since process start; only touched from the event loop thread."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    errors: int = 0
    corrupt: int = 0


@dataclass(frozen=True)
class ShardStats:
    entries: int
    bytes_on_disk: int
    hits: int
    misses: int
    stores: int
    evictions: int
    errors: int
    corrupt: int
    uptime_seconds: float
    max_entries: int
    sync: bool


class Shard:
    def __init__(self, store: ShardStore, settings: ShardSettings) -> None:
        self.store = store
        self.settings = settings
        self.counters = Counters()
        self._checker = ValueChecker()
        self._pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="rocksdb")
        self._started = time.monotonic()

    async def _blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _lookup_blocking(self, keys: list[bytes]) -> tuple[list[bool], list[bytes], int, int]:
        return self._checker.screen(self.store.multi_get(keys))

    async def lookup(self, keys: list[bytes]) -> tuple[list[bool], list[bytes]]:
        """found flags and values (b"" for a miss), in key order.

        A value the codec rejects is a miss (counted as corrupt). A failed
        read is logged, counted, and answered as all misses: the caller
        computes instead, which is what a cache should make it do."""
        n = len(keys)
        if n > self.settings.max_batch:
            raise InvalidInput(f"`keys` has {n} keys; the limit is {self.settings.max_batch}")
        if n == 0:
            return [], []
        try:
            found, values, hits, corrupt = await self._blocking(self._lookup_blocking, keys)
        except StoreError as exc:
            log.error("lookup of %d keys failed: %s", n, exc)
            self.counters.errors += 1
            self.counters.misses += n
            return [False] * n, [b""] * n
        c = self.counters
        c.hits += hits
        c.misses += n - hits
        if corrupt:
            c.corrupt += corrupt
            c.errors += corrupt
            log.warning("%d stored values failed to decode; answered as misses", corrupt)
        return found, values

    async def put(self, keys: list[bytes], values: list[bytes]) -> int:
        """Write all entries in one WriteBatch; returns how many were written."""
        n = len(keys)
        if n == 0:
            raise InvalidInput("`entries` cannot be empty")
        if n > self.settings.max_batch:
            raise InvalidInput(f"`entries` has {n} entries; the limit is {self.settings.max_batch}")
        for i, (key, value) in enumerate(zip(keys, values)):
            if not key:
                raise InvalidInput(f"`entries[{i}].key` cannot be empty")
            problem = self._checker.error(value)
            if problem is not None:
                raise InvalidInput(f"`entries[{i}].value` is not a cache value: {problem}")
        try:
            await self._blocking(self.store.write, keys, values)
        except StoreError as exc:
            log.error("store of %d entries failed: %s", n, exc)
            self.counters.errors += 1
            raise Unavailable("the shard could not write to disk; retry later") from exc
        self.counters.stores += n
        return n

    async def stats(self) -> ShardStats:
        entries, on_disk = await self._blocking(lambda: (self.store.entries(), self.store.bytes_on_disk()))
        c = self.counters
        # FIFO drops whole files and reports no key count, so evictions are
        # inferred: what was there at open plus what was written since, less
        # what is there now (a rewritten key counts too: an estimate).
        evictions = max(0, self.store.entries_at_open + c.stores - entries)
        return ShardStats(
            entries=entries, bytes_on_disk=on_disk, hits=c.hits, misses=c.misses, stores=c.stores,
            evictions=evictions, errors=c.errors, corrupt=c.corrupt,
            uptime_seconds=time.monotonic() - self._started,
            max_entries=self.settings.max_entries, sync=self.settings.sync,
        )

    async def checkpoint(self, path: str) -> str:
        if not path:
            raise InvalidInput("`path` cannot be empty")
        dest = Path(path)
        if not dest.is_absolute():
            raise InvalidInput(f"`path` must be absolute (it is a path on the shard's machine): {path!r}")
        try:
            done = await self._blocking(self.store.checkpoint, dest)
        except (FileExistsError, FileNotFoundError, NotADirectoryError) as exc:
            raise InvalidInput(f"`path`: {exc}") from None
        except Exception as exc:
            log.error("checkpoint to %s failed: %s", dest, exc)
            self.counters.errors += 1
            raise Unavailable(f"checkpoint to {dest} failed: {exc}") from exc
        log.info("checkpoint written to %s", done)
        return str(done)

    async def close(self) -> None:
        """Finish queued RocksDB work, flush memtables, close the database."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._pool.shutdown, True)
        await loop.run_in_executor(None, self.store.close)
        log.info("database flushed and closed")

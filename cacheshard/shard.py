"""The shard's engine: request validation, counters, and the hop from the
event loop to the RocksDB worker threads. Transport-free; `server.py`
converts protobuf messages to and from these calls.

Reads go to the in-memory tier first (`memory.py`), then to RocksDB for
what it lacks. rocksdict holds the GIL while RocksDB runs a multi-get
(measured: two threads doing multi-gets get no speed-up over one), so the
worker pool adds no read parallelism; it keeps disk waits off the event loop
for writes (fsync in --sync mode) and for larger reads. A read of a few keys
(--inline-read-keys) runs on the event loop: new traffic's lookups are mostly
of one or a few keys RocksDB's filters rule out in microseconds, and the hop
to a worker and back cost more than that (two thread wake-ups and context
switches on a 2-vCPU machine, where they also preempt the other processes).

Callers are not trusted: a Store is refused (INVALID_ARGUMENT, nothing
written) unless every key has a cache key's length, every value is one the
codec reads with a width within --max-width, and the whole request is within
--max-batch entries and --max-request-bytes bytes. Lookup refuses a batch
over --max-batch, or with a key of the wrong length (no such key can be
stored, and the frontend only sends cache keys). Checkpoints are named,
never given as paths: they go into the shard's own backup directory.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cacheshard.memory import MemoryTier
from cacheshard.settings import ShardSettings
from cacheshard.store import CheckpointInfo, ShardStore, StoreError, list_checkpoints
from cacheshard.values import ValueChecker
from common.cache_key import KEY_BYTES
from common.errors import AlreadyExists, InvalidInput, Unavailable
from common.histogram import Histogram
from common.hit_counts import HitCounts

log = logging.getLogger(__name__)

# A checkpoint name is one plain path component: no separators, so never a path of its own, and
# no leading dot, so never `.`, `..`, or the name of a checkpoint still being written.
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
# One message for every bad name, whatever exists on disk: it reveals nothing about the machine.
BAD_NAME = "`name` must be 1 to 128 characters from A-Z a-z 0-9 . _ - and must not start with a dot"


def check_keys(keys: Sequence[bytes], field: str) -> None:
    """Every key must have a cache key's length; `field` names key i when formatted with i."""
    if set(map(len, keys)) - {KEY_BYTES}:
        i = next(i for i, key in enumerate(keys) if len(key) != KEY_BYTES)
        raise InvalidInput(f"`{field.format(i)}` has {len(keys[i])} bytes; a cache key has {KEY_BYTES}")


@dataclass
class Counters(HitCounts):
    """Hits, misses and errors as every cache level counts them, and what only the shard knows.
    `corrupt` values are counted in `errors` too; `memory_hits` in `hits` too. GetStats and
    /metrics (cacheshard/metrics.py) both read these."""

    stores: int = 0
    corrupt: int = 0
    memory_hits: int = 0
    stored_bytes: int = 0  # key and value bytes of stored entries
    checkpoints: int = 0  # written successfully
    lookup_seconds: Histogram = field(default_factory=Histogram)  # per answered Lookup batch
    store_seconds: Histogram = field(default_factory=Histogram)  # per successful Store


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
    memory_entries: int
    memory_hits: int
    memory_capacity: int
    memory_bytes: int
    memory_capacity_bytes: int


class Shard:
    def __init__(self, store: ShardStore, settings: ShardSettings) -> None:
        self.store = store
        self.settings = settings
        self.counters = Counters()
        self._checker = ValueChecker(settings.max_width)
        self.memory = MemoryTier(settings.tier_entries, settings.tier_value_bytes)
        self._pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="rocksdb")
        self._checkpointing = asyncio.Lock()  # one at a time: pruning must not race a checkpoint
        self._started = time.monotonic()

    async def _blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _read_blocking(self, keys: list[bytes]) -> tuple[list[bool], list[bytes], int, int]:
        return self._checker.screen(self.store.multi_get(keys))

    async def _read(self, keys: list[bytes]) -> tuple[list[bool], list[bytes]]:
        """One multi-get, screened by the codec: on the event loop for a few keys
        (--inline-read-keys), else on a worker thread.

        A value the codec rejects is a miss (counted as corrupt). A failed
        read is logged, counted, and answered as misses: the caller computes
        instead, which is what a cache should make it do."""
        c = self.counters
        try:
            if len(keys) <= self.settings.inline_read_keys:
                found, values, _, corrupt = self._read_blocking(keys)
            else:
                found, values, _, corrupt = await self._blocking(self._read_blocking, keys)
        except StoreError as exc:
            log.error("lookup of %d keys failed: %s", len(keys), exc)
            c.errors += 1
            return [False] * len(keys), [b""] * len(keys)
        if corrupt:
            c.corrupt += corrupt
            c.errors += corrupt
            log.warning("%d stored values failed to decode; answered as misses", corrupt)
        return found, values

    async def lookup(self, keys: Sequence[bytes]) -> tuple[list[bool], list[bytes]]:
        """found flags and values (b"" for a miss), in key order; the time it took is counted."""
        started = time.perf_counter()
        answer = await self._lookup(keys)
        self.counters.lookup_seconds.observe(time.perf_counter() - started)
        return answer

    async def _lookup(self, keys: Sequence[bytes]) -> tuple[list[bool], list[bytes]]:
        """found flags and values (b"" for a miss), in key order.

        Keys the memory tier holds are answered on the event loop (an array
        lookup, nothing blocks); the rest go to RocksDB in one multi-get."""
        n = len(keys)
        # Keys have a fixed length, so this count also bounds the batch's bytes.
        if n > self.settings.max_batch:
            raise InvalidInput(f"`keys` has {n} keys; the limit is {self.settings.max_batch}")
        c = self.counters
        if n == 0:
            return [], []
        keys = list(keys)  # a protobuf repeated field makes new bytes objects on every pass: once only
        check_keys(keys, "keys[{}]")
        if not self.memory.enabled:
            found, values = await self._read(keys)
            hits = found.count(True)
            c.hits += hits
            c.misses += n - hits
            return found, values
        values, missing = self.memory.lookup(keys)
        if not missing:  # the common case, without per-key work
            c.hits += n
            c.memory_hits += n
            return [True] * n, values
        c.memory_hits += n - len(missing)
        missing_keys = [keys[i] for i in missing]
        found, read = await self._read(missing_keys)
        fill_keys, fill_values = [], []
        for i, ok, key, value in zip(missing, found, missing_keys, read):
            if ok:
                values[i] = value
                fill_keys.append(key)
                fill_values.append(value)
        self.memory.put_many(fill_keys, fill_values)
        hits = n - len(missing) + len(fill_keys)
        c.hits += hits
        c.misses += n - hits
        if hits == n:
            return [True] * n, values
        return [v is not None for v in values], [v or b"" for v in values]

    async def put(self, keys: list[bytes], values: list[bytes]) -> int:
        """Write all entries in one WriteBatch; returns how many were written."""
        n = len(keys)
        if n == 0:
            raise InvalidInput("`entries` cannot be empty")
        if n > self.settings.max_batch:
            raise InvalidInput(f"`entries` has {n} entries; the limit is {self.settings.max_batch}")
        size = sum(map(len, keys)) + sum(map(len, values))
        if size > self.settings.max_request_bytes:
            raise InvalidInput(f"`entries` hold {size} bytes of keys and values; the limit is "
                               f"{self.settings.max_request_bytes}")
        check_keys(keys, "entries[{}].key")
        error = self._checker.error
        for i, value in enumerate(values):
            problem = error(value)
            if problem is not None:
                raise InvalidInput(f"`entries[{i}].value` is not a cache value: {problem}")
        started = time.perf_counter()
        try:
            await self._blocking(self.store.write, keys, values)
        except StoreError as exc:
            log.error("store of %d entries failed: %s", n, exc)
            self.counters.errors += 1
            raise Unavailable("the shard could not write to disk; retry later") from exc
        self.memory.put_many(keys, values)
        c = self.counters
        c.stores += n
        c.stored_bytes += size
        c.store_seconds.observe(time.perf_counter() - started)
        return n

    async def delete(self, keys: list[bytes]) -> int:
        """Remove `keys` from RocksDB and the memory tier (the frontend's invalidation)."""
        n = len(keys)
        if n == 0:
            raise InvalidInput("`keys` cannot be empty")
        if n > self.settings.max_batch:
            raise InvalidInput(f"`keys` has {n} keys; the limit is {self.settings.max_batch}")
        check_keys(keys, "keys[{}]")
        self.memory.delete_many(keys)  # first: a lookup meanwhile reads RocksDB, never a stale copy
        try:
            await self._blocking(self.store.delete, keys)
        except StoreError as exc:
            log.error("delete of %d keys failed: %s", n, exc)
            self.counters.errors += 1
            raise Unavailable("the shard could not write to disk; retry later") from exc
        self.memory.delete_many(keys)  # a lookup during the write may have refilled the tier
        return n

    async def scan(self, start_after: bytes, limit: int) -> tuple[list[tuple[bytes, bytes]], bool]:
        """A page of stored entries in key order (the frontend's export), and whether it is the last."""
        if limit > self.settings.max_batch:
            raise InvalidInput(f"`limit` {limit} is over the limit of {self.settings.max_batch}")
        try:
            return await self._blocking(self.store.scan, bytes(start_after), limit or self.settings.max_batch)
        except StoreError as exc:
            log.error("scan failed: %s", exc)
            self.counters.errors += 1
            raise Unavailable("the shard could not read its database; retry later") from exc

    async def stats(self) -> ShardStats:
        return await self._blocking(self.snapshot)

    def snapshot(self) -> ShardStats:
        """GetStats' figures; blocks on RocksDB (a worker thread, or the metrics endpoint's)."""
        entries, on_disk = self.store.entries(), self.store.bytes_on_disk()
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
            memory_entries=len(self.memory), memory_hits=c.memory_hits,
            memory_capacity=self.memory.max_entries, memory_bytes=self.memory.bytes,
            memory_capacity_bytes=self.memory.max_bytes,
        )

    async def checkpoint(self, name: str) -> tuple[Path, list[str]]:
        """Write checkpoint `name` into the backup directory, then prune to --keep.

        Returns its directory and the names pruned. Errors never echo more
        than the (validated) name: a caller learns nothing about the disk
        beyond the shard's own backup directory."""
        if not CHECKPOINT_NAME.fullmatch(name):
            raise InvalidInput(BAD_NAME)
        async with self._checkpointing:
            try:
                done, pruned = await self._blocking(self.store.backup, self.settings.backups, name,
                                                    self.settings.keep)
            except FileExistsError:
                raise AlreadyExists(f"a checkpoint named {name!r} already exists") from None
            except Exception as exc:
                log.error("checkpoint %r into %s failed: %s", name, self.settings.backups, exc)
                self.counters.errors += 1
                raise Unavailable("the checkpoint could not be written; see the shard's log") from exc
            self.counters.checkpoints += 1
        log.info("checkpoint written to %s%s", done, f"; pruned {', '.join(pruned)}" if pruned else "")
        return done, pruned

    async def checkpoints(self) -> list[CheckpointInfo]:
        """The checkpoints in the backup directory, oldest first."""
        return await self._blocking(list_checkpoints, self.settings.backups)

    async def close(self) -> None:
        """Finish queued RocksDB work, flush memtables, close the database."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._pool.shutdown, True)
        if await loop.run_in_executor(None, self.store.close):
            log.info("database flushed and closed")
        else:
            log.info("database closed without a final flush; the write-ahead log has every acknowledged entry")

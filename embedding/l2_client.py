"""L2: routing keys over the cache shards, with copies, and a shard set that may change.

Keys are spread over shards by rendezvous (highest-random-weight) hashing,
so adding a shard only moves the keys that now belong to it (about 1/N of
them), and the shard set may change while the frontend runs
(`L2Client.set_shards`, fed by `embedding.shard_source`). Each shard is one
`embedding.l2_shard.ShardConnection` (its stream, coalescing and breaker).

Copies (`--l2-copies`): with 2, every entry is written to the two
highest-ranked shards for its key, and a lookup asks the first, then the
second for the keys the first missed or could not answer, so losing one
shard costs neither its entries nor (beyond its breaker opening) a
request's time.

The cache is fail-open: whatever a shard does costs misses and error
counts, never a failed request.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Sequence

import grpc

from common.tls import TlsClientOptions
from embedding.l2_shard import (  # re-exported (__all__): callers import the L2 API from here
    FIRST_BACKOFF_S, LOOKUP_MESSAGES_IN_FLIGHT, MAX_LOOKUP_KEYS, L2Error, L2Timeout, ShardBusy, ShardConnection,
    ShardUnavailable)
from embedding.stats import Stats

__all__ = ["FIRST_BACKOFF_S", "LOOKUP_MESSAGES_IN_FLIGHT", "MAX_LOOKUP_KEYS", "L2Client", "L2Error", "L2Timeout",
           "ShardBusy", "ShardConnection", "ShardUnavailable", "ranked", "rendezvous"]

log = logging.getLogger(__name__)


def ranked(key: bytes, shard_ids: Sequence[bytes], copies: int = 1) -> list[int]:
    """Indices of the `copies` shards with the highest weights for `key`, highest first."""
    n = len(shard_ids)
    if n <= 1:
        return list(range(n))
    weights = [int.from_bytes(hashlib.blake2b(key, digest_size=8, key=sid[:64]).digest(), "little")
               for sid in shard_ids]
    if copies == 1:
        return [max(range(n), key=weights.__getitem__)]
    return sorted(range(n), key=weights.__getitem__, reverse=True)[:copies]


def rendezvous(key: bytes, shard_ids: Sequence[bytes]) -> int:
    """Index of the shard with the highest weight for `key`."""
    return ranked(key, shard_ids, 1)[0]


class L2Client:
    """Routes keys to shards (with `copies` replicas each) and keeps every failure inside the cache layer."""

    def __init__(self, addresses: tuple[str, ...], stats: Stats, *, timeout_s: float, max_message_bytes: int,
                 reconnect_max_s: float, max_waiting: int = 256, keepalive_ms: int = 0,
                 tls: TlsClientOptions | None = None, copies: int = 1) -> None:
        self._connect = functools.partial(ShardConnection, stats=stats, max_message_bytes=max_message_bytes,
                                          reconnect_max_s=reconnect_max_s, max_waiting=max_waiting,
                                          keepalive_ms=keepalive_ms, tls=tls)
        self._stats = stats
        self._timeout_s = timeout_s
        self.copies = max(1, copies)
        self.shards: list[ShardConnection] = []
        self._ids: list[bytes] = []
        self._tasks: set[asyncio.Task] = set()  # closing dropped shards, following a shard source
        self._use(tuple(dict.fromkeys(addresses)))

    @property
    def waiting(self) -> int:
        """Lookups awaiting a shard's answer, all shards together (0 when traffic stops)."""
        return sum(s.waiting for s in self.shards)

    def _own(self, coro, name: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def set_shards(self, addresses: Sequence[str]) -> bool:
        """Serve from `addresses` from now on; True if the set changed (counted in
        `Stats.l2_shard_set_changes`).

        Connections to shards that stay are kept (their streams, breakers and
        in-flight lookups untouched); new shards get a connection; dropped
        ones are closed (lookups waiting on them end as misses). Rendezvous
        weights depend only on a shard's address, so each key keeps its shard
        unless a new shard outranks it: about 1/N of the keys move when an
        Nth shard is added."""
        addresses = tuple(dict.fromkeys(addresses))
        if addresses == tuple(s.address for s in self.shards):
            return False
        dropped = self._use(addresses)
        self._stats.l2_shard_set_changes += 1
        log.info("L2 shards now %s%s", ", ".join(addresses) or "(none)",
                 f" (dropped {', '.join(dropped)})" if dropped else "")
        return True

    def _use(self, addresses: tuple[str, ...]) -> list[str]:
        """Swap the shard list to `addresses` (keeping the connections of shards that stay); the dropped ones."""
        kept = {s.address: s for s in self.shards}
        # Swapped whole, never mutated: a lookup in progress keeps the list it started with.
        self.shards = [kept.pop(a, None) or self._connect(a) for a in addresses]
        self._ids = [a.encode() for a in addresses]
        for gone in kept.values():
            self._own(gone.close(), f"l2-close-{gone.address}")
        return list(kept)

    def follow(self, read, interval_s: float) -> asyncio.Task:
        """Re-read the shard set every `interval_s` with `read()` (an async callable returning
        addresses, or None to keep the current set) until close(); see embedding.shard_source."""
        async def loop() -> None:
            while True:
                try:
                    addresses = await read()
                except Exception as exc:  # noqa: BLE001 - a bad read keeps the current set
                    log.warning("could not read the L2 shard set: %r", exc)
                    addresses = None
                if addresses is not None:
                    self.set_shards(addresses)
                await asyncio.sleep(interval_s)

        return self._own(loop(), "l2-shard-source")

    def shard_for(self, key: bytes) -> int:
        """Index in `shards` of the key's first (highest-ranked) shard."""
        return rendezvous(key, self._ids)

    def owners(self, key: bytes) -> list[ShardConnection]:
        """The shards that hold `key`: the `copies` highest-ranked, first first. Writes and deletes go to all."""
        shards = self.shards
        return [shards[i] for i in ranked(key, self._ids, min(self.copies, len(shards)))]

    async def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        """One value per key, or None: missing, or its shards failed (already counted as errors).

        The first copy's shard is asked for every key; with copies, the keys it
        missed or failed go to the second, and so on."""
        shards, ids = self.shards, self._ids
        results: list[bytes | None] = [None] * len(keys)
        if not shards:
            return results
        copies = min(self.copies, len(shards))
        owners = [ranked(key, ids, copies) for key in keys]
        todo = range(len(keys))
        for rank in range(copies):
            by_shard: dict[int, list[int]] = {}
            for i in todo:
                by_shard.setdefault(owners[i][rank], []).append(i)
            await asyncio.gather(*(self._ask(shards[s], keys, positions, results)
                                   for s, positions in by_shard.items()))
            left = [i for i in todo if results[i] is None]
            if rank:
                self._stats.l2_second_copy_hits += len(todo) - len(left)
            todo = left
            if not todo:
                break
        return results

    async def _ask(self, shard: ShardConnection, keys: list[bytes], positions: list[int],
                   results: list[bytes | None]) -> None:
        """Fill `results` at `positions` from one shard; a failure leaves them None and counts one error."""
        wanted = [keys[i] for i in positions]
        started = time.monotonic()
        try:
            if len(wanted) <= MAX_LOOKUP_KEYS:
                values = await shard.lookup(wanted, self._timeout_s)
            else:
                parts = await asyncio.gather(*(
                    shard.lookup(wanted[i:i + MAX_LOOKUP_KEYS], self._timeout_s)
                    for i in range(0, len(wanted), MAX_LOOKUP_KEYS)), return_exceptions=True)
                for part in parts:
                    if isinstance(part, BaseException):
                        raise part
                values = [v for part in parts for v in part]
        except L2Error as exc:
            self._stats.l2.errors += 1
            log.debug("L2 lookup failed: %s", exc)
            return
        self._stats.l2.latency.record(time.monotonic() - started)
        for i, value in zip(positions, values):
            results[i] = value

    async def store(self, entries: list[tuple[bytes, bytes]], timeout: float) -> tuple[int, int]:
        """Store every entry on each of its owners; (entries stored on at least one, failed Store calls).
        Failures are logged at debug and returned for the caller to count: a lost write is a future miss."""
        return await self._each_owner(entries, lambda shard, group: shard.store(group, timeout),
                                      key=lambda entry: entry[0])

    async def delete(self, keys: list[bytes], timeout: float) -> tuple[int, int]:
        """Delete `keys` from every copy (a copy left behind would answer after the first misses)."""
        return await self._each_owner(keys, lambda shard, group: shard.delete(group, timeout), key=lambda k: k)

    async def _each_owner(self, items: list, call, key) -> tuple[int, int]:
        groups: dict[str, tuple[ShardConnection, list]] = {}
        for item in items:
            for shard in self.owners(key(item)):
                groups.setdefault(shard.address, (shard, []))[1].append(item)
        done: set[bytes] = set()
        failed = 0

        async def one(shard: ShardConnection, group: list) -> None:
            nonlocal failed
            try:
                await call(shard, group)
            except Exception as exc:  # noqa: BLE001 - grpc errors and L2Error alike
                failed += 1
                reason = (exc.code().name if isinstance(exc, grpc.aio.AioRpcError)
                          else str(exc) if isinstance(exc, L2Error) else repr(exc))
                log.debug("L2 call with %d entries to shard %s failed: %s", len(group), shard.address, reason)
                return
            done.update(key(item) for item in group)

        await asyncio.gather(*(one(shard, group) for shard, group in groups.values()))
        return len(done), failed

    async def entries_and_evictions(self, timeout: float = 1.0) -> tuple[int, int]:
        """Sum of the shards' entry and eviction counts (shards that do not answer count 0; with
        copies, each entry counts once per copy)."""
        replies = await asyncio.gather(*(s.get_stats(timeout) for s in self.shards), return_exceptions=True)
        ok = [r for r in replies if not isinstance(r, BaseException)]
        return sum(r.entries for r in ok), sum(r.evictions for r in ok)

    async def close(self) -> None:
        for task in list(self._tasks):
            if task.get_name() == "l2-shard-source":
                task.cancel()
        await asyncio.gather(*(s.close() for s in self.shards), *self._tasks, return_exceptions=True)

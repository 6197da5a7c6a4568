"""L2: the cache shards, reached over one long-lived Lookup stream each.

Per shard there is one channel and one bidi `Lookup` stream; a lookup sends
a batch with a fresh `batch_id` and waits for the answer carrying the same
id. A single reader task settles the waiting futures. Keys are spread over
shards by rendezvous (highest-random-weight) hashing, so adding a shard only
moves the keys that now belong to it.

The cache is fail-open: a shard that is down, slow or broken costs a miss
and an error count, never a failed request. A broken stream is reopened on
the next lookup after a backoff (doubling up to a cap), so a restarted shard
is used again without restarting the frontend.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time

import grpc

from common.tls import TlsClientOptions, open_channel
from embedding.stats import Stats
from sutra.cache.v1 import cache_shard_service_pb2 as pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


# Keys per Lookup message; shards refuse batches over their --max-batch (4096 by default).
MAX_LOOKUP_KEYS = 1024


class L2Error(Exception):
    """A shard could not answer; callers treat the keys as misses."""


def rendezvous(key: bytes, shard_ids: list[bytes]) -> int:
    """Index of the shard with the highest weight for `key`."""
    if len(shard_ids) == 1:
        return 0
    best, best_weight = 0, -1
    for i, sid in enumerate(shard_ids):
        weight = int.from_bytes(hashlib.blake2b(key, digest_size=8, key=sid[:64]).digest(), "little")
        if weight > best_weight:
            best, best_weight = i, weight
    return best


class ShardConnection:
    """One shard: its channel, its Lookup stream, and Store/GetStats calls."""

    def __init__(self, address: str, stats: Stats, *, max_message_bytes: int, reconnect_max_s: float,
                 tls: TlsClientOptions | None = None) -> None:
        self.address = address
        self._stats = stats
        self._channel = open_channel(address, tls, max_message_bytes=max_message_bytes, options=[
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(reconnect_max_s * 1000)),
        ])
        self._stub = pb_grpc.CacheShardServiceStub(self._channel)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: asyncio.Queue | None = None
        self._call = None
        self._reader: asyncio.Task | None = None
        self._retry_at = 0.0
        self._backoff = 0.1
        self._reconnect_max_s = reconnect_max_s
        self.stream_opens = 0
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._call is not None

    def _open_stream(self) -> None:
        if self._call is not None:
            return
        if time.monotonic() < self._retry_at:
            raise L2Error(f"shard {self.address} is backing off after a failure")
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while True:
                item = await outbox.get()
                if item is None:
                    return
                yield item

        self._outbox = outbox
        self._call = self._stub.Lookup(requests())
        self.stream_opens += 1
        self._reader = asyncio.create_task(self._read(self._call), name=f"l2-reader-{self.address}")

    async def _read(self, call) -> None:
        error: BaseException | None = None
        try:
            async for reply in call:
                fut = self._pending.pop(reply.batch_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
                if self._backoff > 0.1:
                    log.info("L2 shard %s answering again", self.address)
                    self._backoff = 0.1
            error = L2Error(f"shard {self.address} closed the Lookup stream")
        except asyncio.CancelledError:
            error = L2Error("L2 client closing")
            raise
        except grpc.aio.AioRpcError as exc:
            error = L2Error(f"shard {self.address}: {exc.code().name}: {exc.details()}")
        except Exception as exc:  # noqa: BLE001 - any stream failure makes the shard look down
            error = L2Error(f"shard {self.address}: {exc!r}")
        finally:
            self._broken(call, error)

    def _broken(self, call, error: BaseException | None) -> None:
        if self._call is call:
            self._call = None
            if self._outbox is not None:
                self._outbox.put_nowait(None)
            self._outbox = None
            self._retry_at = time.monotonic() + self._backoff
            if not self._closing:
                log.warning("L2 stream to %s broken (%s); retry in %.2fs", self.address, error,
                            self._backoff)
            self._backoff = min(self._backoff * 2, self._reconnect_max_s)
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error or L2Error("stream ended"))
                fut.exception()

    async def lookup(self, keys: list[bytes], timeout: float) -> list[bytes | None]:
        """One value (or None) per key; raises L2Error when the shard cannot answer in time."""
        self._open_stream()
        batch_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[batch_id] = fut
        self._outbox.put_nowait(pb.LookupRequest(batch_id=batch_id, keys=keys))
        try:
            done, _ = await asyncio.wait([fut], timeout=timeout)
        finally:
            self._pending.pop(batch_id, None)
        if not done:
            raise L2Error(f"shard {self.address} did not answer a lookup in {timeout * 1000:.0f} ms")
        reply = fut.result()
        if len(reply.found) != len(keys) or len(reply.values) != len(keys):
            raise L2Error(f"shard {self.address} answered {len(reply.found)} results for {len(keys)} keys")
        return [value if found else None for found, value in zip(reply.found, reply.values)]

    async def store(self, entries: list[tuple[bytes, bytes]], timeout: float) -> int:
        reply = await self._stub.Store(
            pb.StoreRequest(entries=[pb.Entry(key=k, value=v) for k, v in entries]), timeout=timeout)
        return reply.stored

    async def get_stats(self, timeout: float) -> pb.GetStatsResponse:
        return await self._stub.GetStats(pb.GetStatsRequest(), timeout=timeout)

    async def close(self) -> None:
        self._closing = True
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._channel.close()


class L2Client:
    """Routes keys to shards and keeps every failure inside the cache layer."""

    def __init__(self, addresses: tuple[str, ...], stats: Stats, *, timeout_s: float, max_message_bytes: int,
                 reconnect_max_s: float, tls: TlsClientOptions | None = None) -> None:
        self.shards = [ShardConnection(a, stats, max_message_bytes=max_message_bytes,
                                       reconnect_max_s=reconnect_max_s, tls=tls) for a in addresses]
        self._ids = [a.encode() for a in addresses]
        self._stats = stats
        self._timeout_s = timeout_s

    def shard_for(self, key: bytes) -> int:
        return rendezvous(key, self._ids)

    async def lookup(self, groups: list[list[bytes]]) -> list[list[bytes | None] | None]:
        """Look up groups of keys; every key of a group goes to the shard of the group's first key.

        Returns per group its values (None per missing key), or None for the
        whole group when its shard failed (already counted as an error).
        """
        by_shard: dict[int, list[int]] = {}
        for gi, group in enumerate(groups):
            by_shard.setdefault(self.shard_for(group[0]), []).append(gi)
        results: list[list[bytes | None] | None] = [None] * len(groups)

        async def one(shard_index: int, group_ids: list[int]) -> None:
            keys = [k for gi in group_ids for k in groups[gi]]
            shard = self.shards[shard_index]
            started = time.monotonic()
            try:
                if len(keys) <= MAX_LOOKUP_KEYS:
                    values = await shard.lookup(keys, self._timeout_s)
                else:
                    parts = await asyncio.gather(*(
                        shard.lookup(keys[i:i + MAX_LOOKUP_KEYS], self._timeout_s)
                        for i in range(0, len(keys), MAX_LOOKUP_KEYS)))
                    values = [v for part in parts for v in part]
            except L2Error as exc:
                self._stats.l2.errors += 1
                log.debug("L2 lookup failed: %s", exc)
                return
            self._stats.l2.latency.record(time.monotonic() - started)
            pos = 0
            for gi in group_ids:
                n = len(groups[gi])
                results[gi] = values[pos:pos + n]
                pos += n

        await asyncio.gather(*(one(s, gids) for s, gids in by_shard.items()))
        return results

    async def entries_and_evictions(self, timeout: float = 1.0) -> tuple[int, int]:
        """Sum of the shards' entry and eviction counts (shards that do not answer count 0)."""
        replies = await asyncio.gather(*(s.get_stats(timeout) for s in self.shards), return_exceptions=True)
        ok = [r for r in replies if not isinstance(r, BaseException)]
        return sum(r.entries for r in ok), sum(r.evictions for r in ok)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards), return_exceptions=True)

"""L2: the cache shards, reached over one long-lived Lookup stream each.

Per shard there is one channel and one bidi `Lookup` stream, because a
stream pipelines batches with no per-call setup; answers are matched to
waiting futures by `batch_id`. Keys are spread over shards by rendezvous
(highest-random-weight) hashing, so adding a shard only moves the keys that
now belong to it.

The cache is fail-open: a shard that is down, slow or broken costs a miss
and an error count, never a failed request. The hard case is a shard that
hangs without closing its socket (SIGSTOP, a partition that sends no RST):
nothing fails, every lookup would just wait its full timeout, and requests
would pile up in the outbox and in grpc's buffers. So each shard has a
circuit breaker:

- closed: lookups go to the stream. One lookup timeout or a stream failure
  opens it; a timeout also cancels the stream, so grpc drops what it holds,
  and fails every lookup still waiting on it at once.
- open: lookups and stores fail at once, queueing nothing, for a backoff
  (100 ms, doubling up to `reconnect_max_s`).
- half-open: when the backoff has passed, exactly one lookup (the probe)
  goes out on a fresh stream while the others still fail at once. An answer
  closes the breaker and resets the backoff; a timeout opens it again.

A hung shard thus costs about one L2 timeout per backoff period, not one per
request. At most `max_waiting` lookups wait on a shard at once, so its memory
stays bounded even before the first timeout. Keepalive pings find a dead
connection when there is no traffic to time out.

Every waiting lookup is a future whose deadline timer and done-callback are
owned here: the callback releases its slot however the future ends (answer,
timeout, broken stream, caller cancelled), so `waiting` returns to 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time

import grpc

from common import tracing
from common.grpc_server import keepalive_options
from common.tls import TlsClientOptions, open_channel
from embedding.stats import Stats
from sutra.cache.v1 import cache_shard_service_pb2 as pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


# Keys per Lookup message; shards refuse batches over their --max-batch (4096 by default).
MAX_LOOKUP_KEYS = 1024
# First backoff after the breaker opens; each failed probe doubles it up to reconnect_max_s.
FIRST_BACKOFF_S = 0.1


class L2Error(Exception):
    """A shard could not answer; callers treat the keys as misses."""


class L2Timeout(L2Error):
    """A lookup was not answered in time (opens the breaker)."""


class ShardUnavailable(L2Error):
    """The shard's breaker is open: refused at once, nothing sent."""


class ShardBusy(L2Error):
    """`max_waiting` lookups already wait on the shard: refused at once, nothing sent."""


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


class _Stream:
    """One Lookup call: its outbox and the futures waiting for its answers."""

    def __init__(self, stub: pb_grpc.CacheShardServiceStub) -> None:
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.pending: dict[int, asyncio.Future] = {}
        outbox = self.outbox

        async def requests():
            while True:
                item = await outbox.get()
                if item is None:
                    return
                fut, request = item
                if not fut.done():  # the caller left before it was sent: do not send it
                    yield request

        self.call = stub.Lookup(requests())

    def abort(self, error: L2Error) -> None:
        """Cancel the call (grpc drops what it buffered) and fail every waiting lookup."""
        self.call.cancel()
        self.outbox.put_nowait(None)
        for fut in list(self.pending.values()):
            if not fut.done():
                fut.set_exception(error)


class ShardConnection:
    """One shard: its channel, its Lookup stream and breaker, and Store/GetStats calls."""

    def __init__(self, address: str, stats: Stats, *, max_message_bytes: int, reconnect_max_s: float,
                 max_waiting: int = 256, keepalive_ms: int = 0, tls: TlsClientOptions | None = None) -> None:
        self.address = address
        self._stats = stats
        options: list[tuple[str, object]] = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(reconnect_max_s * 1000)),
        ]
        options += keepalive_options(keepalive_ms)
        self._channel = open_channel(address, tls, max_message_bytes=max_message_bytes, options=options)
        self._stub = pb_grpc.CacheShardServiceStub(self._channel)
        self._ids = itertools.count(1)
        self._max_waiting = max_waiting
        self._reconnect_max_s = reconnect_max_s
        self._stream: _Stream | None = None
        self._readers: set[asyncio.Task] = set()
        self._waiting = 0
        # Breaker: open while `_open`; the probe may go once `_retry_at` has passed.
        self._open = False
        self._retry_at = 0.0
        self._open_for = 0.0
        self._backoff = FIRST_BACKOFF_S
        self._probe: asyncio.Future | None = None
        self.stream_opens = 0
        self.trips = 0
        self.last_failure = ""  # why the breaker last opened
        self._closing = False

    # -- state ----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._stream is not None

    @property
    def waiting(self) -> int:
        """Lookups sent (or queued to send) and not yet settled."""
        return self._waiting

    @property
    def state(self) -> str:
        """closed | open (failing fast) | half-open (the probe may go, or is out)."""
        if not self._open:
            return "closed"
        return "half-open" if self._probe is not None or time.monotonic() >= self._retry_at else "open"

    @property
    def backoff_s(self) -> float:
        """How long the current opening of the breaker lasts; 0 while closed."""
        return self._open_for if self._open else 0.0

    def _admit(self) -> bool:
        """Raise unless a lookup may go now; True when it is the half-open probe."""
        if self._closing:
            raise ShardUnavailable("L2 client closing")
        if self._open and (self._probe is not None or time.monotonic() < self._retry_at):
            raise ShardUnavailable(f"shard {self.address} is not answering; retry in "
                                   f"{max(0.0, self._retry_at - time.monotonic()) * 1000:.0f} ms")
        stream = self._stream
        if self._waiting >= self._max_waiting or (stream is not None and stream.outbox.qsize() >= self._max_waiting):
            raise ShardBusy(f"{self._max_waiting} lookups already wait on shard {self.address}")
        return self._open

    def _trip(self, reason: str) -> None:
        """Open the breaker for the current backoff, drop the stream, double the next backoff."""
        stream, self._stream = self._stream, None
        self._probe = None
        was_open, self._open = self._open, True
        self._open_for = self._backoff
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, max(self._reconnect_max_s, FIRST_BACKOFF_S))
        self.trips += 1
        self.last_failure = reason
        if not self._closing:  # a failed probe is old news
            log.log(logging.DEBUG if was_open else logging.WARNING, "L2 shard %s: %s; failing fast for %.2fs",
                    self.address, reason, self._open_for)
        if stream is not None:
            stream.abort(ShardUnavailable(f"shard {self.address}: {reason}"))

    def _recovered(self) -> None:
        self._open = False
        self._probe = None
        self._backoff = FIRST_BACKOFF_S
        log.info("L2 shard %s answering again", self.address)

    # -- the Lookup stream ------------------------------------------------------------------------
    def _ensure_stream(self) -> _Stream:
        if self._stream is None:
            stream = _Stream(self._stub)
            self._stream = stream
            self.stream_opens += 1
            reader = asyncio.create_task(self._read(stream), name=f"l2-reader-{self.address}")
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
        return self._stream

    async def _read(self, stream: _Stream) -> None:
        reason = "closed the Lookup stream"
        try:
            async for reply in stream.call:
                if stream is self._stream and self._open:
                    self._recovered()  # only the probe is sent on a stream opened while open
                fut = stream.pending.get(reply.batch_id)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        except asyncio.CancelledError:
            reason = "Lookup stream cancelled"
            raise
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001 - any stream failure makes the shard look down
            reason = repr(exc)
        finally:
            if stream is self._stream:
                self._trip(reason)

    def _settled(self, stream: _Stream, batch_id: int, timer: asyncio.TimerHandle, fut: asyncio.Future) -> None:
        """Done-callback of every lookup: release its slot, then move the breaker."""
        self._waiting -= 1
        stream.pending.pop(batch_id, None)
        timer.cancel()
        if fut.cancelled():
            if self._probe is fut:  # the probe's caller left: the next lookup probes instead
                self._probe = None
            return
        if isinstance(fut.exception(), L2Timeout) and stream is self._stream:
            self._trip("a lookup got no answer in time")

    async def lookup(self, keys: list[bytes], timeout: float) -> list[bytes | None]:
        """One value (or None) per key; raises L2Error when the shard cannot answer in time."""
        probe = self._admit()
        stream = self._ensure_stream()
        batch_id = next(self._ids)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        timer = loop.call_later(timeout, self._expire, fut, timeout)
        stream.pending[batch_id] = fut
        self._waiting += 1
        fut.add_done_callback(lambda f: self._settled(stream, batch_id, timer, f))
        if probe:
            self._probe = fut
        # The stream is shared by many requests: the trace context rides in the message.
        stream.outbox.put_nowait((fut, pb.LookupRequest(batch_id=batch_id, keys=keys,
                                                        traceparent=tracing.traceparent())))
        reply = await fut
        if len(reply.found) != len(keys) or len(reply.values) != len(keys):
            raise L2Error(f"shard {self.address} answered {len(reply.found)} results for {len(keys)} keys")
        return [value if found else None for found, value in zip(reply.found, reply.values)]

    def _expire(self, fut: asyncio.Future, timeout: float) -> None:
        if not fut.done():
            fut.set_exception(L2Timeout(f"shard {self.address} did not answer a lookup in {timeout * 1000:.0f} ms"))

    # -- unary calls --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closing or self._open:
            raise ShardUnavailable(f"shard {self.address} is not answering lookups")

    async def store(self, entries: list[tuple[bytes, bytes]], timeout: float) -> int:
        """Entries stored; ShardUnavailable at once while the breaker is not closed."""
        self._check_open()
        reply = await self._stub.Store(
            pb.StoreRequest(entries=[pb.Entry(key=k, value=v) for k, v in entries]), timeout=timeout)
        return reply.stored

    async def get_stats(self, timeout: float) -> pb.GetStatsResponse:
        self._check_open()
        return await self._stub.GetStats(pb.GetStatsRequest(), timeout=timeout)

    async def close(self) -> None:
        self._closing = True
        if self._stream is not None:
            self._trip("closing")
        for reader in list(self._readers):
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await self._channel.close()


class L2Client:
    """Routes keys to shards and keeps every failure inside the cache layer."""

    def __init__(self, addresses: tuple[str, ...], stats: Stats, *, timeout_s: float, max_message_bytes: int,
                 reconnect_max_s: float, max_waiting: int = 256, keepalive_ms: int = 0,
                 tls: TlsClientOptions | None = None) -> None:
        self.shards = [ShardConnection(a, stats, max_message_bytes=max_message_bytes,
                                       reconnect_max_s=reconnect_max_s, max_waiting=max_waiting,
                                       keepalive_ms=keepalive_ms, tls=tls) for a in addresses]
        self._ids = [a.encode() for a in addresses]
        self._stats = stats
        self._timeout_s = timeout_s

    @property
    def waiting(self) -> int:
        """Lookups awaiting a shard's answer, all shards together (0 when traffic stops)."""
        return sum(s.waiting for s in self.shards)

    def shard_for(self, key: bytes) -> int:
        return rendezvous(key, self._ids)

    async def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        """One value per key, or None: missing, or its shard failed (already counted as an error)."""
        by_shard: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_shard.setdefault(self.shard_for(key), []).append(i)
        results: list[bytes | None] = [None] * len(keys)

        async def one(shard_index: int, positions: list[int]) -> None:
            wanted = [keys[i] for i in positions]
            shard = self.shards[shard_index]
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

        await asyncio.gather(*(one(s, positions) for s, positions in by_shard.items()))
        return results

    async def entries_and_evictions(self, timeout: float = 1.0) -> tuple[int, int]:
        """Sum of the shards' entry and eviction counts (shards that do not answer count 0)."""
        replies = await asyncio.gather(*(s.get_stats(timeout) for s in self.shards), return_exceptions=True)
        ok = [r for r in replies if not isinstance(r, BaseException)]
        return sum(r.entries for r in ok), sum(r.evictions for r in ok)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards), return_exceptions=True)

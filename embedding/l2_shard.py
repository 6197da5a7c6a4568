"""One cache shard as the frontend sees it: a channel, one long-lived Lookup
stream, coalescing of concurrent lookups, and a circuit breaker.

Per shard there is one channel and one bidi `Lookup` stream, because a
stream pipelines batches with no per-call setup; answers are matched to
waiting callers by `batch_id`. Routing keys to shards, copies and the shard
set are `embedding.l2_client`'s.

Coalescing: every request makes its own lookup, and under many concurrent
single-text requests the shard's fixed cost per message dominates (measured
~140 us of shard CPU per message on this machine; README, Cache at scale).
So a connection keeps at most LOOKUP_MESSAGES_IN_FLIGHT messages in flight;
lookups that arrive in the same event-loop tick, or while that many are in
flight, join one forming message (up to MAX_LOOKUP_KEYS keys) that goes when
the tick ends or an answer frees a slot, and each caller gets its own slice
of the answer. An idle connection sends at the end of the current tick, so a
lone lookup waits for nothing.

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
timeout, broken stream, caller cancelled), so `waiting` returns to 0; a
message keeps only done futures of callers who left, which its answer skips.
"""

from __future__ import annotations

import asyncio
import collections
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
# Lookup messages sent and not yet answered, per shard; lookups beyond wait to be coalesced.
# Two keep the shard busy (it answers one while the next is read) without queueing single keys
# one message each behind it.
LOOKUP_MESSAGES_IN_FLIGHT = 2
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


class _Message:
    """One Lookup message: its keys and the callers they came from (a future and a slice each)."""

    __slots__ = ("batch_id", "keys", "parts", "traceparent")

    def __init__(self, batch_id: int, traceparent: str) -> None:
        self.batch_id = batch_id
        self.keys: list[bytes] = []
        self.parts: list[tuple[asyncio.Future, int, int]] = []
        # One message carries several callers; it carries the first one's trace context.
        self.traceparent = traceparent

    def add(self, keys: list[bytes], fut: asyncio.Future) -> None:
        self.parts.append((fut, len(self.keys), len(keys)))
        self.keys.extend(keys)

    def wanted(self) -> bool:
        """False once every caller has left (timed out, cancelled): then it is not sent."""
        return any(not fut.done() for fut, _, _ in self.parts)

    def answer(self, reply: pb.LookupResponse, address: str) -> None:
        found, values = reply.found, reply.values
        if len(found) != len(self.keys) or len(values) != len(self.keys):
            self.fail(L2Error(f"shard {address} answered {len(found)} results for {len(self.keys)} keys"))
            return
        for fut, start, n in self.parts:
            if not fut.done():
                fut.set_result((found[start:start + n], values[start:start + n]))

    def fail(self, error: L2Error) -> None:
        for fut, _, _ in self.parts:
            if not fut.done():
                fut.set_exception(error)


class _Stream:
    """One Lookup call: its outbox, the messages in flight and those still forming."""

    def __init__(self, stub: pb_grpc.CacheShardServiceStub) -> None:
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.sent: dict[int, _Message] = {}  # by batch_id
        self.forming: collections.deque[_Message] = collections.deque()
        self.flush_scheduled = False
        outbox = self.outbox

        async def requests():
            while True:
                message = await outbox.get()
                if message is None:
                    return
                yield pb.LookupRequest(batch_id=message.batch_id, keys=message.keys,
                                       traceparent=message.traceparent)

        self.call = stub.Lookup(requests())

    def abort(self, error: L2Error) -> None:
        """Cancel the call (grpc drops what it buffered) and fail every waiting lookup."""
        self.call.cancel()
        self.outbox.put_nowait(None)
        messages = [*self.sent.values(), *self.forming]
        self.sent.clear()
        self.forming.clear()
        for message in messages:
            message.fail(error)


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
    def closed(self) -> bool:
        """close() has begun: every lookup now fails at once."""
        return self._closing

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
        if self._waiting >= self._max_waiting:
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
                message = stream.sent.pop(reply.batch_id, None)
                if message is not None:
                    message.answer(reply, self.address)
                if stream.forming and not stream.flush_scheduled:
                    self._flush(stream)  # a slot is free: what formed meanwhile goes now
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

    def _settled(self, stream: _Stream, timer: asyncio.TimerHandle, fut: asyncio.Future) -> None:
        """Done-callback of every lookup: release its slot, then move the breaker. Its message
        keeps only a done future, which an answer skips (and a message of done futures is not sent)."""
        self._waiting -= 1
        timer.cancel()
        if fut.cancelled():
            if self._probe is fut:  # the probe's caller left: the next lookup probes instead
                self._probe = None
            return
        if isinstance(fut.exception(), L2Timeout) and stream is self._stream:
            self._trip("a lookup got no answer in time")

    def _flush(self, stream: _Stream) -> None:
        """Send forming messages while fewer than LOOKUP_MESSAGES_IN_FLIGHT are in flight."""
        stream.flush_scheduled = False
        if stream is not self._stream:
            return  # aborted meanwhile: its messages have failed
        forming, sent = stream.forming, stream.sent
        while forming and len(sent) < LOOKUP_MESSAGES_IN_FLIGHT:
            message = forming.popleft()
            if message.wanted():
                sent[message.batch_id] = message
                stream.outbox.put_nowait(message)

    def _enqueue(self, stream: _Stream, keys: list[bytes], fut: asyncio.Future) -> None:
        """Add the caller's keys to the last forming message if they fit, else to a new one."""
        forming = stream.forming
        if forming and len(forming[-1].keys) + len(keys) <= MAX_LOOKUP_KEYS:
            forming[-1].add(keys, fut)
        else:
            # The stream is shared by many requests: the trace context rides in the message.
            message = _Message(next(self._ids), tracing.traceparent())
            message.add(keys, fut)
            forming.append(message)
        if not stream.flush_scheduled and len(stream.sent) < LOOKUP_MESSAGES_IN_FLIGHT:
            stream.flush_scheduled = True  # at the end of this tick, with whatever joined by then
            asyncio.get_running_loop().call_soon(self._flush, stream)

    async def lookup(self, keys: list[bytes], timeout: float) -> list[bytes | None]:
        """One value (or None) per key; raises L2Error when the shard cannot answer in time."""
        probe = self._admit()
        stream = self._ensure_stream()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        timer = loop.call_later(timeout, self._expire, fut, timeout)
        self._waiting += 1
        fut.add_done_callback(lambda f: self._settled(stream, timer, f))
        if probe:
            self._probe = fut
        self._enqueue(stream, keys, fut)
        found, values = await fut
        return [value if ok else None for ok, value in zip(found, values)]

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

    async def delete(self, keys: list[bytes], timeout: float) -> int:
        """Remove `keys` (cache invalidation); errors as grpc raises them."""
        return (await self._stub.Delete(pb.DeleteRequest(keys=keys), timeout=timeout)).deleted

    async def scan(self, start_after: bytes, limit: int, timeout: float) -> pb.ScanResponse:
        """One page of the shard's entries in key order (cache export)."""
        return await self._stub.Scan(pb.ScanRequest(start_after=start_after, limit=limit), timeout=timeout)

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

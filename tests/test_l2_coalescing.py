"""ShardConnection coalesces concurrent lookups into shared Lookup messages.

What is promised (embedding/l2_client.py): lookups that arrive in one
event-loop tick, or while LOOKUP_MESSAGES_IN_FLIGHT messages are out, share
a message of at most MAX_LOOKUP_KEYS keys; every caller gets exactly its own
keys' answers; a caller that leaves (cancelled, or its own deadline) takes
nothing from the others; a message whose callers have all left is not sent;
and the waiting count returns to 0.

The peer is the in-process stand-in from tests/test_l2_breaker.py (it
records every message it reads); the connection under test is the real one
over a real channel.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from embedding.l2_client import LOOKUP_MESSAGES_IN_FLIGHT, MAX_LOOKUP_KEYS, L2Client
from embedding.stats import Stats
from sutra.cache.v1 import cache_shard_service_pb2 as pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as pb_grpc
from tests.support import aio
from tests.test_l2_breaker import Peer, until

TIMEOUT = 30.0  # lookups here must never time out: the breaker is not under test


class RecordingPeer(Peer):
    """A Peer that records each message's key count, and can hold answers until released."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[int] = []
        self.gate: asyncio.Event | None = None  # set: answers flow; None: no holding

    async def Lookup(self, request_iterator, context):
        # Reads (and records) every message as it comes, while answers wait for the gate.
        self.streams += 1
        queue: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            async for request in request_iterator:
                self.messages.append(len(request.keys))
                queue.put_nowait(request)
            queue.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (request := await queue.get()) is not None:
                if self.gate is not None:
                    await self.gate.wait()
                yield pb.LookupResponse(batch_id=request.batch_id, found=[k in self.data for k in request.keys],
                                        values=[self.data.get(k, b"") for k in request.keys])
        finally:
            reader.cancel()


@contextlib.asynccontextmanager
async def peer_and_conn(entries: int = 2000):
    peer = RecordingPeer()
    peer.data = {b"key-%05d" % i: b"value-%05d" % i for i in range(entries)}
    server = grpc.aio.server()
    pb_grpc.add_CacheShardServiceServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    l2 = L2Client((f"127.0.0.1:{port}",), Stats(), timeout_s=TIMEOUT, max_message_bytes=8 << 20,
                  reconnect_max_s=2.0, max_waiting=4096)
    try:
        yield peer, l2.shards[0]
    finally:
        await l2.close()
        await server.stop(0)


async def fill_slots(peer: RecordingPeer, conn) -> list[asyncio.Future]:
    """LOOKUP_MESSAGES_IN_FLIGHT single-key lookups, each in its own message (one sent before the next starts)."""
    tasks = []
    for i in range(LOOKUP_MESSAGES_IN_FLIGHT):
        tasks.append(asyncio.ensure_future(conn.lookup([key(i)], TIMEOUT)))
        await until(lambda: len(peer.messages) == i + 1, what=f"message {i + 1} read by the peer")
    return tasks


def key(i: int) -> bytes:
    return b"key-%05d" % i


def value(i: int) -> bytes:
    return b"value-%05d" % i


@aio
async def test_concurrent_single_key_lookups_share_messages_and_each_gets_its_own_answer():
    async with peer_and_conn() as (peer, conn):
        results = await asyncio.gather(*(conn.lookup([key(i)], TIMEOUT) for i in range(200)))
        assert results == [[value(i)] for i in range(200)]
        assert sum(peer.messages) == 200
        # 200 lookups in one tick: one message, not 200.
        assert len(peer.messages) == 1, peer.messages
        assert conn.waiting == 0


@aio
async def test_lookups_arriving_while_messages_are_in_flight_wait_and_go_together():
    async with peer_and_conn() as (peer, conn):
        peer.gate = asyncio.Event()
        first = await fill_slots(peer, conn)
        later = [asyncio.ensure_future(conn.lookup([key(100 + i), key(500 + i)], TIMEOUT)) for i in range(30)]
        await asyncio.sleep(0.05)
        assert len(peer.messages) == LOOKUP_MESSAGES_IN_FLIGHT  # the later ones wait for a free slot
        peer.gate.set()
        assert await asyncio.gather(*first) == [[value(i)] for i in range(LOOKUP_MESSAGES_IN_FLIGHT)]
        assert await asyncio.gather(*later) == [[value(100 + i), value(500 + i)] for i in range(30)]
        assert peer.messages == [1] * LOOKUP_MESSAGES_IN_FLIGHT + [60]
        assert conn.waiting == 0


@aio
async def test_messages_stay_within_the_key_limit_and_answers_are_split_in_order():
    async with peer_and_conn(entries=3000) as (peer, conn):
        sizes = [300, 1, 700, 24, 1024, 5, 333]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        results = await asyncio.gather(*(conn.lookup([key(s + j) for j in range(n)], TIMEOUT)
                                         for s, n in zip(starts, sizes)))
        for s, n, got in zip(starts, sizes, results):
            assert got == [value(s + j) for j in range(n)]
        assert max(peer.messages) <= MAX_LOOKUP_KEYS and sum(peer.messages) == sum(sizes)
        assert len(peer.messages) < len(sizes)


@aio
async def test_misses_are_answered_as_none_for_their_own_caller_only():
    async with peer_and_conn(entries=10) as (peer, conn):
        results = await asyncio.gather(conn.lookup([key(1), b"absent-1"], TIMEOUT),
                                       conn.lookup([b"absent-2"], TIMEOUT), conn.lookup([key(2)], TIMEOUT))
        assert results == [[value(1), None], [None], [value(2)]]
        assert len(peer.messages) == 1


@aio
async def test_a_caller_that_leaves_takes_nothing_from_the_others_in_its_message():
    async with peer_and_conn() as (peer, conn):
        peer.gate = asyncio.Event()
        tasks = [asyncio.ensure_future(conn.lookup([key(i)], TIMEOUT)) for i in range(20)]
        # Its own deadline: wait_for cancels the lookup when it runs out, as a request's deadline does.
        impatient = asyncio.ensure_future(asyncio.wait_for(conn.lookup([key(999)], TIMEOUT), 0.001))
        await until(lambda: len(peer.messages) >= 1, what="the shared message sent")
        tasks[3].cancel()
        tasks[17].cancel()
        peer.gate.set()
        results = await asyncio.gather(*tasks, impatient, return_exceptions=True)
        assert isinstance(results[3], asyncio.CancelledError) and isinstance(results[17], asyncio.CancelledError)
        assert isinstance(results[-1], asyncio.TimeoutError)
        assert [r for i, r in enumerate(results[:20]) if i not in (3, 17)] == [
            [value(i)] for i in range(20) if i not in (3, 17)]
        assert conn.waiting == 0 and conn.state == "closed"
        # The connection is still healthy for the next caller.
        assert await conn.lookup([key(7)], TIMEOUT) == [value(7)]


@aio
async def test_a_message_whose_callers_all_left_is_not_sent():
    async with peer_and_conn() as (peer, conn):
        peer.gate = asyncio.Event()
        busy = await fill_slots(peer, conn)
        gone = [asyncio.ensure_future(conn.lookup([key(50 + i)], TIMEOUT)) for i in range(10)]
        await asyncio.sleep(0.01)
        for task in gone:
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        peer.gate.set()
        await asyncio.gather(*busy)
        after = await conn.lookup([key(60)], TIMEOUT)
        assert after == [value(60)]
        # The busy messages, then the one lookup after: the cancelled callers' message never went.
        assert peer.messages == [1] * LOOKUP_MESSAGES_IN_FLIGHT + [1]
        assert conn.waiting == 0

"""The L2 client's circuit breaker, waiting bound and release of waiting
lookups, against a shard that hangs.

The peer is a small grpc.aio CacheShardService in this process that can be
told to stop answering (it keeps reading, like a shard whose answers never
come back) or to answer after a random delay: a stand-in for the network
peer only; the ShardConnection under test is the real one, over a real
channel. The real shard process, SIGSTOPped, is in tests/faults/test_shard_hang.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import grpc
import pytest

from embedding.l2_client import L2Client, L2Timeout, ShardBusy, ShardConnection, ShardUnavailable
from embedding.stats import Stats
from embedding.writeback import WriteBack
from sutra.cache.v1 import cache_shard_service_pb2 as pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as pb_grpc
from tests.support import aio

SHORT = 0.05  # a lookup timeout that the hanging peer always exceeds


class Peer(pb_grpc.CacheShardServiceServicer):
    """Answers from `data`; `hang` stops answers (requests are still read), `delay` spreads them."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.hang = False
        self.delay = 0.0
        self.received = 0
        self.streams = 0
        self.stores = 0

    async def Lookup(self, request_iterator, context):
        self.streams += 1
        async for request in request_iterator:
            self.received += 1
            if self.hang:
                continue
            if self.delay:
                await asyncio.sleep(random.uniform(0, self.delay))
            yield pb.LookupResponse(batch_id=request.batch_id, found=[k in self.data for k in request.keys],
                                    values=[self.data.get(k, b"") for k in request.keys])

    async def Store(self, request, context):
        self.stores += 1
        if self.hang:
            await asyncio.Event().wait()
        for e in request.entries:
            self.data[e.key] = e.value
        return pb.StoreResponse(stored=len(request.entries))


@contextlib.asynccontextmanager
async def peer_and_client(max_waiting: int = 256, reconnect_max_s: float = 2.0):
    peer = Peer()
    server = grpc.aio.server()
    pb_grpc.add_CacheShardServiceServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    l2 = L2Client((f"127.0.0.1:{port}",), Stats(), timeout_s=SHORT, max_message_bytes=1 << 20,
                  reconnect_max_s=reconnect_max_s, max_waiting=max_waiting)
    try:
        yield peer, l2, l2.shards[0]
    finally:
        await l2.close()
        await server.stop(0)


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.005)


async def trip(peer: Peer, conn: ShardConnection) -> None:
    peer.hang = True
    with pytest.raises(L2Timeout):
        await conn.lookup([b"k"], SHORT)
    assert conn.state == "open"


def kinds(results) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        name = type(r).__name__ if isinstance(r, BaseException) else "answer"
        out[name] = out.get(name, 0) + 1
    return out


@aio
async def test_one_timeout_opens_the_breaker_and_fails_every_waiter_at_once():
    async with peer_and_client() as (peer, _, conn):
        peer.data[b"k"] = b"v"
        assert await conn.lookup([b"k"], 1.0) == [b"v"]
        peer.hang = True
        # One short timeout among nine long ones: the first timeout fails them all, nobody waits 5 s.
        results = await asyncio.gather(conn.lookup([b"k"], SHORT),
                                       *(conn.lookup([b"k"], 5.0) for _ in range(9)), return_exceptions=True)
        assert kinds(results) == {"L2Timeout": 1, "ShardUnavailable": 9}
        assert conn.state == "open" and conn.trips == 1 and not conn.connected and conn.waiting == 0
        sent = peer.received
        for _ in range(50):  # open: refused before anything is queued or sent
            with pytest.raises(ShardUnavailable):
                await conn.lookup([b"k"], 5.0)
        assert conn.waiting == 0 and conn.trips == 1
        assert peer.received == sent


@aio
async def test_backoff_doubles_up_to_the_cap_and_an_answer_resets_it():
    async with peer_and_client(reconnect_max_s=0.4) as (peer, _, conn):
        await trip(peer, conn)
        backoffs = [conn.backoff_s]
        for _ in range(4):
            await until(lambda: conn.state == "half-open", what="backoff over")
            with pytest.raises(L2Timeout):  # the probe
                await conn.lookup([b"k"], SHORT)
            backoffs.append(conn.backoff_s)
        assert backoffs == [0.1, 0.2, 0.4, 0.4, 0.4]
        assert conn.stream_opens == 5  # every probe on a fresh stream
        await until(lambda: peer.streams == 5, what="the peer saw every stream")

        peer.hang = False
        await until(lambda: conn.state == "half-open", what="backoff over")
        assert await conn.lookup([b"k"], 1.0) == [None]
        assert conn.state == "closed" and conn.backoff_s == 0.0
        await trip(peer, conn)
        assert conn.backoff_s == 0.1


@aio
async def test_half_open_lets_exactly_one_probe_through():
    async with peer_and_client() as (peer, _, conn):
        await trip(peer, conn)
        await until(lambda: conn.state == "half-open", what="backoff over")
        sent = peer.received
        results = await asyncio.gather(*(conn.lookup([b"k"], 0.2) for _ in range(20)), return_exceptions=True)
        assert kinds(results) == {"L2Timeout": 1, "ShardUnavailable": 19}
        assert peer.received == sent + 1
        assert conn.stream_opens == 2 and conn.waiting == 0


@aio
async def test_a_probe_whose_caller_leaves_hands_the_probe_to_the_next_lookup():
    async with peer_and_client() as (peer, _, conn):
        await trip(peer, conn)
        await until(lambda: conn.state == "half-open", what="backoff over")
        probe = asyncio.create_task(conn.lookup([b"k"], 5.0))
        await until(lambda: conn.waiting == 1, what="probe sent")
        with pytest.raises(ShardUnavailable):
            await conn.lookup([b"k"], 5.0)
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)
        assert conn.waiting == 0 and conn.state == "half-open"
        peer.hang = False
        assert await conn.lookup([b"k"], 1.0) == [None]
        assert conn.state == "closed"


@aio
async def test_waiting_lookups_are_bounded_and_released_when_callers_leave():
    async with peer_and_client(max_waiting=8) as (peer, l2, conn):
        peer.hang = True
        tasks = [asyncio.create_task(conn.lookup([b"k"], 5.0)) for _ in range(30)]
        await until(lambda: sum(t.done() for t in tasks) == 22, what="the excess refused")
        assert kinds(t.exception() for t in tasks if t.done()) == {"ShardBusy": 22}
        assert conn.waiting == l2.waiting == 8 and conn.state == "closed"
        with pytest.raises(ShardBusy):
            await conn.lookup([b"k"], 5.0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert conn.waiting == l2.waiting == 0 and conn.state == "closed"
        peer.hang = False
        peer.data[b"k"] = b"v"
        assert await conn.lookup([b"k"], 1.0) == [b"v"]


@pytest.mark.parametrize("hang", [False, True], ids=["answering", "hanging"])
@aio
async def test_callers_cancelled_at_random_moments_leave_nothing_waiting(hang):
    rng = random.Random(20 + hang)
    async with peer_and_client(max_waiting=64) as (peer, l2, conn):
        peer.data = {b"k%d" % i: b"v%d" % i for i in range(0, 100, 2)}
        peer.delay = 0.002
        peer.hang = hang
        for _ in range(3):
            tasks = []
            for i in range(200):
                task = asyncio.create_task(conn.lookup([b"k%d" % (i % 100)], rng.choice([0.001, 0.02, 1.0])))
                roll = rng.random()
                if roll < 0.2:
                    task.cancel()  # before its first step
                elif roll < 0.7:
                    asyncio.get_running_loop().call_later(rng.uniform(0, 0.03), task.cancel)
                tasks.append(task)
                if rng.random() < 0.3:
                    await asyncio.sleep(0)
            await asyncio.gather(*tasks, return_exceptions=True)
            assert conn.waiting == l2.waiting == 0
        peer.hang = False
        # The storm may have opened the breaker; a new lookup answers once it lets one through.
        for _ in range(200):
            if (await l2.lookup([b"k2"]))[0] == b"v2":
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail(f"no answer after the storm (breaker {conn.state})")
        assert conn.waiting == 0 and conn.state == "closed"


@aio
async def test_store_and_stats_fail_fast_while_the_breaker_is_open():
    async with peer_and_client() as (peer, l2, conn):
        assert await conn.store([(b"a", b"1")], 1.0) == 1
        await trip(peer, conn)
        for call in (conn.store([(b"b", b"2")], 5.0), conn.get_stats(5.0)):
            with pytest.raises(ShardUnavailable):
                await call
        assert peer.stores == 1
        assert await l2.entries_and_evictions() == (0, 0)


@aio
async def test_close_settles_waiting_lookups():
    async with peer_and_client() as (peer, l2, conn):
        peer.hang = True
        tasks = [asyncio.create_task(conn.lookup([b"k"], 5.0)) for _ in range(5)]
        await until(lambda: conn.waiting == 5, what="lookups waiting")
        await l2.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert kinds(results) == {"ShardUnavailable": 5}
        assert conn.waiting == 0
        with pytest.raises(ShardUnavailable):
            await conn.lookup([b"k"], 5.0)


@aio
async def test_writeback_to_an_open_breaker_counts_errors_without_waiting():
    async with peer_and_client() as (peer, l2, conn):
        stats = Stats()
        wb = WriteBack(l2, stats, capacity=100, batch=10, timeout_s=30.0)
        wb.start()
        await trip(peer, conn)
        for i in range(25):
            assert wb.offer(b"k%d" % i, b"v")
        await asyncio.wait_for(wb.drained(), 5.0)  # fails fast: far from 3 x 30 s
        assert stats.l2.errors == 3 and stats.l2_writes == 0  # one per batch of 10
        assert wb.queued == 0 and peer.stores == 0
        await wb.close(1.0)


class _Shard:
    def __init__(self) -> None:
        self.stored: list[bytes] = []

    async def store(self, entries, timeout):
        self.stored += [k for k, _ in entries]
        return len(entries)


class _L2:
    def __init__(self) -> None:
        self.shards = [_Shard()]

    async def store(self, entries, timeout):
        return await self.shards[0].store(entries, timeout), 0


@aio
async def test_writeback_worker_that_dies_is_started_again():
    l2, stats = _L2(), Stats()
    wb = WriteBack(l2, stats, capacity=100, batch=10)
    real_store = wb._store
    calls = 0

    async def store_that_crashes_once(items):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug in the worker")
        await real_store(items)

    wb._store = store_that_crashes_once
    wb.start()
    wb.offer(b"lost", b"v")
    await asyncio.wait_for(wb.drained(), 5.0)
    await until(lambda: wb.restarts == 1, what="worker restarted")
    wb.offer(b"kept", b"v")
    await asyncio.wait_for(wb.drained(), 5.0)
    assert l2.shards[0].stored == [b"kept"] and wb.queued == 0
    await wb.close(1.0)
    assert wb.restarts == 1


class _CountingL2(_L2):
    """Records the entries of each Store call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[bytes]] = []

    async def store(self, entries, timeout):
        self.calls.append([k for k, _ in entries])
        return await super().store(entries, timeout)


@aio
@pytest.mark.parametrize("linger_s, calls", [(0.0, [[b"k0"], [b"k1", b"k2", b"k3", b"k4"]]),
                                             (0.05, [[b"k0", b"k1", b"k2", b"k3", b"k4"]])])
async def test_writeback_linger_lets_later_entries_join_one_store(linger_s, calls):
    # The worker takes k0 while the test yields; the other four arrive before it runs again (no await
    # between the offers), so only the linger decides whether k0 waits for them.
    l2 = _CountingL2()
    wb = WriteBack(l2, Stats(), capacity=100, batch=10, linger_s=linger_s)
    wb.start()
    wb.offer(b"k0", b"v")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for i in range(1, 5):
        wb.offer(b"k%d" % i, b"v")
    await asyncio.wait_for(wb.drained(), 5.0)
    assert l2.calls == calls
    await wb.close(1.0)


@aio
async def test_writeback_close_stores_what_lingers():
    l2 = _CountingL2()
    wb = WriteBack(l2, Stats(), capacity=100, batch=10, linger_s=30.0)
    wb.start()
    wb.offer(b"a", b"v")
    await asyncio.sleep(0)
    wb.offer(b"b", b"v")
    await wb.close(1.0)  # the worker sleeps its linger; close must not wait it out or lose the entries
    assert sorted(l2.shards[0].stored) == [b"a", b"b"]


@aio
async def test_writeback_full_batch_ends_the_linger():
    l2 = _CountingL2()
    wb = WriteBack(l2, Stats(), capacity=100, batch=4, linger_s=30.0)
    wb.start()
    wb.offer(b"k0", b"v")
    await asyncio.sleep(0)
    for i in range(1, 6):
        wb.offer(b"k%d" % i, b"v")
    await until(lambda: len(l2.calls) >= 1, what="the first Store, long before the 30 s linger")
    assert l2.calls[0] == [b"k0", b"k1", b"k2", b"k3"]
    await wb.close(1.0)
    assert sorted(l2.shards[0].stored) == [b"k%d" % i for i in range(6)]


@aio
async def test_writeback_linger_ends_when_the_queue_bound_is_below_the_batch():
    # capacity 3 < batch 256: three entries held (one taken, two queued) are a full Store, so the
    # worker stops lingering instead of letting the full queue drop what comes next.
    l2 = _CountingL2()
    stats = Stats()
    wb = WriteBack(l2, stats, capacity=3, batch=256, linger_s=30.0)
    wb.start()
    wb.offer(b"k0", b"v")
    await asyncio.sleep(0)
    wb.offer(b"k1", b"v")
    wb.offer(b"k2", b"v")
    await until(lambda: len(l2.calls) >= 1, what="the first Store, long before the 30 s linger")
    assert l2.calls[0] == [b"k0", b"k1", b"k2"] and stats.l2_writes_dropped == 0
    await wb.close(1.0)

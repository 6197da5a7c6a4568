"""Which connection a batch goes on (`embedding.mlbase_pool.pick_connection`).

Replicas put their id in every answer, so the pool knows which of its
connections reach the same replica. The rules, each pinned here: the least
busy replica first (counted over all of its connections), then the fewest
RPCs on the connection, then one that reaches the wanted fingerprint, then
(with affinity) the replica that answered last, then the least used
connection; a retry avoids the connections it tried and, where another is
known, their replicas. The end-to-end side (a lone client stays on one
replica, concurrent ones use both, a refused batch goes to the other) is in
tests/test_lb_replicas.py. The last test here checks, on a real replica,
that GetInfo alone (the pool's watch) labels every connection, and
relabels them when the replica behind them is a new one.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc

from common.tls import DEFAULT_MAX_MESSAGE_BYTES
from embedding.mlbase_pool import MLBasePool, pick_connection
from embedding.stats import Stats
from harness.procs import free_port
from harness.stack import service
from sutra.mlbase.v1 import mlbase_service_pb2 as mpb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as mpb_grpc
from tests.support import aio


def conn(index: int, replica: str = "", inflight: int = 0, answered_at: float = 0.0, calls: int = 0):
    """The attributes pick_connection reads from a pooled connection."""
    return SimpleNamespace(index=index, replica=replica, inflight=inflight, answered_at=answered_at, calls=calls)


def test_an_idle_pool_sends_a_lone_batch_to_the_replica_that_answered_last():
    conns = [conn(0, "r1", answered_at=5.0, calls=9), conn(1, "r2", answered_at=9.0, calls=9),
             conn(2, "r1", answered_at=1.0, calls=0), conn(3, "r2", answered_at=2.0, calls=0)]
    chosen = pick_connection(conns)
    assert chosen.replica == "r2"
    # Any connection to the warm replica will do; among them, the least used.
    assert chosen.index == 3


def test_without_affinity_idle_batches_take_the_connections_in_turn():
    conns = [conn(0, "r1", answered_at=5.0, calls=3), conn(1, "r2", answered_at=9.0, calls=3),
             conn(2, "r1", answered_at=1.0, calls=2), conn(3, "r2", answered_at=2.0, calls=3)]
    assert pick_connection(conns, affinity=False).index == 2


def test_a_busy_replica_is_avoided_even_through_its_idle_connection():
    # r1 computes on connection 0; connection 2 also reaches r1, and r1 answered last.
    conns = [conn(0, "r1", inflight=1, answered_at=9.0), conn(1, "r2", answered_at=1.0),
             conn(2, "r1", answered_at=9.0)]
    assert pick_connection(conns).replica == "r2"


def test_with_every_replica_busy_the_least_busy_one_gets_the_batch():
    conns = [conn(0, "r1", inflight=2), conn(1, "r1", inflight=1), conn(2, "r2", inflight=1),
             conn(3, "r2", inflight=1)]
    # r1 has 3 RPCs in flight, r2 two.
    assert pick_connection(conns).replica == "r2"


def test_connections_whose_replica_is_unknown_count_on_their_own():
    # New connections (no answer yet) are not lumped together as one replica.
    conns = [conn(0, "", inflight=1), conn(1, "", inflight=0, calls=4), conn(2, "r1", inflight=1)]
    assert pick_connection(conns).index == 1


def test_a_retry_goes_to_another_replica_when_one_is_known():
    conns = [conn(0, "r1", answered_at=9.0), conn(1, "r1", answered_at=8.0), conn(2, "r2", answered_at=1.0)]
    chosen = pick_connection(conns, avoid_connections={0}, avoid_replicas={"r1"})
    assert chosen.index == 2
    # With no other replica known it still tries another connection rather than none.
    only_r1 = conns[:2]
    assert pick_connection(only_r1, avoid_connections={0}, avoid_replicas={"r1"}).index == 1
    # And with every connection tried, it tries again somewhere rather than giving up.
    assert pick_connection(only_r1, avoid_connections={0, 1}, avoid_replicas={"r1"}).index in (0, 1)


def test_at_equal_load_a_connection_known_to_reach_the_wanted_model_comes_first():
    conns = [conn(0, "r1", answered_at=9.0), conn(1, "r2", answered_at=1.0)]
    assert pick_connection(conns, prefer=lambda c: c.index == 1).index == 1
    # ...but never at the price of a busier replica.
    conns[1].inflight = 1
    assert pick_connection(conns, prefer=lambda c: c.index == 1).index == 0


def replica_id(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        return mpb_grpc.MLBaseServiceStub(ch).GetInfo(mpb.GetInfoRequest(), timeout=30).replica_id


async def labels_after_refresh(pool: MLBasePool, want: str, timeout: float = 60.0) -> set[str]:
    """Refresh (GetInfo on every connection) until every label is `want` or `timeout` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        await pool.refresh()
        labels = {c.replica for c in pool._conns}
        if labels == {want} or loop.time() > deadline:
            return labels
        await asyncio.sleep(0.2)


def test_get_info_labels_every_connection_and_a_new_replica_relabels_them(tmp_path):
    port = free_port()
    settings = {"server.port": port, "threads": 1, "server.drain_seconds": 0.0}
    first = service("mlbase", tmp_path / "first.log", settings).start().wait_serving(300)
    second = None
    try:
        address = f"127.0.0.1:{port}"
        old = replica_id(address)
        assert len(old) == 16

        @aio
        async def scenario() -> None:
            nonlocal second
            pool = MLBasePool(address, 3, Stats(), max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, watch_s=0)
            try:
                # No batch has run: GetInfo alone tells the pool where each connection leads.
                assert await labels_after_refresh(pool, old) == {old}
                first.stop()
                assert await labels_after_refresh(pool, "") == {""}  # gone: unknown, not the old id
                second = service("mlbase", tmp_path / "second.log", settings).start().wait_serving(300)
                new = replica_id(address)
                assert new != old
                assert await labels_after_refresh(pool, new) == {new}
            finally:
                await pool.close()

        scenario()
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()

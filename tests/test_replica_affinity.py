"""Which connection a batch goes on (`embedding.mlbase_pool.pick_connection`).

Replicas put their id in every answer, so the pool knows which of its
connections reach the same replica. The rules, each pinned here: the least
busy replica first (counted over all of its connections), then the fewest
RPCs on the connection, then one that reaches the wanted fingerprint, then
(with affinity) the replica that answered last, then the least used
connection; a retry avoids the connections it tried and, where another is
known, their replicas. The end-to-end side (a lone client stays on one
replica, concurrent ones use both) is in tests/test_lb_replicas.py.
"""

from __future__ import annotations

from types import SimpleNamespace

from embedding.mlbase_pool import pick_connection


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

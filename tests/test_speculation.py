"""Overlapping the L2 round trip with the computation (FrontendEngine._speculate).

With ML-base idle and L2 rarely answering, a cache miss starts computing while L2 is asked, so a
miss costs max(L2, compute) instead of their sum. These tests drive the frontend's own engine
over a real cache shard process (RocksDB) through its own L2Client; the ML-base hop is the unit
tests' recording Backend, gated, so that what is computed and when is observable without timing.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from common.grpc_server import ServerOptions
from embedding.engine import FrontendEngine
from embedding.l2_client import L2Client
from embedding.settings import FrontendSettings
from embedding.stats import Stats
from harness.procs import wait_until
from harness.stack import service
from tests.support import aio
from tests.test_embedding_units import INFO, Backend, fake_vector, until


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("speculation")
    proc = service("cacheshard", path / "shard.log", {"path": path / "db"}).start()
    try:
        proc.wait_serving(120)
        yield proc
    finally:
        proc.stop()


@contextlib.asynccontextmanager
async def engine_over(shard, backend: Backend, **overrides):
    """An engine with L1 off (every repeat asks L2) over the real shard."""
    stats = Stats()
    settings = FrontendSettings(server=ServerOptions(), cache_shards=(shard.address,),
                                **{"l1_entries": 0, "batch_window_ms": 1.0, **overrides})
    l2 = L2Client((shard.address,), stats, timeout_s=5.0, max_message_bytes=8 << 20, reconnect_max_s=1.0)
    engine = FrontendEngine(settings, stats, backend, l2=l2)
    engine.configure(INFO)
    try:
        yield engine
    finally:
        await engine.close(5.0)
        await l2.close()


async def stored(engine: FrontendEngine, count: int) -> None:
    """Wait until `count` write-backs reached the shard."""
    for _ in range(5000):
        if engine.stats.l2_writes >= count:
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"only {engine.stats.l2_writes} of {count} write-backs stored")


def test_an_idle_miss_computes_while_l2_is_asked_and_an_l2_hit_cancels_the_computation(shard):
    @aio
    async def run():
        backend = Backend(gated=True)
        async with engine_over(shard, backend) as engine:
            # A new text: the computation starts before L2 has answered (the gate holds it).
            first = asyncio.ensure_future(engine.embed(["speculation: a brand new text"]))
            await until(lambda: backend.texts == ["speculation: a brand new text"])
            await until(lambda: engine.stats.l2.misses == 1)
            backend.gate.set()
            reply = await first
            assert reply.usage.computed == 1 and reply.usage.l2_hits == 0
            assert engine.stats.speculated == 1 and engine.stats.speculated_l2_hits == 0
            await stored(engine, 1)

            # The same text again (L1 off): speculation starts a computation, L2 answers first, and
            # the computation is cancelled; the answer is L2's, equal to the computed one.
            backend.gate.clear()
            again = await engine.embed(["speculation: a brand new text"])
            assert again.usage.l2_hits == 1 and again.usage.computed == 0
            np.testing.assert_allclose(again.vectors, reply.vectors, atol=2e-3)
            assert engine.stats.speculated == 2 and engine.stats.speculated_l2_hits == 1
            await until(lambda: backend.cancelled == 1)
            assert engine.pending == 0 and engine.inflight.idle
    run()


def test_speculation_stops_while_l2_answers_most_misses(shard):
    @aio
    async def run():
        backend = Backend()
        async with engine_over(shard, backend) as engine:
            texts = [f"speculation: popular text {i}" for i in range(30)]
            for t in texts:
                await engine.embed([t])
            await stored(engine, len(texts))
            # (An instant computation may have been written back before its own L2 lookup was read,
            # and that lookup then counted as an L2 hit: only what follows is counted.)
            speculated, wasted = engine.stats.speculated, engine.stats.speculated_l2_hits
            for t in texts:  # every one an L2 hit now
                reply = await engine.embed([t])
                assert reply.usage.l2_hits == 1 and reply.usage.computed == 0
            # The first hits were speculated (the share of answered misses was still low); once L2
            # answered most misses, no more computations were spent on hits.
            spent = engine.stats.speculated_l2_hits - wasted
            assert 0 < spent < 15 and engine.stats.speculated - speculated == spent
            before = engine.stats.speculated
            for t in texts[:10]:
                await engine.embed([t])
            assert engine.stats.speculated == before
    run()


def test_no_speculation_when_turned_off_or_while_batches_run(shard):
    @aio
    async def run():
        backend = Backend(gated=True)
        async with engine_over(shard, backend, speculate_below_l2_hit_rate=0.0) as engine:
            pending = asyncio.ensure_future(engine.embed(["speculation off: new text"]))
            await until(lambda: backend.texts == ["speculation off: new text"])
            backend.gate.set()
            await pending
            assert engine.stats.speculated == 0

        backend = Backend(gated=True)
        async with engine_over(shard, backend) as engine:
            busy = asyncio.ensure_future(engine.embed(["speculation: the batch that keeps ML-base busy"]))
            await until(lambda: len(backend.batches) == 1)
            assert engine.stats.speculated == 1
            # A second miss while a batch runs asks L2 first: its text reaches the backend only after.
            second = asyncio.ensure_future(engine.embed(["speculation: arrives while busy"]))
            await until(lambda: engine.stats.l2.misses == 2)
            assert engine.stats.speculated == 1
            backend.gate.set()
            await asyncio.gather(busy, second)
            assert engine.stats.speculated == 1
            assert "speculation: arrives while busy" in backend.texts
            assert engine.pending == 0 and engine.inflight.idle
    run()


def test_settings_refuse_a_share_outside_zero_to_one():
    with pytest.raises(ValueError, match="between 0 and 1"):
        FrontendSettings(server=ServerOptions(), cache_shards=(), speculate_below_l2_hit_rate=1.5)

"""Unit tests for the frontend's parts that need no other process: the LRU,
rendezvous hashing, settings, and the engine's call path (de-duplication,
single-flight, batching, deadlines, cancellation, limits) driven by a plain
async function in place of the network hop to ML-base. The real processes are
exercised in tests/test_embedding_integration.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import urllib.request
from collections.abc import AsyncIterator

import numpy as np
import pytest

from common.errors import DeadlineExceeded, InvalidInput, Overloaded, Unavailable
from common.grpc_server import ServerOptions
from common.matryoshka import reduce
from embedding.admin import AdminServer
from embedding.engine import FrontendEngine
from embedding.l1 import LRUCache
from embedding.l2_client import rendezvous
from embedding.mlbase_pool import ReplicaInfo
from embedding.settings import FrontendSettings, load_settings
from embedding.stats import Stats, make_registry
from tests.support import aio

NATIVE = 16




def fake_vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).normal(size=NATIVE).astype(np.float32)


INFO = ReplicaInfo(model_id="unit-model", fingerprint="fp-unit", native_width=NATIVE, max_seq_length=32,
                   backend="test", precision="fp32", allowed_widths=(), min_width=4, default_width=8,
                   layer_norm=False, max_inputs=100, max_chars=1000)


class Backend:
    """Stands in for the ML-base hop: records every batch it is asked for."""

    def __init__(self, delay: float = 0.0, gated: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        # When gated, every batch waits for `gate.set()`.
        self.gate: asyncio.Event | None = asyncio.Event() if gated else None
        self.cancelled = 0
        self.fail: Exception | None = None

    async def __call__(self, texts: list[str], timeout: float, fingerprint: str | None = None):
        self.batches.append(list(texts))
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        truncated = {i for i, t in enumerate(texts) if len(t) > 40}
        return np.stack([fake_vector(t) for t in texts]), truncated

    @property
    def texts(self) -> list[str]:
        return [t for b in self.batches for t in b]


async def until(condition, tries: int = 2000) -> None:
    """Yield to the loop until `condition()` holds (the engine settles cancellations asynchronously)."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


@contextlib.asynccontextmanager
async def running(backend: Backend, **overrides) -> AsyncIterator[FrontendEngine]:
    """An engine over `backend` (settings overridden by keyword), closed when the block ends."""
    settings = FrontendSettings(server=ServerOptions(), cache_shards=(), **{"batch_window_ms": 1.0, **overrides})
    engine = FrontendEngine(settings, Stats(), backend, l2=None)
    engine.configure(INFO)
    try:
        yield engine
    finally:
        await engine.close(0)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.status, r.read()


@contextlib.asynccontextmanager
async def serving(admin: AdminServer) -> AsyncIterator[AdminServer]:
    """The admin HTTP server, started for the block and closed after it."""
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


# -- L1 ---------------------------------------------------------------------------------------

def test_lru_evicts_least_recently_used():
    cache = LRUCache(2)
    cache.put(b"a", np.ones(3), False)
    cache.put(b"b", np.ones(3) * 2, True)
    assert cache.get(b"a") is not None  # a is now most recent
    cache.put(b"c", np.ones(3) * 3, False)
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"c") is not None
    assert cache.evictions == 1 and len(cache) == 2
    assert not cache.get(b"a").vector.flags.writeable


def test_lru_zero_capacity_holds_nothing():
    cache = LRUCache(0)
    cache.put(b"a", np.ones(3), False)
    assert cache.get(b"a") is None and len(cache) == 0


# -- rendezvous -------------------------------------------------------------------------------

def test_rendezvous_spreads_and_only_moves_keys_to_a_new_shard():
    keys = [hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(3000)]
    three = [b"a:1", b"b:2", b"c:3"]
    before = [rendezvous(k, three) for k in keys]
    counts = np.bincount(before, minlength=3)
    assert counts.min() > 800  # roughly even
    after = [rendezvous(k, three + [b"d:4"]) for k in keys]
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert moved and all(a == 3 for _, a in moved)


# -- settings ---------------------------------------------------------------------------------

def test_settings_from_env_and_flags():
    env = {"SUTRA_CACHE_ENABLED": "false", "MATRYOSHKA_DIM": "128", "SUTRA_CACHE_SHARDS": "h1:1, h2:2",
           "SUTRA_EMBEDDING_PORT": "6000"}
    s = load_settings([], env)
    assert not s.cache_enabled and not s.l1_enabled and not s.l2_enabled
    assert s.default_width == 128 and s.cache_shards == ("h1:1", "h2:2") and s.server.port == 6000
    s = load_settings(["--cache-enabled", "true", "--l1-entries", "5", "--port", "7"], env)
    assert s.cache_enabled and s.l1_entries == 5 and s.server.port == 7
    with pytest.raises(SystemExit):
        load_settings(["--mlbase-connections", "0"], {})


# -- engine -----------------------------------------------------------------------------------

@aio
async def test_vectors_are_the_shared_transform_and_duplicates_computed_once():
    backend = Backend()
    async with running(backend) as engine:
        result = await engine.embed(["x", "y", "x"], 6)
        expected = reduce(np.stack([fake_vector("x"), fake_vector("y"), fake_vector("x")]), 6, False)
        np.testing.assert_array_equal(result.vectors, expected)
        assert backend.texts == ["x", "y"]
        assert (result.usage.duplicates, result.usage.computed, result.usage.l1_hits) == (1, 2, 0)
        again = await engine.embed(["y"], 0)
        assert again.width == 8 and again.usage.l1_hits == 1 and backend.texts == ["x", "y"]


@aio
async def test_concurrent_identical_requests_compute_once():
    backend = Backend(gated=True)
    async with running(backend) as engine:
        tasks = [asyncio.create_task(engine.embed(["same text"], 8)) for _ in range(20)]
        await until(lambda: backend.batches)
        backend.gate.set()
        results = await asyncio.gather(*tasks)
        assert backend.texts == ["same text"]
        assert engine.stats.computed == 0  # counted by the real pool, not by this stand-in
        assert engine.stats.coalesced == 19
        for r in results:
            np.testing.assert_array_equal(r.vectors, results[0].vectors)


@aio
async def test_misses_from_concurrent_requests_share_a_batch():
    """Adaptive batching: the first miss goes at once (nothing was in flight); the nine that arrive
    while it computes wait for the window and share one batch."""
    backend = Backend()
    async with running(backend, batch_window_ms=20.0) as engine:
        await asyncio.gather(*(engine.embed([f"t{i}"], 8) for i in range(10)))
        assert [sorted(b) for b in backend.batches] == [["t0"], sorted(f"t{i}" for i in range(1, 10))]


@aio
async def test_cancelled_caller_leaves_shared_work_running_for_others():
    backend = Backend(gated=True)
    async with running(backend) as engine:
        first = asyncio.create_task(engine.embed(["shared"], 8))
        second = asyncio.create_task(engine.embed(["shared"], 8))
        await until(lambda: backend.batches)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        assert backend.cancelled == 0
        backend.gate.set()
        result = await second
        assert result.vectors.shape == (1, 8) and engine.pending == 0


@aio
async def test_work_is_cancelled_when_every_caller_leaves():
    backend = Backend(gated=True)
    async with running(backend) as engine:
        task = asyncio.create_task(engine.embed(["abandoned"], 8))
        await until(lambda: backend.batches)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await until(lambda: backend.cancelled == 1 and engine.pending == 0)
        backend.gate.set()
        # A later request for the same text starts fresh work and succeeds.
        result = await engine.embed(["abandoned"], 8)
        assert result.usage.computed == 1 and len(backend.batches) == 2


@aio
async def test_deadline_exceeded_and_error_propagation():
    backend = Backend(delay=0.5)
    async with running(backend) as engine:
        loop_deadline = __import__("time").monotonic() + 0.05
        with pytest.raises(DeadlineExceeded):
            await engine.embed(["slow"], 8, deadline=loop_deadline)
        await until(lambda: engine.pending == 0)
        assert backend.cancelled == 1
        backend.delay = 0.0
        backend.fail = Unavailable("no replica")
        with pytest.raises(Unavailable):
            await engine.embed(["fails"], 8)
        backend.fail = None
        assert (await engine.embed(["fails"], 8)).usage.computed == 1


@aio
async def test_validation_errors_name_the_limit():
    async with running(Backend(), max_inputs=3) as engine:
        with pytest.raises(InvalidInput, match="cannot be empty"):
            await engine.embed([], 8)
        with pytest.raises(InvalidInput, match="limit is 3"):
            await engine.embed(["a"] * 4, 8)
        with pytest.raises(InvalidInput, match="limit is 1000"):  # the replica's max_chars is lower
            await engine.embed(["a" * 1001], 8)
        with pytest.raises(InvalidInput, match="4 to 16"):
            await engine.embed(["a"], 2)
        with pytest.raises(InvalidInput, match="4 to 16"):
            await engine.embed(["a"], 17)


@aio
async def test_pending_bound_refuses_with_overloaded():
    backend = Backend(gated=True)
    async with running(backend, max_pending=3) as engine:
        held = asyncio.create_task(engine.embed(["p1", "p2"], 8))
        await until(lambda: backend.batches)
        with pytest.raises(Overloaded, match="limit 3"):
            await engine.embed(["p3", "p4"], 8)
        assert engine.stats.rejected_overloaded == 1
        backend.gate.set()
        await held
        assert (await engine.embed(["p3", "p4"], 8)).usage.computed == 2


@aio
async def test_truncation_is_reported_cached_and_rejected_on_request():
    backend = Backend()
    long_text = "long " * 20
    async with running(backend) as engine:
        r = await engine.embed(["short", long_text, long_text], 8)
        assert r.truncated_indices == [1, 2] and r.usage.truncated == 2
        r = await engine.embed([long_text], 8)  # from L1: still known to be truncated
        assert r.usage.l1_hits == 1 and r.truncated_indices == [0]
        with pytest.raises(InvalidInput, match="TRUNCATION_REJECT"):
            await engine.embed(["short", long_text], 8, reject_truncation=True)
        assert engine.model.might_truncate(long_text) and not engine.model.might_truncate("short")


@aio
async def test_cache_disabled_computes_every_time():
    backend = Backend()
    async with running(backend, cache_enabled=False) as engine:
        await engine.embed(["a"], 8)
        r = await engine.embed(["a"], 8)
        assert r.usage.l1_hits == 0 and r.usage.computed == 1 and backend.texts == ["a", "a"]
        stats = await engine.cache_stats()
        assert stats["l1"]["hits"] == 0 and stats["l1"]["misses"] == 0


@aio
async def test_admin_http_serves_stats_json_and_metrics():
    async with running(Backend()) as engine:
        registry = make_registry(engine.stats, lambda: {"l1_entries": 1})
        admin = AdminServer("127.0.0.1", 0, engine.cache_stats, registry, ready=lambda: True)
        async with serving(admin):
            await engine.embed(["a", "b"], 8)
            await engine.embed(["a"], 8)
            status, body = await asyncio.to_thread(http_get, admin.port, "/cache/stats")
            stats = json.loads(body)
            assert status == 200 and stats["l1"]["hits"] == 1 and stats["l1"]["misses"] == 2
            assert stats["l1"]["entries"] == 2 and abs(stats["l1"]["hit_rate"] - 1 / 3) < 1e-9
            status, body = await asyncio.to_thread(http_get, admin.port, "/metrics")
            text = body.decode()
            assert 'sutra_embedding_cache_lookups_total{level="l1",result="hit"} 1.0' in text
            assert "sutra_embedding_l1_entries 1.0" in text


@aio
async def test_metrics_and_cache_stats_report_the_same_evictions():
    async with running(Backend(), l1_entries=3) as engine:
        registry = make_registry(engine.stats, lambda: {})
        refreshed = []

        async def refresh() -> None:
            refreshed.append(1)
            await engine.refresh_l2_stats()

        admin = AdminServer("127.0.0.1", 0, engine.cache_stats, registry, ready=lambda: True, refresh=refresh)
        async with serving(admin):
            await engine.embed([f"text {i}" for i in range(10)], 8)
            await engine.embed(["text 0", "text 1"], 8)  # evicted: computed again, evicting two more
            stats = await engine.cache_stats()
            assert stats["l1"]["evictions"] == 9 and stats["l1"]["entries"] == 3
            assert registry.get_sample_value("sutra_embedding_cache_evictions_total", {"level": "l1"}) == 9
            _, body = await asyncio.to_thread(http_get, admin.port, "/metrics")
            assert 'sutra_embedding_cache_evictions_total{level="l1"} 9.0' in body.decode() and refreshed
            assert registry.get_sample_value("sutra_embedding_cache_evictions_total", {"level": "l2"}) == \
                stats["l2"]["evictions"] == 0


def test_an_unknown_model_name_is_refused_without_repeating_a_huge_one():
    @aio
    async def run():
        async with running(Backend()) as engine:
            with pytest.raises(InvalidInput) as caught:
                await engine.embed(["text"], model="m" * 100_000)
            assert "(100000 characters)" in str(caught.value) and len(str(caught.value)) < 300
            with pytest.raises(InvalidInput, match="'unit-model'"):
                await engine.embed(["text"], model="another")
            assert len((await engine.embed(["text"], model="unit-model")).vectors) == 1
    run()

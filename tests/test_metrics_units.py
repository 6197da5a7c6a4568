"""Metrics in process: histograms and their rendering, the /metrics endpoint of every gRPC
server, the shard's and a replica's collectors (they read what the RPCs read), and the reading
side `sutra top` uses (rates, quantiles)."""

from __future__ import annotations

import math
import urllib.request

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cacheshard.metrics import make_registry as shard_registry
from cacheshard.settings import ShardSettings
from cacheshard.shard import Shard
from cacheshard.store import ShardStore, _human
from common import codec
from common.cache_key import KEY_BYTES
from common.errors import InvalidInput, Overloaded
from common.grpc_server import ServerOptions, ServiceServer
from common.histogram import Histogram, family
from deploy.scrape import Page, delta_buckets, quantile, rate
from harness.procs import free_port
from mlbase.backends.base import Backend, BackendOptions, ModelDescription
from mlbase.backends.tokens import Encoded
from mlbase.engine import ReplicaEngine
from mlbase.metrics import make_registry as replica_registry
from mlbase.settings import MLBaseSettings
from tests.support import aio

WIDTH = 8


def page_of(registry) -> Page:
    return Page.parse(generate_latest(registry).decode())


def test_histogram_counts_le_buckets_and_renders_them():
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    assert h.count == 5 and h.sum == pytest.approx(8.65)
    assert h.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    text = generate_latest_of(family("x_seconds", "doc", ["stage"], [(("a",), h)]))
    [fam] = text_string_to_metric_families(text)
    assert fam.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert samples[("x_seconds_bucket", "+Inf")] == samples[("x_seconds_count", None)] == 5
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


def generate_latest_of(metric_family) -> str:
    class One:
        def collect(self):
            yield metric_family

    from prometheus_client.registry import CollectorRegistry
    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    return generate_latest(registry).decode()


def test_quantiles_and_rates_read_like_promql():
    buckets = [(1.0, 0.0), (2.0, 10.0), (math.inf, 10.0)]
    assert quantile(0.5, buckets) == 1.5
    assert quantile(0.99, [(1.0, 0.0), (math.inf, 4.0)]) == 1.0  # past the last bound: the last bound
    assert quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    old = Page.parse('# TYPE c counter\nc_total{a="x"} 5\n# TYPE h histogram\nh_bucket{le="1.0"} 1\n'
                     'h_bucket{le="+Inf"} 2\nh_count 2\nh_sum 3\n')
    new = Page.parse('# TYPE c counter\nc_total{a="x"} 15\n# TYPE h histogram\nh_bucket{le="1.0"} 4\n'
                     'h_bucket{le="+Inf"} 5\nh_count 5\nh_sum 4\n')
    assert rate(old, new, 2.0, "c_total", a="x") == 5.0 and rate(None, new, 2.0, "c_total") is None
    assert rate(new, old, 1.0, "c_total") == 5.0  # a restart counts from zero
    assert delta_buckets(old, new, "h") == [(1.0, 3.0), (math.inf, 3.0)]
    assert delta_buckets(new, old, "h") == old.buckets("h")


def test_rocksdb_human_numbers():
    assert [_human(t) for t in ("0", "9999", "12K", "3M", "2G")] == [0, 9999, 12_000, 3_000_000, 2 * 10**9]


@aio
async def test_a_grpc_server_serves_its_registry_on_the_metrics_port():
    h = Histogram()
    h.observe(0.01)
    registry = shard_like_registry(h)
    port = free_port()
    server = ServiceServer(ServerOptions(port=0, metrics_port=port), ["x.Y"], metrics=registry)
    try:
        assert server.metrics is not None and server.metrics.port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        assert "demo_seconds_count 1.0" in text and "process_cpu_seconds_total" in text
    finally:
        server.close_metrics()
        await server.server.stop(0)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    off = ServiceServer(ServerOptions(port=0), ["x.Y"], metrics=registry)
    assert off.metrics is None
    await off.server.stop(0)


def shard_like_registry(h: Histogram):
    from common.metrics_http import process_registry

    class Demo:
        def collect(self):
            yield family("demo_seconds", "demo", series=[((), h)])

    return process_registry(Demo())


def keys_and_values(n: int, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    rng = np.random.default_rng(seed)
    keys = [rng.bytes(KEY_BYTES) for _ in range(n)]
    values = codec.encode_many(rng.standard_normal((n, 16)).astype(np.float32), "float16", set())
    return keys, list(values)


@aio
async def test_shard_metrics_are_its_get_stats(tmp_path):
    settings = ShardSettings(path=tmp_path / "db", rocksdb_statistics=True)
    shard = Shard(ShardStore(settings), settings)
    try:
        keys, values = keys_and_values(20)
        await shard.put(keys[:10], values[:10])
        await shard.lookup(keys)  # 10 hits, 10 misses
        await shard.checkpoint("first")
        stats = await shard.stats()
        page = page_of(shard_registry(shard))
        assert page.value("sutra_cacheshard_lookups_total", result="hit") == stats.hits == 10
        assert page.value("sutra_cacheshard_lookups_total", result="miss") == stats.misses == 10
        assert page.value("sutra_cacheshard_stores_total") == stats.stores == 10
        assert page.value("sutra_cacheshard_stored_bytes_total") == sum(map(len, keys[:10] + values[:10]))
        assert page.value("sutra_cacheshard_checkpoints_total") == 1
        assert page.value("sutra_cacheshard_lookup_duration_seconds_count") == 1
        assert page.value("sutra_cacheshard_store_duration_seconds_count") == 1
        assert page.value("sutra_cacheshard_rocksdb_wal_writes_total") == 1
        assert page.value("sutra_cacheshard_rocksdb_memtable_bytes") > 0
        # Statistics on: every ticker, FIFO's deletions among them.
        assert page.series("sutra_cacheshard_rocksdb_ticker_total", ticker="rocksdb.fifo.max.size.compactions")
        assert len(page.families) >= 20
    finally:
        await shard.close()


class FakeBackend(Backend):
    """Length = number of words; a vector of ones; `embed` fails for a text saying "fail"."""

    name = "fake"

    def load(self) -> None:
        pass

    def describe(self) -> ModelDescription:
        return ModelDescription("fake-model", "0" * 64, "{}", False, 64, WIDTH, "fake", "fp32")

    def tokenize(self, texts):
        return [Encoded({"input_ids": [1] * max(1, len(t.split()))}, max(1, len(t.split())), False) for t in texts]

    def embed(self, batch):
        return np.ones((len(batch), WIDTH), dtype=np.float32)


@aio
async def test_replica_metrics_count_batches_padding_and_refusals():
    settings = MLBaseSettings(max_queue=16, min_width=WIDTH, default_width=WIDTH)
    engine = ReplicaEngine(FakeBackend(BackendOptions(model_path="")), settings)
    registry = replica_registry(engine)
    assert page_of(registry).value("sutra_mlbase_ready") == 0  # renders before the model loads
    await engine.start()
    try:
        warm = page_of(registry).value("sutra_mlbase_texts_total")
        await engine.embed(["one", "two words here"], 0, False, False)
        with pytest.raises(Overloaded):
            await engine.embed(["x"] * 17, 0, False, False)
        with pytest.raises(InvalidInput):
            await engine.embed(["x" * (settings.max_chars + 1)], 0, False, False)
        page = page_of(registry)
        assert page.value("sutra_mlbase_texts_total") - warm == 2
        assert page.value("sutra_mlbase_batch_texts_count") == page.value("sutra_mlbase_batches_total")
        assert page.value("sutra_mlbase_queue_wait_seconds_count") == page.value("sutra_mlbase_texts_total")
        assert page.value("sutra_mlbase_inference_duration_seconds_count") == page.value("sutra_mlbase_batches_total")
        s = engine.batcher.stats
        assert page.value("sutra_mlbase_padding_tokens_total") == s.padded_tokens - s.tokens
        assert page.value("sutra_mlbase_rejected_total", reason="queue_full") == 1
        assert page.value("sutra_mlbase_rejected_total", reason="invalid_input") == 1
        assert page.value("sutra_mlbase_queue_texts") == 0 and page.value("sutra_mlbase_ready") == 1
        [(labels, _)] = page.series("sutra_mlbase_model_info")
        assert labels == {"model_id": "fake-model", "fingerprint": engine.fingerprint, "backend": "fake",
                          "precision": "fp32"}
    finally:
        await engine.close()

"""Every process of a `sutra up` stack serves Prometheus metrics, and they agree with its RPCs.

One stack (one replica, free ports, mutual TLS inside, as `make up` runs it), a small workload
through the frontend (Embed and EmbedStream, repeats that hit L1, write-backs that reach the
shard), then for each process: /metrics is valid Prometheus text with at least 8 families, its
counts moved, and they equal what its stats RPC says (shard: GetStats; frontend: GetCacheStats;
replica: what the frontend computed). Last, every metric the Grafana dashboard queries is one
some process exports.
"""

from __future__ import annotations

import json
import re
import time

import grpc
import pytest

from deploy.scrape import Page, fetch
from deploy.settings import ROOT, StackSettings
from harness.deployed import deployed
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from common.tls import DEFAULT_MAX_MESSAGE_BYTES, open_channel

DASHBOARD = ROOT / "deploy" / "grafana" / "sutra.json"
TEXTS = [f"metrics everywhere {i}" for i in range(12)]
STREAMED = [[f"streamed {i}", f"streamed {i + 1}"] for i in range(3)]
MIN_FAMILIES = 8


def scrape_all(settings: StackSettings) -> dict[str, Page]:
    names = ["embedding", "cacheshard", *settings.replica_names(), "haproxy"]
    return {name: fetch(settings.metrics_url(name)) for name in names}


def shard_stats(settings: StackSettings) -> cpb.GetStatsResponse:
    with open_channel(settings.shard_address, settings.client_tls("operator"),
                      max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, aio=False) as channel:
        return cpb_grpc.CacheShardServiceStub(channel).GetStats(cpb.GetStatsRequest(), timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with deployed(tmp_path_factory.mktemp("metrics") / "run", 1) as (settings, _out):
        yield settings


@pytest.fixture(scope="module")
def workload(stack):
    """Pages before and after the workload, and what the frontend said about it."""
    settings = stack
    before = scrape_all(settings)
    with grpc.insecure_channel(settings.frontend_address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for round_ in range(2):  # the second round hits L1
            for text in TEXTS:
                stub.Embed(pb.EmbedRequest(inputs=[text], dimensions=64), timeout=60)
        answers = list(stub.EmbedStream(iter(pb.EmbedRequest(inputs=batch, dimensions=64) for batch in STREAMED),
                                        timeout=60))
        assert len(answers) == len(STREAMED)
        # Write-backs reach the shard in the background: wait until it has stored every computed text.
        deadline = time.monotonic() + 30
        computed = stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=10).computed
        while shard_stats(settings).stores < computed and time.monotonic() < deadline:
            time.sleep(0.2)
        cache_stats = stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=10)
    shard = shard_stats(settings)
    after = scrape_all(settings)
    return before, after, cache_stats, shard


def test_every_endpoint_serves_valid_prometheus_text(stack, workload):
    _, after, _, _ = workload
    for name, page in after.items():
        assert len(page.families) >= MIN_FAMILIES, (name, sorted(page.families))


def test_shard_metrics_agree_with_get_stats(workload):
    before, after, _, stats = workload
    page = after["cacheshard"]
    assert page.value("sutra_cacheshard_lookups_total", result="hit") == stats.hits
    assert page.value("sutra_cacheshard_lookups_total", result="miss") == stats.misses
    assert page.value("sutra_cacheshard_stores_total") == stats.stores > 0
    assert page.value("sutra_cacheshard_memory_hits_total") == stats.memory_hits
    assert page.value("sutra_cacheshard_entries") == stats.entries
    assert page.value("sutra_cacheshard_stored_bytes_total") > before["cacheshard"].value(
        "sutra_cacheshard_stored_bytes_total")
    assert page.value("sutra_cacheshard_lookup_duration_seconds_count") > 0
    assert page.value("sutra_cacheshard_store_duration_seconds_count") > 0
    # RocksDB's own figures are there, and it holds what was stored (memtables, not yet flushed).
    assert page.value("sutra_cacheshard_rocksdb_memtable_bytes") > 0
    assert page.value("sutra_cacheshard_rocksdb_estimated_keys") == stats.entries
    assert page.series("sutra_cacheshard_rocksdb_write_stalls_total", kind="stop")


def test_frontend_metrics_agree_with_get_cache_stats(workload):
    before, after, stats, shard = workload
    page, old = after["embedding"], before["embedding"]
    for level, counts in (("l1", stats.l1), ("l2", stats.l2)):
        assert page.value("sutra_embedding_cache_lookups_total", level=level, result="hit") == counts.hits
        assert page.value("sutra_embedding_cache_lookups_total", level=level, result="miss") == counts.misses
    assert page.value("sutra_embedding_computed_total") == stats.computed
    assert page.value("sutra_embedding_coalesced_total") == stats.coalesced
    # One shard, no file edits: nothing from a second copy, the shard set unchanged (but both exported).
    for name in ("l2_second_copy_hits", "l2_shard_set_changes"):
        assert f"sutra_embedding_{name}" in page.families
        assert page.value(f"sutra_embedding_{name}_total") == getattr(stats, name) == 0
    # Every answered request is timed once, under its method.
    requests = page.value("sutra_embedding_requests_total") - old.value("sutra_embedding_requests_total")
    assert requests == 2 * len(TEXTS) + len(STREAMED)
    timed = {method: page.value("sutra_embedding_request_duration_seconds_count", method=method)
             - old.value("sutra_embedding_request_duration_seconds_count", method=method)
             for method in ("Embed", "EmbedStream")}
    assert timed == {"Embed": 2 * len(TEXTS), "EmbedStream": len(STREAMED)}
    assert page.value("sutra_embedding_lookup_duration_seconds_count", level="l1") > 0
    assert page.value("sutra_embedding_mlbase_batch_duration_seconds_count") == \
        page.value("sutra_embedding_mlbase_batches_total")
    # The frontend's L2 lookups are the shard's lookups (one frontend, one shard).
    assert stats.l2.hits + stats.l2.misses == shard.hits + shard.misses
    # Idle again: the in-flight gauges are back at rest.
    assert page.value("sutra_embedding_pending_flights") == 0 and page.value("sutra_embedding_batches_inflight") == 0


def test_replica_metrics_count_what_the_frontend_computed(workload):
    before, after, _, _ = workload
    page, old = after["mlbase1"], before["mlbase1"]
    front_new, front_old = after["embedding"], before["embedding"]
    texts = page.value("sutra_mlbase_texts_total") - old.value("sutra_mlbase_texts_total")
    computed = front_new.value("sutra_embedding_computed_total") - front_old.value("sutra_embedding_computed_total")
    assert texts == computed > 0
    # Forward passes and the frontend's calls need not match: a replica merges concurrent calls
    # into one pass, and splits a long one.
    assert page.value("sutra_mlbase_batches_total") > old.value("sutra_mlbase_batches_total")
    assert page.value("sutra_mlbase_batch_texts_count") == page.value("sutra_mlbase_batches_total")
    assert page.value("sutra_mlbase_batch_texts_sum") == page.value("sutra_mlbase_texts_total")
    assert page.value("sutra_mlbase_queue_wait_seconds_count") == page.value("sutra_mlbase_texts_total")
    assert page.value("sutra_mlbase_inference_duration_seconds_count") == page.value("sutra_mlbase_batches_total")
    # The inference thread's CPU in forward passes: some for the new texts, never more than their wall time
    # (one thread per replica here), nor than the whole process used.
    cpu = page.value("sutra_mlbase_inference_cpu_seconds_total") - old.value("sutra_mlbase_inference_cpu_seconds_total")
    wall = page.value("sutra_mlbase_inference_duration_seconds_sum") - \
        old.value("sutra_mlbase_inference_duration_seconds_sum")
    process = page.value("process_cpu_seconds_total") - old.value("process_cpu_seconds_total")
    assert 0 < cpu <= wall + 1e-3 and cpu <= process + 0.02, (cpu, wall, process)
    assert page.value("sutra_mlbase_padding_tokens_total") >= 0
    assert page.value("sutra_mlbase_queue_texts") == 0 and page.value("sutra_mlbase_ready") == 1
    [(labels, value)] = page.series("sutra_mlbase_model_info")
    assert value == 1 and labels["backend"] and labels["precision"] and labels["model_id"]
    assert len(labels["fingerprint"]) > 8


def test_haproxy_exporter_reports_each_replica(stack, workload):
    _, after, _, _ = workload
    states = after["haproxy"].series("haproxy_server_status", proxy="mlbase", server="mlbase1")
    assert states and any(value == 1 for _, value in states)


def dashboard_metrics() -> set[str]:
    """Every metric name a panel of the dashboard queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    names = set()
    for expr in exprs:
        names |= {name for name in re.findall(r"\b((?:sutra|haproxy|process)_[a-z0-9_]+)", expr)}
    return names


def test_every_metric_the_dashboard_queries_is_exported(workload):
    _, after, _, _ = workload
    exported = {name for page in after.values() for name, _, _ in page.samples}
    missing = dashboard_metrics() - exported
    assert not missing, sorted(missing)

"""Counters and latency windows for the frontend, and their Prometheus view.

One `Stats` object is shared by the engine, the L2 client and the ML-base
pool; GetCacheStats, the admin `/cache/stats` JSON and `/metrics` all read
it, so the three can never disagree. Prometheus metrics are produced by a
custom collector at scrape time rather than kept twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from common import histogram
from common.hit_counts import HitCounts
from common.latency import LatencyWindow
from common.metrics_http import process_registry

# The HTTP API's embeddings call, as logs and /metrics name it.
HTTP_EMBEDDINGS = "POST /v1/embeddings"
# The calls whose answer times /metrics shows (EmbedStream: each message of a stream).
TIMED_METHODS = ("Embed", "EmbedStream", HTTP_EMBEDDINGS)


@dataclass
class LevelCounters(HitCounts):
    # L1: counted by the LRU itself. L2: the shards' own counts, summed by
    # FrontendEngine.refresh_l2_stats before each GetCacheStats and /metrics scrape.
    evictions: int = 0
    latency: LatencyWindow = field(default_factory=LatencyWindow)


@dataclass
class Stats:
    """Mutable counters; only touched from the event loop thread."""

    l1: LevelCounters = field(default_factory=LevelCounters)
    l2: LevelCounters = field(default_factory=LevelCounters)
    computed: int = 0
    coalesced: int = 0
    # Texts computed while L2 was asked (idle ML-base, low L2 hit rate), and those L2 then answered.
    speculated: int = 0
    speculated_l2_hits: int = 0
    mlbase_batches: int = 0
    mlbase_retries: int = 0
    mlbase_errors: int = 0
    fingerprint_mismatches: int = 0
    # Requests started again because the model switched under them (a rollout).
    model_restarts: int = 0
    l2_writes: int = 0
    l2_writes_dropped: int = 0
    # Kept by the L2 client: keys the first-ranked shard missed or could not answer that the next
    # copy had (--l2-copies 2), and changes of the shard set after start (a shard file or DNS).
    l2_second_copy_hits: int = 0
    l2_shard_set_changes: int = 0
    requests: int = 0
    inputs: int = 0
    duplicates: int = 0
    truncated: int = 0
    rejected_overloaded: int = 0
    mlbase_latency: LatencyWindow = field(default_factory=LatencyWindow)
    # Answered requests by method (the servicer times them; `requests` counts them).
    request_latency: dict[str, LatencyWindow] = field(
        default_factory=lambda: {method: LatencyWindow() for method in TIMED_METHODS})


class StatsCollector(Collector):
    """Renders a Stats snapshot as Prometheus metric families on each scrape."""

    def __init__(self, stats: Stats, gauges, live=None) -> None:
        self._stats = stats
        # embedding.fingerprints.LiveFingerprints of the ML-base pool, or None.
        self._live = live
        # Callable returning {"l1_entries": n, "l2_entries": n, "pending": n, ...}.
        self._gauges = gauges

    def collect(self):
        s = self._stats
        lookups = CounterMetricFamily("sutra_embedding_cache_lookups", "Cache lookups by level and result",
                                      labels=["level", "result"])
        for name, level in (("l1", s.l1), ("l2", s.l2)):
            lookups.add_metric([name, "hit"], level.hits)
            lookups.add_metric([name, "miss"], level.misses)
        yield lookups
        errors = CounterMetricFamily("sutra_embedding_cache_errors", "Failed cache operations by level",
                                     labels=["level"])
        evictions = CounterMetricFamily("sutra_embedding_cache_evictions", "Cache evictions by level",
                                        labels=["level"])
        for name, level in (("l1", s.l1), ("l2", s.l2)):
            errors.add_metric([name], level.errors)
            evictions.add_metric([name], level.evictions)
        yield errors
        yield evictions
        for name, value, doc in (
            ("computed", s.computed, "Texts sent to model replicas"),
            ("coalesced", s.coalesced, "Lookups that joined a computation already in flight"),
            ("speculated", s.speculated, "Cache misses sent to compute while L2 was still being asked"),
            ("speculated_l2_hits", s.speculated_l2_hits,
             "Speculatively computed texts that L2 answered after all (idle computations spent)"),
            ("mlbase_batches", s.mlbase_batches, "Batches sent to model replicas"),
            ("mlbase_retries", s.mlbase_retries, "Batches retried on another connection"),
            ("mlbase_errors", s.mlbase_errors, "Batches that failed after every retry"),
            ("fingerprint_mismatches", s.fingerprint_mismatches,
             "Replica answers with an unexpected model fingerprint"),
            ("model_restarts", s.model_restarts, "Requests started again because the model switched under them"),
            ("l2_writes", s.l2_writes, "Entries stored to L2"),
            ("l2_writes_dropped", s.l2_writes_dropped, "L2 write-backs dropped because the queue was full"),
            ("l2_second_copy_hits", s.l2_second_copy_hits,
             "L2 keys the first-ranked shard missed or could not answer that another copy had (--l2-copies)"),
            ("l2_shard_set_changes", s.l2_shard_set_changes,
             "Changes of the L2 shard set while running (--cache-shards-file, --cache-shards-dns)"),
            ("requests", s.requests, "Embed requests answered (stream messages included)"),
            ("inputs", s.inputs, "Inputs in answered requests"),
            ("duplicates", s.duplicates, "Inputs repeating an earlier input of the same request"),
            ("truncated", s.truncated, "Inputs cut to the model window"),
            ("rejected_overloaded", s.rejected_overloaded, "Requests refused by the pending-work bound"),
        ):
            yield CounterMetricFamily(f"sutra_embedding_{name}", doc, value=value)
        quantiles = GaugeMetricFamily("sutra_embedding_latency_ms", "Recent latency percentiles in milliseconds",
                                      labels=["stage", "quantile"])
        for stage, window in (("l1_lookup", s.l1.latency), ("l2_lookup", s.l2.latency),
                              ("mlbase_batch", s.mlbase_latency)):
            for q in (50, 99):
                quantiles.add_metric([stage, f"0.{q}"], window.percentile_ms(q))
        yield quantiles
        yield histogram.family("sutra_embedding_request_duration_seconds",
                               "Time to answer one Embed request, EmbedStream message or HTTP embeddings request",
                               ["method"],
                               [((method,), w.histogram) for method, w in s.request_latency.items()])
        yield histogram.family("sutra_embedding_lookup_duration_seconds", "Time of one cache lookup by level "
                               "(L1: a request's keys; L2: one batch to the shards)", ["level"],
                               [(("l1",), s.l1.latency.histogram), (("l2",), s.l2.latency.histogram)])
        yield histogram.family("sutra_embedding_mlbase_batch_duration_seconds",
                               "Time of one successful batch call to a model replica",
                               series=[((), s.mlbase_latency.histogram)])
        if self._live is not None:
            live = GaugeMetricFamily("sutra_embedding_live_fingerprint_connections",
                                     "ML-base connections reaching a replica of each model fingerprint (active=1: "
                                     "the one answers are computed with); two series only during a rollout",
                                     labels=["fingerprint", "active"])
            counts = self._live.counts()
            if self._live.active is not None:
                counts.setdefault(self._live.active, 0)
            for fp, n in sorted(counts.items()):
                live.add_metric([fp, "1" if fp == self._live.active else "0"], n)
            yield live
            yield CounterMetricFamily("sutra_embedding_model_switches", "Times the frontend switched to another "
                                      "model fingerprint (rollouts)", value=self._live.switches)
        for name, value in self._gauges().items():
            yield GaugeMetricFamily(f"sutra_embedding_{name}", name.replace("_", " "), value=value)


def make_registry(stats: Stats, gauges, live=None) -> CollectorRegistry:
    return process_registry(StatsCollector(stats, gauges, live))

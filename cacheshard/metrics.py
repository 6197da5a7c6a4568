"""The cache shard's Prometheus view: its own counters and RocksDB's figures, at scrape time.

The counts are the ones GetStats answers (`Shard.snapshot`, `Shard.counters`), rendered by a
custom collector rather than kept a second time, so GetStats and /metrics always agree. RocksDB's
figures are read from its properties on each scrape (`ShardStore.figures`): a few microseconds,
on the metrics endpoint's thread, never on the event loop.
"""

from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from cacheshard.shard import Shard
from common import histogram
from common.metrics_http import process_registry

log = logging.getLogger(__name__)

P = "sutra_cacheshard_"
# RocksDB integer property -> (metric name, kind, help).
PROPERTIES = {
    "rocksdb.live-sst-files-size": ("rocksdb_live_sst_bytes", "gauge", "Bytes of SST files the live version uses"),
    "rocksdb.total-sst-files-size": ("rocksdb_sst_bytes", "gauge",
                                     "Bytes of all SST files, checkpoints' hard links and obsolete files included"),
    "rocksdb.cur-size-all-mem-tables": ("rocksdb_memtable_bytes", "gauge",
                                        "Bytes of the active and unflushed memtables"),
    "rocksdb.num-immutable-mem-table": ("rocksdb_immutable_memtables", "gauge", "Memtables waiting to be flushed"),
    "rocksdb.estimate-num-keys": ("rocksdb_estimated_keys", "gauge", "RocksDB's estimate of the keys it holds"),
    "rocksdb.compaction-pending": ("rocksdb_compactions_pending", "gauge",
                                   "1 when at least one compaction (a FIFO deletion) is pending"),
    "rocksdb.num-running-compactions": ("rocksdb_compactions_running", "gauge", "Compactions running"),
    "rocksdb.num-running-flushes": ("rocksdb_flushes_running", "gauge", "Memtable flushes running"),
    "rocksdb.actual-delayed-write-rate": ("rocksdb_delayed_write_rate_bytes_per_second", "gauge",
                                          "Write rate RocksDB throttles to while it delays writes, 0 = not delayed"),
    "rocksdb.is-write-stopped": ("rocksdb_write_stopped", "gauge", "1 while RocksDB stops all writes"),
    "rocksdb.block-cache-usage": ("rocksdb_block_cache_bytes", "gauge", "Bytes held in the block cache"),
    "rocksdb.num-files-at-level0": ("rocksdb_sst_files", "gauge",
                                    "SST files (all in level 0 under FIFO compaction)"),
    "rocksdb.background-errors": ("rocksdb_background_errors", "counter",
                                  "Errors in background flushes and compactions"),
}


def _one(kind: str, name: str, doc: str, value: float):
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(P + name, doc, value=value)


class ShardCollector(Collector):
    """Renders the shard's counters and RocksDB's figures on each scrape."""

    def __init__(self, shard: Shard) -> None:
        self._shard = shard

    def collect(self):
        shard = self._shard
        s = shard.snapshot()
        c = shard.counters
        lookups = CounterMetricFamily(P + "lookups", "Keys looked up, by result (memory-tier hits included)",
                                      labels=["result"])
        lookups.add_metric(["hit"], s.hits)
        lookups.add_metric(["miss"], s.misses)
        yield lookups
        for kind, name, doc, value in (
            ("counter", "memory_hits", "Keys answered by the in-memory tier (counted as hits too)", s.memory_hits),
            ("counter", "stores", "Entries stored", s.stores),
            ("counter", "stored_bytes", "Key and value bytes stored", c.stored_bytes),
            ("counter", "errors", "Failed reads, writes and checkpoints, and corrupt values", s.errors),
            ("counter", "corrupt", "Stored values that failed to decode (answered as misses)", s.corrupt),
            ("counter", "evictions", "Entries evicted by FIFO compaction (estimated from the key count)",
             s.evictions),
            ("counter", "checkpoints", "Checkpoints written", c.checkpoints),
            ("gauge", "entries", "Entries held (RocksDB's estimate)", s.entries),
            ("gauge", "max_entries", "Configured size budget in entries", s.max_entries),
            ("gauge", "disk_bytes", "Bytes of SST files and write-ahead logs", s.bytes_on_disk),
            ("gauge", "memory_entries", "Entries in the in-memory tier", s.memory_entries),
            ("gauge", "memory_bytes", "Value bytes in the in-memory tier", s.memory_bytes),
            ("gauge", "memory_capacity_entries", "Capacity of the in-memory tier in entries", s.memory_capacity),
            ("gauge", "memory_capacity_bytes", "Capacity of the in-memory tier in bytes", s.memory_capacity_bytes),
            ("gauge", "sync", "1 when Stores are fsynced before they are acknowledged", int(s.sync)),
        ):
            yield _one(kind, name, doc, value)
        yield histogram.family(P + "lookup_duration_seconds", "Time to answer one Lookup batch",
                               series=[((), c.lookup_seconds)])
        yield histogram.family(P + "store_duration_seconds", "Time to write one Store batch",
                               series=[((), c.store_seconds)])
        yield from self._rocksdb()

    def _rocksdb(self):
        try:
            f = self._shard.store.figures(PROPERTIES)
        except Exception as exc:  # rocksdict raises plain Exception (a closed database, say)
            log.debug("RocksDB figures unavailable: %s", exc)
            return
        for prop, (name, kind, doc) in PROPERTIES.items():
            yield _one(kind, name, doc, f.properties[prop])
        yield _one("counter", "rocksdb_wal_writes", "Write batches through the write-ahead log "
                   "(RocksDB prints it rounded above 9999)", f.wal_writes)
        yield _one("counter", "rocksdb_wal_syncs", "Write-ahead log fsyncs (RocksDB prints it rounded above 9999)",
                   f.wal_syncs)
        yield _one("counter", "rocksdb_stall_seconds", "Time writes spent delayed or stopped by RocksDB",
                   f.stall_seconds)
        stalls = CounterMetricFamily(P + "rocksdb_write_stalls", "Times RocksDB delayed or stopped writes",
                                     labels=["kind"])
        for kind in ("delays", "stops"):
            stalls.add_metric([kind.removesuffix("s")], f.stalls.get(kind, 0))
        yield stalls
        if f.tickers:
            tickers = CounterMetricFamily(P + "rocksdb_ticker", "RocksDB statistics tickers (--rocksdb-statistics)",
                                          labels=["ticker"])
            for ticker, value in sorted(f.tickers.items()):
                tickers.add_metric([ticker], value)
            yield tickers


def make_registry(shard: Shard) -> CollectorRegistry:
    return process_registry(ShardCollector(shard))

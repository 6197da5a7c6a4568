"""The frontend follows its shard list file without a restart, and with two copies keeps
answering from L2 when a shard is killed; both show on its /metrics and in GetCacheStats.

Real processes on loopback ports chosen at run time: one ML-base replica
(the bundled model), three cache shards, and the embedding frontend started
with --cache-shards-file (what `sutra up` gives it) and --l2-copies 2.
"""

from __future__ import annotations

import grpc

from deploy.scrape import Page, fetch
from harness.procs import free_port, wait_until
from harness.stack import ShardClient, cache_stats, service
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc


def embed(address: str, texts: list[str]) -> pb.EmbedResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=texts), timeout=120)


def stores(shard) -> int:
    with ShardClient(shard.address) as sc:
        return sc.stats().stores


def l2_counters(page: Page) -> tuple[float, float]:
    """(second-copy hits, shard set changes) from the frontend's /metrics; both must be there."""
    names = ("sutra_embedding_l2_second_copy_hits", "sutra_embedding_l2_shard_set_changes")
    assert all(name in page.families for name in names), sorted(page.families)
    return tuple(page.value(f"{name}_total") for name in names)


def test_frontend_follows_the_shard_file_and_two_copies_survive_a_killed_shard(tmp_path):
    replica = service("mlbase", tmp_path / "mlbase.log", {"threads": 1, "server.drain_seconds": 0.0}).start()
    shards = [service("cacheshard", tmp_path / f"shard{i}.log", {"path": tmp_path / f"db{i}"}).start()
              for i in range(3)]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{shards[0].address}\n{shards[1].address}\n")
    frontend = service("embedding", tmp_path / "frontend.log", {
        "mlbase_address": replica.address, "cache_shards_file": str(listing), "cache_shards_refresh_s": 0.1,
        "l2_copies": 2, "l1_entries": 0, "admin_port": (admin := free_port()), "http_port": 0})
    metrics = f"http://127.0.0.1:{admin}/metrics"
    procs = [replica, *shards]
    try:
        for p in procs:
            p.wait_serving(300)
        frontend.start().wait_serving(300)
        procs.append(frontend)
        assert l2_counters(fetch(metrics, timeout=10)) == (0, 0)  # the set it started with is no change
        texts = [f"shard set text {i}" for i in range(40)]
        first = embed(frontend.address, texts)
        assert first.usage.computed == 40
        # Two copies on two shards: each shard got every entry.
        wait_until(lambda: stores(shards[0]) == stores(shards[1]) == 40, 60, "write-backs on both shards")
        assert stores(shards[2]) == 0

        # A third shard joins by editing the file; the frontend is not restarted.
        listing.write_text("".join(f"{s.address}\n" for s in shards))
        probes = iter(range(10_000))
        wait_until(lambda: embed(frontend.address, [f"probe {next(probes)}" for _ in range(10)]) is not None
                   and stores(shards[2]) > 0, 120, "entries written to the new shard")

        # Texts cached while three shards serve, each on two of them (the probes' write-backs stored first).
        wait_until(lambda: fetch(metrics, timeout=10).value("sutra_embedding_writeback_queued") == 0, 60,
                   "the probes' write-backs stored")
        more = [f"three shard text {i}" for i in range(100)]
        before = sum(stores(s) for s in shards)
        assert embed(frontend.address, more).usage.computed == 100
        wait_until(lambda: sum(stores(s) for s in shards) - before == 200, 60, "two copies of each written back")

        # Kill one shard: with two copies, every one of them is still an L2 hit and nothing fails.
        second_before, changes = l2_counters(fetch(metrics, timeout=10))
        assert changes == 1  # the third shard joining
        shards[0].kill()
        again = embed(frontend.address, more)
        assert again.usage.l2_hits == 100 and again.usage.computed == 0
        stats = cache_stats(frontend.address)
        assert stats.l2.errors >= 1  # the dead shard was noticed, and failed open
        # The texts whose first shard was the dead one came from their second copy: counted on
        # /metrics and in GetCacheStats alike (one counter behind both).
        second, changes = l2_counters(fetch(metrics, timeout=10))
        assert second - second_before >= 1 and changes == 1
        assert (stats.l2_second_copy_hits, stats.l2_shard_set_changes) == (second, changes)
        assert len(embed(frontend.address, texts).embeddings) == 40  # older entries: hits or recomputed, never errors
    finally:
        for p in reversed(procs):
            p.stop()

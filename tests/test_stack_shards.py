"""`sutra up --shards 3 --l2-copies 2`, end to end: three shard processes under supervisord,
each on its own port, metrics port and directory, all in `status --json`; the frontend writes
every entry to two of them, and with one shard stopped every cached text is still an L2 hit.
A stack on free ports in a temporary run directory (harness/deployed.py), mutual TLS on the
internal hops as in `make up`, `down` afterwards."""

from __future__ import annotations

import json

import grpc
import pytest

from common.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from common.tls import open_channel
from deploy.settings import StackSettings
from harness.deployed import deployed, free_run, sutra
from harness.procs import wait_until
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

SHARDS = 3


def shard_stores(settings: StackSettings, index: int) -> int:
    with open_channel(settings.address(settings.shard_port_of(index)), settings.client_tls("operator"),
                      max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, aio=False) as channel:
        return cpb_grpc.CacheShardServiceStub(channel).GetStats(cpb.GetStatsRequest(), timeout=10).stores


def embed(settings: StackSettings, texts: list[str]) -> pb.EmbedResponse:
    with grpc.insecure_channel(settings.frontend_address) as ch:
        return pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=texts), timeout=120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    shard_base = free_run(SHARDS, set())
    metrics_base = free_run(SHARDS, set(range(shard_base, shard_base + SHARDS)))
    # Later flags win: the shard ports replace up_args' single free ports with runs of three.
    with deployed(tmp_path_factory.mktemp("shards") / "run", 1, "--shards", str(SHARDS), "--l2-copies", "2",
                  "--l1-entries", "0", "--shard-port", str(shard_base),
                  "--shard-metrics-port", str(metrics_base)) as found:
        yield found


def test_up_starts_three_shards_and_status_lists_them(stack):
    settings, out = stack
    assert settings.shards == SHARDS and settings.l2_copies == 2
    for i in range(1, SHARDS + 1):
        assert settings.address(settings.shard_port_of(i)) in out
    result = sutra("status", "--json", "--run-dir", str(settings.run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    shards = [p for p in json.loads(result.stdout)["processes"] if p["role"] == "cacheshard"]
    assert sorted(p["name"] for p in shards) == ["cacheshard", "cacheshard2", "cacheshard3"]
    assert all(p["state"] == "RUNNING" and p["health"] == "SERVING" for p in shards), shards
    assert len({p["metrics_url"] for p in shards}) == SHARDS
    assert settings.shards_file.read_text().count("\n") == SHARDS + 1  # a comment line, then one per shard


def test_two_copies_of_each_entry_and_a_stopped_shard_costs_no_hit(stack):
    settings, _ = stack
    texts = [f"three shards, two copies: text {i}" for i in range(60)]
    before = sum(shard_stores(settings, i) for i in range(1, SHARDS + 1))
    assert embed(settings, texts).usage.computed == 60
    wait_until(lambda: sum(shard_stores(settings, i) for i in range(1, SHARDS + 1)) - before == 120, 60,
               "two copies of each entry written back")
    assert all(shard_stores(settings, i) > 0 for i in range(1, SHARDS + 1))  # spread over all three
    stop = sutra("ctl", "--run-dir", str(settings.run_dir), "stop", "cacheshard2")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    try:
        again = embed(settings, texts)
        assert again.usage.l2_hits == 60 and again.usage.computed == 0
    finally:
        start = sutra("ctl", "--run-dir", str(settings.run_dir), "start", "cacheshard2")
        assert start.returncode == 0, start.stdout + start.stderr

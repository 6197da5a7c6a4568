"""Integration tests of the cache shard: real `python -m cacheshard`
processes on loopback ports chosen at run time, real RocksDB directories in
tmp_path, stopped by PID."""

from __future__ import annotations

import queue
import random
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cacheshard.settings import TRANSIENT_MARGIN, ShardSettings
from cacheshard.store import ShardStore
from common import codec
from common.grpc_server import ServerOptions
from harness.procs import ROOT, SERVING, Proc, free_port, health_status
from harness.stack import service
from sutra.cache.v1 import cache_shard_service_pb2 as pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as pb_grpc

SERVICE = "sutra.cache.v1.CacheShardService"


def start_shard(tmp_path, path, name: str = "shard", **values) -> Proc:
    """A started shard on `path`; `values` are further ShardSettings fields (e.g. sync=True)."""
    port = free_port()
    return service("cacheshard", tmp_path / f"{name}-{port}.log", {"server.port": port, "path": path, **values}).start()


def make_entries(n: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    rng = np.random.default_rng(seed)
    keys = [rng.bytes(16) for _ in range(n)]
    return keys, codec.encode_many(rng.standard_normal((n, 384)).astype(np.float32))


class Client:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.CacheShardServiceStub(self.channel)

    def store(self, keys, values, timeout: float = 30.0) -> int:
        entries = [pb.Entry(key=k, value=v) for k, v in zip(keys, values)]
        return self.stub.Store(pb.StoreRequest(entries=entries), timeout=timeout).stored

    def lookup(self, keys, batch: int = 256) -> tuple[list[bool], list[bytes]]:
        requests = [pb.LookupRequest(batch_id=i, keys=keys[i:i + batch]) for i in range(0, len(keys), batch)]
        found, values = [], []
        for response in self.stub.Lookup(iter(requests), timeout=60):
            found += response.found
            values += response.values
        return found, values

    def stats(self) -> pb.GetStatsResponse:
        return self.stub.GetStats(pb.GetStatsRequest(), timeout=30)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def shard(tmp_path):
    proc = start_shard(tmp_path, tmp_path / "db").wait_serving(60)
    client = Client(proc.address)
    yield proc, client
    client.close()
    assert proc.stop() == 0, proc.log()


# --- durability -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["wal", "sync"])
def test_acknowledged_entries_survive_kill_9(tmp_path, mode):
    durability = {"sync": True} if mode == "sync" else {}
    path = tmp_path / "db"
    proc = start_shard(tmp_path, path, **durability).wait_serving(60)
    client = Client(proc.address)
    assert client.stats().sync == (mode == "sync")
    acked_keys: list[bytes] = []
    acked_values: list[bytes] = []
    enough = threading.Event()
    killer = threading.Thread(target=lambda: (enough.wait(120), proc.kill()))
    killer.start()
    try:
        for b in range(10_000):  # until the kill cuts a Store short
            keys, values = make_entries(50, seed=b)
            try:
                assert client.store(keys, values, timeout=10) == 50
            except grpc.RpcError:
                break
            acked_keys += keys
            acked_values += values
            if b == 20:
                enough.set()
    finally:
        enough.set()
        killer.join()
        client.close()
    assert proc.popen.returncode == -9
    assert len(acked_keys) >= 21 * 50
    proc.stop()

    again = start_shard(tmp_path, path, name="restarted", **durability).wait_serving(60)
    client = Client(again.address)
    try:
        found, values = client.lookup(acked_keys)
        assert all(found), f"{found.count(False)} acknowledged entries lost"
        assert values == acked_values
        stats = client.stats()
        assert stats.memory_hits == 0  # every answer above came from RocksDB
        assert stats.hits == len(acked_keys)
    finally:
        client.close()
        assert again.stop() == 0


def test_sigterm_ends_idle_streams_flushes_and_exits_zero(tmp_path):
    path = tmp_path / "db"
    proc = start_shard(tmp_path, path).wait_serving(60)
    client = Client(proc.address)
    keys, values = make_entries(100, seed=1)
    client.store(keys, values)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    responses = client.stub.Lookup(iter(outbox.get, None))
    outbox.put(pb.LookupRequest(batch_id=1, keys=keys[:3]))
    assert list(next(responses).found) == [True, True, True]
    assert proc.stop() == 0  # the stream is idle and open
    with pytest.raises(grpc.RpcError) as err:
        next(responses)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
    outbox.put(None)
    client.close()
    assert "database flushed and closed" in proc.log()

    again = start_shard(tmp_path, path, name="again").wait_serving(60)
    client = Client(again.address)
    assert client.lookup(keys) == ([True] * 100, values)
    client.close()
    assert again.stop() == 0


# --- lookup stream ------------------------------------------------------------

def test_interleaved_batches_answered_in_order_on_concurrent_streams(shard):
    proc, client = shard
    keys, values = make_entries(600, seed=2)
    for i in range(0, 600, 200):
        client.store(keys[i:i + 200], values[i:i + 200])
    stored = dict(zip(keys, values))
    errors: list[str] = []

    def one_stream(seed: int) -> None:
        rng = random.Random(seed)
        requests = []
        for batch_id in range(300):
            n = rng.choice([0, 1, 7, 64, 256])
            batch = [rng.choice(keys) if rng.random() < 0.7 else rng.randbytes(16) for _ in range(n)]
            requests.append(pb.LookupRequest(batch_id=seed * 1000 + batch_id, keys=batch))
        # The generator hands every request to gRPC without waiting for answers.
        answers = list(Client(proc.address).stub.Lookup(iter(requests), timeout=120))
        if [a.batch_id for a in answers] != [r.batch_id for r in requests]:
            errors.append(f"stream {seed}: answers out of order or missing")
            return
        for request, answer in zip(requests, answers):
            expected_found = [k in stored for k in request.keys]
            expected_values = [stored.get(k, b"") for k in request.keys]
            if list(answer.found) != expected_found or list(answer.values) != expected_values:
                errors.append(f"stream {seed}: wrong answer for batch {request.batch_id}")
                return

    threads = [threading.Thread(target=one_stream, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = client.stats()
    assert stats.hits > 0 and stats.misses > 0 and stats.errors == 0


def test_memory_tier_and_rocksdb_answer_one_batch_together(tmp_path):
    proc = start_shard(tmp_path, tmp_path / "db", memory_entries=100).wait_serving(60)
    client = Client(proc.address)
    try:
        keys, values = make_entries(300, seed=8)
        client.store(keys[:150], values[:150])
        client.store(keys[150:], values[150:])  # the memory tier now holds keys[200:]
        absent = [b"absent-key-%05d" % i for i in range(20)]
        mixed = keys[:50] + absent[:10] + keys[250:] + keys[50:250] + absent[10:]
        found, got = client.lookup(mixed, batch=400)
        expected = dict(zip(keys, values))
        assert found == [k in expected for k in mixed]
        assert got == [expected.get(k, b"") for k in mixed]
        stats = client.stats()
        assert (stats.hits, stats.misses, stats.memory_hits) == (300, 20, 100)
        assert stats.memory_entries == stats.memory_capacity == 100
    finally:
        client.close()
        assert proc.stop() == 0


# --- size bound -------------------------------------------------------------

def test_size_bound_holds_after_storing_five_times_the_budget(tmp_path):
    budget = 2000
    settings = ShardSettings(server=ServerOptions(), path=tmp_path / "db", max_entries=budget)
    proc = start_shard(tmp_path, settings.path, max_entries=budget, memory_entries=0).wait_serving(60)
    client = Client(proc.address)
    all_keys: list[bytes] = []
    worst_entries = worst_bytes = 0
    try:
        for b in range(50):  # 50 x 200 = 5 x the budget
            keys, values = make_entries(200, seed=100 + b)
            client.store(keys, values)
            all_keys += keys
            stats = client.stats()
            worst_entries = max(worst_entries, stats.entries)
            worst_bytes = max(worst_bytes, stats.bytes_on_disk)
        assert worst_entries <= budget * (1 + TRANSIENT_MARGIN), worst_entries
        assert worst_bytes <= settings.budget_bytes * (1 + TRANSIENT_MARGIN), worst_bytes
        # Once FIFO has caught up the budget holds without margin.
        stats = client.stats()
        deadline = 600
        while stats.entries > budget and deadline:
            threading.Event().wait(0.1)  # polling RocksDB's own estimate; nothing else to wait on
            deadline -= 1
            stats = client.stats()
        assert stats.entries <= budget, stats
        assert stats.max_entries == budget
        assert stats.evictions >= len(all_keys) - budget * (1 + TRANSIENT_MARGIN)
        # Eviction order: the oldest writes are gone, the newest are all there.
        found, _ = client.lookup(all_keys[:1000])
        assert not any(found)
        found, _ = client.lookup(all_keys[-400:])
        assert all(found)
    finally:
        client.close()
        assert proc.stop() == 0


# --- corrupt values ---------------------------------------------------------

def test_corrupt_or_unknown_values_read_as_misses_and_are_counted(tmp_path):
    path = tmp_path / "db"
    good_keys, good_values = make_entries(10, seed=3)
    bad = codec.encode_many(np.ones((3, 384), np.float32))
    future_version = bad[0][:2] + bytes([codec.VERSION + 1]) + bad[0][3:]
    bad_keys = [b"garbage-key-0000", b"future-version-0", b"truncated-value0"]
    bad_values = [b"\x00not a vector at all", future_version, bad[2][:-10]]
    # Write straight into the database, as a disk fault or an older build would.
    store = ShardStore(ShardSettings(server=ServerOptions(), path=path))
    store.write(good_keys + bad_keys, good_values + bad_values)
    store.close()

    proc = start_shard(tmp_path, path).wait_serving(60)
    client = Client(proc.address)
    try:
        found, values = client.lookup(bad_keys + good_keys)
        assert found == [False] * 3 + [True] * 10
        assert values == [b""] * 3 + good_values
        stats = client.stats()
        assert stats.corrupt == 3 and stats.errors >= 3
        assert stats.misses == 3 and stats.hits == 10
        assert health_status(proc.address) == SERVING
        # Store refuses values the codec cannot read instead of keeping them.
        with pytest.raises(grpc.RpcError) as err:
            client.store([b"k" * 16], [future_version])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "entries[0].value" in err.value.details()
    finally:
        client.close()
        assert proc.stop() == 0


# --- startup failures -------------------------------------------------------

def test_second_shard_on_the_same_directory_fails_clearly(shard, tmp_path):
    proc, client = shard
    keys, values = make_entries(5, seed=4)
    client.store(keys, values)
    second = start_shard(tmp_path, tmp_path / "db", name="second")
    assert second.popen.wait(120) == 2
    log = second.log()
    assert "locked by another process" in log and "Traceback" not in log
    assert health_status(proc.address) == SERVING
    assert client.lookup(keys) == ([True] * 5, values)
    second.stop()


@pytest.mark.parametrize("case", ["under-a-file", "foreign-database"])
def test_unusable_directory_is_a_one_line_error(tmp_path, case):
    if case == "under-a-file":
        (tmp_path / "plain-file").write_text("x")
        path, expected = tmp_path / "plain-file" / "db", "cannot create database directory"
    else:
        import rocksdict

        path, expected = tmp_path / "foreign", "not a cache shard"
        db = rocksdict.Rdict(str(path))
        db["someone else's"] = "data"
        db.close()
    proc = start_shard(tmp_path, path)
    assert proc.popen.wait(120) == 2
    lines = [line for line in proc.log().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cacheshard: ") and expected in lines[0], lines
    proc.stop()


# --- checkpoint ---------------------------------------------------------------

def test_checkpoint_cli_list_and_restore(shard, tmp_path):
    proc, client = shard
    before_keys, before_values = make_entries(300, seed=5)
    client.store(before_keys, before_values)
    dest = tmp_path / "db-backups" / "nightly"  # the default --backup-dir: beside --path
    cli = [sys.executable, "-m", "cacheshard", "checkpoint", "--address", proc.address, "--name", "nightly"]
    done = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(dest)
    after_keys, after_values = make_entries(50, seed=6)
    client.store(after_keys, after_values)
    again = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr and "'nightly'" in again.stderr
    listed = subprocess.run([sys.executable, "-m", "cacheshard", "checkpoints", "--address", proc.address],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == f"# {dest.parent}" and len(lines) == 2 and lines[1].startswith("nightly\t")

    restored = start_shard(tmp_path, dest, name="restored").wait_serving(60)
    other = Client(restored.address)
    try:
        assert other.lookup(before_keys) == ([True] * 300, before_values)
        assert other.lookup(after_keys)[0] == [False] * 50
    finally:
        other.close()
        assert restored.stop() == 0


# --- bad requests, health, reflection ----------------------------------------

def test_bad_requests_get_their_status_and_the_shard_stays_up(shard):
    proc, client = shard
    cases = [
        (lambda: client.stub.Store(pb.StoreRequest(), timeout=10), "`entries` cannot be empty"),
        (lambda: client.store([b""], codec.encode_many(np.ones((1, 8)))), "`entries[0].key` has 0 bytes"),
        (lambda: client.store([b"k" * 16], [b"junk"]), "`entries[0].value` is not a cache value"),
        (lambda: client.store([b"k%015d" % i for i in range(4097)], codec.encode_many(np.ones((4097, 4)))),
         "limit is 4096"),
        (lambda: list(client.stub.Lookup(iter([pb.LookupRequest(keys=[b"k"] * 4097)]), timeout=10)),
         "limit is 4096"),
        (lambda: client.stub.Checkpoint(pb.CheckpointRequest(name="relative/dir"), timeout=10), "`name` must be"),
        (lambda: client.stub.Checkpoint(pb.CheckpointRequest(name=""), timeout=10), "`name` must be"),
    ]
    for call, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert message in err.value.details()
    assert health_status(proc.address) == SERVING
    assert health_status(proc.address, SERVICE) == SERVING
    keys, values = make_entries(3, seed=7)
    assert client.store(keys, values) == 3
    assert client.lookup(keys) == ([True] * 3, values)
    assert client.stats().stores == 3


def test_reflection_lists_the_service(shard):
    proc, client = shard
    services = ProtoReflectionDescriptorDatabase(client.channel).get_services()
    assert SERVICE in services and "grpc.health.v1.Health" in services

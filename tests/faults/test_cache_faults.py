"""The cache shard failing under steady client load.

The cache is fail-open: a shard that is gone or refuses writes costs the
frontend a miss and an error count, never a failed call. What is promised
(README, "Guarantees"):

- kill -9 of the shard: no client call fails; the shard, started again
  with --sync on the same directory, holds every entry it acknowledged; the
  frontend's L2 hits come back without restarting it;
- the shard's disk full: writes are refused (UNAVAILABLE) and counted in
  GetStats.errors and the frontend's L2 errors, lookups keep answering,
  no call fails, nothing crashes; SIGTERM still stops it cleanly (exit 0);
  once space is freed, the shard started again on the same directory has
  every acknowledged entry and stores again.

The frontend here runs with L1 off (--l1-entries 0), so a repeated text is
answered by L2 or not at all: L2 hits are visible in every reply's usage.
"""

from __future__ import annotations

import time
import uuid

import grpc
import numpy as np

from common import codec
from common.cache_key import cache_key
from harness.disk import NsProc, PrivateDisk
from harness.load import Load, measure
from harness.procs import SERVING, free_port, health_status, wait_until
from harness.stack import ShardClient, cache_stats, fingerprint, frontend, service
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.support import Background


def embed(address: str, texts: list[str]) -> pb.EmbedResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=texts, dimensions=64), timeout=30)


def random_entries(rng: np.random.Generator, n: int) -> tuple[list[bytes], list[bytes]]:
    keys = [rng.bytes(16) for _ in range(n)]
    return keys, codec.encode_many(rng.standard_normal((n, 384)).astype(np.float32))


class Writer(Background):
    """Stores batches straight into the shard and keeps what it acknowledged."""

    def __init__(self, address: str, batch: int = 32, seed: int = 7) -> None:
        super().__init__(join_s=30)
        self.client = ShardClient(address)
        self.rng = np.random.default_rng(seed)
        self.batch = batch
        self.acked: dict[bytes, bytes] = {}
        self.refused = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            keys, values = random_entries(self.rng, self.batch)
            try:
                if self.client.store(keys, values, timeout=5) == len(keys):
                    self.acked.update(zip(keys, values))
            except grpc.RpcError:
                self.refused += 1
                self._stop.wait(0.05)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.client.close()


def missing_from(address: str, entries: dict[bytes, bytes]) -> int:
    """How many of `entries` the shard does not hold with exactly that value."""
    keys = list(entries)
    with ShardClient(address) as sc:
        values = sc.lookup(keys)
    return sum(1 for k, v in zip(keys, values) if v != entries[k])


def wait_l2_hits(address: str, texts: list[str], timeout: float = 30.0) -> None:
    wait_until(lambda: embed(address, texts).usage.l2_hits == len(texts), timeout,
               f"L2 hits for {len(texts)} written-back texts", poll=0.05)


def test_kill_9_of_the_shard_fails_open_and_keeps_every_acknowledged_entry(healthy):
    stack = healthy
    fe = stack.frontend.address
    fp = fingerprint(fe)
    warm = [f"shard fault {uuid.uuid4().hex} {i}" for i in range(40)]
    assert embed(fe, warm).usage.computed == len(warm)
    with ShardClient(stack.shard.address) as sc:  # the frontend's write-back has landed
        wait_until(lambda: None not in sc.lookup([cache_key(fp, t) for t in warm]), 30, "write-back of warm texts")
    errors_before = cache_stats(fe).l2.errors
    with Writer(stack.shard.address) as writer, Load(fe, threads=3) as load:
        load.wait_for(10)
        wait_until(lambda: len(writer.acked) >= 5 * writer.batch, 30, "direct stores acknowledged")
        killed = time.monotonic()
        stack.shard.kill()
        load.wait_for(10)  # answered with the shard down: computed instead
        stack.restart_shard().wait_serving(60)
        up = time.monotonic()
        wait_l2_hits(fe, warm[:4])
        resumed = time.monotonic()
        load.wait_for(10)
    row = measure("cache shard kill -9", load.calls, killed, resumed, recovery_s=resumed - up,
                  recovery_means="restarted shard SERVING -> frontend L2 hits again",
                  shard_down_s=round(up - killed, 3), acknowledged_entries=len(writer.acked),
                  refused_stores=writer.refused)
    assert load.failures() == [], load.details[:5]
    assert row["requests_during_fault"] > 0
    assert cache_stats(fe).l2.errors > errors_before, "the outage should be counted as L2 errors"
    assert len(writer.acked) >= 5 * writer.batch
    assert missing_from(stack.shard.address, writer.acked) == 0
    assert embed(fe, warm).usage.l2_hits == len(warm)


def test_full_disk_refuses_writes_counts_them_and_keeps_lookups(healthy, tmp_path):
    stack = healthy
    disk = PrivateDisk(tmp_path / "disk", size_mb=8)
    port = free_port()
    # Memory tier off: every lookup below is a RocksDB read on the full disk.
    launch = service("cacheshard", tmp_path / "shard.log", {"server.port": port, "path": disk.mountpoint / "db",
                                                             "sync": True, "memory_entries": 0, "max_entries": 2000})
    shard = NsProc.inside(disk, launch).start()
    fe_proc = frontend(tmp_path, stack.lb.address, f"127.0.0.1:{port}", "frontend-disk", "--l1-entries", "0")
    procs = [shard, fe_proc]
    try:
        shard.wait_serving(60)
        fe = fe_proc.start().wait_serving(60).address
        fp = fingerprint(fe)
        warm = [f"disk fault {uuid.uuid4().hex} {i}" for i in range(30)]
        embed(fe, warm)
        acked: dict[bytes, bytes] = {cache_key(fp, t): b"" for t in warm}
        with ShardClient(shard.address) as sc:
            wait_until(lambda: None not in sc.lookup(list(acked)), 30, "write-back of warm texts")
            acked = dict(zip(acked, sc.lookup(list(acked))))
            keys, values = random_entries(np.random.default_rng(11), 40)
            assert sc.store(keys, values) == 40
            acked.update(zip(keys, values))
            errors_before = sc.stats().errors
        fe_errors_before = cache_stats(fe).l2.errors

        with Load(fe, threads=2) as load, ShardClient(shard.address) as sc:
            load.wait_for(10)
            filled = disk.fill()
            full = time.monotonic()
            # The frontend's write-backs of the new vectors are refused and counted.
            # (Space RocksDB preallocated for its log may take a few more writes first.)
            wait_until(lambda: sc.stats().errors > errors_before, 60, "refused writes counted")
            keys, values = random_entries(np.random.default_rng(12), 10)
            try:
                sc.store(keys, values)
                refused = None
            except grpc.RpcError as exc:
                refused = exc.code()
            hits = embed(fe, warm).usage.l2_hits
            missing = missing_from(shard.address, acked)
            load.wait_for(20)
            end = time.monotonic()
            stats = sc.stats()
        fe_errors = cache_stats(fe).l2.errors - fe_errors_before
        alive = shard.popen.poll() is None and health_status(shard.address) == SERVING

        # Free the space; the shard, started again on the same directory, stores again.
        disk.free()
        freed = time.monotonic()
        stop_code = shard.stop()
        stop_log = shard.log()
        shard = NsProc.inside(disk, launch, tmp_path / "shard-2.log").start()
        procs.append(shard)
        shard.wait_serving(60)
        with ShardClient(shard.address) as sc:
            keys, values = random_entries(np.random.default_rng(13), 10)
            stored_again = sc.store(keys, values)
        storing = time.monotonic()
        missing_after_restart = missing_from(shard.address, acked)
        wait_l2_hits(fe, warm[:4])
        row = measure("cache shard disk full", load.calls, full, end, recovery_s=storing - freed,
                      recovery_means="space freed -> shard restarted on the same directory and storing",
                      filler_bytes=filled, shard_errors=stats.errors - errors_before, frontend_l2_errors=fe_errors,
                      shard_exit_code_on_sigterm=stop_code)
        assert load.failures() == [], load.details[:5]
        assert refused == grpc.StatusCode.UNAVAILABLE
        assert stats.errors > errors_before and fe_errors > 0
        assert hits == len(warm), "lookups must keep answering from the full disk"
        assert missing == 0
        assert alive, shard.log()[-3000:]
        assert fe_proc.popen.poll() is None
        assert row["requests_during_fault"] > 0
        # SIGTERM with memtables it could not flush: an orderly stop (the WAL
        # holds every acknowledged entry), not a traceback.
        assert stop_code == 0 and "Traceback" not in stop_log, stop_log[-3000:]
        assert stored_again == 10
        assert missing_after_restart == 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        disk.close()

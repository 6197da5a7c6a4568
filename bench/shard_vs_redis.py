"""Cache shard vs Redis: batch lookups of 256 keys, in one run.

Starts a real cache shard (`python -m cacheshard`) and a real
`redis-server` on free loopback ports, preloads the same keys (cache keys
from `common.cache_key`) and values (codec-encoded 384-wide float16
vectors, 774 bytes) into both, then measures on the same random batches:

  shard pipelined     one Lookup stream, --depth batches in flight
  shard sequential    one Lookup stream, one batch at a time (latency)
  rocksdb ...         the same against a second shard with its memory tier
                      off, so every key is a RocksDB multi-get
  redis MGET          redis-py + hiredis, one MGET at a time (latency)
  redis pipelined     --depth MGETs per pipeline round trip

Each round runs every measurement once, in rotating order, so machine
noise hits all alike; keys/s figures are medians over rounds, latencies are
percentiles over every batch. CPU time per batch is also recorded for the
server process and the client (this) process: unlike wall time it is not
inflated by other work on a shared machine. Prints a table and writes
results/shard_vs_redis.json. All servers are stopped by PID.

    .venv/bin/python -m bench.shard_vs_redis [--keys 20000] [--batches 300] [--rounds 10] [--quick]
    make bench-redis [QUICK=1]     (installs redis-server first, its service left disabled)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import redis

from common import codec
from common.cache_key import cache_key
from common.malloc_tuning import tune_malloc
from sutra.cache.v1 import cache_shard_service_pb2 as pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as pb_grpc
from harness.procs import Proc, free_port
from harness.results import results_path
from harness.stack import service

RESULTS = results_path("shard_vs_redis.json")
REDIS_SERVER = "/usr/bin/redis-server"
BATCH = 256
WIDTH = 384


def make_data(n: int, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    rng = np.random.default_rng(seed)
    keys = [cache_key("bench-fingerprint", f"text number {i}") for i in range(n)]
    vectors = rng.standard_normal((n, WIDTH)).astype(np.float32)
    values = codec.encode_many(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), "float16")
    return keys, values


def make_batches(keys: list[bytes], count: int, seed: int = 1) -> list[list[bytes]]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(count, BATCH))
    return [[keys[i] for i in row] for row in idx]


class RedisServer:
    """redis-server on a free loopback port, no persistence; stopped by PID."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def client(self) -> redis.Redis:
        deadline = time.monotonic() + 30
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.popen.returncode}")
            try:
                client = redis.Redis(host="127.0.0.1", port=self.port)
                client.ping()
                return client
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            self.popen.wait(30)
        self._log.close()


def percentiles_ms(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1000.0
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99))}


# --- shard side: grpc.aio client on one long-lived Lookup stream ----------

async def shard_preload(address: str, keys, values, chunk: int = 1000) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CacheShardServiceStub(channel)
        for i in range(0, len(keys), chunk):
            entries = [pb.Entry(key=k, value=v) for k, v in zip(keys[i:i + chunk], values[i:i + chunk])]
            await stub.Store(pb.StoreRequest(entries=entries))


async def shard_pipelined(address: str, requests: list[pb.LookupRequest], depth: int) -> float:
    """Seconds to answer every request with `depth` batches in flight on one stream."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.CacheShardServiceStub(channel).Lookup()
        slots = asyncio.Semaphore(depth)

        async def send():
            for request in requests:
                await slots.acquire()
                await call.write(request)
            await call.done_writing()

        start = time.perf_counter()
        writer = asyncio.ensure_future(send())
        expected = 0
        async for response in call:
            slots.release()
            if response.batch_id != requests[expected].batch_id or len(response.found) != BATCH:
                raise AssertionError("answers out of order or short")
            expected += 1
        elapsed = time.perf_counter() - start
        await writer
        if expected != len(requests):
            raise AssertionError(f"{expected} answers for {len(requests)} requests")
        return elapsed


async def shard_sequential(address: str, requests: list[pb.LookupRequest]) -> tuple[float, list[float]]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.CacheShardServiceStub(channel).Lookup()
        latencies = []
        start = time.perf_counter()
        for request in requests:
            t = time.perf_counter()
            await call.write(request)
            response = await call.read()
            latencies.append(time.perf_counter() - t)
            if response.batch_id != request.batch_id:
                raise AssertionError("answer for the wrong batch")
        elapsed = time.perf_counter() - start
        await call.done_writing()
        return elapsed, latencies


async def shard_check(address: str, keys, values) -> None:
    """The shard returns exactly what was stored (a benchmark of wrong answers is worthless)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.CacheShardServiceStub(channel).Lookup()
        await call.write(pb.LookupRequest(batch_id=7, keys=keys[:BATCH]))
        response = await call.read()
        await call.done_writing()
        if not all(response.found) or list(response.values) != values[:BATCH]:
            raise AssertionError("shard returned wrong values")


# --- redis side: redis-py with hiredis ------------------------------------

def redis_preload(client: redis.Redis, keys, values, chunk: int = 1000) -> None:
    for i in range(0, len(keys), chunk):
        client.mset(dict(zip(keys[i:i + chunk], values[i:i + chunk])))


def redis_sequential(client: redis.Redis, batches) -> tuple[float, list[float]]:
    latencies = []
    mget = client.mget
    start = time.perf_counter()
    for batch in batches:
        t = time.perf_counter()
        got = mget(batch)
        latencies.append(time.perf_counter() - t)
        if len(got) != BATCH:
            raise AssertionError("short MGET answer")
    return time.perf_counter() - start, latencies


def redis_pipelined(client: redis.Redis, batches, depth: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(batches), depth):
        pipe = client.pipeline(transaction=False)
        for batch in batches[i:i + depth]:
            pipe.mget(batch)
        pipe.execute()
    return time.perf_counter() - start


KINDS = ("shard_pipelined", "shard_sequential", "rocksdb_pipelined", "rocksdb_sequential",
         "redis_mget", "redis_pipelined")


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=20_000, help="keys preloaded into each store (default %(default)s)")
    parser.add_argument("--batches", type=int, default=300, help="256-key batches per measurement (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="rounds; each runs every measurement once, in rotating order (default %(default)s)")
    parser.add_argument("--depth", type=int, default=8, help="batches in flight when pipelining (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small run: 5,000 keys, 100 batches, 4 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default %(default)s)")
    args = parser.parse_args(argv)
    # Both clients live in this process; the shard's gRPC client parses
    # ~200 KB messages, which without this pays page faults per message
    # (see common.malloc_tuning). Redis's client allocates per value and is
    # unaffected either way.
    tune_malloc()
    if args.quick:
        args.keys, args.batches, args.rounds = 5000, 100, 4
    if not Path(REDIS_SERVER).exists():
        raise SystemExit(f"{REDIS_SERVER} not found: `make bench-redis` installs it (its service left disabled)")

    keys, values = make_data(args.keys)
    batches = make_batches(keys, args.batches)
    requests = [pb.LookupRequest(batch_id=i, keys=b) for i, b in enumerate(batches)]
    work = Path(tempfile.mkdtemp(prefix="shard-vs-redis-"))
    shards = {
        # The default shard: memory tier in front of RocksDB.
        "shard": {},
        # Every lookup is a RocksDB multi-get (memory tier off, RocksDB row cache on).
        "rocksdb": {"memory_entries": 0, "row_cache_mb": 128},
    }
    procs: dict[str, Proc] = {}
    for name, settings in shards.items():
        procs[name] = service("cacheshard", work / f"{name}.log",
                              {"path": work / name, "server.log_level": "WARNING", **settings})
    server = RedisServer(work / "redis.log")
    me = os.getpid()
    runs: dict[str, list[float]] = {k: [] for k in KINDS}
    cpu = {k: {"server_s": 0.0, "client_s": 0.0, "batches": 0} for k in KINDS}
    latencies: dict[str, list[float]] = {"shard": [], "rocksdb": [], "redis_mget": []}
    n_keys = len(batches) * BATCH
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_serving(60)
        client = server.client()
        for proc in procs.values():
            asyncio.run(shard_preload(proc.address, keys, values))
            asyncio.run(shard_check(proc.address, keys, values))
        redis_preload(client, keys, values)
        if client.mget(keys[:BATCH]) != values[:BATCH]:
            raise AssertionError("redis returned wrong values")

        def measure(kind: str) -> float:
            """Run one measurement; returns elapsed seconds and records CPU and latencies."""
            store = kind.split("_")[0]
            pid = server.popen.pid if store == "redis" else procs[store].pid
            s0, c0 = cpu_seconds(pid), cpu_seconds(me)
            if kind.endswith("_pipelined") and store != "redis":
                elapsed = asyncio.run(shard_pipelined(procs[store].address, requests, args.depth))
            elif kind.endswith("_sequential"):
                elapsed, lat = asyncio.run(shard_sequential(procs[store].address, requests))
                latencies[store] += lat
            elif kind == "redis_mget":
                elapsed, lat = redis_sequential(client, batches)
                latencies["redis_mget"] += lat
            else:
                elapsed = redis_pipelined(client, batches, args.depth)
            cpu[kind]["server_s"] += cpu_seconds(pid) - s0
            cpu[kind]["client_s"] += cpu_seconds(me) - c0
            cpu[kind]["batches"] += len(batches)
            return elapsed

        for kind in KINDS:  # warm-up: caches, connections, code paths
            measure(kind)
        for kind in KINDS:
            runs[kind].clear()
            latencies = {k: [] for k in latencies}
            cpu[kind] = {"server_s": 0.0, "client_s": 0.0, "batches": 0}
        for r in range(args.rounds):
            order = KINDS[r % len(KINDS):] + KINDS[: r % len(KINDS)]
            for kind in order:
                runs[kind].append(n_keys / measure(kind))
        client.close()
    finally:
        codes = {name: proc.stop() for name, proc in procs.items()}
        server.stop()
    if any(codes.values()):
        raise SystemExit(f"shard exit codes {codes}; logs in {work}")
    shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in runs.items()}
    cpu_us = {k: {"server_us_per_batch": 1e6 * v["server_s"] / v["batches"],
                  "client_us_per_batch": 1e6 * v["client_s"] / v["batches"]} for k, v in cpu.items()}
    result = {
        "batch_keys": BATCH,
        "value_bytes": len(values[0]),
        "preloaded_keys": args.keys,
        "batches_per_measurement": args.batches,
        "rounds": args.rounds,
        "pipeline_depth": args.depth,
        "keys_per_s_median": med,
        "keys_per_s_all_rounds": runs,
        "ratio_vs_redis_mget": {k: med[k] / med["redis_mget"] for k in KINDS},
        "ratio_shard_pipelined_vs_redis_pipelined": med["shard_pipelined"] / med["redis_pipelined"],
        "latency_one_batch_ms": {k: percentiles_ms(v) for k, v in latencies.items()},
        "cpu_per_batch": cpu_us,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_after": os.getloadavg()[0]},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    return 0


LABELS = {
    "shard_pipelined": "shard Lookup, pipelined",
    "shard_sequential": "shard Lookup, one at a time",
    "rocksdb_pipelined": "shard, RocksDB reads, pipelined",
    "rocksdb_sequential": "shard, RocksDB reads, one at a time",
    "redis_mget": "redis MGET, one at a time",
    "redis_pipelined": "redis MGET, pipelined",
}
LATENCY_OF = {"shard_sequential": "shard", "rocksdb_sequential": "rocksdb", "redis_mget": "redis_mget"}


def print_table(r: dict) -> None:
    print(f"\n{r['batch_keys']}-key batch lookups, {r['value_bytes']}-byte values, {r['preloaded_keys']} keys "
          f"preloaded; {r['batches_per_measurement']} batches x {r['rounds']} rounds, medians; "
          f"pipelined = {r['pipeline_depth']} batches in flight")
    print(f"\n{'path':<38}{'keys/s':>11}{'vs MGET':>9}{'p50 ms':>8}{'p99 ms':>8}{'srv us':>8}{'cli us':>8}")
    for kind, label in LABELS.items():
        lat = r["latency_one_batch_ms"].get(LATENCY_OF.get(kind, ""), {})
        c = r["cpu_per_batch"][kind]
        p50 = f"{lat['p50_ms']:.3f}" if lat else ""
        p99 = f"{lat['p99_ms']:.3f}" if lat else ""
        print(f"{label:<38}{r['keys_per_s_median'][kind]:>11,.0f}{r['ratio_vs_redis_mget'][kind]:>9.2f}"
              f"{p50:>8}{p99:>8}{c['server_us_per_batch']:>8.0f}{c['client_us_per_batch']:>8.0f}")
    print("\nsrv us / cli us: CPU microseconds per batch in the server process / the client (this) process")
    print(f"shard pipelined / redis pipelined: {r['ratio_shard_pipelined_vs_redis_pipelined']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())

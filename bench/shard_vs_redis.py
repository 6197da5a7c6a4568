"""Cache shard vs Redis: batch lookups of 256 keys, in one run.

Starts a real cache shard (`python -m cacheshard`) and a real
`redis-server` on free loopback ports, preloads the same keys (cache keys
from `common.cache_key`) and values (codec-encoded 384-wide float16
vectors, 774 bytes) into both, then measures on the same random batches:

  shard pipelined    one Lookup stream, --depth batches in flight
  shard sequential   one Lookup stream, one batch at a time (latency)
  redis MGET         redis-py + hiredis, one MGET at a time (latency)
  redis pipelined    --depth MGETs per pipeline round trip

Rounds alternate shard and Redis so machine noise hits both alike; each
figure is the median over rounds. Prints a table and writes
bench/results/shard_vs_redis.json. Both servers are stopped by PID.

    .venv/bin/python -m bench.shard_vs_redis [--keys 20000] [--batches 1000] [--rounds 3]
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
import redis

from common import codec
from common.cache_key import cache_key
from sutra.cache.v1 import cache_shard_service_pb2 as pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as pb_grpc
from tests.support import Proc, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "shard_vs_redis.json"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=20_000, help="keys preloaded into both (default %(default)s)")
    parser.add_argument("--batches", type=int, default=1000, help="256-key batches per measurement (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported (default %(default)s)")
    parser.add_argument("--depth", type=int, default=8, help="batches in flight when pipelining (default %(default)s)")
    parser.add_argument("--shard-arg", action="append", default=[], help="extra flag for the shard (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small run: 5,000 keys, 200 batches, 2 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.keys, args.batches, args.rounds = 5000, 200, 2
    if not Path(REDIS_SERVER).exists():
        raise SystemExit(f"{REDIS_SERVER} not found: `apt-get install redis-server` (make setup does it)")

    keys, values = make_data(args.keys)
    batches = make_batches(keys, args.batches)
    requests = [pb.LookupRequest(batch_id=i, keys=b) for i, b in enumerate(batches)]
    work = Path(tempfile.mkdtemp(prefix="shard-vs-redis-"))
    shard = Proc("cacheshard", ["--port", str(port := free_port()), "--path", str(work / "db"),
                                "--log-level", "WARNING", *args.shard_arg], work / "shard.log", port)
    server = RedisServer(work / "redis.log")
    try:
        shard.start().wait_serving(60)
        client = server.client()
        asyncio.run(shard_preload(shard.address, keys, values))
        redis_preload(client, keys, values)
        asyncio.run(shard_check(shard.address, keys, values))
        if client.mget(keys[:BATCH]) != values[:BATCH]:
            raise AssertionError("redis returned wrong values")
        # Warm both: caches, connections, code paths.
        asyncio.run(shard_pipelined(shard.address, requests[: min(200, len(requests))], args.depth))
        redis_sequential(client, batches[:200])

        runs: dict[str, list[float]] = {k: [] for k in ("shard_pipelined", "shard_sequential", "redis_mget", "redis_pipelined")}
        shard_lat: list[float] = []
        redis_lat: list[float] = []
        n_keys = len(batches) * BATCH
        for _ in range(args.rounds):
            runs["shard_pipelined"].append(n_keys / asyncio.run(shard_pipelined(shard.address, requests, args.depth)))
            runs["redis_pipelined"].append(n_keys / redis_pipelined(client, batches, args.depth))
            elapsed, lat = asyncio.run(shard_sequential(shard.address, requests))
            runs["shard_sequential"].append(n_keys / elapsed)
            shard_lat += lat
            elapsed, lat = redis_sequential(client, batches)
            runs["redis_mget"].append(n_keys / elapsed)
            redis_lat += lat
        client.close()
    finally:
        code = shard.stop()
        server.stop()
    if code != 0:
        raise SystemExit(f"shard exited with {code}; log in {work / 'shard.log'}")
    shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "batch_keys": BATCH,
        "value_bytes": len(values[0]),
        "preloaded_keys": args.keys,
        "batches_per_run": args.batches,
        "rounds": args.rounds,
        "pipeline_depth": args.depth,
        "keys_per_s": med,
        "keys_per_s_all_rounds": runs,
        "ratio_shard_pipelined_vs_redis_mget": med["shard_pipelined"] / med["redis_mget"],
        "ratio_shard_pipelined_vs_redis_pipelined": med["shard_pipelined"] / med["redis_pipelined"],
        "ratio_shard_sequential_vs_redis_mget": med["shard_sequential"] / med["redis_mget"],
        "latency_one_batch": {"shard": percentiles_ms(shard_lat), "redis_mget": percentiles_ms(redis_lat)},
        "shard_args": args.shard_arg,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": os.getloadavg()[0]},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    lat = result["latency_one_batch"]
    print(f"\n256-key batch lookups, {len(values[0])}-byte values, {args.keys} keys preloaded, "
          f"{args.batches} batches x {args.rounds} rounds (medians)\n")
    print(f"{'path':<34}{'keys/s':>12}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"{'shard Lookup, pipelined (depth ' + str(args.depth) + ')':<34}{med['shard_pipelined']:>12,.0f}{'':>9}{'':>9}")
    print(f"{'shard Lookup, one at a time':<34}{med['shard_sequential']:>12,.0f}"
          f"{lat['shard']['p50_ms']:>9.3f}{lat['shard']['p99_ms']:>9.3f}")
    print(f"{'redis MGET, one at a time':<34}{med['redis_mget']:>12,.0f}"
          f"{lat['redis_mget']['p50_ms']:>9.3f}{lat['redis_mget']['p99_ms']:>9.3f}")
    print(f"{'redis MGET, pipelined (depth ' + str(args.depth) + ')':<34}{med['redis_pipelined']:>12,.0f}{'':>9}{'':>9}")
    print(f"\nratio shard pipelined / redis MGET:       {result['ratio_shard_pipelined_vs_redis_mget']:.2f}")
    print(f"ratio shard pipelined / redis pipelined:  {result['ratio_shard_pipelined_vs_redis_pipelined']:.2f}")
    print(f"ratio shard one-at-a-time / redis MGET:   {result['ratio_shard_sequential_vs_redis_mget']:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

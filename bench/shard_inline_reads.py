"""Small RocksDB reads on the shard's event loop against a hop to its worker threads, side by side.

Starts two real cache shards on the same kind of data: one with the default --inline-read-keys,
one with --inline-read-keys 0 (every RocksDB read on an --io-threads worker, as before). Each
stores --entries entries, flushed to SST files, so that lookups go through RocksDB's filters and
blocks. Then, through the frontend's own `L2Client` (one key per lookup, as one interactive miss
makes), the client alternates blocks of lookups between the two shards, so both see the same
machine noise, in two cases:

  absent   keys no shard holds: the memory tier misses, RocksDB's filters answer (the cold
           lookup of new traffic, the most frequent lookup an interactive stack makes)
  on disk  stored keys, with the memory tier off on both shards (--memory-entries 0), so every
           lookup reads RocksDB's blocks

Reported per shard and case: p50/p90/p99 latency per lookup, and the shard process's CPU per
lookup (from /proc; robust on a shared machine), at concurrency 1 and --concurrency.

    .venv/bin/python -m bench.shard_inline_reads [--lookups 4000] [--entries 20000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import psutil

from bench import ab
from bench.shard_scale import key, value_pool
from embedding.l2_client import L2Client
from embedding.stats import Stats
from harness.procs import free_port
from harness.results import results_path
from harness.stack import service
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc

VARIANTS = {"inline": {}, "workers": {"inline_read_keys": 0}}
BLOCK = 200  # lookups in a row to one shard before turning to the other


async def fill(l2: L2Client, entries: int) -> None:
    pool = value_pool()
    for lo in range(0, entries, 1000):
        await l2.shards[0].store([(key(i), pool[i % len(pool)]) for i in range(lo, min(entries, lo + 1000))], 30.0)


async def block(l2: L2Client, keys: list[bytes], concurrency: int, expect_found: bool) -> list[float]:
    """Look `keys` up one per call with `concurrency` in flight; latencies in ms."""
    pending = iter(keys)
    lat: list[float] = []

    async def worker() -> None:
        for k in pending:
            t = time.perf_counter()
            got = (await l2.lookup([k]))[0]
            lat.append(1000 * (time.perf_counter() - t))
            if (got is not None) != expect_found:
                raise AssertionError(f"lookup found={got is not None}, expected {expect_found}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat


async def measure(cfg: argparse.Namespace, workdir: Path, case: str) -> dict:
    tier_off = {"memory_entries": 0} if case == "on disk" else {}
    shards, clients, procs = {}, {}, {}
    try:
        for name, overrides in VARIANTS.items():
            shards[name] = service("cacheshard", workdir / f"{case}-{name}.log",
                                   {"path": workdir / f"{case}-{name}-db", "server.metrics_port": free_port(),
                                    **tier_off, **overrides}).start()
        for name, shard in shards.items():
            shard.wait_serving(120)
            procs[name] = psutil.Process(shard.pid)
            clients[name] = L2Client((shard.address,), Stats(), timeout_s=5.0, max_message_bytes=8 << 20,
                                     reconnect_max_s=2.0, max_waiting=4096)
            await fill(clients[name], cfg.entries)
            # A checkpoint flushes the memtables into SST files: lookups below go through filters and
            # blocks, not only the memtable.
            with grpc.insecure_channel(shard.address) as channel:
                cpb_grpc.CacheShardServiceStub(channel).Checkpoint(cpb.CheckpointRequest(name="bench"), timeout=60)
        rng = np.random.default_rng(7)
        out: dict = {}
        for concurrency in (1, cfg.concurrency):
            lat = {name: [] for name in VARIANTS}
            cpu = {name: 0.0 for name in VARIANTS}
            for start in range(0, cfg.lookups, BLOCK):
                n = min(BLOCK, cfg.lookups - start)
                if case == "absent":
                    keys = [key(cfg.entries + 10_000_000 * concurrency + start + i) for i in range(n)]
                else:
                    keys = [key(int(i)) for i in rng.integers(0, cfg.entries, size=n)]
                order = list(VARIANTS)
                rng.shuffle(order)
                for name in order:
                    before = sum(procs[name].cpu_times()[:2])
                    lat[name] += await block(clients[name], keys, concurrency, case == "on disk")
                    cpu[name] += sum(procs[name].cpu_times()[:2]) - before
            out[f"concurrency {concurrency}"] = {
                name: {**{f"p{p}_ms": float(np.percentile(lat[name], p)) for p in (50, 90, 99)},
                       "shard_cpu_us_per_lookup": 1e6 * cpu[name] / len(lat[name]), "n": len(lat[name])}
                for name in VARIANTS}
        return out
    finally:
        for client in clients.values():
            await client.close()
        for shard in shards.values():
            shard.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shard_inline_reads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lookups", type=int, default=4000, help="lookups per shard, case and concurrency")
    ap.add_argument("--entries", type=int, default=20_000, help="entries stored in each shard")
    ap.add_argument("--concurrency", type=int, default=8, help="the second concurrency measured (the first is 1)")
    ap.add_argument("--out", type=Path, default=None)
    cfg = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="shard-inline-reads-"))
    result: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": ab.cpu_model(),
                    "lookups": cfg.lookups, "entries": cfg.entries, "cases": {}}
    try:
        for case in ("absent", "on disk"):
            result["cases"][case] = asyncio.run(measure(cfg, workdir, case))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"CPU: {result['cpu']}; {cfg.lookups} single-key lookups per shard, case and concurrency, "
          f"alternating in blocks of {BLOCK}")
    print(f"  {'case':8} {'in flight':>9} {'shard':8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'CPU us/lookup':>14}")
    for case, levels in result["cases"].items():
        for level, rows in levels.items():
            for name, r in rows.items():
                print(f"  {case:8} {level.split()[-1]:>9} {name:8} {r['p50_ms']:8.3f} {r['p90_ms']:8.3f} "
                      f"{r['p99_ms']:8.3f} {r['shard_cpu_us_per_lookup']:14.1f}")
            a, b = rows["inline"], rows["workers"]
            # CPU times come in 10 ms ticks: a short run may count none.
            cpu = (f"{a['shard_cpu_us_per_lookup'] / b['shard_cpu_us_per_lookup']:14.2f}x"
                   if b["shard_cpu_us_per_lookup"] else f"{'-':>15}")
            print(f"  {'':8} {'':>9} {'ratio':8} {a['p50_ms'] / b['p50_ms']:8.2f}x{'':>17} {cpu}")
    out = cfg.out or results_path("shard_inline_reads.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

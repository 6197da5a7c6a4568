"""How one cache shard's lookups scale with the entries it holds.

Starts a real shard (`python -m cacheshard --memory-budget B`) on a free
loopback port with its database in a temporary directory, fills it through
`Store` (batches of 2,000) to each size in turn (20k, 100k, 1M, 10M by
default), and at each size measures, over keys that exist:

  uniform / zipf    keys drawn uniformly, or Zipf (s=1.1) over the keys with
                    hot ranks scattered over the insertion order
  keys/s            one Lookup stream, --depth batches of 256 in flight; the
                    median of 8 runs. Each larger size's runs alternate with
                    runs against a second shard that holds the smallest size
                    (the baseline), and its goal is judged by the median of
                    those paired ratios: on a shared machine the load drifts
                    over the minutes between sizes, and a ratio of two
                    figures taken minutes apart measured that drift as much
                    as the shard
  batch p50/p99     one batch of 256 at a time (latency)
  single p50/p99    one key per Lookup message, one at a time
  shard CPU         shard process CPU seconds per key during the keys/s run:
                    far less inflated than wall time by other work on a
                    shared machine

plus the store rate of the fill, the shard's RSS (anonymous and file-backed)
against the budget, bytes on disk and SST files. Each lookup answer is
checked against what was stored. Writes results/shard_scale.json (or
shard_scale_quick.json) and a PNG of rate and latency against size, prints
a table and the goals (rate at 1M >= 0.7x and at 10M >= 0.5x the rate at
20k, RSS within the budget). The shard is stopped by PID and its directory
deleted.

    .venv/bin/python -m bench.shard_scale                 # 20k..10M, 12 GiB budget, ~8 GB of disk at 10M
    .venv/bin/python -m bench.shard_scale --quick         # 20k and 200k, 384 MiB budget: seconds
    .venv/bin/python -m bench.shard_scale --sizes 20000,1000000 --budget 2GiB
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import psutil

from bench.shard_vs_redis import BATCH, WIDTH, percentiles_ms, shard_pipelined, shard_sequential
from cacheshard.budget import parse_bytes, show_bytes
from common import codec
from harness.procs import free_port, wait_until
from harness.results import results_path
from harness.stack import service
from sutra.cache.v1 import cache_shard_service_pb2 as pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as pb_grpc

FULL_SIZES = (20_000, 100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (20_000, 200_000)
FULL_BUDGET = "12GiB"  # what holds 10M entries in the tier: the goal run (needs ~10 GiB of free RAM)
QUICK_BUDGET = "384MiB"
FILL_BATCH = 2000
VALUE_POOL = 1024
ZIPF_S = 1.1
GOALS = {1_000_000: 0.7, 10_000_000: 0.5}
ROUNDS = 8


def key(i: int) -> bytes:
    """Entry i's cache key: a uniform 16-byte hash, like common.cache_key's."""
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()


def value_pool() -> list[bytes]:
    """Codec values (384-wide float16, 774 bytes); entry i holds pool[i % len(pool)]."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((VALUE_POOL, WIDTH)).astype(np.float32)
    return codec.encode_many(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), "float16")


def draw(rng: np.random.Generator, n: int, count: int, kind: str) -> np.ndarray:
    """`count` entry indices below n: uniform, or Zipf ranks scattered by a multiplicative hash."""
    if kind == "uniform":
        return rng.integers(0, n, size=count)
    ranks = rng.zipf(ZIPF_S, size=count * 2)
    ranks = ranks[ranks <= n][:count]
    while len(ranks) < count:
        more = rng.zipf(ZIPF_S, size=count)
        ranks = np.concatenate([ranks, more[more <= n]])[:count]
    return (ranks.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(n)


async def fill(stub, pool: list[bytes], start: int, stop: int) -> float:
    """Store entries [start, stop) two batches in flight; returns entries per second."""
    began = time.perf_counter()
    inflight: set[asyncio.Future] = set()
    for lo in range(start, stop, FILL_BATCH):
        entries = [pb.Entry(key=key(i), value=pool[i % VALUE_POOL]) for i in range(lo, min(stop, lo + FILL_BATCH))]
        inflight.add(asyncio.ensure_future(stub.Store(pb.StoreRequest(entries=entries), timeout=120)))
        if len(inflight) >= 2:
            done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            for d in done:
                d.result()
    await asyncio.gather(*inflight)
    return (stop - start) / (time.perf_counter() - began)


def requests_for(idx: np.ndarray, per: int) -> tuple[list[pb.LookupRequest], list[list[int]]]:
    rows = [list(map(int, idx[i:i + per])) for i in range(0, len(idx) - per + 1, per)]
    return [pb.LookupRequest(batch_id=b + 1, keys=[key(i) for i in row]) for b, row in enumerate(rows)], rows


async def check(address: str, pool: list[bytes], rows: list[list[int]], requests) -> None:
    """Every key found, with the value stored for it."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.CacheShardServiceStub(channel).Lookup()
        for row, request in zip(rows[:4], requests[:4]):
            await call.write(request)
            reply = await call.read()
            if not all(reply.found) or list(reply.values) != [pool[i % VALUE_POOL] for i in row]:
                raise AssertionError("the shard answered a stored key wrongly")
        await call.done_writing()


class ShardProcess:
    """The shard under test and what it says about itself."""

    def __init__(self, workdir: Path, budget: int, max_entries: int, name: str = "shard") -> None:
        self.metrics_port = free_port()
        self.db = workdir / f"{name}-db"
        self.proc = service("cacheshard", workdir / f"{name}.log", {
            "path": self.db, "max_entries": max_entries, "memory_budget": budget,
            "server.metrics_port": self.metrics_port}).start().wait_serving(120)
        self.ps = psutil.Process(self.proc.pid)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        m = re.search(rf"^sutra_cacheshard_{name} (\S+)$", text, re.MULTILINE)
        return float(m[1]) if m else 0.0

    def settle(self) -> None:
        """Wait until RocksDB has no flush or compaction (file merge) running. ("Pending" can stay
        1 for good: FIFO reports a merge it may not pick, see store.py's `_merge_small_files`.)"""
        wait_until(lambda: not any(self.metric(m) for m in ("rocksdb_compactions_running",
                                                            "rocksdb_flushes_running",
                                                            "rocksdb_immutable_memtables")),
                   1800, "RocksDB idle", poll=0.5)

    def memory(self) -> dict[str, int]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        field = lambda k: int(re.search(rf"^{k}:\s+(\d+) kB", status, re.MULTILINE)[1]) * 1024  # noqa: E731
        return {"rss_bytes": field("VmRSS"), "rss_anon_bytes": field("RssAnon"), "rss_file_bytes": field("RssFile"),
                "peak_rss_bytes": field("VmHWM")}

    def disk(self) -> int:
        return sum(f.stat().st_size for f in self.db.iterdir() if f.is_file())

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system


async def rate_round(shard: ShardProcess, requests: list[pb.LookupRequest], depth: int) -> tuple[float, float]:
    """keys/s of one pipelined run, and the shard CPU seconds it took."""
    cpu0 = shard.cpu()
    seconds = await shard_pipelined(shard.proc.address, requests, depth)
    return len(requests) * BATCH / seconds, shard.cpu() - cpu0


async def measure(shard: ShardProcess, pool: list[bytes], n: int, kind: str, cfg: argparse.Namespace,
                  base: tuple[ShardProcess, int] | None = None) -> dict:
    """One size's figures. With `base` (the baseline shard and its size), the keys/s rounds alternate
    between this shard and the baseline, and the row carries the ratio of each pair: drift on a
    shared machine then moves both sides of a ratio alike instead of one."""
    address = shard.proc.address
    rng = np.random.default_rng(hash((n, kind)) & 0xFFFF)
    warm, _ = requests_for(draw(rng, n, cfg.warm * BATCH, kind), BATCH)
    await shard_pipelined(address, warm, cfg.depth)
    rate_reqs, rows = requests_for(draw(rng, n, cfg.batches * BATCH, kind), BATCH)
    await check(address, pool, rows, rate_reqs)
    per = len(rate_reqs) // ROUNDS
    if base is not None:
        base_shard, base_n = base
        base_reqs, base_rows = requests_for(draw(rng, base_n, cfg.batches * BATCH, kind), BATCH)
        await shard_pipelined(base_shard.proc.address, base_reqs[:cfg.warm], cfg.depth)
        await check(base_shard.proc.address, pool, base_rows, base_reqs)
    rates, cpu, base_rates, base_cpu = [], 0.0, [], 0.0
    for i in range(ROUNDS):
        # ROUNDS separate runs, median rate: a burst of other work on a shared machine spoils one, not all.
        order = ("base", "this") if i % 2 == 0 else ("this", "base")
        for side in order if base is not None else ("this",):
            if side == "this":
                rate, seconds = await rate_round(shard, rate_reqs[i * per:(i + 1) * per], cfg.depth)
                rates.append(rate)
                cpu += seconds
            else:
                rate, seconds = await rate_round(base_shard, base_reqs[i * per:(i + 1) * per], cfg.depth)
                base_rates.append(rate)
                base_cpu += seconds
    seq_reqs, _ = requests_for(draw(rng, n, cfg.sequential * BATCH, kind), BATCH)
    _, batch_lat = await shard_sequential(address, seq_reqs)
    one_reqs, _ = requests_for(draw(rng, n, cfg.singles, kind), 1)
    _, one_lat = await shard_sequential(address, one_reqs)
    keys = per * ROUNDS * BATCH
    batch, single = percentiles_ms(batch_lat), percentiles_ms(one_lat)
    out = {"keys_per_s": float(np.median(rates)), "keys_per_s_rounds": rates, "shard_cpu_us_per_key": cpu / keys * 1e6,
           "batch_p50_ms": batch["p50_ms"], "batch_p99_ms": batch["p99_ms"],
           "single_p50_ms": single["p50_ms"], "single_p99_ms": single["p99_ms"]}
    if base is not None:
        out["paired_base"] = {"entries": base_n, "keys_per_s": float(np.median(base_rates)),
                              "keys_per_s_rounds": base_rates, "shard_cpu_us_per_key": base_cpu / keys * 1e6}
        out["ratio_to_paired_base"] = float(np.median(np.divide(rates, base_rates)))
        out["cpu_ratio_to_paired_base"] = base_cpu / cpu
    return out


async def run(cfg: argparse.Namespace, workdir: Path) -> dict:
    pool = value_pool()
    budget = parse_bytes(cfg.budget)
    sizes = sorted(cfg.sizes)
    # Room for the largest size plus 10%: this measures lookups, not eviction.
    shard = ShardProcess(workdir, budget, int(sizes[-1] * 1.1) + 1000)
    # The baseline (the smallest size) in a shard of its own, measured in turn with every larger size.
    base_n = sizes[0]
    base_shard = ShardProcess(workdir, budget, int(base_n * 1.1) + 1000, name="baseline") if len(sizes) > 1 else None
    rows = []
    try:
        if base_shard is not None:
            async with grpc.aio.insecure_channel(base_shard.proc.address, options=[
                    ("grpc.max_send_message_length", 8 << 20)]) as channel:
                await fill(pb_grpc.CacheShardServiceStub(channel), pool, 0, base_n)
            base_shard.settle()
        async with grpc.aio.insecure_channel(shard.proc.address, options=[
                ("grpc.max_send_message_length", 8 << 20)]) as channel:
            stub = pb_grpc.CacheShardServiceStub(channel)
            held = 0
            for n in sizes:
                store_rate = await fill(stub, pool, held, n)
                held = n
                shard.settle()
                stats = await stub.GetStats(pb.GetStatsRequest(), timeout=30)
                row = {"entries": n, "store_entries_per_s": store_rate,
                       "sst_files": int(shard.metric("rocksdb_sst_files")), "disk_bytes": shard.disk(),
                       "memory_tier_entries": stats.memory_entries}
                paired = (base_shard, base_n) if base_shard is not None and n > base_n else None
                for kind in ("uniform", "zipf"):
                    row[kind] = await measure(shard, pool, n, kind, cfg, paired)
                row.update(shard.memory())
                rows.append(row)
                u, z = row["uniform"], row["zipf"]
                print(f"{n:>11,} store {store_rate:>9,.0f}/s  uniform {u['keys_per_s']:>9,.0f} keys/s "
                      f"(cpu {u['shard_cpu_us_per_key']:.2f} us/key, batch p99 {u['batch_p99_ms']:.2f} ms, "
                      f"single p99 {u['single_p99_ms']:.2f} ms)  zipf {z['keys_per_s']:>9,.0f} keys/s  "
                      f"rss {row['rss_bytes'] / 2**20:,.0f} MiB  disk {row['disk_bytes'] / 2**20:,.0f} MiB  "
                      f"files {row['sst_files']}"
                      + (f"  paired with {base_n:,}: uniform x{u['ratio_to_paired_base']:.2f} "
                         f"zipf x{z['ratio_to_paired_base']:.2f}" if paired else ""), flush=True)
    finally:
        shard.proc.stop()
        if base_shard is not None:
            base_shard.proc.stop()
    return {"budget_bytes": budget, "budget": show_bytes(budget), "rows": rows}


def goals(result: dict) -> list[dict]:
    """The issue's goals. A size measured in turn with the baseline shard is judged by the median of
    its paired ratios; `across_runs` is the plain ratio to the 20k row, measured minutes earlier."""
    rows = {r["entries"]: r for r in result["rows"]}
    out = []
    base = rows.get(20_000)
    for n, ratio in GOALS.items():
        if base is None or n not in rows:
            continue
        for kind in ("uniform", "zipf"):
            row = rows[n][kind]
            across = row["keys_per_s"] / base[kind]["keys_per_s"]
            got = row.get("ratio_to_paired_base", across)
            cpu = row.get("cpu_ratio_to_paired_base",
                          base[kind]["shard_cpu_us_per_key"] / row["shard_cpu_us_per_key"])
            out.append({"goal": f"{kind} keys/s at {n:,} >= {ratio}x the rate at 20,000", "value": round(got, 3),
                        "across_runs": round(across, 3), "by_shard_cpu": round(cpu, 3), "met": got >= ratio})
    peak = max(r["peak_rss_bytes"] for r in result["rows"])
    out.append({"goal": f"shard RSS within --memory-budget {result['budget']}", "value": peak,
                "met": peak <= result["budget_bytes"]})
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    sizes = [r["entries"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, style in (("uniform", "o-"), ("zipf", "s--")):
        a.plot(sizes, [r[kind]["keys_per_s"] for r in rows], style, label=kind)
        b.plot(sizes, [r[kind]["batch_p99_ms"] for r in rows], style, label=f"{kind} batch of 256 p99")
        b.plot(sizes, [r[kind]["single_p99_ms"] for r in rows], style, alpha=0.5, label=f"{kind} single key p99")
    for ax, label in ((a, "lookup keys/s"), (b, "ms")):
        ax.set_xscale("log")
        ax.set_xlabel("entries in the shard")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    a.set_ylim(bottom=0)
    fig.suptitle(f"one cache shard, --memory-budget {result['budget']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.shard_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, --budget {QUICK_BUDGET}, "
                    "fewer batches: what `make bench` runs")
    ap.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=None,
                    help=f"entry counts, comma-separated (default {','.join(map(str, FULL_SIZES))})")
    ap.add_argument("--budget", default=None, help=f"the shard's --memory-budget (default {FULL_BUDGET})")
    ap.add_argument("--depth", type=int, default=8, help="batches in flight for keys/s (default %(default)s)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the database goes (a temporary directory inside it, deleted afterwards)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default results/shard_scale.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
    cfg.sizes = cfg.sizes or list(QUICK_SIZES if cfg.quick else FULL_SIZES)
    cfg.budget = cfg.budget or (QUICK_BUDGET if cfg.quick else FULL_BUDGET)
    cfg.warm, cfg.batches, cfg.sequential, cfg.singles = (20, 120, 60, 300) if cfg.quick else (100, 600, 300, 2000)
    out = cfg.out or results_path("shard_scale_quick.json" if cfg.quick else "shard_scale.json")
    workdir = Path(tempfile.mkdtemp(prefix="shard-scale-", dir=cfg.dir))
    try:
        result = asyncio.run(run(cfg, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["goals"] = goals(result)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result["machine"] = {"cpu": cpu, "cpus": os.cpu_count(), "load_average_end": os.getloadavg()}
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["command"] = "python -m bench.shard_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, out.with_suffix(".png"))
    for g in result["goals"]:
        print(f"{'MET ' if g['met'] else 'MISS'}  {g['goal']}: {g['value']}"
              + (f" (by shard CPU per key: {g['by_shard_cpu']}; against the 20k row: {g['across_runs']})"
                 if "by_shard_cpu" in g else ""))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Many concurrent single-key L2 lookups: what coalescing them into shared messages saves.

Starts a real cache shard, stores --keys entries, then at each concurrency
runs --lookups single-key lookups through the frontend's `L2Client` (one
key per call, as one interactive request makes) and records lookups/s,
the shard process's CPU per lookup (robust on a shared machine), the Lookup
messages the shard answered (from its lookup-duration histogram count) and
p50/p99 per lookup. Writes results/l2_coalescing.json (or --out).

The before/after figures in the README come from running this script on the
tree before coalescing (embedding/l2_client.py at the previous commit) and
after, one after the other on the same machine.

    .venv/bin/python -m bench.l2_coalescing [--lookups 20000] [--concurrency 1,16,64,256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

from bench.shard_scale import key, value_pool
from embedding.l2_client import L2Client
from embedding.stats import Stats
from harness.procs import free_port
from harness.results import results_path
from harness.stack import service


def messages_answered(metrics_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(r"^sutra_cacheshard_lookup_duration_seconds_count (\S+)$", text, re.MULTILINE)
    return int(float(m[1])) if m else -1


async def run_one(l2: L2Client, n: int, concurrency: int, keys: int) -> tuple[float, list[float]]:
    rng = np.random.default_rng(concurrency)
    idx = rng.integers(0, keys, size=n).tolist()
    pos = 0
    lat: list[float] = []

    async def worker() -> None:
        nonlocal pos
        while pos < n:
            i = idx[pos]
            pos += 1
            t = time.perf_counter()
            got = (await l2.lookup([key(i)]))[0]
            lat.append(time.perf_counter() - t)
            if got is None:
                raise AssertionError("a stored key missed")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, lat


async def main_async(cfg: argparse.Namespace, workdir: Path) -> list[dict]:
    metrics_port = free_port()
    shard = service("cacheshard", workdir / "shard.log", {"path": workdir / "db",
                                                          "server.metrics_port": metrics_port}).start()
    rows = []
    try:
        shard.wait_serving(120)
        ps = psutil.Process(shard.pid)
        l2 = L2Client((shard.address,), Stats(), timeout_s=5.0, max_message_bytes=8 << 20, reconnect_max_s=2.0,
                      max_waiting=4096)
        pool = value_pool()
        for lo in range(0, cfg.keys, 1000):
            await l2.shards[0].store([(key(i), pool[i % len(pool)]) for i in range(lo, min(cfg.keys, lo + 1000))],
                                     30.0)
        await run_one(l2, 2000, 16, cfg.keys)  # warm-up
        for c in cfg.concurrency:
            cpu0, msg0 = sum(ps.cpu_times()[:2]), messages_answered(metrics_port)
            seconds, lat = await run_one(l2, cfg.lookups, c, cfg.keys)
            cpu, msgs = sum(ps.cpu_times()[:2]) - cpu0, messages_answered(metrics_port) - msg0
            ms = np.array(lat) * 1000
            rows.append({"concurrency": c, "lookups_per_s": cfg.lookups / seconds,
                         "shard_cpu_us_per_lookup": cpu / cfg.lookups * 1e6, "messages": msgs,
                         "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))})
            r = rows[-1]
            print(f"concurrency {c:>4}: {r['lookups_per_s']:>8,.0f} lookups/s  shard cpu "
                  f"{r['shard_cpu_us_per_lookup']:>6.1f} us/lookup  {msgs:>6} messages  p50 {r['p50_ms']:.2f} ms  "
                  f"p99 {r['p99_ms']:.2f} ms", flush=True)
        await l2.close()
    finally:
        shard.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.l2_coalescing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--keys", type=int, default=5000)
    ap.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",")], default=[1, 16, 64, 256])
    ap.add_argument("--out", type=Path, default=None)
    cfg = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="l2-coalescing-"))
    try:
        rows = asyncio.run(main_async(cfg, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = cfg.out or results_path("l2_coalescing.json")
    out.write_text(json.dumps({"rows": rows, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""L2 hit rate and latency while one of three shards is killed and restarted, with 1 and 2 copies.

Starts three real cache shards (`python -m cacheshard`) on free loopback
ports and drives the frontend's own L2 path against them: `L2Client`
(rendezvous hashing, breakers, `--l2-copies`) and `WriteBack`, in this
process. The load is repeat-heavy: a working set of --keys texts already
cached, drawn Zipf (s=1.1), one key per request, --concurrency requests at
a time; a miss is "computed" (a stored value) and written back, as the
frontend does. Per run (copies 1, then 2, each on fresh shards):

  before    --phase seconds of load
  down      shard 2 killed (SIGKILL), load continues
  back      shard 2 restarted on the same directory (its WAL keeps what it
            acknowledged), load continues
  added     a fourth (empty) shard joins the set (`L2Client.set_shards`, what
            the frontend does when its shard list changes): the hit rate
            right after adding a shard, then `added_later` as the keys that
            moved to it are computed and written back again

and for each phase: L2 hit rate, requests, p50/p99 request latency, L2
errors, and failed requests (a lookup that raised; the L2 path is fail-open,
so this must be 0). No model runs here: this measures the cache layer, so
that compute time does not hide its behaviour. Writes results/shard_loss.json.

    .venv/bin/python -m bench.shard_loss [--phase 6] [--keys 20000] [--concurrency 16] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.shard_scale import draw, key, value_pool
from embedding.l2_client import L2Client
from embedding.stats import Stats
from embedding.writeback import WriteBack
from harness.results import results_path
from harness.stack import service

PHASES = ("before", "down", "back", "added", "added_later")
VICTIM = 1  # index of the shard killed (the second of three)


class Load:
    """--concurrency loops of single-key requests; records each one's phase, hit and latency."""

    def __init__(self, l2: L2Client, wb: WriteBack, pool: list[bytes], keys: int, seed: int) -> None:
        self.l2, self.wb, self.pool = l2, wb, pool
        self.idx = draw(np.random.default_rng(seed), keys, 2_000_000, "zipf").tolist()
        self.next = 0
        self.phase = PHASES[0]
        self.records: dict[str, list[tuple[bool, float]]] = {p: [] for p in PHASES}
        self.failed = {p: 0 for p in PHASES}
        self.stop = False

    async def worker(self) -> None:
        while not self.stop:
            i = self.idx[self.next % len(self.idx)]
            self.next += 1
            phase = self.phase
            started = time.perf_counter()
            try:
                got = (await self.l2.lookup([key(i)]))[0]
            except Exception:  # noqa: BLE001 - what is measured: must never happen
                self.failed[phase] += 1
                continue
            if got is None:
                self.wb.offer(key(i), self.pool[i % len(self.pool)])  # computed, written back
            elif got != self.pool[i % len(self.pool)]:
                raise AssertionError("L2 answered a key with another key's value")
            self.records[phase].append((got is not None, time.perf_counter() - started))


async def one_run(copies: int, cfg: argparse.Namespace, workdir: Path) -> dict:
    pool = value_pool()
    shards = [service("cacheshard", workdir / f"shard{i}.log", {"path": workdir / f"db{i}"}).start()
              for i in range(4)]  # the fourth joins in phase "added"
    try:
        for s in shards:
            s.wait_serving(120)
        stats = Stats()
        l2 = L2Client(tuple(s.address for s in shards[:3]), stats, timeout_s=0.25, max_message_bytes=8 << 20,
                      reconnect_max_s=2.0, copies=copies)
        wb = WriteBack(l2, stats, capacity=10_000, batch=256)
        wb.start()
        # The working set is cached before the load starts (each entry on its `copies` owners).
        for lo in range(0, cfg.keys, 1000):
            entries = [(key(i), pool[i % len(pool)]) for i in range(lo, min(cfg.keys, lo + 1000))]
            stored, failed = await l2.store(entries, 30.0)
            assert stored == len(entries) and failed == 0
        load = Load(l2, wb, pool, cfg.keys, seed=copies)
        workers = [asyncio.ensure_future(load.worker()) for _ in range(cfg.concurrency)]
        errors = {}
        try:
            for phase in PHASES:
                load.phase = phase
                before = stats.l2.errors
                if phase == "down":
                    shards[VICTIM].kill()
                elif phase == "back":
                    await asyncio.to_thread(lambda: shards[VICTIM].start().wait_serving(120))
                elif phase == "added":
                    l2.set_shards([s.address for s in shards])
                await asyncio.sleep(cfg.phase)
                errors[phase] = stats.l2.errors - before
        finally:
            load.stop = True
            await asyncio.gather(*workers)
            await wb.close(5.0)
            await l2.close()
        out = {"copies": copies, "second_copy_hits": stats.l2_second_copy_hits}
        for phase in PHASES:
            rec = load.records[phase]
            hits = sum(h for h, _ in rec)
            lat = np.array([t for _, t in rec]) * 1000
            out[phase] = {"requests": len(rec), "hit_rate": hits / max(1, len(rec)),
                          "first_hit_rate": sum(h for h, _ in rec[:2000]) / max(1, len(rec[:2000])),
                          "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                          "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                          "l2_errors": errors[phase], "failed_requests": load.failed[phase]}
        return out
    finally:
        for s in shards:
            s.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shard_loss", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", type=float, default=8.0, help="seconds per phase (default %(default)s)")
    ap.add_argument("--keys", type=int, default=20_000, help="working set, all cached first (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="3 s phases, 5,000 keys")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default results/shard_loss.json)")
    cfg = ap.parse_args(argv)
    if cfg.quick:
        cfg.phase, cfg.keys = 3.0, 5000
    runs = []
    for copies in (1, 2):
        workdir = Path(tempfile.mkdtemp(prefix="shard-loss-"))
        try:
            runs.append(asyncio.run(one_run(copies, cfg, workdir)))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        r = runs[-1]
        print(f"copies {copies}: " + "  ".join(
            f"{p}: hit {r[p]['hit_rate']:.3f} p99 {r[p]['p99_ms']:.2f} ms ({r[p]['requests']} req, "
            f"{r[p]['failed_requests']} failed, {r[p]['l2_errors']} L2 errors)" for p in PHASES), flush=True)
        added = r["added"]
        print(f"          right after adding a 4th shard: first 2,000 requests hit {added['first_hit_rate']:.3f}")
    two = runs[1]
    goals = [{"goal": "copies 2: L2 hit rate while a shard is down within 5 points of before",
              "value": round(two["before"]["hit_rate"] - two["down"]["hit_rate"], 4),
              "met": two["before"]["hit_rate"] - two["down"]["hit_rate"] <= 0.05},
             {"goal": "copies 2: no request fails", "value": sum(two[p]["failed_requests"] for p in PHASES),
              "met": sum(two[p]["failed_requests"] for p in PHASES) == 0}]
    for g in goals:
        print(f"{'MET ' if g['met'] else 'MISS'}  {g['goal']}: {g['value']}")
    out = cfg.out or results_path("shard_loss.json")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "")
    out.write_text(json.dumps({"runs": runs, "goals": goals, "machine": {"cpu": cpu, "cpus": os.cpu_count()},
                               "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "command": "python -m bench.shard_loss " + " ".join(argv or [])}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

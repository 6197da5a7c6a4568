"""What the write-back linger is worth: eight clients of cold single texts, two frontends on one
stack, and the CPU each process spends per request.

Every cold text is one L2 lookup (a miss) and one write-back. Without a linger the write-back
worker stores as soon as an entry arrives, so at a few hundred texts per second nearly every
entry is its own Store call, and a gRPC call costs the frontend and the shard far more than the
entry's bytes. The stack's frontend runs the default `--writeback-linger-ms`; a second frontend
on the same replicas and shard runs 0. Rounds alternate between them (random order per round),
each `--clients` clients sending `--requests` new single texts; per round: req/s, and the CPU
seconds the shard, the frontend under test and the replicas spent, per request. Reported: the
medians of each side and their ratios, and how many entries each Store carried.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from bench import ab, interactive, workloads
from bench.stack_access import stack_and_second_frontend
from deploy import stack
from deploy.scrape import fetch
from embedding.settings import FrontendSettings

DEFAULT = "linger"
BASE = "store_at_once"
RESULTS = Path("results/writeback_linger.json")


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        t = psutil.Process(pid).cpu_times()
        out[name] = t.user + t.system
    return out


def _shard_stores(url: str) -> tuple[float, float]:
    """(entries stored, Store calls) so far, from the shard's /metrics."""
    page = fetch(url, timeout=5)
    return page.value("sutra_cacheshard_stores_total"), page.value("sutra_cacheshard_store_duration_seconds_count")


def _settled_stores(url: str, linger_ms: float) -> tuple[float, float]:
    """The shard's store counts once they stop moving (the last write-backs linger, then land)."""
    last = _shard_stores(url)
    while True:
        time.sleep(2 * linger_ms / 1000 + 0.05)
        now = _shard_stores(url)
        if now == last:
            return now
        last = now


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.writeback_linger", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8, help="clients in flight (default %(default)s)")
    ap.add_argument("--requests", type=int, default=600, help="single new texts per round and frontend (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds; each measures both frontends (default %(default)s)")
    ap.add_argument("--replicas", type=int, default=2, help="replicas behind HAProxy (default %(default)s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    backend, precision = workloads.stack_default(args.replicas)
    lines = workloads.corpus_lines(workloads.data_dir())
    rng = random.Random(args.seed)
    linger_ms = FrontendSettings.writeback_linger_ms
    with tempfile.TemporaryDirectory(prefix="sutra-writeback-linger-") as tmp, stack_and_second_frontend(
            Path(tmp), args.replicas, backend, precision, BASE.replace("_", "-"),
            writeback_linger_ms=0.0) as (settings, second):
        pids = {name: record["pid"] for name, record in stack.recorded_pids(settings).items()}
        frontends = {DEFAULT: (settings.frontend_address, pids["embedding"]), BASE: (second.address, second.pid)}
        shard_pid = pids["cacheshard"]
        replica_pids = [pid for name, pid in pids.items() if name.startswith("mlbase")]
        shard_metrics = f"http://127.0.0.1:{settings.shard_metrics_port}/metrics"
        rows: dict[str, list[dict]] = {DEFAULT: [], BASE: []}
        for name, (address, _) in frontends.items():  # warm each path
            workloads.drive(address, [[t] for t in interactive.fresh(lines, 64)], args.clients)
        for _ in range(args.rounds):
            order = list(frontends)
            rng.shuffle(order)
            for name in order:
                address, pid = frontends[name]
                watched = {"shard": shard_pid, "frontend": pid, **{f"replica{i}": p for i, p in enumerate(replica_pids)}}
                requests = [[t] for t in interactive.fresh(lines, args.requests)]
                before, stores_before = _cpu(watched), _shard_stores(shard_metrics)
                texts_per_s, latencies, _ = workloads.drive(address, requests, args.clients)
                stores_after = _settled_stores(shard_metrics, linger_ms)  # this round's last Store landed
                after = _cpu(watched)
                cpu = {k: 1000 * (after[k] - before[k]) / len(requests) for k in after}
                rows[name].append({
                    "req_per_s": texts_per_s, "p50_ms": 1000 * statistics.median(latencies),
                    "shard_cpu_ms": cpu["shard"], "frontend_cpu_ms": cpu["frontend"],
                    "replicas_cpu_ms": sum(v for k, v in cpu.items() if k.startswith("replica")),
                    "entries_per_store": ((stores_after[0] - stores_before[0])
                                          / max(1.0, stores_after[1] - stores_before[1])),
                })
    keys = ("req_per_s", "p50_ms", "shard_cpu_ms", "frontend_cpu_ms", "replicas_cpu_ms", "entries_per_store")
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in rows.items()}
    ratios = {k: medians[DEFAULT][k] / medians[BASE][k] for k in keys if medians[BASE][k]}
    result = {"cpu": ab.cpu_model(), "cores": len(os.sched_getaffinity(0)), "backend": f"{backend} {precision}".strip(),
              "clients": args.clients,
              "requests_per_round": args.requests, "rounds": args.rounds, "linger_ms": linger_ms,
              "medians": medians, f"ratio {DEFAULT} / {BASE}": ratios, "rounds_detail": rows}
    print(f"CPU: {result['cpu']} ({result['cores']} cores); {args.clients} clients, {args.requests} single new texts per round, {args.rounds} rounds, "
          f"{args.replicas} replicas ({result['backend']}); medians per request:")
    print(f"  {'':22} {'req/s':>8} {'p50 ms':>8} {'shard cpu':>10} {'frontend cpu':>13} {'replicas cpu':>13} {'entries/Store':>14}")
    for name in (DEFAULT, BASE):
        m = medians[name]
        label = f"{name} ({linger_ms:g} ms)" if name == DEFAULT else f"{name} (0 ms)"
        print(f"  {label:22} {m['req_per_s']:8.1f} {m['p50_ms']:8.2f} {m['shard_cpu_ms']:10.3f} "
              f"{m['frontend_cpu_ms']:13.3f} {m['replicas_cpu_ms']:13.3f} {m['entries_per_store']:14.1f}")
    print("  ratio                  " + " ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Rollouts under load: what one costs, and what pre-warming buys.

    .venv/bin/python -m bench.rollout [--replicas 2] [--working-set 400] [--after-s 10]

Starts a default stack (`sutra up`, mutual TLS, on free ports in a temporary
run directory) and runs a steady closed-loop load on it: each request asks
for `--repeat` texts drawn from a working set that users keep asking for and
one brand-new text. Then two rollouts, each to a new fingerprint:

1. `sutra rollout --backend torch` (no pre-warm),
2. `sutra rollout --prewarm N --backend torch --max-seq-length 128`.

For each: requests, failures and latency percentiles while the rollout ran,
its duration, and the hit rate of the working-set texts over the first
`--after-s` seconds after the frontend switched fingerprint (the switch is
timed by polling the frontend's GetInfo). Writes results/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np

from bench.ab import cpu_model
from harness.deployed import deployed, sutra
from harness.load import Call, Load
from harness.results import results_path
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc


def working_set_load(address: str, working_set: list[str], threads: int, repeat: int) -> Load:
    """Closed-loop clients, each request `repeat` texts drawn from `working_set` and one brand-new text
    (new texts are never hits, so every hit a call records is a working-set text's)."""
    rngs = [random.Random(index) for index in range(threads)]  # one per client thread, as it only uses its own

    def texts(index: int, _n: int) -> list[str]:
        return rngs[index].sample(working_set, repeat) + [f"a brand-new text {uuid.uuid4().hex}"]

    return Load(address, threads, timeout=60, width=256, make_texts=texts)


def hit_rate(calls: list[Call], repeat: int) -> float:
    """Working-set texts answered from L1 or L2, of those asked for in `calls`."""
    return round(sum(c.hits for c in calls) / max(1, repeat * len(calls)), 3)


def watch_switch(address: str, old: str, stop: threading.Event) -> dict:
    """Polls GetInfo until the fingerprint moves off `old`; {'at': monotonic time, 'fingerprint'}."""
    found: dict = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        while not stop.is_set() and not found:
            try:
                info = stub.GetInfo(pb.GetInfoRequest(), timeout=5)
                if info.fingerprint != old:
                    found.update(at=time.monotonic(), fingerprint=info.fingerprint,
                                 backend=f"{info.backend} {info.precision}")
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    return found


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def one_rollout(settings, load: Load, repeat: int, flags: list[str], after_s: float, label: str) -> dict:
    with grpc.insecure_channel(settings.frontend_address) as channel:
        before_info = pb_grpc.EmbeddingServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
    old = before_info.fingerprint
    stop = threading.Event()
    switch: dict = {}
    watcher = threading.Thread(target=lambda: switch.update(watch_switch(settings.frontend_address, old, stop)))
    watcher.start()
    first = len(load.calls)
    started = time.monotonic()
    done = sutra("rollout", "--run-dir", str(settings.run_dir), *flags)
    ended = time.monotonic()
    if done.returncode != 0:
        raise SystemExit(f"rollout failed:\n{done.stdout}{done.stderr}")
    # Let the window after the switch fill (the switch comes before the last replica is UP again).
    while switch.get("at") is None or time.monotonic() < switch["at"] + after_s:
        time.sleep(0.2)
    stop.set()
    watcher.join()
    during = [c for c in load.calls[first:] if c.start <= ended]
    after = [c for c in load.calls if switch["at"] <= c.start <= switch["at"] + after_s and c.ok]
    before = [c for c in load.calls[:first] if c.ok][-200:]
    prewarm_line = next((line.strip() for line in done.stdout.splitlines() if "pre-warmed" in line), None)
    row = {
        "rollout": label, "command": "sutra rollout " + " ".join(flags),
        "seconds": round(ended - started, 1),
        "requests_during": len(during), "failed_during": sum(not c.ok for c in during),
        "p50_during_ms": percentile_ms([c.end - c.start for c in during if c.ok], 50),
        "p99_during_ms": percentile_ms([c.end - c.start for c in during if c.ok], 99),
        "p99_before_ms": percentile_ms([c.end - c.start for c in before], 99),
        "hit_rate_before": hit_rate(before, repeat),
        "hit_rate_first_s_after_switch": hit_rate(after, repeat),
        "requests_after_switch": len(after),
        "old_backend": f"{before_info.backend} {before_info.precision}", "old_fingerprint": old,
        "new_backend": switch.get("backend"), "new_fingerprint": switch.get("fingerprint"),
        "prewarm": prewarm_line,
    }
    print(json.dumps(row, indent=1))
    return row


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--working-set", type=int, default=400, help="texts users keep asking for")
    ap.add_argument("--repeat", type=int, default=3, help="working-set texts per request (plus one new text)")
    ap.add_argument("--threads", type=int, default=2, help="closed-loop clients")
    ap.add_argument("--after-s", type=float, default=10.0, help="window after the switch for the hit rate")
    ap.add_argument("--out", type=Path, default=results_path("rollout.json"))
    args = ap.parse_args(argv)
    working_set = [f"what users keep asking about, topic {i}: {uuid.uuid4().hex[:6]}" for i in range(args.working_set)]
    run_dir = Path(tempfile.mkdtemp(prefix="sutra-bench-rollout-")) / "run"
    with deployed(run_dir, args.replicas) as (settings, _):
        with grpc.insecure_channel(settings.frontend_address) as channel:
            pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(inputs=working_set), timeout=300)
        with working_set_load(settings.frontend_address, working_set, args.threads, args.repeat) as load:
            time.sleep(5)
            rows = [
                one_rollout(settings, load, args.repeat, ["--backend", "torch"], args.after_s, "without pre-warm"),
                one_rollout(settings, load, args.repeat,
                            ["--prewarm", "100000", "--backend", "torch", "--max-seq-length", "128"],
                            args.after_s, "with pre-warm"),
            ]
        total = {"requests": len(load.calls), "failed": sum(not c.ok for c in load.calls),
                 "errors": sorted(set(load.details))[:5]}
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_model(), "cores": os.cpu_count(),
              "command": "python -m bench.rollout " + " ".join(argv or []), "replicas": args.replicas,
              "working_set": args.working_set, "request": f"{args.repeat} working-set texts + 1 new text, width 256",
              "threads": args.threads, "rollouts": rows, "load_total": total}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

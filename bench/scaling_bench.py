"""Scaling benchmark: the whole stack (`sutra up`) with 1, 2 and 3 ML-base
replicas behind HAProxy, against in-process `encode`, in one run.

cold     the same never-seen corpus lines through each stack (fresh run
         directory, so L1 and L2 are empty), REQUEST texts per call with
         INFLIGHT calls in flight; torch threads split as `sutra up` does
         (max(1, cores // replicas)). The baseline is sentence-transformers
         `encode` in this process with every core. The machine is shared and
         noisy, so each configuration runs ROUNDS rounds that alternate
         `encode` and the stack on the same slice of texts (the stack idle
         while `encode` runs), and its ratio is sum/sum over its own rounds.
         `encode` with one thread is timed too: on an oversubscribed machine
         two OpenMP threads can wait on each other at every barrier.
mixed    the seed's workload on the 3-replica stack: requests drawn
         Zipf-like over the corpus so that about 85% of texts are repeats,
         with the frontend's L1 cut to a fraction of the distinct texts so
         that both cache levels take part (the seed reports L1 68% + L2
         17%). Reports texts/s, request latency p50/p99 and where answers
         came from (EmbedUsage).

Everything (client, frontend, HAProxy, replicas) shares this machine's
cores, so replicas add parallelism only where cores are idle. Prints a table
and writes results/scaling.json.

    .venv/bin/python -m bench.scaling_bench [--cold 512] [--mixed 3000] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.datasets import corpus_lines
from bench.stack_access import stack_settings
from bench.workloads import INFLIGHT, MIXED_REQUEST, REQUEST, InProcess, chunks, drive, zipf_workload
from deploy import stack
from deploy.settings import StackSettings
from harness.results import results_path
from lb import runtime
from mlbase.settings import DEFAULT_BACKEND

RESULTS = results_path("scaling.json")
MIXED_INFLIGHT = 4


def per_replica_bytes(settings: StackSettings) -> dict[str, int]:
    return {v.name: v.bytes_out for v in runtime.servers(settings.haproxy_socket)}


def run_stack(replicas: int, slices: list[list[str]], baseline: "InProcess", mixed: list[str] | None,
              workdir: Path, mixed_l1_entries: int) -> dict:
    # The replicas' built-in default backend, as this benchmark has always measured (not the tuner's
    # choice: scaling with replicas is the question here, and the choice can differ between machines).
    settings = stack_settings(workdir / f"stack{replicas}", replicas, DEFAULT_BACKEND)
    quiet = lambda line: None  # noqa: E731
    if mixed is not None:
        settings = dataclasses.replace(settings, l1_entries=mixed_l1_entries)
    t0 = time.perf_counter()
    stack.up(settings, out=quiet)
    started = time.perf_counter() - t0
    try:
        before = per_replica_bytes(settings)
        stack_s = encode_s = encode1_s = 0.0
        texts = 0
        load = []
        rounds = []
        latencies: list[float] = []
        computed = 0
        for texts_r in slices:
            load.append(os.getloadavg()[0])
            enc = baseline.seconds(texts_r, baseline.threads)
            rate, lat, usage = drive(settings.frontend_address, chunks(texts_r, REQUEST), INFLIGHT)
            enc1 = baseline.seconds(texts_r, 1)
            stack_s += len(texts_r) / rate
            encode_s += enc
            encode1_s += enc1
            texts += len(texts_r)
            latencies += lat
            computed += usage["computed"]
            rounds.append({"encode_texts_per_s": round(len(texts_r) / enc, 1), "stack_texts_per_s": round(rate, 1),
                           "encode_1_thread_texts_per_s": round(len(texts_r) / enc1, 1)})
        # HAProxy adds open connections' bytes to its stats every 5 s (contstats).
        time.sleep(5.5)
        after = per_replica_bytes(settings)
        result = {
            "replicas": replicas, "torch_threads": settings.torch_threads, "startup_s": round(started, 1),
            "cold_texts_per_s": round(texts / stack_s, 1), "encode_texts_per_s": round(texts / encode_s, 1),
            "ratio": round(encode_s / stack_s, 2), "encode_1_thread_texts_per_s": round(texts / encode1_s, 1),
            "ratio_vs_1_thread": round(encode1_s / stack_s, 2), "load_average": round(statistics.mean(load), 1),
            "cold_computed": computed, "rounds": rounds,
            "cold_request_p50_ms": round(1000 * statistics.median(latencies), 1),
            "bytes_per_replica": {k: after[k] - before[k] for k in after},
        }
        if mixed is not None:
            rate, lat, usage = drive(settings.frontend_address, chunks(mixed, MIXED_REQUEST), MIXED_INFLIGHT)
            lat.sort()
            n = usage["texts"]
            result["mixed"] = {
                "texts": n, "texts_per_s": round(rate, 1), "l1_entries": mixed_l1_entries,
                "request_texts": MIXED_REQUEST, "inflight": MIXED_INFLIGHT,
                "p50_ms": round(1000 * lat[len(lat) // 2], 2), "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 2),
                "l1_share": round(usage["l1_hits"] / n, 3), "l2_share": round(usage["l2_hits"] / n, 3),
                "computed_share": round(usage["computed"] / n, 3),
                "in_request_duplicate_share": round(usage["duplicates"] / n, 3),
            }
        return result
    finally:
        stack.down(settings, out=quiet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", type=int, default=512, help="cold texts per configuration (default %(default)s)")
    parser.add_argument("--mixed", type=int, default=3000, help="texts in the mixed workload (default %(default)s)")
    parser.add_argument("--mixed-l1-fraction", type=float, default=0.1,
                        help="frontend L1 size for the mixed run as a fraction of its distinct texts, so that "
                             "L2 takes part (default %(default)s)")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds per configuration, alternating encode and the stack (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="short version: 128 cold texts, 800 mixed")
    args = parser.parse_args(argv)
    if args.quick:
        args.cold, args.mixed = 128, 800
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cores = os.cpu_count() or 1
    counts = [int(c) for c in args.replicas.split(",")]

    lines = corpus_lines()
    mixed, exponent = zipf_workload(lines[: len(lines) // 2], args.mixed)
    cold = lines[len(lines) // 2:][: args.cold]  # disjoint from the mixed workload
    repeats = 1 - len(set(mixed)) / len(mixed)
    mixed_l1 = max(16, int(len(set(mixed)) * args.mixed_l1_fraction))

    baseline = InProcess(cores)
    per_round = max(REQUEST, len(cold) // args.rounds)
    slices = [cold[i:i + per_round] for i in range(0, len(cold), per_round)]
    runs = []
    with tempfile.TemporaryDirectory(prefix="sutra-scaling-") as tmp:
        for replicas in counts:
            print(f"stack with {replicas} replica(s)...", flush=True)
            runs.append(run_stack(replicas, slices, baseline, mixed if replicas == max(counts) else None,
                                  Path(tmp), mixed_l1))

    print()
    print(f"cold-cache texts/s, {len(cold)} corpus lines in {len(slices)} rounds alternating with encode, "
          f"{REQUEST} per request, {INFLIGHT} in flight, {cores} cores")
    print(f"{'configuration':28} {'stack':>7} {'encode':>7} {'ratio':>6} {'enc 1t':>7} {'ratio':>6} "
          f"{'p50 ms':>7} {'load':>5}  per-replica bytes out")
    for run in runs:
        name = f"{run['replicas']} replica(s) x {run['torch_threads']} thread(s)"
        share = ", ".join(f"{k} {v // 1024}k" for k, v in run["bytes_per_replica"].items())
        print(f"{name:28} {run['cold_texts_per_s']:7.1f} {run['encode_texts_per_s']:7.1f} {run['ratio']:6.2f} "
              f"{run['encode_1_thread_texts_per_s']:7.1f} {run['ratio_vs_1_thread']:6.2f} "
              f"{run['cold_request_p50_ms']:7.1f} {run['load_average']:5.1f}  {share}")
    print(f"(encode = sentence-transformers encode in this process with {cores} threads, enc 1t = with 1 thread; "
          f"batch {REQUEST}, the same texts, alternating with the stack's rounds; load = 1-minute load average)")
    mixed_run = next((r["mixed"] for r in runs if "mixed" in r), None)
    if mixed_run:
        print()
        print(f"mixed workload ({mixed_run['texts']} texts, {repeats:.0%} repeats, Zipf s={exponent:.2f}, "
              f"{mixed_run['request_texts']} per request, {mixed_run['inflight']} in flight, "
              f"L1 {mixed_run['l1_entries']} entries, {max(counts)} replicas):")
        print(f"  {mixed_run['texts_per_s']:.1f} texts/s, request p50 {mixed_run['p50_ms']} ms, "
              f"p99 {mixed_run['p99_ms']} ms")
        hit = mixed_run['l1_share'] + mixed_run['l2_share'] + mixed_run['in_request_duplicate_share']
        print(f"  answered from L1 {mixed_run['l1_share']:.1%}, L2 {mixed_run['l2_share']:.1%}, "
              f"repeats within a request {mixed_run['in_request_duplicate_share']:.1%}, "
              f"computed {mixed_run['computed_share']:.1%} (not computed: {hit:.1%})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "cores": cores, "cold_texts": len(cold), "request": REQUEST, "inflight": INFLIGHT,
        "rounds": len(slices),
        "stacks": runs, "mixed_repeats": round(repeats, 3), "mixed_zipf_exponent": round(exponent, 3),
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

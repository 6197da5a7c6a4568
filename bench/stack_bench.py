"""The whole-stack benchmark behind `make bench`: one run, one stack, every figure.

Starts a full local stack (cache shard, N ML-base replicas, HAProxy,
frontend) with `deploy.stack` on free ports in a temporary run directory,
then measures, in this order, on the shared corpora:

  cold    never-seen texts through the frontend (all misses) in rounds that
          alternate with in-process encode of the same texts: sentence-
          transformers (torch) always, and the stack's own backend in this
          process when that is not torch, each with every core and with one
          thread (goals use the faster). Ratios are sum/sum over rounds.
  L1      the cold texts again (all in the frontend's LRU): 1-text and
          64-text requests, float and packed encodings; embeddings/s with
          8 requests in flight, latency one request at a time.
  L2      the same through a second frontend with --l1-entries 0 on the same
          shard and balancer, once the shard holds every cold text.
  mixed   Zipf streams with ~85% repeats, each from its own texts (so each
          starts with empty caches): "serving" (8-text requests, 16 in
          flight: as many texts in flight as the cold client) and "bulk" (the
          cold client itself, 32 x 4) through the stack's frontend with its
          default L1, as `make up` runs it; then "small L1": the serving
          client through a third frontend whose L1 holds a tenth of the
          stream's distinct texts, so that L2 takes part; and "saturating":
          the cold client's requests with as many misses in flight as the
          cold run had (see `saturating_client`). Effective texts/s,
          hit rates per level from GetCacheStats deltas, and the ratio to
          cold throughput: to the cold phase's, and (the one the goal uses)
          to cold traffic sent by the cold client right before and right
          after the mixed runs, since a shared machine's load drifts within
          a run.
  memory  RSS of every process (PIDs from supervisord and our own frontends).
  disk    a shard Checkpoint, named for the run, into the shard's backup
          directory (RocksDB flushes its memtables into SST files for it; the
          shard's FIFO compaction never rewrites files, so these SSTs are the
          on-disk form): SST bytes / entries.

Everything shares this machine's cores with the client (this process), so
throughput is what a client on the same host sees.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench import interactive, frontend_bench, workloads
from bench.stack_access import (cache_stats, cpu_by_role, cpu_seconds, disk_phase, extra_frontend, replica_info,
                                rss_snapshot, stack_pids, start_stack, wait_shard_entries)
from deploy import stack
from deploy.settings import StackSettings
from harness.procs import Proc
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

Printer = Callable[[str], None]
HIT_SIZES = (1, frontend_bench.REQUEST)
ENCODINGS = (("float", pb.ENCODING_FLOAT), ("packed", pb.ENCODING_PACKED))
# Mixed traffic as a serving workload: 8-text requests (as bench.scaling_bench), with as many texts in
# flight as the cold client (32 x 4). The cold client itself is run on the stream too ("bulk").
SERVING_CLIENT = (workloads.MIXED_REQUEST,
                  workloads.REQUEST * workloads.INFLIGHT // workloads.MIXED_REQUEST)
BULK_CLIENT = (workloads.REQUEST, workloads.INFLIGHT)


def saturating_client(repeat_share: float) -> tuple[int, int]:
    """The cold client's requests with as many *misses* in flight as the cold run had.

    A closed-loop client with few texts in flight measures its own wait for the few
    misses, not the stack's capacity: with 85% repeats, 128 texts in flight hold about
    19 misses, so the replicas sit mostly idle. Keeping the replicas as busy as in the
    cold run (128 misses in flight) is what makes the two throughputs comparable."""
    misses = workloads.REQUEST * workloads.INFLIGHT
    return workloads.REQUEST, max(workloads.INFLIGHT,
                                      round(misses / max(0.05, 1.0 - repeat_share) / workloads.REQUEST))


@dataclass(frozen=True)
class BenchConfig:
    """One run's shape; built once by `bench.__main__` from flags."""

    backend: str
    precision: str
    replicas: int
    cold_texts: int
    rounds: int
    mixed_draws: int
    mixed_l1_fraction: float
    # Requests per (level, size, encoding) for the throughput figure; latency takes a third of them.
    single_requests: int
    batch_requests: int
    data_dir: Path
    quick: bool = False


def cold_phase(cfg: BenchConfig, address: str, texts: list[str], baselines: list[workloads.Baseline],
               pids: dict[str, int], out: Printer) -> dict:
    """Alternate in-process encode and the stack on the same slices; ratios are sum/sum."""
    per_round = max(workloads.REQUEST, len(texts) // cfg.rounds)
    slices = workloads.chunks(texts, per_round)
    enc_s = {b.name: [] for b in baselines}
    enc_cpu = {b.name: 0.0 for b in baselines}
    stack_s, latencies, rounds = [], [], []
    computed = 0
    stack_cpu = 0.0
    for i, part in enumerate(slices, start=1):
        row = {"texts": len(part), "load_average": round(os.getloadavg()[0], 2)}
        for b in baselines:
            took, cpu = b.timed(part)
            enc_s[b.name].append(took)
            enc_cpu[b.name] += cpu
            row[f"in_process {b.name} texts/s"] = round(len(part) / took, 1)
        cpu_before = cpu_seconds(pids)
        rate, lat, usage = workloads.drive(address, workloads.chunks(part, workloads.REQUEST),
                                               workloads.INFLIGHT)
        stack_cpu += cpu_seconds(pids) - cpu_before
        stack_s.append(len(part) / rate)
        latencies += lat
        computed += usage["computed"]
        row["stack texts/s"] = round(rate, 1)
        rounds.append(row)
        out(f"  cold round {i}/{len(slices)}: " + ", ".join(f"{k} {v}" for k, v in row.items() if "/s" in k))
    n = sum(len(p) for p in slices)
    best: dict[str, dict] = {}
    for b in baselines:
        ratio = workloads.ratio_of_sums(enc_s[b.name], stack_s)
        if b.engine not in best or ratio < best[b.engine]["stack_ratio"]:
            best[b.engine] = {"baseline": b.name, "texts_per_s": n / sum(enc_s[b.name]), "stack_ratio": ratio}
    result = {
        "texts": n, "rounds": rounds, "request_texts": workloads.REQUEST, "inflight": workloads.INFLIGHT,
        "computed": computed, "all_misses": computed == n,
        "stack_texts_per_s": n / sum(stack_s), "latency": workloads.latency_summary(latencies),
        "stack_cpu_ms_per_text": 1000 * stack_cpu / n,
        "in_process": {name: {"texts_per_s": n / sum(s), "stack_ratio": workloads.ratio_of_sums(s, stack_s),
                              "cpu_ms_per_text": 1000 * enc_cpu[name] / n,
                              "cpu_ratio": enc_cpu[name] / stack_cpu if stack_cpu else None}
                       for name, s in enc_s.items()},
        # Per engine, its fastest in-process configuration in this run (the lowest stack ratio).
        "best_in_process": best,
    }
    return result


async def sequential_latencies(address: str, texts: list[str], size: int, encoding: int, requests: int,
                               seed: int) -> tuple[list[float], dict]:
    """One request at a time over one channel: the latency a lone caller sees (raw samples, for CDFs)."""
    rng = np.random.default_rng(seed)
    bodies = [pb.EmbedRequest(inputs=[texts[j] for j in rng.choice(len(texts), size, replace=False)],
                              encoding=encoding) for _ in range(requests)]
    usage = {"l1_hits": 0, "l2_hits": 0, "computed": 0}
    out = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        await stub.Embed(bodies[0], timeout=60)
        for body in bodies:
            t = time.perf_counter()
            reply = await stub.Embed(body, timeout=60)
            out.append(time.perf_counter() - t)
            for k in usage:
                usage[k] += getattr(reply.usage, k)
    return out, usage


def interactive_phase(cfg: BenchConfig, address: str, lines: list[str], baselines: list[workloads.Baseline],
                      same: str, replica_threads: int, probe: Callable[[], dict[str, float]], out: Printer) -> dict:
    """The single-text sweep, and the same backend's floors at the replica's thread budget (one
    text) and on every core (8 texts as one batch). `probe` splits each level's cost per request
    by part of the stack (`stack_access.cpu_by_role`)."""
    mine = [b for b in baselines if b.engine == same]
    budget = min(mine, key=lambda b: abs(b.threads - replica_threads))
    widest = max(mine, key=lambda b: b.threads)
    samples = 40 if cfg.quick else 200
    floor = {"replica_threads": interactive.floors(budget, lines, samples),
             "all_cores": interactive.floors(widest, lines, samples)}
    rows = interactive.sweep(address, lines, 64 if cfg.quick else 320, probe=probe)
    out(f"  in-process {budget.name}: one text p50 {floor['replica_threads']['single_p50_ms']:.1f} ms; "
        f"{widest.name}: 8 texts as one batch p50 {floor['all_cores']['batch8_p50_ms']:.1f} ms")
    for row in rows:
        out(f"  {row['concurrency']:>2} clients: {row['req_per_s']:6.1f} req/s, p50 {row['p50_ms']:6.1f} ms, "
            f"p99 {row['p99_ms']:6.1f} ms ({row['computed']}/{row['requests']} computed); "
            + cost_line(row["ms_per_request"]))
    return {"floors": floor, "sweep": rows}


def cost_line(ms: dict[str, float]) -> str:
    """"CPU ms per request: ..." from a sweep row's `ms_per_request`."""
    cpu = sum(v for k, v in ms.items() if ":" not in k)
    parts = ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
    return f"CPU ms per request {cpu:.2f} ({parts})"


def hits_phase(cfg: BenchConfig, address: str, texts: list[str], level: str, out: Printer) -> dict:
    """Every text cached at one level: embeddings/s (frontend_bench.hits_run, 8 in flight) and latency."""
    table = {}
    for size in HIT_SIZES:
        n = cfg.single_requests if size == 1 else cfg.batch_requests
        for name, encoding in ENCODINGS:
            tput = asyncio.run(frontend_bench.hits_run(address, texts, size, encoding, n, frontend_bench.CONCURRENCY))
            lat, usage = asyncio.run(sequential_latencies(address, texts, size, encoding, max(50, n // 3),
                                                          seed=size * 31 + encoding))
            for k in usage:
                usage[k] += tput["usage"][k]
            row = {"request_texts": size, "encoding": name, "embeddings_per_s": tput["embeddings_per_s"],
                   "concurrency": frontend_bench.CONCURRENCY, "latency": workloads.latency_summary(lat),
                   "usage": usage}
            table[f"{size}-text {name}"] = row
            out(f"  {level} {size:>2}-text {name:6}: {row['embeddings_per_s']:9.0f} embeddings/s, "
                f"p50 {row['latency']['p50_ms']:.2f} ms, p99 {row['latency']['p99_ms']:.2f} ms")
    return table


def level_stats_delta(before: pb.GetCacheStatsResponse, after: pb.GetCacheStatsResponse) -> dict:
    def level(b: pb.CacheLevelStats, a: pb.CacheLevelStats) -> dict:
        hits, misses = a.hits - b.hits, a.misses - b.misses
        return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                "errors": a.errors - b.errors}

    return {"l1": level(before.l1, after.l1), "l2": level(before.l2, after.l2),
            "computed": after.computed - before.computed, "coalesced": after.coalesced - before.coalesced}


def cold_reference(address: str, texts: list[str]) -> tuple[float, int]:
    """(seconds, texts) of never-seen texts sent by the cold client."""
    rate, _lat, usage = workloads.drive(address, workloads.chunks(texts, workloads.REQUEST),
                                            workloads.INFLIGHT)
    return len(texts) / rate, usage["computed"]


def mixed_phase(address: str, stream: workloads.MixedStream, client: tuple[int, int], l1_entries: int,
                cold_texts_per_s: float, title: str, out: Printer) -> dict:
    size, inflight = client
    before = cache_stats(address)
    rate, lat, usage = workloads.drive(address, workloads.chunks(stream.texts, size), inflight)
    stats = level_stats_delta(before, cache_stats(address))
    n = usage["texts"]
    result = {
        "title": title, "texts": n, "distinct": stream.distinct, "repeat_share": stream.repeat_share,
        "zipf_exponent": stream.zipf_exponent, "request_texts": size,
        "inflight": inflight, "l1_entries": l1_entries,
        "texts_per_s": rate, "vs_cold": rate / cold_texts_per_s, "latency": workloads.latency_summary(lat),
        # Model work per second during the run; well under the cold rate = replicas were partly idle
        # (requests waited on their few misses), not saturated.
        "computed_texts_per_s": stats["computed"] * rate / n,
        "cache_stats": stats,
        "answered_from": {"l1": usage["l1_hits"] / n, "l2": usage["l2_hits"] / n,
                          "duplicate_in_request": usage["duplicates"] / n, "computed": usage["computed"] / n},
    }
    out(f"  {title}: {rate:.0f} texts/s ({result['vs_cold']:.1f}x cold), L1 hit rate {stats['l1']['hit_rate']:.1%}, "
        f"L2 hit rate {stats['l2']['hit_rate']:.1%} of L1 misses, computed {stats['computed']} of {n}")
    return result


# --- the run ----------------------------------------------------------------------------


def run(cfg: BenchConfig, out: Printer = print) -> dict:
    """Every phase against one stack; returns the result document (no timing asserts)."""
    t_run = time.perf_counter()
    cores = os.cpu_count() or 1
    lines = workloads.corpus_lines(cfg.data_dir)
    # Cold references around the mixed runs: 4 waves of the cold client's texts in flight on each side.
    split = workloads.split_corpus(lines, cfg.cold_texts, spare=2 * 4 * workloads.REQUEST * workloads.INFLIGHT)
    streams = {name: workloads.mixed_stream(split.mixed_pool[i::4], cfg.mixed_draws)
               for i, name in enumerate(("serving", "bulk", "small_l1", "saturating"))}
    small_l1 = max(16, int(streams["small_l1"].distinct * cfg.mixed_l1_fraction))

    out(f"in-process baselines ({cores} threads)...")
    # Every core, and one thread: on a busy machine OpenMP threads that wait on each other at
    # every barrier can make the all-cores rate the worse one; the goals use the better of the two.
    torch_all = workloads.TorchBaseline(cores)
    baselines: list[workloads.Baseline] = [torch_all] + ([torch_all.with_threads(1)] if cores > 1 else [])
    if (cfg.backend, cfg.precision) != ("torch", "fp32"):
        # The first one also exports/optimises the graph into the shared ONNX cache, before replicas start.
        for threads in sorted({cores, 1}, reverse=True):
            baselines.append(workloads.BackendBaseline(cfg.backend, cfg.precision, threads, workloads.REQUEST))
    same = baselines[-1].engine

    workdir = Path(tempfile.mkdtemp(prefix="sutra-bench-"))
    settings: StackSettings | None = None
    frontends: dict[str, Proc] = {}
    phases: dict[str, float] = {}
    try:
        out(f"starting the stack ({cfg.backend} {cfg.precision})...")
        settings, startup_s = start_stack(workdir / "stack", cfg.replicas, cfg.backend, cfg.precision, out)
        info = replica_info(settings)
        if (info.backend, workloads.base_precision(info.precision)) != (cfg.backend, cfg.precision):
            raise RuntimeError(f"replicas run {info.backend} {info.precision}, asked for {cfg.backend} {cfg.precision}")
        if same != f"{info.backend} {info.precision}":
            raise RuntimeError(f"the same-backend baseline runs {same}, the replicas {info.backend} {info.precision}")
        front = settings.frontend_address
        # Warm every replica's code paths (and connections) on texts no phase measures.
        workloads.drive(front, workloads.chunks(split.warmup, 16), 2 * cfg.replicas)

        t = time.perf_counter()
        out("cold (all misses) vs in-process encode...")
        cold = cold_phase(cfg, front, split.cold, baselines, stack_pids(settings), out)
        phases["cold"] = time.perf_counter() - t

        t = time.perf_counter()
        out("interactive: one new text per request, 1 to 32 clients...")
        interactive = interactive_phase(cfg, front, split.cold, baselines, same, settings.torch_threads,
                                        cpu_by_role(settings), out)
        phases["interactive"] = time.perf_counter() - t

        t = time.perf_counter()
        out("L1 hits...")
        l1 = hits_phase(cfg, front, split.cold, "L1", out)
        phases["l1"] = time.perf_counter() - t

        t = time.perf_counter()
        stored = wait_shard_entries(settings, len(split.cold) + len(split.warmup))
        out(f"L2 hits (second frontend, --l1-entries 0; shard holds {stored} entries)...")
        frontends["frontend-l2"] = extra_frontend(settings, workdir, "frontend-l2", 0)
        l2 = hits_phase(cfg, frontends["frontend-l2"].address, split.cold, "L2", out)
        frontends.pop("frontend-l2").stop()
        phases["l2"] = time.perf_counter() - t

        t = time.perf_counter()
        out(f"mixed Zipf streams ({cfg.mixed_draws} texts each, {streams['serving'].repeat_share:.0%} repeats)...")
        rate = cold["stack_texts_per_s"]
        half = len(split.spare) // 2
        before_s, before_computed = cold_reference(front, split.spare[:half])
        mixed = {
            "serving": mixed_phase(front, streams["serving"], SERVING_CLIENT, settings.l1_entries, rate,
                                   "mixed, serving client", out),
            "bulk": mixed_phase(front, streams["bulk"], BULK_CLIENT, settings.l1_entries, rate,
                                "mixed, bulk (cold) client", out),
            "saturating": mixed_phase(front, streams["saturating"],
                                      saturating_client(streams["saturating"].repeat_share), settings.l1_entries,
                                      rate, "mixed, cold client with the cold run's misses in flight", out),
        }
        frontends["frontend-small-l1"] = extra_frontend(settings, workdir, "frontend-small-l1", small_l1)
        mixed["small_l1"] = mixed_phase(frontends["frontend-small-l1"].address, streams["small_l1"], SERVING_CLIENT,
                                        small_l1, rate, "mixed, serving client, small L1 (third frontend)", out)
        after_s, after_computed = cold_reference(front, split.spare[half:])
        adjacent = len(split.spare) / (before_s + after_s)
        for run_ in mixed.values():
            run_["vs_cold_adjacent"] = run_["texts_per_s"] / adjacent
        mixed_cold = {"texts": len(split.spare), "texts_per_s": adjacent, "computed": before_computed + after_computed,
                      "before_texts_per_s": half / before_s, "after_texts_per_s": (len(split.spare) - half) / after_s}
        out(f"  cold right before/after: {mixed_cold['before_texts_per_s']:.0f}/{mixed_cold['after_texts_per_s']:.0f} "
            f"texts/s; serving mixed = {mixed['serving']['vs_cold_adjacent']:.1f}x that")
        phases["mixed"] = time.perf_counter() - t

        rss = rss_snapshot(settings, {name: p.pid for name, p in frontends.items()})
        stored = len(split.cold) + len(split.warmup) + len(split.spare) + sum(s.distinct for s in streams.values())
        wait_shard_entries(settings, stored)
        disk = disk_phase(settings, info.fingerprint, info.native_width)
        out(f"  disk: {disk['bytes_per_entry']:.0f} bytes per entry ({disk['entries']} entries, "
            f"{disk['sst_bytes']} SST bytes); key+value payload {disk['payload_bytes']['sum']} bytes")
    finally:
        for proc in frontends.values():
            proc.stop()
        if settings is not None:
            stack.down(settings, out=lambda line: None)
        shutil.rmtree(workdir, ignore_errors=True)

    return {
        "config": {**dataclasses.asdict(cfg), "data_dir": str(cfg.data_dir), "cores": cores,
                   "torch_threads_per_replica": settings.torch_threads,
                   "frontend_connections": settings.frontend_connections,
                   "in_process_threads": cores, "in_process_batch": workloads.REQUEST},
        "stack": {"startup_s": startup_s, "backend": info.backend, "precision": info.precision,
                  "model_id": info.model_id, "fingerprint": info.fingerprint, "replicas": cfg.replicas},
        "same_backend_engine": same,
        "cold": cold, "interactive": interactive, "l1": l1, "l2": l2, "mixed": mixed, "mixed_cold_reference": mixed_cold, "rss_mib": rss, "disk": disk,
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
        "total_seconds": round(time.perf_counter() - t_run, 1),
    }

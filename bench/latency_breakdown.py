"""Where a lone query's time goes: one new text per request, hop by hop, from the spans every
process exports.

    python -m bench.latency_breakdown [--requests N] [--replicas N] [--backend auto|onnx|torch]
                                      [--out results/latency_breakdown.json]

Starts harness.stack.Stack (cache shard, replicas, HAProxy, frontend; plaintext hops) with
`SUTRA_OTLP_ENDPOINT` in every process pointing at a real OTLP/gRPC receiver in this process
(harness.otlp). One blocking client sends single never-seen texts, one at a time, each with its
own W3C `traceparent`, so every request's spans are found by its trace id. Per request:

  client <-> frontend   the client's time minus the frontend's server span: both gRPC stacks,
                        the loopback, this client's own work
  frontend, before      server span start -> the ML-base call starts (validation, keys, L1,
                        the single-flight table, the speculative start)
  frontend -> replica   the ML-base call starts -> the replica's server span starts (the frontend's
                        gRPC client, HAProxy, the replica's gRPC server)
  replica, before       -> inference starts (tokenizing, the batcher's queue, the thread hop)
  inference             the forward pass
  replica, after        -> the replica's span ends (the hop back to its event loop, the answer)
  replica -> frontend   -> the ML-base call ends in the frontend
  frontend, after       -> the server span ends (caches filled, the answer built)

Reported: the median of each, their sum against the client's median, and the in-process
single-text encode of the replicas' backend at their thread budget (the goal's floor), both back
to back and after a pause as long as a replica of a lone client idles between two texts (the
client's time minus the inference): on a shared VM an encode after a few idle milliseconds is
markedly slower than one in a hot loop (caches and the vCPU go cold), and no server that waits
for its next request can avoid that. Span
times come from different processes' clocks (each corrected to the wall clock once at start),
so a hop can be off by some microseconds. Tracing adds its own cost (bench.tracing_cost), so
the client's total here is a little above an untraced stack's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench import ab, interactive, workloads
from harness.otlp import OtlpReceiver, ReceivedSpan
from harness.results import results_path
from harness.stack import Stack
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

SERVER_SPAN = "sutra.embedding.v1.EmbeddingService/Embed"
REPLICA_SPAN = "sutra.mlbase.v1.MLBaseService/Embed"
PARTS = ("client <-> frontend", "frontend, before", "frontend -> replica", "replica, before", "inference",
         "replica, after", "replica -> frontend", "frontend, after")


def parts_of(spans: list[ReceivedSpan], client_ns: int) -> dict[str, int] | None:
    """One request's parts in ns, or None when a span is missing (e.g. not exported yet)."""
    by_name = {s.name: s for s in spans}
    try:
        server, call = by_name[SERVER_SPAN], by_name["mlbase.embed"]
        replica, inference = by_name[REPLICA_SPAN], by_name["replica.inference"]
    except KeyError:
        return None
    return {
        "client <-> frontend": client_ns - (server.end_ns - server.start_ns),
        "frontend, before": call.start_ns - server.start_ns,
        "frontend -> replica": replica.start_ns - call.start_ns,
        "replica, before": inference.start_ns - replica.start_ns,
        "inference": inference.end_ns - inference.start_ns,
        "replica, after": replica.end_ns - inference.end_ns,
        "replica -> frontend": call.end_ns - replica.end_ns,
        "frontend, after": server.end_ns - call.end_ns,
    }


def run(stack: Stack, receiver: OtlpReceiver, texts: list[str]) -> tuple[list[int], list[dict[str, int]]]:
    """Client times (ns) and each traced request's parts."""
    timed: dict[str, int] = {}
    with grpc.insecure_channel(stack.frontend.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for text in texts[:10]:  # warm every path
            stub.Embed(pb.EmbedRequest(inputs=[f"warm {text}"]), timeout=60)
        for text in texts[10:]:
            trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
            started = time.perf_counter_ns()
            stub.Embed(pb.EmbedRequest(inputs=[text]), timeout=60,
                       metadata=(("traceparent", f"00-{trace_id}-{parent}-01"),))
            timed[trace_id] = time.perf_counter_ns() - started
    deadline = time.monotonic() + 30
    rows: list[dict[str, int]] = []
    while time.monotonic() < deadline:  # the processes export in batches, every few seconds
        by_trace: dict[str, list[ReceivedSpan]] = {}
        for span in receiver.spans():
            if span.trace_id in timed:
                by_trace.setdefault(span.trace_id, []).append(span)
        rows = [p for t, spans in by_trace.items() if (p := parts_of(spans, timed[t])) is not None]
        if len(rows) >= 0.98 * len(timed):
            break
        time.sleep(1)
    return list(timed.values()), rows


def floors(baseline: workloads.Baseline, texts: list[str], pause_s: float) -> tuple[float, float]:
    """p50 ms of one text encoded in this process back to back, and after `pause_s` of idling
    before each (what a replica of a lone client sees), alternating so both see the same noise."""
    hot, paused = [], []
    for i, text in enumerate(texts):
        if i % 2:
            time.sleep(pause_s)
            paused.append(baseline.seconds([text]))
        else:
            hot.append(baseline.seconds([text]))
    return 1000 * statistics.median(hot), 1000 * statistics.median(paused)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.latency_breakdown", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="single new texts (default %(default)s)")
    ap.add_argument("--replicas", type=int, default=2, help="replicas behind HAProxy (default %(default)s)")
    ap.add_argument("--backend", default="auto", help="the replicas' backend, as `sutra up --backend` (default auto)")
    ap.add_argument("--out", type=Path, default=results_path("latency_breakdown.json"))
    args = ap.parse_args(argv)
    backend, precision = workloads.stack_default(args.replicas) if args.backend == "auto" else (args.backend, "")
    lines = workloads.corpus_lines(workloads.data_dir())
    texts = interactive.fresh(lines, args.requests + 10)
    with OtlpReceiver() as receiver, tempfile.TemporaryDirectory(prefix="sutra-breakdown-") as tmp:
        stack = Stack(Path(tmp), replica_count=args.replicas, frontend_flags=())
        for proc in [stack.shard, *stack.replicas.values(), stack.frontend]:
            proc.env["SUTRA_OTLP_ENDPOINT"] = receiver.endpoint
        for proc in stack.replicas.values():
            proc.env["SUTRA_MLBASE_BACKEND"] = backend
            if precision:
                proc.env["SUTRA_MLBASE_PRECISION"] = precision
        stack.start()
        try:
            client_ns, rows = run(stack, receiver, texts)
        finally:
            stack.stop()
    medians = {part: statistics.median(r[part] for r in rows) / 1e6 for part in PARTS}
    client_ms = statistics.median(client_ns) / 1e6
    # A lone client's replica idles between two texts for about the rest of the round trip.
    pause_s = max(0.0, client_ms - medians["inference"]) / 1000
    floor = workloads.BackendBaseline(backend, precision or "fp32", 1, workloads.REQUEST)
    floor.seconds(texts[:4])
    floor_ms, paused_ms = floors(floor, texts[10:210], pause_s)
    result = {"backend": f"{backend} {precision}".strip(), "replicas": args.replicas, "requests": len(client_ns),
              "traced": len(rows), "client_p50_ms": client_ms, "parts_p50_ms": medians,
              "sum_of_parts_ms": sum(medians.values()), "in_process_single_text_p50_ms": floor_ms,
              "pause_ms": 1000 * pause_s, "in_process_single_text_after_pause_p50_ms": paused_ms,
              "cpu": ab.cpu_model(), "cores": len(os.sched_getaffinity(0)),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python -m bench.latency_breakdown",
                                                                                 *(argv or sys.argv[1:])])}
    print(f"CPU: {result['cpu']} ({result['cores']} cores); {result['backend']}, {args.replicas} replicas x 1 thread; "
          f"{len(rows)} of {len(client_ns)} requests traced")
    for part in PARTS:
        print(f"  {part:22} {medians[part]:7.2f} ms")
    print(f"  {'sum of the medians':22} {result['sum_of_parts_ms']:7.2f} ms; client p50 {client_ms:.2f} ms "
          f"= {client_ms / floor_ms:.2f}x the in-process single text ({floor_ms:.2f} ms back to back), "
          f"{client_ms / paused_ms:.2f}x the same after a {1000 * pause_s:.1f} ms pause ({paused_ms:.2f} ms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One lone client, two frontends on one stack: what a frontend setting is worth to the
interactive call (one new text per request). bench.speculation and bench.replica_affinity
are this with one setting each.

Both frontends share the stack's replicas (through HAProxy) and its cache shard, and hold the
stack frontend's certificate; the second one differs by the setting under test. One client sends
single new texts (misses at both levels), alternating between the two in blocks (`block`
requests to one, then to the other, in a random order per round), so both see the same machine
noise. A block longer than one request matters where the setting acts across requests (which
replica the next one goes to). Reported: p50/p90/p99 per frontend and the ratio, beside the
in-process single-text encode of the replicas' backend at their thread budget.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench import ab, interactive, workloads
from bench.stack_access import stack_and_second_frontend
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Comparison:
    """The stack's own frontend (`variant`: the setting at its default) against a second frontend
    started with `overrides` (FrontendSettings fields that turn it off: `base`)."""

    prog: str
    doc: str
    variant: str  # name of the default's side, e.g. "speculating"
    base: str  # name of the second frontend's side, e.g. "l2_first"
    ratio_label: str
    overrides: dict
    block: int = 1
    default_out: Path | None = None

    @property
    def ratio_key(self) -> str:
        return f"{self.variant} / {self.base}"


def main(cmp: Comparison, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=cmp.prog, description=cmp.doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="single-text requests per frontend (default %(default)s)")
    ap.add_argument("--backend", default="auto", help="the replicas' backend, as `sutra up --backend` (default auto)")
    ap.add_argument("--replicas", type=int, default=2, help="replicas behind HAProxy (default %(default)s)")
    ap.add_argument("--block", type=int, default=cmp.block,
                    help="requests in a row to one frontend before the client turns to the other (default %(default)s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=cmp.default_out)
    args = ap.parse_args(argv)
    backend, precision = workloads.stack_default(args.replicas) if args.backend == "auto" else (args.backend, "")
    lines = workloads.corpus_lines(workloads.data_dir())
    with tempfile.TemporaryDirectory(prefix="sutra-lone-client-") as tmp, stack_and_second_frontend(
            Path(tmp), args.replicas, backend, precision, cmp.base.replace("_", "-"), **cmp.overrides) as (settings, second):
        addresses = {cmp.variant: settings.frontend_address, cmp.base: second.address}
        times = measure(addresses, lines, args.requests, args.seed, args.block)
    floor = workloads.BackendBaseline(backend, precision or "fp32", settings.torch_threads, workloads.REQUEST)
    texts = interactive.fresh(lines, 104)
    floor.seconds(texts[:4])
    floor_ms = 1000 * statistics.median(floor.seconds([t]) for t in texts[4:])
    result = ab.summary(times, base=cmp.base, variant=cmp.variant, ratio_key=cmp.ratio_key, percentiles=(50, 90, 99))
    result["in_process_single_text_p50_ms"] = floor_ms
    result["backend"] = f"{backend} {precision}".strip()
    result["block"] = args.block
    ab.report(result, names=(cmp.variant, cmp.base), ratio_key=cmp.ratio_key, ratio_label=cmp.ratio_label,
              heading=f"{args.requests} single new texts per frontend in blocks of {args.block}, {args.replicas} "
                      f"replicas ({result['backend']}); in-process single text {floor_ms:.2f} ms", out=args.out)
    return 0


def measure(addresses: dict[str, str], lines: list[str], requests: int, seed: int, block: int = 1) -> dict:
    """{frontend: {"cold": [ms]}}: each round sends `block` new texts to each, in a random order."""
    rng = random.Random(seed)
    channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
    try:
        stubs = {name: pb_grpc.EmbeddingServiceStub(ch) for name, ch in channels.items()}
        texts = interactive.fresh(lines, requests + 20)
        for name, stub in stubs.items():  # warm each path
            for text in texts[:20]:
                stub.Embed(pb.EmbedRequest(inputs=[f"{text} {name}"]), timeout=60)
        times: dict = {name: {"cold": []} for name in stubs}
        rest = texts[20:]
        for start in range(0, len(rest), block):
            order = list(stubs)
            rng.shuffle(order)
            for name in order:
                for text in rest[start:start + block]:
                    started = time.perf_counter()
                    stubs[name].Embed(pb.EmbedRequest(inputs=[f"{text} {name}"]), timeout=60)
                    times[name]["cold"].append(1000 * (time.perf_counter() - started))
        return times
    finally:
        for ch in channels.values():
            ch.close()

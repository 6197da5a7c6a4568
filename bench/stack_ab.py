"""Two whole stacks, one setting apart, under the same single-text clients: what a replica or shard
setting is worth end to end.

bench.lone_client compares two frontends on one stack; a setting of the replicas or the cache
shard needs a stack of its own. This starts stack "A" as `sutra up` would and stack "B" with the
--env settings added to its processes' environment (e.g. SUTRA_CACHE_SHARD_INLINE_READ_KEYS=0),
each on its own free ports, and then sends single new texts (misses at both cache levels) with
--clients in flight, alternating blocks of --block requests between the stacks in a random
order per round, so both see the same machine noise. Only one stack has traffic at a time; each
block starts and ends with an empty pipeline, so with many texts in flight use long blocks.
Answers are packed, as make bench's clients ask. Reported: p50/p90/p99 per stack, req/s over
each stack's blocks, and B/A ratios.

    .venv/bin/python -m bench.stack_ab --env SUTRA_CACHE_SHARD_INLINE_READ_KEYS=0 [--clients 1] [--requests 600]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from bench import ab, interactive, workloads
from bench.stack_access import stack_settings
from deploy import stack
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc


@contextlib.contextmanager
def environment(extra: dict[str, str]):
    """`extra` in os.environ for the block (a stack's supervisord, and so its programs, inherit it)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def two_stacks(work: Path, replicas: int, backend: str, precision: str, env_b: dict[str, str]):
    """Stacks A (as `make bench` starts one) and B (with `env_b`), each on its own free ports."""
    started = []
    try:
        for name, env in (("a", {}), ("b", env_b)):
            settings = stack_settings(work / name, replicas, backend, precision)
            with environment(env):
                stack.up(settings, out=lambda line: None)
            started.append(settings)
        yield started
    finally:
        for settings in started:
            stack.down(settings, out=lambda line: None)


def measure(addresses: dict[str, str], lines: list[str], requests: int, clients: int, block: int,
            seed: int, request_texts: int = 1) -> tuple[dict, dict]:
    """({stack: {"cold": [ms]}}, {stack: requests/s over its blocks}); each request carries
    `request_texts` new texts."""
    rng = random.Random(seed)
    channels = {name: grpc.insecure_channel(a) for name, a in addresses.items()}
    times: dict = {name: {"cold": []} for name in addresses}
    busy = {name: 0.0 for name in addresses}
    try:
        stubs = {name: pb_grpc.EmbeddingServiceStub(ch) for name, ch in channels.items()}
        texts = interactive.fresh(lines, (requests + 40) * request_texts)
        for name, stub in stubs.items():  # warm each path
            for text in texts[:40]:
                stub.Embed(pb.EmbedRequest(inputs=[f"{text} {name}"]), timeout=60)

        def one(name: str, first: str) -> float:
            i = index[first]
            inputs = [f"{x} {name}" for x in texts[i:i + request_texts]]
            t = time.perf_counter()
            stubs[name].Embed(pb.EmbedRequest(inputs=inputs, encoding=pb.ENCODING_PACKED), timeout=60)
            return 1000 * (time.perf_counter() - t)

        firsts = texts[40 * request_texts::request_texts]
        index = {t: i for i, t in enumerate(texts)}
        rest = firsts[:requests]
        with ThreadPoolExecutor(clients) as pool:
            for start in range(0, len(rest), block):
                order = list(stubs)
                rng.shuffle(order)
                for name in order:
                    t = time.perf_counter()
                    times[name]["cold"] += pool.map(one, [name] * len(rest[start:start + block]),
                                                    rest[start:start + block])
                    busy[name] += time.perf_counter() - t
        return times, {name: len(times[name]["cold"]) / busy[name] for name in stubs}
    finally:
        for ch in channels.values():
            ch.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stack_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment setting of stack B's processes (repeatable)")
    ap.add_argument("--requests", type=int, default=600, help="single-text requests per stack (default %(default)s)")
    ap.add_argument("--clients", type=int, default=1, help="requests in flight (default %(default)s)")
    ap.add_argument("--request-texts", type=int, default=1,
                    help="new texts per request (default %(default)s; 32 with --clients 4 is make bench's cold client)")
    ap.add_argument("--block", type=int, default=20, help="requests in a row to one stack (default %(default)s)")
    ap.add_argument("--replicas", type=int, default=2, help="replicas per stack (default %(default)s)")
    ap.add_argument("--backend", default="auto", help="the replicas' backend, as `sutra up --backend` (default auto)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    env_b = dict(item.split("=", 1) for item in args.env)
    if not env_b:
        ap.error("give stack B at least one --env NAME=VALUE")
    backend, precision = workloads.stack_default(args.replicas) if args.backend == "auto" else (args.backend, "")
    lines = workloads.corpus_lines(workloads.data_dir())
    with tempfile.TemporaryDirectory(prefix="sutra-stack-ab-") as tmp, \
            two_stacks(Path(tmp), args.replicas, backend, precision, env_b) as (a, b):
        times, rates = measure({"A": a.frontend_address, "B": b.frontend_address}, lines, args.requests,
                               args.clients, args.block, args.seed, args.request_texts)
    result = ab.summary(times, base="A", variant="B", ratio_key="B / A", percentiles=(50, 90, 99))
    result["req_per_s"] = {**rates, "B / A": rates["B"] / rates["A"]}
    result.update({"B_env": env_b, "clients": args.clients, "block": args.block, "request_texts": args.request_texts,
                   "backend": f"{backend} {precision}".strip(), "replicas": args.replicas})
    heading = (f"{args.requests} requests of {args.request_texts} new text(s) per stack, {args.clients} in flight, "
               f"blocks of {args.block}; "
               f"{args.replicas} replicas ({result['backend']}); B: {' '.join(args.env)}")
    out = args.out or Path(tempfile.gettempdir()) / "stack_ab.json"
    ab.report(result, names=("A", "B"), ratio_key="B / A", ratio_label="B / A", heading=heading, out=out)
    print(f"req/s: A {rates['A']:.1f}, B {rates['B']:.1f} (B / A x{rates['B'] / rates['A']:.3f}); texts/s: "
          f"A {rates['A'] * args.request_texts:.0f}, B {rates['B'] * args.request_texts:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the OpenAI-compatible HTTP API costs a caller against gRPC, on one frontend.

    python -m bench.http_vs_grpc [--requests N] [--batch-requests N] [--out results/http_vs_grpc.json]

One replica (one thread), one cache shard and one frontend serving both transports, so
both reach the same engine, caches and replica. Requests alternate between the
transports, in random order, so all see the same machine noise: gRPC Embed through
`embedding.client.Client` (packed float32), and POST /v1/embeddings over a keep-alive
http.client connection, with base64 vectors (`http`, what the official openai client
asks for) and with JSON numbers (`http_float`, what curl users get). Each client decodes
the vectors into a numpy array, inside the timing. Kinds: one text or 64 texts, each an
L1 hit (the same warm texts every time) or cold (new texts, computed by the replica).
Printed: p50 and p99 per kind and transport, and the HTTP/gRPC ratios.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import orjson

from bench.ab import report, summary
from embedding.client import Client
from harness.procs import free_port
from harness.results import results_path
from harness.stack import backends, service

RATIO = "ratio_http_over_grpc"
RATIO_FLOAT = "ratio_http_float_over_grpc"
DIMENSIONS = 256
KINDS = {"1/L1": (1, False), "1/cold": (1, True), "64/L1": (64, False), "64/cold": (64, True)}


class HttpEmbedder:
    """POST /v1/embeddings on one keep-alive connection; vectors as a numpy array."""

    def __init__(self, port: int, as_base64: bool) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self._format = "base64" if as_base64 else "float"

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int, int]:
        """(vectors, L1 hits, computed)."""
        body = orjson.dumps({"input": texts, "dimensions": DIMENSIONS, "encoding_format": self._format})
        self._conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        reply = self._conn.getresponse()
        doc = orjson.loads(reply.read())
        assert reply.status == 200, doc
        rows = [d["embedding"] for d in doc["data"]]
        if self._format == "base64":
            vectors = np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows])
        else:
            vectors = np.array(rows, dtype=np.float32)
        return vectors, int(reply.getheader("x-sutra-l1-hits")), int(reply.getheader("x-sutra-computed"))

    def close(self) -> None:
        self._conn.close()


def measure(grpc_client: Client, http_port: int, counts: dict[str, int], seed: int) -> dict:
    """{transport: {kind: [ms, ...]}}, `counts[kind]` requests per transport and kind, alternating."""
    rng = random.Random(seed)
    callers = {"grpc": None, "http": HttpEmbedder(http_port, True), "http_float": HttpEmbedder(http_port, False)}
    warm = {size: [f"http vs grpc warm {size} {i}" for i in range(size)] for size in (1, 64)}
    times: dict[str, dict[str, list[float]]] = {name: {kind: [] for kind in KINDS} for name in callers}

    def call(name: str, texts: list[str]) -> tuple[np.ndarray, int, int]:
        if name == "grpc":
            out = grpc_client.embed_detailed(texts, DIMENSIONS)
            return out.vectors, out.l1_hits, out.computed
        return callers[name].embed(texts)

    try:
        for size in warm:  # fill L1 (and check the transports agree)
            same = [call(name, warm[size])[0] for name in callers]
            assert all(np.array_equal(same[0], other) for other in same[1:])
        for kind, (size, cold) in KINDS.items():
            for _ in range(counts[kind]):
                order = list(callers)
                rng.shuffle(order)
                for name in order:
                    texts = [f"http vs grpc {uuid.uuid4().hex}" for _ in range(size)] if cold else warm[size]
                    started = time.perf_counter()
                    vectors, l1_hits, computed = call(name, texts)
                    times[name][kind].append((time.perf_counter() - started) * 1000)
                    assert vectors.shape == (size, DIMENSIONS) and (computed, l1_hits) == ((size, 0) if cold
                                                                                          else (0, size))
    finally:
        for caller in callers.values():
            if caller is not None:
                caller.close()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.http_vs_grpc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="single-text requests per transport and kind "
                                                              "(default %(default)s)")
    ap.add_argument("--batch-requests", type=int, default=40, help="64-text requests per transport and kind "
                                                                   "(default %(default)s)")
    ap.add_argument("--warmup", type=int, default=20, help="requests per transport and kind first, not counted "
                                                           "(default %(default)s)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=results_path("http_vs_grpc.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sutra-http-vs-grpc-") as tmp:
        replica, shard = backends(Path(tmp))
        http_port = free_port()
        frontend = service("embedding", Path(tmp) / "frontend.log", {
            "mlbase_address": replica.address, "cache_shards": (shard.address,), "admin_port": 0,
            "http_port": http_port, "mlbase_connections": 2})
        procs = [replica, shard, frontend]
        try:
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.wait_serving()
            with Client(frontend.address, retries=0, timeout=120) as grpc_client:
                measure(grpc_client, http_port, dict.fromkeys(KINDS, args.warmup), args.seed + 1)
                counts = {kind: args.requests if size == 1 else args.batch_requests
                          for kind, (size, _) in KINDS.items()}
                times = measure(grpc_client, http_port, counts, args.seed)
        finally:
            for proc in reversed(procs):
                proc.stop()
    result = summary(times, base="grpc", variant="http", ratio_key=RATIO, percentiles=(50, 99))
    result[RATIO_FLOAT] = summary(times, base="grpc", variant="http_float", ratio_key=RATIO_FLOAT,
                                  percentiles=(50, 99))[RATIO_FLOAT]
    report(result, names=("grpc", "http", "http_float"), ratio_key=RATIO, ratio_label="HTTP (base64) / gRPC",
           heading=f"{args.requests} single-text and {args.batch_requests} 64-text requests per transport and kind, "
                   f"width {DIMENSIONS}, one frontend, one replica (1 thread)", out=args.out)
    for kind, row in result[RATIO_FLOAT].items():
        print(f"HTTP (JSON floats) / gRPC, {kind}: " + ", ".join(f"{c.removesuffix('_ms')} x{v:.3f}"
                                                                for c, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What tracing costs a caller: two small stacks side by side, one exporting spans, one not.

    python -m bench.tracing_cost [--requests N] [--out results/tracing_cost.json]

Each stack is harness.stack.Stack with one replica (a cache shard, HAProxy, a frontend with its
default L1). In one, every process has `SUTRA_OTLP_ENDPOINT` pointing at a real OTLP/gRPC
receiver in this process (harness.otlp), so spans are made, batched and really exported with the
SDK's default batching; in the other nothing is set, so tracing is off (nothing installed). Single-
text requests alternate between the stacks in random order, so both see the same machine noise:
a cold text (L1 and L2 miss, computed by the replica: every span of the trace, three services),
and a repeated one (an L1 hit: the server span and the L1 span only, where a fixed per-span cost
weighs most). Printed: p50 and p99 per kind and stack, the on/off ratios, and the spans received.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from bench.ab import report, summary
from embedding.client import Client
from harness.otlp import OtlpReceiver
from harness.results import results_path
from harness.stack import Stack

KINDS = ("cold", "l1_hit")
STACKS = ("off", "on")
RATIO = "ratio_on_over_off"


def _stack(workdir: Path, endpoint: str | None) -> Stack:
    """One replica, L1 on; every process exports to `endpoint` when given (the variable the settings read)."""
    workdir.mkdir(parents=True)
    stack = Stack(workdir, replica_count=1, frontend_flags=())
    if endpoint is not None:
        for proc in [stack.shard, *stack.replicas.values(), stack.frontend]:
            proc.env["SUTRA_OTLP_ENDPOINT"] = endpoint
    return stack


def measure(clients: dict[str, Client], requests: int, seed: int) -> dict[str, dict[str, list[float]]]:
    """`requests` cold texts and as many L1 hits per stack, each step in a random stack order."""
    rng = random.Random(seed)
    times: dict[str, dict[str, list[float]]] = {name: {kind: [] for kind in KINDS} for name in clients}
    hot = {name: f"tracing cost hot text {uuid.uuid4()}" for name in clients}
    for name, client in clients.items():
        client.embed_detailed([hot[name]])
    for _ in range(requests):
        for kind in KINDS:
            order = list(clients)
            rng.shuffle(order)
            for name in order:
                text = f"tracing cost probe {uuid.uuid4()}" if kind == "cold" else hot[name]
                start = time.perf_counter()
                out = clients[name].embed_detailed([text])
                times[name][kind].append((time.perf_counter() - start) * 1000)
                assert (out.computed if kind == "cold" else out.l1_hits) == 1, (name, kind)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tracing_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300,
                    help="cold texts and L1 hits per stack, each (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=30, help="the same first, not counted (default %(default)s)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=results_path("tracing_cost.json"))
    args = ap.parse_args(argv)
    os.environ.pop("SUTRA_OTLP_ENDPOINT", None)  # "off" means off, whatever this shell exports
    with tempfile.TemporaryDirectory(prefix="sutra-tracing-cost-") as tmp, ExitStack() as stacks:
        receiver = stacks.enter_context(OtlpReceiver())
        running = {}
        for name in STACKS:
            stack = _stack(Path(tmp) / name, receiver.endpoint if name == "on" else None)
            stacks.callback(stack.stop)
            running[name] = stack.start()
        clients = {name: stacks.enter_context(Client(s.frontend.address, retries=0)) for name, s in running.items()}
        measure(clients, args.warmup, args.seed + 1)
        result = summary(measure(clients, args.requests, args.seed), base="off", variant="on", ratio_key=RATIO,
                         percentiles=(50, 99))
        time.sleep(6.0)  # the SDK exports every 5 s: let the last batch arrive
        received = receiver.spans()
    result["spans_received"] = len(received)
    result["services_seen"] = sorted({s.service for s in received})
    report(result, names=STACKS, ratio_key=RATIO, ratio_label="tracing on / off",
           heading=f"{args.requests} requests per kind and stack, one replica each; {len(received)} spans received "
                   f"from {', '.join(result['services_seen'])}", out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

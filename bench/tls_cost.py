"""What mutual TLS on the internal hops costs a caller: two `sutra up` stacks side by side.

    python -m bench.tls_cost [--requests N] [--out results/tls_cost.json]

Both stacks are what `make up` starts (one replica each, L1 off so a repeated text is an L2 hit),
one with the default mutual TLS on every internal hop, one with `--no-internal-tls`. Requests
alternate between them, in random order, so both see the same machine noise: a cold text (L1 and
L2 miss, computed by the replica, through HAProxy, then written back to the shard), then the same
text again (an L2 hit: one lookup on the shard's long-lived TLS stream). The caller's own hop is
plaintext in both, so the difference is the internal hops alone. Printed: p50 and p95 per kind and
stack, and the TLS/plaintext ratios.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from bench.ab import report, summary
from embedding.client import Client
from harness.deployed import deployed
from harness.results import results_path

RATIO = "ratio_tls_over_plaintext"


def timed(client: Client, text: str) -> tuple[float, object]:
    start = time.perf_counter()
    out = client.embed_detailed([text])
    return (time.perf_counter() - start) * 1000, out


def measure(clients: dict[str, Client], requests: int, seed: int, round_size: int = 20) -> dict:
    """Rounds of `round_size` cold texts per stack (interleaved), then the same texts again once the
    write-backs have reached the shard (they are stored after the reply, not before)."""
    rng = random.Random(seed)
    times: dict[str, dict[str, list[float]]] = {name: {"cold": [], "l2_hit": []} for name in clients}
    done = 0
    while done < requests:
        n = min(round_size, requests - done)
        texts = {name: [f"tls cost probe {uuid.uuid4()}" for _ in range(n)] for name in clients}
        for kind, expect in (("cold", "computed"), ("l2_hit", "l2_hits")):
            for i in range(n):
                order = list(clients)
                rng.shuffle(order)
                for name in order:
                    ms, out = timed(clients[name], texts[name][i])
                    assert getattr(out, expect) == 1, (name, kind, out.l1_hits, out.l2_hits, out.computed)
                    times[name][kind].append(ms)
            time.sleep(1.0)  # let the write-backs land
        done += n
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tls_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="cold + L2-hit pairs per stack (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=20, help="pairs per stack first, not counted (default %(default)s)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=results_path("tls_cost.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sutra-tls-cost-") as tmp, ExitStack() as stacks:
        settings = {
            "mutual_tls": stacks.enter_context(deployed(Path(tmp) / "tls", 1, "--l1-entries", "0"))[0],
            "plaintext": stacks.enter_context(deployed(Path(tmp) / "plain", 1, "--l1-entries", "0",
                                                       "--no-internal-tls"))[0],
        }
        clients = {name: stacks.enter_context(Client(s.frontend_address, retries=0)) for name, s in settings.items()}
        measure(clients, args.warmup, args.seed + 1)
        result = summary(measure(clients, args.requests, args.seed), base="plaintext", variant="mutual_tls",
                         ratio_key=RATIO, percentiles=(50, 95))
    report(result, names=("plaintext", "mutual_tls"), ratio_key=RATIO, ratio_label="mutual TLS / plaintext",
           heading=f"{args.requests} pairs per stack, one replica each", out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

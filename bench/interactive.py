"""Interactive traffic: one new text per request, at rising concurrency, and the in-process floors
it is judged against.

Production's most frequent call is one search query: one text, never seen before. A stack that
batches well but makes that call wait on windows, hops and round trips loses to a plain Python
server, so `make bench` measures it beside what the same backend does in-process:

- floors: the replica's own backend in this process, at the replica's thread budget: one text
  (tokenizer included), and 8 texts as one batch;
- the sweep: single-text cold requests (each text new: an L1 and L2 miss) with 1, 2, 4, 8, 16
  and 32 clients in flight; req/s, p50 and p99.

Texts are corpus lines with a per-run suffix, so their lengths are real and every one is a miss.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Sequence

from bench import workloads

LEVELS = (1, 2, 4, 8, 16, 32)
BATCH = 8


def fresh(lines: Sequence[str], count: int) -> list[str]:
    """`count` texts no cache holds: corpus lines (cycled) with a suffix unique to this call."""
    run = uuid.uuid4().hex[:8]
    return [f"{lines[i % len(lines)]} ({run}-{i})" for i in range(count)]


def floors(baseline: workloads.Baseline, lines: Sequence[str], samples: int) -> dict:
    """p50 of one text alone, and of 8 texts as one batch, encoded in this process."""
    texts = fresh(lines, samples * (1 + BATCH))
    baseline.seconds(texts[:BATCH])  # warm the shapes
    single = [baseline.seconds([t]) for t in texts[:samples]]
    batches = workloads.chunks(texts[samples:], BATCH)
    batch = [baseline.seconds(b) for b in batches]
    return {"engine": baseline.name, "single_p50_ms": 1000 * statistics.median(single),
            "batch8_p50_ms": 1000 * statistics.median(batch), "samples": samples}


def sweep(address: str, lines: Sequence[str], per_level: int, levels: Sequence[int] = LEVELS,
          probe: Callable[[], dict[str, float]] | None = None) -> list[dict]:
    """One row per concurrency level: single-text cold requests, `per_level` of them. With `probe`
    (cumulative seconds per part, `stack_access.cpu_by_role`), each row also gets the milliseconds
    of each part per request."""
    rows = []
    for level in levels:
        requests = [[t] for t in fresh(lines, max(per_level, 4 * level))]
        before = probe() if probe else {}
        started = time.perf_counter()
        _, latencies, usage = workloads.drive(address, requests, level)
        elapsed = time.perf_counter() - started
        after = probe() if probe else {}
        summary = workloads.latency_summary(latencies)
        row = {"concurrency": level, "requests": len(requests), "req_per_s": len(requests) / elapsed,
               "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"], "computed": usage["computed"],
               "latency": summary}
        if probe:
            row["ms_per_request"] = {part: 1000 * (after[part] - before[part]) / len(requests) for part in after}
        rows.append(row)
    return rows


def row_at(result: dict, concurrency: int) -> dict | None:
    for row in result.get("interactive", {}).get("sweep", []):
        if row["concurrency"] == concurrency:
            return row
    return None

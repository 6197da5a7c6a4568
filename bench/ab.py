"""Two variants of the stack measured side by side (mutual TLS or not, tracing or not): the
percentiles, the variant/base ratios, the printed table and the JSON file, written once for
bench.tls_cost and bench.tracing_cost. Each script alternates its requests between the variants
itself, so both see the same machine noise; this module only reports what they measured."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def summary(times: dict[str, dict[str, list[float]]], *, base: str, variant: str, ratio_key: str,
            percentiles: tuple[int, ...]) -> dict:
    """{name: {kind: {"pNN_ms": ..., "n": ...}}} for each variant's latencies (ms), and under
    `ratio_key` the variant's percentiles over the base's, per kind."""
    out: dict = {name: {kind: {**{f"p{p}_ms": float(np.percentile(v, p)) for p in percentiles}, "n": len(v)}
                        for kind, v in kinds.items()} for name, kinds in times.items()}
    out[ratio_key] = {kind: {f"p{p}_ms": out[variant][kind][f"p{p}_ms"] / out[base][kind][f"p{p}_ms"]
                             for p in percentiles} for kind in times[base]}
    return out


def report(result: dict, *, names: tuple[str, ...], ratio_key: str, ratio_label: str, heading: str,
           out: Path) -> None:
    """Add the machine to `result`, print the table and ratios, and write `result` to `out` as JSON."""
    result["cpu"] = cpu_model()
    result["cores"] = len(os.sched_getaffinity(0))
    print(f"CPU: {result['cpu']} ({result['cores']} cores); {heading}")
    columns = [key for key in next(iter(result[names[0]].values())) if key != "n"]
    width = max(len(name) for name in names) + 1
    print(f"{'':{width}} {'kind':7} " + " ".join(f"{c.replace('_ms', ' ms'):>8}" for c in columns))
    for name in names:
        for kind, row in result[name].items():
            print(f"{name:{width}} {kind:7} " + " ".join(f"{row[c]:8.3f}" for c in columns))
    for kind, row in result[ratio_key].items():
        print(f"{ratio_label}, {kind}: " + ", ".join(f"{c.removesuffix('_ms')} x{row[c]:.3f}" for c in columns))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")

"""PNG plots of a `python -m bench` result: throughput per workload and latency CDFs.

Drawn from the result document alone (latency CDFs use the 101 quantiles
stored per workload), so a saved latest.json can be re-plotted:

    .venv/bin/python -m bench.plots results/latest.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def throughput_rows(result: dict) -> list[tuple[str, float, str]]:
    """(label, texts or embeddings per second, group) for every workload."""
    rows = [(f"in-process {name}", row["texts_per_s"], "baseline") for name, row in result["cold"]["in_process"].items()]
    rows.append(("stack cold (all misses)", result["cold"]["stack_texts_per_s"], "stack"))
    for run in result["mixed"].values():
        rows.append((f"{run['title']} ({run['repeat_share']:.0%} repeats)", run["texts_per_s"], "stack"))
    for level in ("l1", "l2"):
        for name, row in result[level].items():
            rows.append((f"{level.upper()} hits, {name}", row["embeddings_per_s"], level))
    return rows


def latency_series(result: dict) -> dict[str, list[float]]:
    series = {f"cold request ({result['cold']['request_texts']} texts)": result["cold"]["latency"]}
    for run in result["mixed"].values():
        series[f"{run['title']} ({run['request_texts']} texts)"] = run["latency"]
    for level in ("l1", "l2"):
        for name, row in result[level].items():
            series[f"{level.upper()} {name}"] = row["latency"]
    return {k: v["quantiles_ms"] for k, v in series.items() if v.get("quantiles_ms")}


def plot_throughput(result: dict, path: Path) -> Path:
    rows = throughput_rows(result)
    colours = {"baseline": "#888888", "stack": "#1f77b4", "l1": "#2ca02c", "l2": "#ff7f0e"}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh(list(y), [r[1] for r in rows], color=[colours[r[2]] for r in rows])
    for i, (_, value, _) in enumerate(rows):
        ax.text(value, i, f" {value:,.0f}", va="center", fontsize=8)
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("texts (embeddings) per second, log scale")
    st = result["stack"]
    ax.set_title(f"throughput per workload: {st['backend']} {st['precision']}, {st['replicas']} replica(s), "
                 f"{result['config']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(result: dict, path: Path) -> Path:
    series = latency_series(result)
    fig, ax = plt.subplots(figsize=(12, 5.5))
    fraction = [i / 100 for i in range(101)]
    colours = plt.get_cmap("tab20")
    for i, (name, quantiles) in enumerate(series.items()):
        style = "--" if name.startswith("L2") else "-"
        ax.plot(quantiles, fraction, style, label=name, linewidth=1.3, color=colours(i % 20))
    ax.set_xscale("log")
    ax.set_xlabel("request latency, ms (log scale)")
    ax.set_ylabel("fraction of requests")
    ax.axvline(1.0, color="#cc0000", linewidth=0.8, linestyle=":")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("latency CDF per workload (cache hits: one request at a time; cold/mixed: in flight)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_interactive(result: dict, path: Path) -> Path:
    """Latency against throughput for single-text clients, one point per concurrency level."""
    rows = result["interactive"]["sweep"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
        ax.plot([r["req_per_s"] for r in rows], [r[key] for r in rows], style, label=key.replace("_ms", ""))
    for r in rows:
        ax.annotate(f"{r['concurrency']}", (r["req_per_s"], r["p50_ms"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    floor = result["interactive"]["floors"]["replica_threads"]
    ax.axhline(floor["single_p50_ms"], color="#888888", linestyle=":",
               label=f"in-process one text ({floor['engine']})")
    ax.set_xlabel("requests per second (one new text each)")
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    st = result["stack"]
    ax.set_title(f"single-text cold requests by clients in flight: {st['backend']} {st['precision']}, "
                 f"{st['replicas']} replica(s)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(result: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [plot_throughput(result, folder / "throughput.png"), plot_latency(result, folder / "latency_cdf.png"),
            plot_interactive(result, folder / "latency_throughput.png")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="a result JSON written by `python -m bench`")
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the JSON's folder)")
    args = ap.parse_args(argv)
    result = json.loads(args.result.read_text())
    for path in write_all(result, args.out or args.result.parent):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

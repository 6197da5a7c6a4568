"""In-process encode speed of each inference backend, on the same texts, in one run.

Rows (with --threads threads unless marked "1 thread"):

  torch (sentence-transformers)   SentenceTransformer.encode, the reference
  onnx fp32 plain / fused         the exported graph without / with onnxruntime's
                                  transformer fusions (Attention, LayerNorm, GELU)
  onnx int8 plain / fused         dynamic per-channel int8 weights
  onnx int8-static                static int8 (SmoothQuant, calibrated activation scales),
                                  its default layers (if any) in fp32
  torch bf16                      the torch backend with the transformer in bfloat16
  onnx int8 keep ...              int8 with some layers kept in fp32 (--keep-fp32)
  ..., 1 thread                   the same with one thread: on a machine whose cores are
                                  busy with other work, torch's OpenMP threads degrade far
                                  more than onnxruntime's; with one thread, CPU time per
                                  text is exact, which settles fused vs plain

Every row encodes all texts in batches of --batch-size, tokenizing included.
Rounds are interleaved (A, B, C, A, B, C, ...) so that the noise of a shared
machine hits every row alike; texts/s is reported as the median and the best
round, with ratios to torch, and so is texts per CPU-second of this process
(its CPU time barely depends on what else the machine runs; for several
threads it includes time spent spinning). Prints a table and writes
results/backend_speed.json; `bench.quality` runs this too, so that
speed and quality come from one run.

    .venv/bin/python -m bench.backend_speed [--texts 1000] [--rounds 5] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench.datasets import CORPUS_FILE, data_file
from harness.results import results_path
from mlbase.backends import registry
from mlbase.backends.base import BackendOptions
from mlbase.backends.onnx_backend import DEFAULT_FUSED
from mlbase.backends.onnx_export import DEFAULT_CACHE_DIR
from common.flags import split_csv
from common.settings import item
from mlbase.settings import DEFAULT_INT8_KEEP_FP32, MLBaseSettings, bundled_model_path

ROOT = Path(__file__).resolve().parent.parent
# The first layer's weights: of the layer choices tried (README), the best STS-B recovered per CPU spent.
DEFAULT_KEEP_FP32 = (("layer.0.",),)
STATIC_KEEP_FP32 = tuple(split_csv(DEFAULT_INT8_KEEP_FP32["int8-static"]))


@dataclass(frozen=True)
class Row:
    name: str
    backend: str
    precision: str
    fused: bool | None = None
    keep_fp32: tuple[str, ...] = ()
    # 0 = --threads; rows with 1 show how each engine copes with a core shared with other work.
    threads: int = 0


def rows_for(keep_sets: Sequence[tuple[str, ...]], single_thread_rows: bool = True) -> list[Row]:
    """The standard rows, plus one int8 row per set of layers kept in fp32."""
    rows = [
        Row("torch (sentence-transformers)", "torch", "fp32"),
        Row("onnx fp32 plain", "onnx", "fp32", fused=False),
        Row("onnx fp32 fused", "onnx", "fp32", fused=True),
        Row("onnx int8 plain", "onnx", "int8", fused=False),
        Row("onnx int8 fused", "onnx", "int8", fused=True),
    ]
    reduced = [Row("torch bf16", "torch", "bf16"),
               Row("onnx int8-static" + (f", fp32 {','.join(STATIC_KEEP_FP32)}" if STATIC_KEEP_FP32 else ""),
                   "onnx", "int8-static", False, STATIC_KEEP_FP32)]
    rows += reduced
    graph = {p: "fused" if DEFAULT_FUSED[p] else "plain" for p in DEFAULT_FUSED}
    for keep in keep_sets:
        rows.append(Row(f"onnx int8 {graph['int8']}, fp32 {','.join(keep)}", "onnx", "int8",
                        DEFAULT_FUSED["int8"], tuple(keep)))
    if single_thread_rows:
        rows += [Row("torch (sentence-transformers), 1 thread", "torch", "fp32", threads=1),
                 Row("onnx fp32 plain, 1 thread", "onnx", "fp32", False, threads=1),
                 Row("onnx fp32 fused, 1 thread", "onnx", "fp32", True, threads=1),
                 Row("onnx int8 plain, 1 thread", "onnx", "int8", False, threads=1),
                 Row("onnx int8 fused, 1 thread", "onnx", "int8", True, threads=1)]
        rows += [replace(row, name=f"{row.name}, 1 thread", threads=1) for row in reduced]
    return rows


def load_texts(n: int) -> list[str]:
    lines = data_file(CORPUS_FILE).read_text().splitlines()
    return [line for line in lines if line.strip()][:n]


def build(row: Row, options: BackendOptions):
    """A loaded backend, and the function that encodes a list of texts with it."""
    options = replace(options, precision=row.precision, keep_fp32=row.keep_fp32,
                      threads=row.threads or options.threads)
    if row.backend == "onnx":
        from mlbase.backends.onnx_backend import OnnxBackend  # onnxruntime is imported by load()

        backend = OnnxBackend(options, fused=row.fused)
    else:
        backend = registry.create(row.backend, options)
    backend.load()
    if row.backend == "torch":
        import torch

        model = backend.model  # fp32: the SentenceTransformer itself, the reference: measure its own encode
        threads = options.threads

        def encode(texts: Sequence[str], batch_size: int):
            torch.set_num_threads(threads)  # process-wide: torch rows with different counts take turns
            if row.precision != "fp32":
                return backend.encode(texts, batch_size=batch_size)[0]
            return model.encode(list(texts), batch_size=batch_size, show_progress_bar=False)
    else:
        def encode(texts: Sequence[str], batch_size: int):
            return backend.encode(texts, batch_size=batch_size)[0]
    return backend, encode


def measure(rows: Sequence[Row], options: BackendOptions, texts: Sequence[str], rounds: int,
            batch_size: int, log: Callable[[str], None] = print) -> list[dict]:
    """Interleaved rounds over all rows; returns one result dict per row."""
    encoders = []
    for row in rows:
        started = time.monotonic()
        _, encode = build(row, options)
        encode(texts[:64], batch_size)  # warm up: first-call allocations, thread pools
        encoders.append(encode)
        log(f"  loaded {row.name} in {time.monotonic() - started:.1f}s")
    seconds: list[list[float]] = [[] for _ in rows]
    cpu: list[list[float]] = [[] for _ in rows]
    for r in range(rounds):
        for i, encode in enumerate(encoders):
            started, cpu_started = time.perf_counter(), time.process_time()
            encode(texts, batch_size)
            seconds[i].append(time.perf_counter() - started)
            cpu[i].append(time.process_time() - cpu_started)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{len(texts) / s[-1]:.0f}" for s in seconds) + " texts/s")
    results = []
    for row, times, cpu_times in zip(rows, seconds, cpu):
        results.append({
            "name": row.name, "backend": row.backend, "precision": row.precision, "fused": row.fused,
            "keep_fp32": list(row.keep_fp32), "threads": row.threads or options.threads,
            "seconds": [round(t, 4) for t in times],
            "median_texts_per_s": len(texts) / statistics.median(times),
            "best_texts_per_s": len(texts) / min(times),
            # CPU time of this process (all its threads): steadier than wall time on a busy machine.
            "cpu_seconds": [round(t, 4) for t in cpu_times],
            "texts_per_cpu_s": len(texts) / statistics.median(cpu_times),
        })
    base = results[0]
    for res in results:
        res["median_vs_torch"] = res["median_texts_per_s"] / base["median_texts_per_s"]
        res["best_vs_torch"] = res["best_texts_per_s"] / base["best_texts_per_s"]
        res["cpu_vs_torch"] = res["texts_per_cpu_s"] / base["texts_per_cpu_s"]
    return results


def table(results: Sequence[dict]) -> str:
    lines = [f"{'backend':44s} {'median texts/s':>14s} {'best texts/s':>12s} {'x torch (median)':>16s} "
             f"{'x torch (best)':>14s} {'texts/CPU-s':>11s} {'x torch (CPU)':>13s}"]
    for r in results:
        lines.append(f"{r['name']:44s} {r['median_texts_per_s']:14.1f} {r['best_texts_per_s']:12.1f} "
                     f"{r['median_vs_torch']:16.2f} {r['best_vs_torch']:14.2f} {r['texts_per_cpu_s']:11.1f} "
                     f"{r['cpu_vs_torch']:13.2f}")
    return "\n".join(lines)


def environment(threads: int) -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": threads,
            "load_average": os.getloadavg(), "python": platform.python_version()}


def parser(module: str, doc: str, out: str) -> argparse.ArgumentParser:
    """The flags every backend benchmark takes (the model and backends, interleaved timing rounds,
    where the JSON goes); the caller adds its own."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=bundled_model_path(), help="sentence-transformers model folder (default: bundled)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every backend")
    cache_env = item(MLBaseSettings, "onnx_cache_dir").env  # the replica's own declaration
    p.add_argument("--onnx-cache-dir", default=os.environ.get(cache_env, DEFAULT_CACHE_DIR),
                   help=f"exported-graph cache, as for the replica (env {cache_env})")
    p.add_argument("--keep-fp32", default=";".join(",".join(k) for k in DEFAULT_KEEP_FP32),
                   help="extra 'int8 with layers kept in fp32' rows: sets of comma-separated module-name "
                        "patterns, separated by ';' (e.g. 'layer.0.;layer.4.,layer.5.'); empty = no such rows")
    p.add_argument("--single-thread-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch and the onnx graphs with 1 thread")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--out", default=str(results_path(out)), help="where to write the JSON results")
    return p


def options_from(args: argparse.Namespace) -> BackendOptions:
    return BackendOptions(model_path=args.model, threads=args.threads, cache_dir=args.onnx_cache_dir)


def keep_from(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """'a,b;c' -> [("a", "b"), ("c",)]"""
    sets = [tuple(p.strip() for p in group.split(",") if p.strip()) for group in args.keep_fp32.split(";")]
    return [s for s in sets if s]


def main(argv: list[str] | None = None) -> int:
    p = parser("bench.backend_speed", __doc__, "backend_speed.json")
    p.add_argument("--texts", type=int, default=1000, help="texts from shared/data/corpus.txt")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--quick", action="store_true", help="300 texts, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.rounds = 300, 2
    texts = load_texts(args.texts)
    print(f"encoding {len(texts)} texts, {args.rounds} interleaved rounds, {args.threads} threads")
    results = measure(rows_for(keep_from(args), args.single_thread_rows), options_from(args), texts, args.rounds,
                      args.batch_size)
    print(table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": environment(args.threads), "texts": len(texts),
                                          "rounds": args.rounds, "batch_size": args.batch_size,
                                          "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""STS-B quality of each backend, Matryoshka width, layer-norm mode and storage
precision, plus backend speed, in one run; and the defaults those numbers pick.

Quality: Spearman correlation between the gold similarity scores of the
STS-B test pairs (shared/data/sts-test.tsv) and the cosine of the two
sentences' vectors, for

  backends   torch fp32 and bf16, onnx fp32, onnx int8, onnx int8-static (its default layers,
             if any, in fp32), onnx int8 with --keep-fp32 layers in fp32
  storage    float32 and float16, through the cache codec (common.codec encode/decode)
  widths     384, 256, 128, 64 through common.matryoshka.reduce, layer norm off and on

Retention is Spearman relative to the same backend and storage at full width
without layer norm (the model's own vectors). Also reported: min/mean cosine of
float16 storage vs float32, and of each backend vs torch, over all STS-B
sentences at full width, and each backend's batch-independence gate
(mlbase.quality_gates: a text alone vs inside batches of other texts).

Speed: bench.backend_speed on --speed-texts texts of shared/data/corpus.txt.

Decisions, by the rule in issue 7:
  layer norm  on if it scores higher (by >= 0.001) at most of the widths 256, 128, 64
              (torch, float32); otherwise off
  graphs      fused or plain onnx graph per precision, by texts per CPU-second
  backend     the fastest (texts per CPU-second: steady on a busy machine, and what a pool of
              CPU-bound replicas serves per core) whose Spearman at every width, with
              float16 storage and the chosen layer-norm mode, is within 0.5% of torch's and
              whose vectors pass the batch-independence gate (`sutra tune` applies the
              same gates per CPU and records its choice for --backend auto)

Prints the tables and writes results/quality.json. Backends run in-process
(mlbase.backends.registry), no server needed.

    .venv/bin/python -m bench.quality [--quick] [--no-speed] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.datasets import corpus_lines, data_file
from bench import backend_speed
from common import codec, matryoshka
from mlbase.backends import registry
from mlbase.backends.base import BackendOptions
from common.flags import split_csv
from mlbase import quality_gates as gates
from mlbase.data_files import STS_TEST_FILE
from mlbase.settings import DEFAULT_INT8_KEEP_FP32
# The statistics and the 0.5% rule are the replica's quality gate (mlbase.quality_gates), re-exported.
from mlbase.quality_gates import STS_TOLERANCE as TOLERANCE, WIDTHS, cosines, load_sts, rankdata, spearman  # noqa: F401

STORAGE = ("float32", "float16")
# Smallest Spearman difference counted as a win: ~1/10 of the sampling error of rho on 1,379 pairs;
# anything smaller is a property of these exact vectors, not of the method.
LAYER_NORM_MARGIN = 0.001


@dataclass(frozen=True)
class Config:
    name: str
    backend: str
    precision: str = "fp32"
    keep_fp32: tuple[str, ...] = ()


def configs(keep_sets: Sequence[tuple[str, ...]]) -> list[Config]:
    static_keep = tuple(split_csv(DEFAULT_INT8_KEEP_FP32["int8-static"]))
    out = [Config("torch fp32", "torch"), Config("torch bf16", "torch", "bf16"), Config("onnx fp32", "onnx"),
           Config("onnx int8", "onnx", "int8"),
           Config("onnx int8-static" + (f"+fp32 {','.join(static_keep)}" if static_keep else ""), "onnx",
                  "int8-static", static_keep)]
    for keep in keep_sets:
        out.append(Config(f"onnx int8+fp32 {','.join(keep)}", "onnx", "int8", tuple(keep)))
    return out


# ---- data and statistics ---------------------------------------------------------------

def stored(full: np.ndarray, dtype: str) -> np.ndarray:
    """What a cache hands back: encode with the cache codec, decode again."""
    return np.stack([codec.decode(value) for value in codec.encode_many(full, dtype)])


# ---- evaluation ----------------------------------------------------------------------------

def encode_all(config: Config, options: BackendOptions, texts: Sequence[str],
               gate_texts: Sequence[str]) -> tuple[np.ndarray, gates.BatchGate]:
    """Full-width vectors of `texts`, and the batch-independence gate on `gate_texts`."""
    backend = registry.create(config.backend, replace(options, precision=config.precision,
                                                      keep_fp32=config.keep_fp32))
    backend.load()
    return backend.encode(texts, batch_size=64)[0], gates.batch_gate(backend, gate_texts)


def evaluate(full: np.ndarray, gold: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> dict:
    """Spearman per (layer_norm, width) for one set of full-width vectors."""
    out = {}
    for layer_norm in (False, True):
        for width in WIDTHS:
            reduced = matryoshka.reduce(full, width, layer_norm)
            out[(layer_norm, width)] = spearman((reduced[i1] * reduced[i2]).sum(axis=1), gold)
    return out


def quality_rows(vectors: dict[str, np.ndarray], gold, i1, i2) -> list[dict]:
    rows = []
    for name, full in vectors.items():
        for storage in STORAGE:
            scores = evaluate(stored(full, storage), gold, i1, i2)
            base = scores[(False, 384)]
            for (layer_norm, width), rho in scores.items():
                rows.append({"backend": name, "storage": storage, "layer_norm": layer_norm, "width": width,
                             "spearman": rho, "retention_pct": 100.0 * rho / base})
    return rows


def cosine_stats(vectors: dict[str, np.ndarray], reference: str) -> dict:
    out: dict[str, dict] = {"float16_vs_float32": {}, "vs_" + reference.replace(" ", "_"): {}}
    ref = vectors[reference]
    for name, full in vectors.items():
        f16 = cosines(full, stored(full, "float16"))
        worst_reduced = min(float(cosines(matryoshka.reduce(full, w, ln), matryoshka.reduce(stored(full, "float16"), w, ln)).min())
                            for w in WIDTHS for ln in (False, True))
        out["float16_vs_float32"][name] = {"min": float(f16.min()), "mean": float(f16.mean()),
                                           "min_after_reduce_any_width": worst_reduced}
        c = cosines(full, ref)
        out["vs_" + reference.replace(" ", "_")][name] = {"min": float(c.min()), "mean": float(c.mean())}
    return out


# ---- decisions -----------------------------------------------------------------------------

def lookup(rows: Sequence[dict], backend: str, storage: str, layer_norm: bool, width: int) -> float:
    for r in rows:
        if (r["backend"], r["storage"], r["layer_norm"], r["width"]) == (backend, storage, layer_norm, width):
            return r["spearman"]
    raise KeyError((backend, storage, layer_norm, width))


def choose_layer_norm(rows: Sequence[dict], reference: str) -> dict:
    """On if it beats off by at least LAYER_NORM_MARGIN at most of 256, 128, 64; otherwise off
    (a tie keeps the model's own vectors and one step less)."""
    deltas = {w: lookup(rows, reference, "float32", True, w) - lookup(rows, reference, "float32", False, w)
              for w in (256, 128, 64)}
    wins = [w for w, d in deltas.items() if d >= LAYER_NORM_MARGIN]
    return {"layer_norm": len(wins) >= 2, "layer_norm_wins_at": wins,
            "layer_norm_minus_plain": {str(w): d for w, d in deltas.items()},
            "layer_norm_rule": f"on if it scores at least {LAYER_NORM_MARGIN} higher at 2 of 256/128/64"}


def speed_row_for(config: Config, speed: Sequence[dict], threads: int) -> dict | None:
    from mlbase.backends.onnx_backend import DEFAULT_FUSED

    for r in speed:
        if (r["backend"], r["precision"], tuple(r["keep_fp32"]), r["threads"]) != (
                config.backend, config.precision, config.keep_fp32, threads):
            continue
        if config.backend == "onnx" and r["fused"] != DEFAULT_FUSED[config.precision]:
            continue
        return r
    return None


def choose_backend(rows: Sequence[dict], cfgs: Sequence[Config], speed: Sequence[dict], layer_norm: bool,
                   threads: int, batch_gates: dict[str, gates.BatchGate] | None = None) -> dict:
    """`batch_gates` (config name -> gate), when given, must pass too."""
    reference = cfgs[0].name
    candidates = []
    for config in cfgs:
        drops = {w: 1.0 - lookup(rows, config.name, "float16", layer_norm, w)
                 / lookup(rows, reference, "float16", layer_norm, w) for w in WIDTHS}
        row = speed_row_for(config, speed, threads)
        gate = (batch_gates or {}).get(config.name)
        candidates.append({"config": config.name, "worst_drop_pct": 100.0 * max(drops.values()),
                           "within_tolerance": max(drops.values()) <= TOLERANCE,
                           "batch_min_cosine": gate.worst if gate else None,
                           "batch_independent": gate.passed if gate else None,
                           "median_texts_per_s": row["median_texts_per_s"] if row else None,
                           "texts_per_cpu_s": row["texts_per_cpu_s"] if row else None})
    eligible = [c for c in candidates if c["within_tolerance"] and c["batch_independent"] is not False
                and c["texts_per_cpu_s"] is not None]
    best = max(eligible, key=lambda c: c["texts_per_cpu_s"]) if eligible else None
    return {"backend": best["config"] if best else reference, "candidates": candidates,
            "rule": f"most texts per CPU-second (what a CPU-bound replica pool serves per core) among "
                    f"those whose Spearman at every width is within {100 * TOLERANCE:.1f}% of {reference} "
                    f"and whose vectors do not depend on their batch mates (cosine >= {gates.MIN_BATCH_COSINE})"}


def choose_graphs(speed: Sequence[dict]) -> dict:
    """Fused vs plain per precision: texts per CPU-second (steady on a busy machine), as the
    geometric mean of the fused/plain ratio over the thread counts measured."""
    out = {}
    for precision in ("fp32", "int8"):
        per_threads = {}
        for r in speed:
            if r["backend"] == "onnx" and r["precision"] == precision and not r["keep_fp32"]:
                per_threads.setdefault(r["threads"], {})[r["fused"]] = r
        ratios = {}
        for threads, by_graph in sorted(per_threads.items()):
            if True in by_graph and False in by_graph:
                fused, plain = by_graph[True], by_graph[False]
                ratios[threads] = {"cpu_fused_vs_plain": fused["texts_per_cpu_s"] / plain["texts_per_cpu_s"],
                                   "wall_median_fused_vs_plain": fused["median_texts_per_s"]
                                   / plain["median_texts_per_s"]}
        if ratios:
            mean = float(np.exp(np.mean([np.log(r["cpu_fused_vs_plain"]) for r in ratios.values()])))
            out[precision] = {"by_threads": {str(t): r for t, r in ratios.items()}, "cpu_fused_vs_plain": mean,
                              "faster": "fused" if mean > 1.0 else "plain"}
    return out


# ---- output --------------------------------------------------------------------------------

def quality_table(rows: Sequence[dict], names: Sequence[str]) -> str:
    head = f"{'backend':38s} {'storage':8s} {'LN':3s} " + " ".join(f"{w:>15d}" for w in WIDTHS)
    lines = [head, "-" * len(head)]
    for name in names:
        for storage in STORAGE:
            for layer_norm in (False, True):
                cells = []
                for w in WIDTHS:
                    r = next(r for r in rows if (r["backend"], r["storage"], r["layer_norm"], r["width"])
                             == (name, storage, layer_norm, w))
                    cells.append(f"{r['spearman']:.4f} ({r['retention_pct']:5.1f}%)")
                lines.append(f"{name:38s} {storage:8s} {'on' if layer_norm else 'off':3s} " + " ".join(cells))
    return "\n".join(lines)


def cosine_table(stats: dict) -> str:
    lines = []
    for section, per_backend in stats.items():
        for name, s in per_backend.items():
            extra = (f", after reduce (any width) min {s['min_after_reduce_any_width']:.7f}"
                     if "min_after_reduce_any_width" in s else "")
            lines.append(f"{section:20s} {name:38s} min {s['min']:.7f} mean {s['mean']:.7f}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = backend_speed.parser("bench.quality", __doc__, "quality.json")
    p.add_argument("--sts", default=str(data_file(STS_TEST_FILE)), help="STS-B test file (tab-separated, with a header)")
    p.add_argument("--pairs", type=int, default=0, help="use only the first N pairs; 0 = all")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="also run bench.backend_speed")
    p.add_argument("--speed-texts", type=int, default=1000, help="texts for the speed section")
    p.add_argument("--quick", action="store_true", help="500 pairs; speed on 300 texts, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.speed_texts, args.rounds = args.pairs or 500, 300, 2
    started = time.monotonic()
    gold, first, second = load_sts(Path(args.sts))
    if args.pairs:
        gold, first, second = gold[:args.pairs], first[:args.pairs], second[:args.pairs]
    texts = sorted(set(first) | set(second))
    position = {t: i for i, t in enumerate(texts)}
    i1 = np.array([position[t] for t in first])
    i2 = np.array([position[t] for t in second])
    options = backend_speed.options_from(args)
    cfgs = configs(backend_speed.keep_from(args))
    print(f"STS-B: {len(gold)} pairs, {len(texts)} distinct sentences")
    vectors, batch_gates = {}, {}
    gate_texts = gates.mixed_length_texts(corpus_lines(), 48 if args.quick else 300)
    for config in cfgs:
        t0 = time.monotonic()
        vectors[config.name], batch_gates[config.name] = encode_all(config, options, texts, gate_texts)
        print(f"  encoded with {config.name} in {time.monotonic() - t0:.1f}s; min cosine alone vs in a batch "
              f"{batch_gates[config.name].worst:.7f}")
    rows = quality_rows(vectors, gold, i1, i2)
    stats = cosine_stats(vectors, cfgs[0].name)
    print("\nSTS-B Spearman (retention vs the same backend and storage at 384 without layer norm)")
    print(quality_table(rows, [c.name for c in cfgs]))
    print("\nCosine agreement over all STS-B sentences, full width")
    print(cosine_table(stats))

    speed: list[dict] = []
    if args.speed:
        speed_texts = backend_speed.load_texts(args.speed_texts)
        print(f"\nspeed: {len(speed_texts)} texts, {args.rounds} interleaved rounds, {args.threads} threads")
        speed = backend_speed.measure(backend_speed.rows_for(backend_speed.keep_from(args)), options,
                                      speed_texts, args.rounds, batch_size=32)
        print(backend_speed.table(speed))

    decision = choose_layer_norm(rows, cfgs[0].name)
    if speed:
        decision["graphs"] = choose_graphs(speed)
        decision.update(choose_backend(rows, cfgs, speed, decision["layer_norm"], args.threads, batch_gates))
    print("\nrecommended defaults:", json.dumps(decision, indent=2))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "environment": backend_speed.environment(args.threads),
        "sts": {"file": str(args.sts), "pairs": len(gold), "sentences": len(texts)},
        "quality": rows, "cosine": stats, "speed": speed,
        "batch_gate": {name: {"min_cosine": {str(w): c for w, c in g.min_cosine.items()}, "passed": g.passed}
                       for name, g in batch_gates.items()},
        "speed_texts": args.speed_texts if args.speed else 0, "rounds": args.rounds,
        "recommendation": decision, "seconds": round(time.monotonic() - started, 1),
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

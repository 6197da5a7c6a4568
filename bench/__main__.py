"""`make bench`: start a full stack, measure it against in-process encode, report.

    .venv/bin/python -m bench [--quick] [--backend auto|torch|onnx] [--precision P] [--replicas N]

Starts its own stack (cache shard, replicas, HAProxy, frontend) on free
ports in a temporary run directory, measures cold, L1, L2 and mixed
traffic, memory and bytes on disk (see `bench.stack_bench`), checks the
figures against the issue's goals, prints a table, and writes
results/latest.json plus throughput.png and latency_cdf.png next to
it. The single-purpose scripts (bench.frontend_bench, bench.scaling_bench,
bench.shard_vs_redis, bench.backend_speed, bench.quality) go deeper on one
question each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import plots, report, shard_scale, stack_bench, tuner_phase, workloads
from deploy.settings import auto_replicas
from harness.results import RESULTS_DIR
from mlbase import tuned
from mlbase.backends import registry
from mlbase.settings import AUTO_BACKEND, DEFAULT_PRECISION

# (cold texts, cold rounds, mixed draws, 1-text requests, 64-text requests) per hit row
FULL = (1536, 6, 6000, 1500, 200)
QUICK = (256, 2, 1200, 300, 40)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"small samples (cold {QUICK[0]} texts in {QUICK[1]} rounds, mixed {QUICK[2]} texts, "
                         f"{QUICK[3]}/{QUICK[4]} requests per hit row); under 3 minutes on 2 cores")
    ap.add_argument("--backend", default=AUTO_BACKEND,
                    help=f"replica backend: {AUTO_BACKEND} (what `make up` runs: the tuner's choice for this CPU, "
                         f"tuned first when there is no record) or one of {', '.join(registry.names())} "
                         "(default: %(default)s)")
    ap.add_argument("--precision", default=None,
                    help="replica precision with an explicit --backend, one of "
                         + "; ".join(f"{b}: {', '.join(p)}" for b, p in registry.PRECISIONS.items())
                         + " (default: that backend's default)")
    ap.add_argument("--replicas", type=int, default=auto_replicas(os.cpu_count() or 1),
                    help="ML-base replicas behind HAProxy; torch threads each = max(1, cores // replicas) "
                         "(default: what `make up` starts, %(default)s)")
    ap.add_argument("--cold", type=int, default=None, help=f"cold (never-seen) texts (default {FULL[0]})")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"cold rounds, each alternating in-process encode and the stack (default {FULL[1]})")
    ap.add_argument("--mixed", type=int, default=None, help=f"texts in the mixed Zipf stream (default {FULL[2]})")
    ap.add_argument("--mixed-l1-fraction", type=float, default=0.1,
                    help="L1 size of the second mixed run's frontend as a fraction of its stream's distinct "
                         "texts, so that L2 takes part (the first runs the stack's default L1) "
                         "(default %(default)s)")
    ap.add_argument("--data", type=Path, default=None,
                    help=f"folder holding corpus.txt (default: ${workloads.DATA_ENV}, else <repo>/../shared/data)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help="folder for latest.json and the PNG plots (default results/ at the repository root)")
    ap.add_argument("--no-tune", action="store_true",
                    help="skip the tuner's table (every backend's floors and quality gates, measured in this run "
                         "with `sutra tune --quick` at the replicas' thread budget; about a minute on 2 cores)")
    ap.add_argument("--no-shard-scale", action="store_true",
                    help="skip the quick cache-shard scale run (bench.shard_scale --quick, under a minute) that follows; `python -m bench.shard_scale` runs the full one (20k to 10M entries)")
    return ap


def config_from(args: argparse.Namespace, default: tuple[str, str]) -> stack_bench.BenchConfig:
    """`default` is what `make up` runs on this machine (`--backend auto` resolved)."""
    cold, rounds, mixed, single, batch = QUICK if args.quick else FULL
    if args.backend == AUTO_BACKEND:
        if args.precision:
            raise SystemExit(f"--backend {AUTO_BACKEND} takes its precision from the tuner's record")
        backend, precision = default
    elif args.backend not in registry.names():
        raise SystemExit(f"--backend must be {AUTO_BACKEND} or one of {', '.join(registry.names())}")
    else:
        backend, precision = args.backend, args.precision or DEFAULT_PRECISION[args.backend]
    if precision not in registry.PRECISIONS[backend]:
        raise SystemExit(f"--precision {precision} needs --backend {' or '.join(registry.backends_for(precision))}")
    if args.replicas < 1:
        raise SystemExit("--replicas must be at least 1")
    if not 0 < args.mixed_l1_fraction <= 1:
        raise SystemExit("--mixed-l1-fraction must be in (0, 1]")
    return stack_bench.BenchConfig(
        backend=backend, precision=precision, replicas=args.replicas,
        cold_texts=args.cold or cold, rounds=args.rounds or rounds, mixed_draws=args.mixed or mixed,
        mixed_l1_fraction=args.mixed_l1_fraction, single_requests=single, batch_requests=batch,
        data_dir=args.data or workloads.data_dir(), quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    defaults = workloads.stack_default(args.replicas)
    cfg = config_from(args, defaults)

    result = stack_bench.run(cfg)
    cpu = tuned.cpu_identity()
    result["machine"] = {"cpus": os.cpu_count(), "cpu_model": cpu.model, "cpu_flags": list(cpu.flags),
                         "python": platform.python_version(), "platform": platform.platform(),
                         "load_average_end": os.getloadavg()}
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["command"] = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    result["make_up_default"] = {"backend": defaults[0], "precision": defaults[1]}
    if not args.no_tune:
        print("\ntuner: every backend's floors and quality gates (sutra tune --quick, nothing recorded)...")
        try:
            result["tuner"] = tuner_phase.run(result["config"]["torch_threads_per_replica"])
        except Exception as exc:  # noqa: BLE001 - the stack's figures are kept whatever the tuner does
            result["tuner"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["goals"] = report.goals(result, defaults)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "latest.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    pngs = plots.write_all(result, args.out)
    report.print_table(result)
    print(f"\nwrote {path}, " + ", ".join(str(p) for p in pngs))
    if not args.no_shard_scale:
        print("\ncache shard at scale (quick form; `python -m bench.shard_scale` for 20k..10M entries):")
        shard_scale.main(["--quick", "--out", str(args.out / "shard_scale_quick.json")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

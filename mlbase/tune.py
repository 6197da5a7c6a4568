"""`sutra tune` (also `python -m mlbase.tune`): pick the backend and precision for this CPU.

For each candidate (backend x precision: torch fp32 and bf16, onnx fp32, dynamic
int8 and static int8; openvino fp32, bf16 and int8-static on request),
in this process, on the CPU at hand:

  speed   single-text latency (tokenize + forward of one text, median) and batch
          throughput (texts/s encoding corpus lines in batches of 32, median of
          rounds in which every candidate runs in turn, so a busy machine's noise
          hits each alike), both at the replica's thread budget (--threads;
          0 = every core); also texts per CPU-second of this process
  gate 1  STS-B test Spearman within 0.5% of torch fp32 at every served width
  gate 2  a text's vector alone vs inside shuffled batches of other texts: cosine
          >= 0.9999 at every served width (mlbase.quality_gates)

The winner is the candidate with the highest batch throughput among those that
pass both gates and whose single-text latency is at most 1.5x the lowest
single-text latency among them: one new text per request is the call an
embedding server answers most, so a backend that buys some batch throughput
with a much slower lone text (torch bf16 on the Xeon: per-call overhead)
does not win. Throughputs within 3% of the best count as a tie (rounds on a
shared 2-core machine vary by more than that); a tie goes to the lower
single-text latency (the gates already call the candidates' quality equal, and
latency is what interactive callers feel), then to the smaller worst STS-B
drop. torch fp32 is the reference and always measured. The table goes to
stdout; the choice is recorded for this CPU (model name + instruction-set
flags, mlbase.tuned) in --out, where a replica started with `--backend auto`
finds it. Tune at the thread count the replicas run with (`sutra up` runs one
single-threaded replica per core): the winner can differ between 1 and 2
threads.

    sutra tune [--quick] [--threads N] [--out .run/tuned.json] [--candidates torch:fp32,onnx:fp32,...]

--quick (about 1-2 minutes on 2 cores: 48 gate texts, 160 speed texts, 2
rounds; still all 1,379 STS-B pairs, since a gate on a subset can pass what
the full set fails) is what `--tune-at-start` runs; the full run uses 300
gate texts, 1,000 speed texts and 5 rounds (a few minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from common.settings import Settings, group, load, parser_for, setting
from mlbase import quality_gates as gates
from mlbase import tuned
from mlbase.backends import registry
from mlbase.backends.onnx_export import package_version
from mlbase.data_files import CORPUS_FILE, STS_TEST_FILE, first_existing
from mlbase.settings import MLBaseSettings

REFERENCE = "torch:fp32"
# openvino is measured on request only (--candidates): it wins this table on AMX CPUs, yet loses in the
# served stack, where every new text length is a new input shape for it (README, the openvino backend).
CANDIDATES = (REFERENCE, "torch:bf16", "onnx:fp32", "onnx:int8", "onnx:int8-static")
# Throughputs within this fraction of the best are a tie (see the module doc).
CLOSE_CALL = 0.03
# A candidate whose single-text latency exceeds this multiple of the lowest among the passing
# candidates cannot win (see the module doc).
LATENCY_SPREAD = 1.5
BATCH_SIZE = 32


@dataclass(frozen=True)
class Budget:
    """How much text each measurement uses."""

    sts_pairs: int  # 0 = all
    gate_texts: int
    speed_texts: int
    rounds: int
    latency_texts: int


FULL = Budget(sts_pairs=0, gate_texts=300, speed_texts=1000, rounds=5, latency_texts=100)
# Quick still scores every STS-B pair: a gate on a subset can pass what the full set fails.
QUICK = Budget(sts_pairs=0, gate_texts=48, speed_texts=160, rounds=2, latency_texts=24)

# The replica settings the tuner uses (the rest are about serving, not computing vectors).
_TUNED_BY = ("model_path", "threads", "max_seq_length", "onnx_cache_dir", "calibration_file", "calibration_texts",
             "tuned_file", "allowed_widths", "min_width", "layer_norm")


@dataclass(frozen=True)
class TuneSettings(Settings):
    ENV_PREFIX = "SUTRA_TUNE_"

    replica: MLBaseSettings = group(
        MLBaseSettings, omit=tuple(f.name for f in fields(MLBaseSettings) if f.name not in _TUNED_BY),
        overrides={"tuned_file": {"flag": "out", "help": "where to record the choice for this CPU (other CPUs' "
                                                         "records in the file are kept); replicas read it with "
                                                         "--backend auto --tuned FILE"},
                   "threads": {"help": "the replica's thread budget, at which every candidate is measured; "
                                       "0 = every core"}})
    quick: bool = setting(False, "about 1-2 minutes on 2 cores instead of several: 48 gate texts, 160 speed texts, "
                                 "2 rounds (still every STS-B pair)")
    candidates: tuple[str, ...] = setting(
        CANDIDATES, f"backend:precision pairs to measure; {REFERENCE} (the quality reference) is always added")

    def problems(self) -> list[str]:
        problems = []
        for candidate in self.candidates:
            backend, _, precision = candidate.partition(":")
            if precision not in registry.PRECISIONS.get(backend, ()):
                problems.append(f"--candidates: {candidate!r} is not backend:precision with one of "
                                + ", ".join(f"{b}:{p}" for b, ps in registry.PRECISIONS.items() for p in ps))
        return problems

    @property
    def budget(self) -> Budget:
        return QUICK if self.quick else FULL

    @property
    def threads(self) -> int:
        return self.replica.threads or os.cpu_count() or 1


@dataclass
class Result:
    """One candidate's measurements."""

    candidate: str
    # What a replica would be told to run; keep_fp32 and label are filled in once loaded.
    choice: tuned.Choice
    fingerprint: str = ""
    load_seconds: float = 0.0
    sts: gates.StsGate | None = None
    batch: gates.BatchGate | None = None
    seconds: list[float] = dataclasses.field(default_factory=list)
    cpu_seconds: list[float] = dataclasses.field(default_factory=list)
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    texts: int = 0
    error: str = ""

    @property
    def texts_per_s(self) -> float:
        return self.texts / statistics.median(self.seconds) if self.seconds else 0.0

    @property
    def texts_per_cpu_s(self) -> float:
        return self.texts / statistics.median(self.cpu_seconds) if self.cpu_seconds else 0.0

    @property
    def latency_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def passed(self) -> bool:
        return not self.error and self.sts is not None and self.sts.passed and self.batch is not None \
            and self.batch.passed

    def to_json(self, reference_speed: float) -> dict:
        out = {"candidate": self.candidate, **dataclasses.asdict(self.choice), "fingerprint": self.fingerprint,
               "passed": self.passed, "error": self.error, "load_seconds": round(self.load_seconds, 2)}
        if self.error:
            return out
        out.update({
            "latency_ms": round(self.latency_ms, 3), "texts_per_s": round(self.texts_per_s, 1),
            "x_reference": round(self.texts_per_s / reference_speed, 3) if reference_speed else None,
            "texts_per_cpu_s": round(self.texts_per_cpu_s, 1), "seconds": [round(s, 4) for s in self.seconds],
            "sts_spearman": {str(w): round(r, 5) for w, r in self.sts.spearman.items()},
            "sts_drop_pct": {str(w): round(100 * d, 3) for w, d in self.sts.drops.items()},
            "sts_passed": self.sts.passed,
            "batch_min_cosine": {str(w): round(c, 7) for w, c in self.batch.min_cosine.items()},
            "batch_passed": self.batch.passed,
        })
        return out


# ---- measuring ---------------------------------------------------------------------------------

def served_widths(settings: MLBaseSettings, native_width: int) -> tuple[int, ...]:
    """The widths the gates check: the allowed ones, else the standard ones the model has."""
    widths = settings.allowed_widths or tuple(w for w in gates.WIDTHS if settings.min_width <= w <= native_width)
    return tuple(sorted(set(widths) | {native_width}, reverse=True))


def build(candidate: str, settings: TuneSettings):
    """A loaded backend for `candidate`, with the replica's options for that precision."""
    backend_name, _, precision = candidate.partition(":")
    replica = dataclasses.replace(settings.replica, backend_name=backend_name, precision=precision,
                                  threads=settings.threads, int8_keep_fp32=None)
    backend = registry.create(backend_name, replica.backend)
    backend.load()
    return backend, replica.backend.keep_fp32


def corpus_lines() -> list[str]:
    from mlbase.data_files import distinct_lines

    return distinct_lines(first_existing((CORPUS_FILE,)))


def speed_rounds(loaded: Sequence[tuple[Result, object]], texts: Sequence[str], budget: Budget,
                      say) -> None:
    """Rounds in which every candidate, in turn, encodes `texts` in batches and then the first
    `latency_texts` one at a time. Each candidate runs a whole block before the next starts
    (switching libraries per text let one's spinning threads slow the other), and the
    order rotates every round so that none always follows the same neighbour."""
    single = texts[:budget.latency_texts]
    for _, backend in loaded:  # warm-up: allocations, thread pools, per-shape kernels
        backend.encode(texts[:BATCH_SIZE], batch_size=BATCH_SIZE)
        for text in single:
            backend.encode([text])
    for r in range(budget.rounds):
        for result, backend in loaded[r % len(loaded):] + loaded[:r % len(loaded)]:
            started, cpu_started = time.perf_counter(), time.process_time()
            backend.encode(texts, batch_size=BATCH_SIZE)
            result.seconds.append(time.perf_counter() - started)
            result.cpu_seconds.append(time.process_time() - cpu_started)
            result.texts = len(texts)
            for text in single:
                started = time.perf_counter()
                backend.encode([text])
                result.latencies_ms.append(1000 * (time.perf_counter() - started))
        say(f"  speed round {r + 1}/{budget.rounds}: "
            + ", ".join(f"{res.candidate} {len(texts) / res.seconds[-1]:.0f}" for res, _ in loaded) + " texts/s")


def measure(settings: TuneSettings, say=print) -> list[Result]:
    budget = settings.budget
    pairs = gates.StsPairs.load(first_existing((STS_TEST_FILE,)), budget.sts_pairs)
    lines = corpus_lines()
    speed_texts = lines[:budget.speed_texts]
    gate_texts = gates.mixed_length_texts(lines[budget.speed_texts:] or lines, budget.gate_texts)
    candidates = list(dict.fromkeys((REFERENCE, *settings.candidates)))
    say(f"tuning on {tuned.cpu_identity().key}, {settings.threads} threads, {'quick' if settings.quick else 'full'}: "
        f"{len(pairs.gold)} STS-B pairs, {len(gate_texts)} gate texts, {len(speed_texts)} speed texts x "
        f"{budget.rounds} rounds")
    results: list[Result] = []
    loaded: list[tuple[Result, object]] = []
    reference: dict[int, float] = {}
    for candidate in candidates:
        backend_name, _, precision = candidate.partition(":")
        result = Result(candidate, tuned.Choice(backend_name, precision, ()))
        results.append(result)
        started = time.monotonic()
        try:
            backend, keep_fp32 = build(candidate, settings)
        except Exception as exc:  # a candidate this machine cannot run is reported, not fatal
            if candidate == REFERENCE:
                raise
            result.error = f"{type(exc).__name__}: {exc}"
            say(f"  {candidate}: cannot load: {result.error}")
            continue
        result.load_seconds = time.monotonic() - started
        description = backend.describe()
        result.choice = dataclasses.replace(result.choice, keep_fp32=keep_fp32, label=description.precision)
        result.fingerprint = description.fingerprint()
        widths = served_widths(settings.replica, description.native_width)
        result.batch = gates.batch_gate(backend, gate_texts, widths, settings.replica.layer_norm)
        vectors, _ = backend.encode(pairs.sentences, batch_size=64)
        rho = gates.sts_spearman(vectors, pairs, widths, settings.replica.layer_norm)
        reference = reference or rho  # the first candidate is the reference
        result.sts = gates.sts_gate(rho, reference)
        loaded.append((result, backend))
        say(f"  {candidate}: loaded in {result.load_seconds:.1f}s, worst STS-B drop "
            f"{100 * result.sts.worst_drop:.2f}%, min cosine alone vs batch {result.batch.worst:.7f}")
    speed_rounds(loaded, speed_texts, budget, say)
    return results


# ---- deciding and reporting -------------------------------------------------------------------

RULE = (f"highest batch texts/s among candidates passing both gates (STS-B within "
        f"{100 * gates.STS_TOLERANCE:.1f}% of {REFERENCE} at every width; alone-vs-batch cosine >= "
        f"{gates.MIN_BATCH_COSINE}) and single-text latency at most {LATENCY_SPREAD}x the lowest among "
        f"them; within {100 * CLOSE_CALL:.0f}% of the best is a tie, won by the lower single-text latency, "
        f"then the smaller worst STS-B drop")


def decide(results: Sequence[Result]) -> Result | None:
    passing = [r for r in results if r.passed and r.texts_per_s > 0]
    if not passing:
        return None
    quickest = min(r.latency_ms for r in passing)
    eligible = [r for r in passing if r.latency_ms <= quickest * LATENCY_SPREAD]
    best = max(r.texts_per_s for r in eligible)
    tied = [r for r in eligible if r.texts_per_s >= best * (1 - CLOSE_CALL)]
    return min(tied, key=lambda r: (r.latency_ms, r.sts.worst_drop))


def table(results: Sequence[Result], threads: int) -> str:
    reference = next((r.texts_per_s for r in results if r.candidate == REFERENCE), 0.0)
    widths = next((tuple(r.sts.spearman) for r in results if r.sts is not None), gates.WIDTHS)
    head = (f"{'candidate':18s} {'latency ms':>10s} {'texts/s':>8s} {'x ' + REFERENCE:>12s} {'texts/CPU-s':>11s} "
            + " ".join(f"{'rho@' + str(w):>14s}" for w in widths)
            + f" {'STS gate':>8s} {'min cos batch':>13s} {'batch gate':>10s} {'verdict':>7s}")
    lines = [f"threads: {threads}; rho@w: STS-B Spearman at width w (drop vs {REFERENCE})", head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.candidate:18s} cannot run here: {r.error}")
            continue
        cells = " ".join(f"{r.sts.spearman[w]:.4f} ({100 * r.sts.drops[w]:+.2f}%)".rjust(14) for w in widths)
        lines.append(f"{r.candidate:18s} {r.latency_ms:10.2f} {r.texts_per_s:8.0f} "
                     f"{(r.texts_per_s / reference if reference else 0):12.2f} {r.texts_per_cpu_s:11.0f} {cells} "
                     f"{'pass' if r.sts.passed else 'FAIL':>8s} {r.batch.worst:13.7f} "
                     f"{'pass' if r.batch.passed else 'FAIL':>10s} {'pass' if r.passed else 'FAIL':>7s}")
    return "\n".join(lines)


def record(settings: TuneSettings, results: Sequence[Result], winner: Result | None, seconds: float) -> dict:
    reference = next((r.texts_per_s for r in results if r.candidate == REFERENCE), 0.0)
    return {
        "choice": dataclasses.asdict(winner.choice) if winner else None,
        "rule": RULE,
        "candidates": [r.to_json(reference) for r in results],
        "model_digest": tuned.model_digest(settings.replica.model_path),
        "model_path": settings.replica.model_path,
        "threads": settings.threads,
        "mode": "quick" if settings.quick else "full",
        "budget": dataclasses.asdict(settings.budget),
        "versions": {p: package_version(p) for p in ("torch", "onnxruntime", "openvino", "sentence-transformers",
                                                     "transformers")},
        "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "load_average": list(os.getloadavg()),
    }


def run(settings: TuneSettings) -> int:
    started = time.monotonic()

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = measure(settings, say)
    winner = decide(results)
    print(table(results, settings.threads))
    cpu = tuned.cpu_identity()
    out = Path(settings.replica.tuned_file)
    tuned.write(out, cpu, record(settings, results, winner, time.monotonic() - started))
    if winner is None:
        print(f"no candidate passed both gates; recorded that for {cpu.key} in {out}")
        return 1
    print(f"winner: {winner.candidate} ({winner.choice.label}), {winner.texts_per_s:.0f} texts/s at {settings.threads} "
          f"threads; recorded for {cpu.key} in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(TuneSettings, prog="python -m mlbase.tune", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(load(TuneSettings, argv, parser))


if __name__ == "__main__":
    raise SystemExit(main())

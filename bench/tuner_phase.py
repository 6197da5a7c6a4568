"""The tuner's table inside `make bench`: every backend's in-process floors and both quality gates,
measured in the same run as the stack they are compared with.

`sutra tune` records its choice once per CPU, and `make up` then runs what the record says, so a
bench that only read the record would show figures from another day and another load. This
phase runs the tuner's own measurement (`mlbase.tune.measure`, quick mode: every STS-B pair, 48
gate texts, 160 speed texts, 2 rounds) at the replicas' thread budget, in this process, after the
stack is down, and keeps the table and each candidate's figures in latest.json. It records
nothing: the stack's record (`.run/tuned.json`) is left as it is. The tuner's decision rule is
applied to this run's figures, so the bench also says whether today's winner is the backend the
stack ran.
"""

from __future__ import annotations

import time

from common.settings import load, parser_for
from mlbase import tune


def run(threads: int, say=print) -> dict:
    """The quick tune at `threads`: {"table", "winner", "record"} (record as `sutra tune` writes it)."""
    parser = parser_for(tune.TuneSettings, prog="bench tuner phase")
    settings = load(tune.TuneSettings, ["--quick", "--threads", str(threads)], parser)
    started = time.monotonic()
    results = tune.measure(settings, say)
    winner = tune.decide(results)
    return {"table": tune.table(results, settings.threads),
            "winner": winner.candidate if winner is not None else None,
            "record": tune.record(settings, results, winner, time.monotonic() - started)}


def summary_lines(phase: dict, ran: tuple[str, str]) -> list[str]:
    """The table, then which candidate today's figures pick against what the stack ran."""
    if "error" in phase:
        return [f"tuner: failed in this run ({phase['error']}); the stack's figures above stand"]
    lines = [f"tuner (quick, measured in this run; {phase['record']['seconds']:.0f} s):", *phase["table"].splitlines()]
    stack = f"{ran[0]}:{ran[1]}"
    winner = phase["winner"]
    if winner is None:
        lines.append("  no candidate passed both gates in this run")
    else:
        verdict = "the backend the stack ran" if winner == stack else f"the stack ran {stack}"
        lines.append(f"  this run's winner by the tuner's rule: {winner} ({verdict})")
    return lines

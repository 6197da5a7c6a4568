"""Turns a `bench.stack_bench` result into the printed table and the goal verdicts.

The goals are the issue's targets for this machine; they are checked against
the figures of one run and recorded next to them, never asserted in tests.
"""

from __future__ import annotations

from collections.abc import Callable

from bench import tuner_phase
from bench.interactive import row_at

Printer = Callable[[str], None]
TORCH = "torch fp32"


def goals(result: dict, default_backend: tuple[str, str]) -> list[dict]:
    """Each goal: name, target, measured value, met (None when this run cannot tell)."""
    cold, same = result["cold"], result["same_backend_engine"]
    ran = (result["stack"]["backend"], result["stack"]["precision"].split("+", 1)[0])
    best = cold["best_in_process"]
    vs_torch = best[TORCH]["stack_ratio"]
    single_p50 = max(result["l1"][f"1-text {enc}"]["latency"]["p50_ms"] for enc in ("float", "packed"))
    floors = result["interactive"]["floors"]
    eight, one = row_at(result, 8), row_at(result, 1)
    out = [
        {"goal": f"stack cold >= 0.9x in-process, same backend ({best[same]['baseline']}, the faster thread count)",
         "target": 0.9, "measured": best[same]["stack_ratio"]},
        {"goal": f"default backend ({' '.join(default_backend)}) stack cold >= 2.5x in-process torch "
                 f"({best[TORCH]['baseline']}, the faster thread count)",
         "target": 2.5, "measured": vs_torch if ran == default_backend else None,
         "note": "" if ran == default_backend else f"this run used {' '.join(ran)}; stack/torch = {vs_torch:.2f}"},
        {"goal": f"8 single-text clients >= 0.8x in-process batch throughput, same backend ({best[same]['baseline']})",
         "target": 0.8, "measured": eight["req_per_s"] / best[same]["texts_per_s"],
         "note": budget_note(eight, best[same]["texts_per_s"], result["config"]["cores"], 0.8)},
        {"goal": f"8 single-text clients: p50 <= 2x in-process time for those 8 texts as one batch "
                 f"({floors['all_cores']['engine']}: {floors['all_cores']['batch8_p50_ms']:.1f} ms)",
         "target": 2.0, "measured": eight["p50_ms"] / floors["all_cores"]["batch8_p50_ms"], "lower_is_better": True,
         "inclusive": True},
        {"goal": f"1 client, 1 text: p50 <= 2x in-process single-text encode at the replica's thread budget "
                 f"({floors['replica_threads']['engine']}: {floors['replica_threads']['single_p50_ms']:.1f} ms)",
         "target": 2.0, "measured": one["p50_ms"] / floors["replica_threads"]["single_p50_ms"],
         "lower_is_better": True, "inclusive": True},
        {"goal": "L1-hit single-text p50 < 1 ms (worse of float and packed)", "target": 1.0,
         "measured": single_p50, "lower_is_better": True},
        {"goal": "85%-repeat mixed workload >= 5x cold throughput (cold client with as many misses in flight as "
                 "the cold run; cold measured right before and after)", "target": 5.0,
         "measured": result["mixed"]["saturating"]["vs_cold_adjacent"],
         "note": f"serving client (8-text requests, 128 texts in flight) "
                 f"{result['mixed']['serving']['vs_cold_adjacent']:.2f}x; bulk client (128 texts in flight) "
                 f"{result['mixed']['bulk']['vs_cold_adjacent']:.2f}x"},
        {"goal": "<= 900 bytes on disk per cached entry (full width, every width served)", "target": 900.0,
         "measured": result["disk"]["bytes_per_entry"], "lower_is_better": True, "inclusive": True},
    ]
    for g in out:
        m = g["measured"]
        if m is None:
            g["met"] = None
        elif g.get("lower_is_better"):
            g["met"] = bool(m <= g["target"] if g.get("inclusive") else m < g["target"])
        else:
            g["met"] = bool(m >= g["target"])
    return out


def budget_note(row: dict, in_process_rate: float, cores: int, share: float) -> str:
    """What `share` of the in-process rate allows per request (every core's time, divided among the
    requests), beside what the row's requests cost; the gap says whether any scheduling could reach it."""
    ms = row.get("ms_per_request")
    if not ms:
        return ""
    budget = 1000 * cores / (share * in_process_rate)
    cpu = sum(v for k, v in ms.items() if ":" not in k)
    inference = ms.get("replicas: inference", 0.0)
    return (f"{share}x allows {budget:.2f} ms of CPU per request on {cores} cores; each cost {cpu:.2f} "
            f"(forward passes {inference:.2f}, everything else {cpu - inference:.2f})")


def _verdict(met: bool | None) -> str:
    return {True: "MET", False: "NOT MET", None: "n/a"}[met]


def print_mixed(m: dict, out: Printer) -> None:
    s = m["cache_stats"]
    out("")
    out(f"{m['title']}: {m['texts']} texts ({m['distinct']} distinct, {m['repeat_share']:.1%} repeats, Zipf "
        f"s={m['zipf_exponent']:.2f}), {m['request_texts']} per request, {m['inflight']} in flight, "
        f"L1 {m['l1_entries']} entries")
    out(f"  {m['texts_per_s']:.1f} texts/s = {m['vs_cold_adjacent']:.1f}x cold right before/after "
        f"({m['vs_cold']:.1f}x the cold phase); request p50 {m['latency']['p50_ms']:.1f} ms, "
        f"p99 {m['latency']['p99_ms']:.1f} ms")
    out(f"  GetCacheStats deltas: L1 hit rate {s['l1']['hit_rate']:.1%} ({s['l1']['hits']}/"
        f"{s['l1']['hits'] + s['l1']['misses']}), L2 hit rate {s['l2']['hit_rate']:.1%} of L1 misses "
        f"({s['l2']['hits']}/{s['l2']['hits'] + s['l2']['misses']}), computed {s['computed']}, "
        f"coalesced {s['coalesced']}; {m['computed_texts_per_s']:.0f} texts/s computed")
    a = m["answered_from"]
    out(f"  per text: L1 {a['l1']:.1%}, L2 {a['l2']:.1%}, repeat within a request {a['duplicate_in_request']:.1%}, "
        f"computed {a['computed']:.1%}")


def print_table(result: dict, out: Printer = print) -> None:
    cfg, st, cold = result["config"], result["stack"], result["cold"]
    out("")
    out(f"sutra-embed benchmark: {st['backend']} {st['precision']}, {st['replicas']} replica(s) x "
        f"{cfg['torch_threads_per_replica']} thread(s), {cfg['cores']} cores"
        f"{' (quick)' if cfg['quick'] else ''}; stack up in {st['startup_s']:.1f}s")
    machine = result.get("machine", {})
    if "cpu_model" in machine:
        out(f"CPU: {machine['cpu_model']} [{' '.join(machine['cpu_flags'])}]")
    out("")
    out(f"cold: {cold['texts']} never-seen texts, {cold['request_texts']} per request, {cold['inflight']} in flight, "
        f"{len(cold['rounds'])} rounds alternating with in-process encode ({cfg['in_process_threads']} threads, "
        f"batch {cfg['in_process_batch']})")
    out(f"  {'workload':44}{'texts/s':>10}{'stack ratio':>13}{'CPU ms/text':>13}{'CPU ratio':>11}")
    out(f"  {'stack (all misses)':44}{cold['stack_texts_per_s']:>10.1f}{'':>13}"
        f"{cold['stack_cpu_ms_per_text']:>13.2f}{'':>11}  request p50 {cold['latency']['p50_ms']:.0f} ms, "
        f"p99 {cold['latency']['p99_ms']:.0f} ms")
    for name, row in cold["in_process"].items():
        cpu_ratio = f"{row['cpu_ratio']:>10.2f}x" if row["cpu_ratio"] else f"{'-':>11}"
        out(f"  {'in-process ' + name:44}{row['texts_per_s']:>10.1f}{row['stack_ratio']:>12.2f}x"
            f"{row['cpu_ms_per_text']:>13.2f}{cpu_ratio}")
    out("  (stack ratio = in-process seconds / stack seconds on the same texts; CPU = every stack process vs this "
        "process while encoding; load average per round in latest.json)")
    if not cold["all_misses"]:
        out(f"  (warning: {cold['computed']} of {cold['texts']} cold texts were computed)")
    out("")
    fl = result["interactive"]["floors"]
    out(f"interactive: one new text per request; in-process floors: {fl['replica_threads']['engine']} one text "
        f"p50 {fl['replica_threads']['single_p50_ms']:.1f} ms, {fl['all_cores']['engine']} 8 texts as one batch "
        f"p50 {fl['all_cores']['batch8_p50_ms']:.1f} ms")
    sweep = result["interactive"]["sweep"]
    parts = list(sweep[0].get("ms_per_request", {}))
    out(f"  {'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}  {'computed':10}"
        + ("CPU ms per request: " + ", ".join(parts) if parts else ""))
    for row in sweep:
        costs = row.get("ms_per_request", {})
        out(f"  {row['concurrency']:>8}{row['req_per_s']:>9.1f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}  "
            f"{str(row['computed']) + '/' + str(row['requests']):10}" + " ".join(f"{costs[k]:.2f}" for k in parts))
    if parts:
        out("  (CPU of each part's processes per request; 'replicas: inference' is the part of the replicas' "
            "time spent in forward passes)")
    out("")
    out(f"cache hits: embeddings/s with {result['l1']['1-text float']['concurrency']} requests in flight, "
        "latency one request at a time")
    out(f"  {'level':6}{'request':18}{'embeddings/s':>14}{'p50 ms':>9}{'p99 ms':>9}  usage")
    for level in ("l1", "l2"):
        for name, row in result[level].items():
            u = row["usage"]
            out(f"  {level.upper():6}{name:18}{row['embeddings_per_s']:>14.0f}{row['latency']['p50_ms']:>9.2f}"
                f"{row['latency']['p99_ms']:>9.2f}  L1 {u['l1_hits']} L2 {u['l2_hits']} computed {u['computed']}")
    ref = result["mixed_cold_reference"]
    out("")
    out(f"mixed streams: cold reference right before/after them {ref['before_texts_per_s']:.0f}/"
        f"{ref['after_texts_per_s']:.0f} texts/s ({ref['texts']} never-seen texts, cold client)")
    for run in result["mixed"].values():
        print_mixed(run, out)
    d = result["disk"]
    out("")
    out(f"disk: {d['bytes_per_entry']:.0f} bytes per entry ({d['entries']} entries, {d['sst_bytes']} SST bytes; "
        f"key {d['payload_bytes']['key']} + value {d['payload_bytes']['value']} = {d['payload_bytes']['sum']} payload); "
        f"method: {d['method']}")
    out("RSS (MiB): " + ", ".join(f"{k} {v}" for k, v in result["rss_mib"].items()))
    if "tuner" in result:
        out("")
        for line in tuner_phase.summary_lines(result["tuner"], (cfg["backend"], cfg["precision"])):
            out(line)
    out("")
    out("goals:")
    for g in result["goals"]:
        shown = "-" if g["measured"] is None else f"{g['measured']:.2f}"
        note = f"  ({g['note']})" if g.get("note") else ""
        out(f"  {_verdict(g['met']):8} {g['goal']}: {shown}{note}")
    out(f"\n{result['total_seconds']:.0f}s in all; phases: "
        + ", ".join(f"{k} {v}s" for k, v in result["phase_seconds"].items()))

"""Unit checks of the benchmark's own logic: where data comes from, how the
corpus is split, the mixed stream's repeat share, the statistics, the goal
verdicts and the files written. No timing is asserted; nothing is started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import datasets, plots, report, stack_bench, workloads


def test_data_dir_prefers_env_then_shared_then_the_committed_copies(tmp_path):
    shared = workloads.ROOT.parent / "shared" / "data"
    expected = shared if (shared / "corpus.txt").exists() else datasets.BUNDLED
    assert workloads.data_dir({}) == expected
    assert workloads.data_dir({workloads.DATA_ENV: str(tmp_path)}) == tmp_path
    # The committed copies are enough for every benchmark and the quality evaluation.
    assert len(datasets.corpus_lines(datasets.BUNDLED)) > 10_000
    assert (datasets.BUNDLED / "sts-test.tsv").exists()


def test_corpus_lines_strip_and_drop_blanks_and_duplicates(tmp_path):
    (tmp_path / "corpus.txt").write_text("a\n  b \n\na\nc\n", encoding="utf-8")
    assert workloads.corpus_lines(tmp_path) == ["a", "b", "c"]
    with pytest.raises(SystemExit, match="not found"):
        workloads.corpus_lines(tmp_path, "missing.txt")


def test_split_is_disjoint_and_refuses_a_small_corpus():
    lines = [f"text {i}" for i in range(2000)]
    split = workloads.split_corpus(lines, cold=300, spare=100, warmup=50)
    parts = [split.warmup, split.cold, split.spare, split.mixed_pool]
    assert [len(p) for p in parts] == [50, 300, 100, 1000]
    assert len(set().union(*map(set, parts))) == sum(len(p) for p in parts)
    with pytest.raises(SystemExit, match="too few"):
        workloads.split_corpus(lines, cold=900, spare=100, warmup=50)


def test_mixed_stream_repeats_about_85_percent_and_is_deterministic():
    pool = [f"q{i}" for i in range(3000)]
    a = workloads.mixed_stream(pool, 2000)
    b = workloads.mixed_stream(pool, 2000)
    assert a.texts == b.texts
    assert len(a.texts) == 2000 and set(a.texts) <= set(pool)
    assert abs(a.repeat_share - workloads.REPEAT_TARGET) < 0.02
    assert a.distinct == len(set(a.texts))


def test_latency_summary_quantiles_in_ms():
    s = workloads.latency_summary([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["n"] == 100
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["max_ms"] == pytest.approx(100.0)
    q = s["quantiles_ms"]
    assert len(q) == 101 and q == sorted(q) and q[0] == pytest.approx(1.0)
    assert workloads.latency_summary([]) == {"n": 0}


def test_ratio_of_sums():
    assert workloads.ratio_of_sums([2.0, 4.0], [1.0, 2.0]) == pytest.approx(2.0)


def _latency(p50: float) -> dict:
    return workloads.latency_summary([p50 / 1000] * 10)


def _hits(p50: float) -> dict:
    return {f"{size}-text {enc}": {"request_texts": size, "encoding": enc, "embeddings_per_s": 1000.0 * size,
                                   "concurrency": 8, "latency": _latency(p50),
                                   "usage": {"l1_hits": 1, "l2_hits": 0, "computed": 0}}
            for size in (1, 64) for enc in ("float", "packed")}


def _mixed(title: str, vs_cold: float) -> dict:
    stats = {"hits": 8, "misses": 2, "hit_rate": 0.8, "errors": 0}
    return {"title": title, "texts": 100, "distinct": 15, "repeat_share": 0.85, "zipf_exponent": 1.4,
            "request_texts": 8, "inflight": 16, "l1_entries": 10000, "texts_per_s": 100.0 * vs_cold,
            "vs_cold": vs_cold, "vs_cold_adjacent": vs_cold, "latency": _latency(5.0),
            "cache_stats": {"l1": stats, "l2": stats, "computed": 15, "coalesced": 0}, "computed_texts_per_s": 50.0,
            "answered_from": {"l1": 0.6, "l2": 0.1, "duplicate_in_request": 0.1, "computed": 0.2}}


def _interactive(rate8: float, p50_8: float, p50_1: float) -> dict:
    rows = [{"concurrency": c, "requests": 64, "req_per_s": rate8 * min(c, 8) / 8, "p50_ms": p50_1 if c == 1 else p50_8,
             "p99_ms": 2 * p50_8, "computed": 64, "latency": _latency(p50_8)} for c in (1, 2, 4, 8, 16, 32)]
    floors = {"replica_threads": {"engine": "onnx int8, 1 thread", "single_p50_ms": 5.0, "batch8_p50_ms": 20.0},
              "all_cores": {"engine": "onnx int8, 2 threads", "single_p50_ms": 3.0, "batch8_p50_ms": 12.0}}
    return {"floors": floors, "sweep": rows}


def result_doc(backend=("onnx", "int8"), cold_ratio=2.6, l1_p50=0.4, mixed=6.0, per_entry=812.0,
               rate8=160.0, p50_8=20.0, p50_1=8.0) -> dict:
    engine = " ".join(backend)
    rows = {"torch fp32, 2 threads": 100.0, "torch fp32, 1 thread": 120.0, f"{engine}, 2 threads": 190.0}
    in_process = {name: {"texts_per_s": tps, "stack_ratio": 240.0 / tps, "cpu_ms_per_text": 5.0, "cpu_ratio": 1.0}
                  for name, tps in rows.items()}
    best = {"torch fp32": {"baseline": "torch fp32, 1 thread", "texts_per_s": 120.0, "stack_ratio": cold_ratio},
            engine: {"baseline": f"{engine}, 2 threads", "texts_per_s": 190.0, "stack_ratio": cold_ratio / 1.5}}
    return {
        "config": {"backend": backend[0], "precision": backend[1], "cores": 2, "quick": True,
                   "torch_threads_per_replica": 1, "in_process_threads": 2, "in_process_batch": 32},
        "stack": {"backend": backend[0], "precision": backend[1], "replicas": 3, "startup_s": 10.0},
        "same_backend_engine": engine,
        "cold": {"texts": 64, "rounds": [{}], "request_texts": 32, "inflight": 4, "computed": 64, "all_misses": True,
                 "stack_texts_per_s": 240.0, "stack_cpu_ms_per_text": 4.0, "latency": _latency(100.0),
                 "in_process": in_process, "best_in_process": best},
        "interactive": _interactive(rate8, p50_8, p50_1),
        "l1": _hits(l1_p50), "l2": _hits(0.9),
        "mixed": {"serving": _mixed("serving", mixed - 1), "bulk": _mixed("bulk", mixed - 1),
                  "saturating": _mixed("saturating", mixed)},
        "mixed_cold_reference": {"texts": 32, "texts_per_s": 240.0, "computed": 32,
                                 "before_texts_per_s": 240.0, "after_texts_per_s": 240.0},
        "disk": {"bytes_per_entry": per_entry, "entries": 100, "sst_bytes": int(per_entry * 100), "method": "m",
                 "payload_bytes": {"key": 16, "value": 774, "sum": 790}},
        "rss_mib": {"frontend": 60.0}, "phase_seconds": {"cold": 1.0}, "total_seconds": 2.0,
    }


def test_goals_met_and_missed_by_the_numbers():
    verdicts = {g["goal"].split(" (")[0]: g["met"] for g in report.goals(result_doc(), ("onnx", "int8"))}
    assert all(verdicts.values()), verdicts
    bad = result_doc(cold_ratio=1.2, l1_p50=1.5, mixed=4.0, per_entry=901.0, rate8=150.0, p50_8=25.0, p50_1=10.5)
    met = [g["met"] for g in report.goals(bad, ("onnx", "int8"))]
    # same-backend ratio 0.8 < 0.9, 1.2 < 2.5, 150/190 < 0.8, 25/12 > 2, 10.5/5 > 2, 1.5 ms >= 1 ms, 4x < 5x,
    # 901 > 900
    assert met == [False] * 8


def test_saturating_client_keeps_the_cold_runs_misses_in_flight():
    size, inflight = stack_bench.saturating_client(0.85)
    misses_in_flight = size * inflight * (1 - 0.85)
    assert size == 32 and abs(misses_in_flight - 32 * 4) <= size


def test_default_backend_goal_is_not_judged_on_another_backend():
    goals = report.goals(result_doc(backend=("torch", "fp32")), ("onnx", "int8"))
    default_goal = goals[1]
    assert default_goal["met"] is None and "torch fp32" in default_goal["note"]


def test_table_and_plots_from_a_result_document(tmp_path):
    doc = result_doc()
    doc["goals"] = report.goals(doc, ("onnx", "int8"))
    doc["machine"] = {"cpu_model": "Some Xeon", "cpu_flags": ["avx512_vnni", "amx_int8"]}
    lines: list[str] = []
    report.print_table(doc, out=lines.append)
    text = "\n".join(lines)
    assert "MET" in text and "812 bytes per entry" in text and "one new text per request" in text
    assert "CPU: Some Xeon [avx512_vnni amx_int8]" in text
    paths = plots.write_all(doc, tmp_path)
    assert [p.name for p in paths] == ["throughput.png", "latency_cdf.png", "latency_throughput.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "latest.json").write_text(json.dumps(doc))
    assert plots.main([str(tmp_path / "latest.json"), "--out", str(tmp_path / "again")]) == 0
    assert (Path(tmp_path) / "again" / "throughput.png").exists()


def test_single_text_rows_show_where_each_request_goes_and_the_budget_of_the_throughput_goal():
    doc = result_doc()
    costs = {"replicas": 6.0, "replicas: inference": 4.0, "frontend": 2.0, "cache shard": 0.5, "haproxy": 0.2,
             "client": 0.5}
    for row in doc["interactive"]["sweep"]:
        row["ms_per_request"] = costs
    goal = report.goals(doc, ("onnx", "int8"))[2]
    # 2 cores / (0.8 x 190 texts/s) = 13.16 ms per request; the requests cost 9.2, 4.0 of it in forward passes.
    assert goal["goal"].startswith("8 single-text clients >= 0.8x")
    assert "allows 13.16 ms of CPU per request on 2 cores; each cost 9.20 (forward passes 4.00, " \
           "everything else 5.20)" in goal["note"]
    doc["goals"] = report.goals(doc, ("onnx", "int8"))
    lines: list[str] = []
    report.print_table(doc, out=lines.append)
    text = "\n".join(lines)
    assert "CPU ms per request: replicas, replicas: inference, frontend, cache shard, haproxy, client" in text
    assert "6.00 4.00 2.00 0.50 0.20 0.50" in text
    # Documents from before the split still print and judge.
    assert report.budget_note(result_doc()["interactive"]["sweep"][3], 190.0, 2, 0.8) == ""


@pytest.mark.parametrize("winner, verdict", [("onnx:int8", "(the backend the stack ran)"),
                                             ("torch:bf16", "(the stack ran onnx:int8)"),
                                             (None, "no candidate passed both gates in this run")])
def test_table_shows_the_tuner_phase_and_whether_its_winner_is_what_the_stack_ran(winner, verdict):
    doc = result_doc()
    doc["goals"] = report.goals(doc, ("onnx", "int8"))
    doc["tuner"] = {"table": "candidate  latency ms\ntorch:fp32  11.40", "winner": winner, "record": {"seconds": 63.2}}
    lines: list[str] = []
    report.print_table(doc, out=lines.append)
    text = "\n".join(lines)
    assert "tuner (quick, measured in this run; 63 s):" in text and "torch:fp32  11.40" in text
    assert verdict in text


def test_table_says_when_the_tuner_phase_failed():
    doc = result_doc()
    doc["goals"] = report.goals(doc, ("onnx", "int8"))
    doc["tuner"] = {"error": "FileNotFoundError: sts-test.tsv"}
    lines: list[str] = []
    report.print_table(doc, out=lines.append)
    assert "tuner: failed in this run (FileNotFoundError: sts-test.tsv)" in "\n".join(lines)


def test_backend_flags_follow_make_up_and_the_registry():
    """--backend auto (the default) measures what `make up` runs; explicit backends take any precision
    the registry lists for them, and nothing else."""
    from bench import __main__ as cli

    def config(*argv):
        return cli.config_from(cli.build_parser().parse_args(["--quick", *argv]), ("onnx", "int8-static"))

    assert (config().backend, config().precision) == ("onnx", "int8-static")
    assert (config("--backend", "torch").backend, config("--backend", "torch").precision) == ("torch", "fp32")
    assert config("--backend", "torch", "--precision", "bf16").precision == "bf16"
    assert config("--backend", "onnx", "--precision", "int8-static").precision == "int8-static"
    for bad in (["--backend", "torch", "--precision", "int8"], ["--precision", "fp32"], ["--backend", "tvm"]):
        with pytest.raises(SystemExit):
            config(*bad)

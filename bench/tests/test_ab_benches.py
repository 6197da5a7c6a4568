"""The side-by-side benches that start their own real processes, run small: they measure both
variants and write what they measured (figures are for the README, never asserted here)."""

from __future__ import annotations

import json
import os

from bench import shard_inline_reads, stack_ab


def test_shard_inline_reads_measures_both_shards_in_both_cases(tmp_path, capsys):
    out = tmp_path / "inline.json"
    assert shard_inline_reads.main(["--lookups", "40", "--entries", "300", "--concurrency", "4",
                                    "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["cases"]) == {"absent", "on disk"}
    for levels in result["cases"].values():
        assert set(levels) == {"concurrency 1", "concurrency 4"}
        for rows in levels.values():
            assert set(rows) == {"inline", "workers"}
            assert all(r["n"] == 40 and r["p50_ms"] > 0 and r["shard_cpu_us_per_lookup"] >= 0 for r in rows.values())
    assert "ratio" in capsys.readouterr().out


def test_stack_ab_gives_stack_b_its_environment_and_puts_ours_back(monkeypatch):
    monkeypatch.setenv("SUTRA_TEST_KEPT", "before")
    monkeypatch.delenv("SUTRA_TEST_NEW", raising=False)
    with stack_ab.environment({"SUTRA_TEST_KEPT": "b", "SUTRA_TEST_NEW": "b"}):
        assert os.environ["SUTRA_TEST_KEPT"] == "b" and os.environ["SUTRA_TEST_NEW"] == "b"
    assert os.environ["SUTRA_TEST_KEPT"] == "before" and "SUTRA_TEST_NEW" not in os.environ


def test_stack_ab_runs_two_real_stacks_a_setting_apart(tmp_path):
    """One replica each; B's replicas get SUTRA_MLBASE_INLINE_TOKENS=0, so only A's lone texts are
    computed on the replica's event loop: the setting reached B and only B."""
    from bench import workloads
    from harness.impatient.metrics import scrape

    backend, precision = workloads.stack_default(1)
    lines = workloads.corpus_lines(workloads.data_dir())
    with stack_ab.two_stacks(tmp_path, 1, backend, precision, {"SUTRA_MLBASE_INLINE_TOKENS": "0"}) as (a, b):
        times, rates = stack_ab.measure({"A": a.frontend_address, "B": b.frontend_address}, lines, 20, 1, 5, 1)
        inline = {}
        for name, settings in (("A", a), ("B", b)):
            inline[name] = scrape(settings.metrics_url("mlbase1"))["sutra_mlbase_inline_batches_total"]
    assert len(times["A"]["cold"]) == len(times["B"]["cold"]) == 20 and rates["A"] > 0 and rates["B"] > 0
    assert inline["A"] >= 20 and inline["B"] == 0, inline

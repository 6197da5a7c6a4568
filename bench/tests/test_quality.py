"""bench.quality's statistics, data parsing and decisions, on small known examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.datasets import BUNDLED, DATA_ENV, data_file
from bench import quality
from common import matryoshka


def test_spearman_without_ties():
    # d = -1, 1, -1, 1, 0 -> rho = 1 - 6 * 4 / (5 * 24) = 0.8
    assert quality.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert quality.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert quality.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Ranks only: any increasing transform of one side changes nothing.
    x = np.array([0.3, 0.1, 0.9, 0.5])
    assert quality.spearman(x, [1, 0, 3, 2]) == pytest.approx(quality.spearman(np.exp(5 * x), [1, 0, 3, 2]))


def test_spearman_with_ties_averages_ranks():
    assert list(quality.rankdata(np.array([10, 20, 20, 30]))) == [1, 2.5, 2.5, 4]
    assert list(quality.rankdata(np.array([5, 5, 5]))) == [2, 2, 2]
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): cov 4.5 / sqrt(4.5 * 5)
    assert quality.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert math.isnan(quality.spearman([1, 1, 1], [1, 2, 3]))


def test_sts_file_is_split_on_tabs_only(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text("genre\tfile\tyear\tid\tscore\tsentence1\tsentence2\n"
                    'main\tx\t2012\t1\t2.500\tA "quoted, text\tanother, with comma\n'
                    "main\tx\t2012\t2\t0.000\tplain\ttext\n\n")
    gold, first, second = quality.load_sts(path)
    assert list(gold) == [2.5, 0.0]
    assert first == ['A "quoted, text', "plain"] and second == ["another, with comma", "text"]
    path.write_text("genre\tscore\tsentence1\tsentence2\nmain\t1.0\tonly one sentence\n")
    with pytest.raises(ValueError, match=":2:"):
        quality.load_sts(path)


def test_the_shared_sts_test_file_parses():
    # The copy committed in bench/data, so this holds in a plain clone.
    gold, first, second = quality.load_sts(data_file(quality.STS_TEST_FILE, {DATA_ENV: str(BUNDLED)}))
    assert len(gold) == len(first) == len(second) > 1000
    assert gold.min() >= 0 and gold.max() <= 5


def test_storage_round_trip_and_evaluation():
    rng = np.random.default_rng(7)
    full = matryoshka.reduce(rng.normal(size=(40, 384)).astype(np.float32), 384, False)
    f32 = quality.stored(full, "float32")
    f16 = quality.stored(full, "float16")
    assert np.array_equal(f32, full)
    assert not np.array_equal(f16, full) and quality.cosines(f16, full).min() > 0.9999
    # Pairs (i, i+20) with gold = their own cosine at full width: Spearman 1 there.
    i1, i2 = np.arange(20), np.arange(20, 40)
    gold = (full[i1] * full[i2]).sum(1)
    scores = quality.evaluate(full, gold, i1, i2)
    assert set(scores) == {(ln, w) for ln in (False, True) for w in quality.WIDTHS}
    assert scores[(False, 384)] == pytest.approx(1.0)
    assert scores[(False, 64)] < 1.0


def _rows(values: dict) -> list[dict]:
    return [{"backend": b, "storage": s, "layer_norm": ln, "width": w, "spearman": v}
            for (b, s, ln, w), v in values.items()]


def test_layer_norm_decision_needs_a_real_win_at_most_small_widths():
    values = {("t", "float32", ln, w): 0.80 for ln in (False, True) for w in quality.WIDTHS}
    values[("t", "float32", True, 256)] = 0.81
    values[("t", "float32", True, 64)] = 0.79
    decision = quality.choose_layer_norm(_rows(values), "t")
    assert (decision["layer_norm"], decision["layer_norm_wins_at"]) == (False, [256])
    assert decision["layer_norm_minus_plain"]["64"] == pytest.approx(-0.01)
    values[("t", "float32", True, 128)] = 0.8002  # higher, but by less than the margin: a tie
    assert quality.choose_layer_norm(_rows(values), "t")["layer_norm"] is False
    values[("t", "float32", True, 128)] = 0.805
    assert quality.choose_layer_norm(_rows(values), "t")["layer_norm"] is True


def test_backend_decision_is_the_fastest_within_half_a_percent():
    cfgs = [quality.Config("torch fp32", "torch"), quality.Config("onnx fp32", "onnx"),
            quality.Config("onnx int8", "onnx", "int8")]
    values = {}
    for w in quality.WIDTHS:
        values[("torch fp32", "float16", False, w)] = 0.800
        values[("onnx fp32", "float16", False, w)] = 0.800
        values[("onnx int8", "float16", False, w)] = 0.797  # -0.375%
    def row(backend, precision, fused, texts_per_s, cpu, threads=2):
        return {"backend": backend, "precision": precision, "keep_fp32": [], "fused": fused, "threads": threads,
                "median_texts_per_s": texts_per_s, "texts_per_cpu_s": cpu}

    speed = [
        row("torch", "fp32", None, 100, 50),
        row("onnx", "fp32", True, 150, 80),
        row("onnx", "fp32", False, 140, 100),
        row("onnx", "int8", True, 250, 120),
        row("onnx", "int8", False, 260, 130),
        row("onnx", "fp32", True, 70, 75, threads=1),
        row("onnx", "fp32", False, 60, 90, threads=1),
    ]
    from mlbase.backends.onnx_backend import DEFAULT_FUSED

    decision = quality.choose_backend(_rows(values), cfgs, speed, False, threads=2)
    assert decision["backend"] == "onnx int8"
    int8 = next(c for c in decision["candidates"] if c["config"] == "onnx int8")
    assert int8["texts_per_cpu_s"] == (120 if DEFAULT_FUSED["int8"] else 130)  # the graph the backend runs
    speed[4]["texts_per_cpu_s"] = speed[3]["texts_per_cpu_s"] = 90  # int8 now costs more CPU than fp32
    assert quality.choose_backend(_rows(values), cfgs, speed, False, threads=2)["backend"] == (
        "onnx fp32" if not DEFAULT_FUSED["fp32"] else "onnx int8")
    speed[4]["texts_per_cpu_s"] = speed[3]["texts_per_cpu_s"] = 130
    values[("onnx int8", "float16", False, 64)] = 0.795  # -0.625% at one width: out
    assert quality.choose_backend(_rows(values), cfgs, speed, False, threads=2)["backend"] == "onnx fp32"
    graphs = quality.choose_graphs(speed)
    # fp32: faster wall clock fused at 2 threads, but less CPU per text plain at both thread counts.
    assert (graphs["int8"]["faster"], graphs["fp32"]["faster"]) == ("plain", "plain")
    assert graphs["fp32"]["cpu_fused_vs_plain"] == pytest.approx(((80 / 100) * (75 / 90)) ** 0.5)
    assert graphs["fp32"]["by_threads"]["2"]["wall_median_fused_vs_plain"] == pytest.approx(150 / 140)

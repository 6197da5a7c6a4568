"""Reduced-precision backends whose vector for a text does not depend on its batch mates
(torch bf16, onnx static int8, openvino bf16), the quality gates, the tuner and `--backend auto`.

The models load once per module; static int8 graphs are built into a temporary cache
(one fp32 export, then the quantized graphs derived from it) that the tuner and the
replica started here reuse.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from common.flags import split_csv
from harness.procs import ROOT
from harness.stack import service
from mlbase import quality_gates as gates
from mlbase import tune, tuned
from mlbase.backends import calibration, registry
from mlbase.backends.base import BackendOptions
from mlbase.backends.onnx_export import select_nodes
from mlbase.data_files import CORPUS_FILE, STS_TEST_FILE, first_existing
from mlbase.settings import DEFAULT_INT8_KEEP_FP32, MLBaseSettings, bundled_model_path, load_settings
from sutra.mlbase.v1 import mlbase_service_pb2 as pb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as pb_grpc
from tests.support import AWKWARD_TEXTS, cosines, serving

MODEL = bundled_model_path()
TEXTS = AWKWARD_TEXTS + [
    "Matryoshka embeddings keep the most useful information in the leading dimensions. " * 4,
    "word " * 300,  # over the 256-token window: truncated
]
STATIC_KEEP = tuple(split_csv(DEFAULT_INT8_KEEP_FP32["int8-static"]))
# Fewer calibration texts than the default (256) keep each static graph's build short here.
CALIBRATION_TEXTS = 32


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def load(backend: str, precision: str, cache_dir: Path | None = None, **kw):
    b = registry.create(backend, BackendOptions(model_path=MODEL, threads=1, precision=precision,
                                                cache_dir=str(cache_dir or ""), **kw))
    b.load()
    return b


@pytest.fixture(scope="module")
def torch_fp32():
    return load("torch", "fp32")


@pytest.fixture(scope="module")
def bf16():
    return load("torch", "bf16")


@pytest.fixture(scope="module")
def onnx_fp32(cache_dir):
    return load("onnx", "fp32", cache_dir)


@pytest.fixture(scope="module")
def static(cache_dir, onnx_fp32):
    return load("onnx", "int8-static", cache_dir, keep_fp32=STATIC_KEEP, calibration_texts=CALIBRATION_TEXTS)


def cpu_has_bf16() -> bool:
    return any(flag in tuned.cpu_identity().flags for flag in ("avx512_bf16", "amx_bf16"))


@pytest.fixture(scope="module")
def ov_bf16(cache_dir, onnx_fp32):
    """OpenVINO in bf16 on the onnx backend's fp32 graph; None on a CPU without native bfloat16,
    where the backend refuses to load (test_openvino_bf16_runs_bf16_or_refuses checks that)."""
    if not cpu_has_bf16():
        return None
    return load("openvino", "bf16", cache_dir)


@pytest.fixture(scope="module")
def gate_texts() -> list[str]:
    lines = [line for line in first_existing((CORPUS_FILE,)).read_text().splitlines() if line.strip()]
    return TEXTS + gates.mixed_length_texts(lines[:200], 24)


def test_new_backends_give_float32_unit_vectors_of_the_native_width(bf16, static, torch_fp32):
    reference, _ = torch_fp32.encode(TEXTS, batch_size=3)
    for backend in (bf16, static):
        vectors, truncated = backend.encode(TEXTS, batch_size=3)
        assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 384)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert truncated == [False] * 6 + [True]
        cos = cosines(vectors, reference)
        assert cos.min() > 0.95 and cos.mean() > 0.98, (backend.describe().precision, cos)  # close to fp32...
        assert cos.min() < 0.999999  # ...yet a different computation
    assert bf16.describe().precision == "bf16"
    dtypes = {type(m).__name__: str(next(m.parameters()).dtype) for m in bf16.model[0].modules()
              if type(m).__name__ in ("Linear", "LayerNorm", "Embedding")}
    assert dtypes == {"Linear": "torch.bfloat16", "LayerNorm": "torch.float32", "Embedding": "torch.float32"}


def test_a_text_alone_and_inside_a_batch_get_the_same_vector(bf16, static, onnx_fp32, gate_texts):
    for backend in (bf16, static, onnx_fp32):
        gate = gates.batch_gate(backend, gate_texts, batch_size=8)
        assert gate.passed, (backend.describe().precision, gate.min_cosine)
        assert set(gate.min_cosine) == set(gates.WIDTHS) and gate.texts == len(gate_texts)


def test_openvino_bf16_runs_bf16_or_refuses(ov_bf16, onnx_fp32, cache_dir, gate_texts):
    """openvino falls back to f32 where the CPU has no bfloat16; a "bf16" fingerprint on such a
    CPU would label fp32 vectors as bf16, so the backend refuses to load there instead."""
    if ov_bf16 is None:
        with pytest.raises(ValueError, match="--precision bf16 is not available here"):
            load("openvino", "bf16", cache_dir)
        return
    reference, _ = onnx_fp32.encode(TEXTS, batch_size=3)
    vectors, truncated = ov_bf16.encode(TEXTS, batch_size=3)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert truncated == [False] * 6 + [True]
    cos = cosines(vectors, reference)
    assert cos.min() > 0.999 and cos.min() < 0.9999999  # the same graph, computed in bfloat16
    assert ov_bf16.graph_path == onnx_fp32.graph_path  # no graph of its own: onnxruntime's plain fp32 export
    gate = gates.batch_gate(ov_bf16, gate_texts, batch_size=8)
    assert gate.passed, gate.min_cosine


def test_openvino_fp32_matches_onnxruntime_on_the_same_graph(onnx_fp32, cache_dir):
    openvino = load("openvino", "fp32", cache_dir)
    assert openvino.graph_path == onnx_fp32.graph_path
    ours, _ = openvino.encode(TEXTS, batch_size=3)
    reference, _ = onnx_fp32.encode(TEXTS, batch_size=3)
    assert cosines(ours, reference).min() > 0.99999
    d, o = openvino.describe(), onnx_fp32.describe()
    assert (d.backend, d.precision, o.backend, o.precision) == ("openvino", "fp32", "onnx", "fp32")
    assert d.fingerprint() != o.fingerprint()  # another runtime's rounding never shares a cache


def test_dynamic_int8_fails_the_batch_gate(cache_dir, onnx_fp32, gate_texts):
    """Why the gate exists: dynamic int8 scales activations over the whole batch."""
    gate = gates.batch_gate(load("onnx", "int8", cache_dir), gate_texts, batch_size=8)
    assert not gate.passed and gate.worst < 0.999


def test_the_static_graph_is_smoothed_and_quantizes_every_weight_matmul(static):
    manifest = static.graphs.manifest(static.spec)
    assert manifest["step"] == "quantize_static" and manifest["recipe"]["format"] == "QDQ"
    assert manifest["quantized_matmuls"] == 36 and manifest["fp32_matmuls"] == []
    assert manifest["smoothed_activations"] == 24  # per layer: Q/K/V's input, attention out, FFN in, FFN out
    assert manifest["calibration_texts"] == CALIBRATION_TEXTS
    assert manifest["check"]["min_cosine_vs_sentence_transformers"] > 0.95
    assert static.graph_path.name == f"int8-static-plain-cal-{static.spec.calibration}.onnx"
    assert not list(static.graph_path.parent.glob(".tmp-*"))  # the smoothed intermediate is gone


def test_keeping_layers_in_fp32_gives_another_graph_and_fingerprint(static, cache_dir):
    kept = load("onnx", "int8-static", cache_dir, keep_fp32=("layer.*.output.dense",),
                calibration_texts=CALIBRATION_TEXTS)
    manifest = kept.graphs.manifest(kept.spec)
    assert manifest["quantized_matmuls"] == 30 and len(manifest["fp32_matmuls"]) == 6
    assert all("/output/dense/" in n and "/attention/" not in n for n in manifest["fp32_matmuls"])
    assert kept.describe().precision == f"int8-static+cal:{static.spec.calibration}+fp32:layer.*.output.dense"
    assert kept.describe().fingerprint() != static.describe().fingerprint()


def test_star_patterns_match_one_dotted_part():
    names = ["/inner/encoder/layer.0/attention/output/dense/MatMul", "/inner/encoder/layer.0/output/dense/MatMul",
             "/inner/encoder/layer.10/output/dense/MatMul", "/inner/encoder/layer.1/intermediate/dense/MatMul"]
    assert select_nodes(names, ["layer.*.output.dense"]) == names[1:3]
    assert select_nodes(names, ["output.dense"]) == names[:3]
    assert select_nodes(names, ["layer.1."]) == names[3:]  # not layer.10


def test_calibration_never_uses_sts_test_sentences(tmp_path):
    test_sentences = calibration.sts_test_sentences()
    assert len(test_sentences) > 2000  # the test split is found (bundled in bench/data at least)
    default = calibration.load()
    assert len(default.texts) == calibration.DEFAULT_TEXTS and not set(default.texts) & test_sentences
    lengths = [len(t.split()) for t in default.texts]
    assert min(lengths) < 15 and max(lengths) > 150  # short and long inputs, up to the window
    mixed = tmp_path / "cal.txt"
    some_test = sorted(test_sentences, key=len)[-5:]
    mixed.write_text("\n".join(["first own line", *some_test, "second own line", "first own line"]) + "\n")
    chosen = calibration.load(str(mixed), 10)
    assert all(t not in text for t in some_test for text in chosen.texts)
    assert chosen.texts[0] == "first own line"
    assert chosen.texts[1] == " ".join(["second own line", "first own line"] * 3)  # 6 lines, cycling
    assert calibration.load(str(mixed), 9).tag() != chosen.tag()
    assert calibration.load(str(mixed), 10).tag() == chosen.tag()  # named by content: stable


def test_precision_and_calibration_change_the_fingerprint(torch_fp32, bf16, onnx_fp32, static, cache_dir):
    other_calibration = load("onnx", "int8-static", cache_dir, keep_fp32=STATIC_KEEP, calibration_texts=16)
    descriptions = [b.describe() for b in (torch_fp32, bf16, onnx_fp32, static, other_calibration)]
    assert [(d.backend, d.precision.split("+")[0]) for d in descriptions] == [
        ("torch", "fp32"), ("torch", "bf16"), ("onnx", "fp32"), ("onnx", "int8-static"), ("onnx", "int8-static")]
    assert static.describe().precision == f"int8-static+cal:{static.spec.calibration}"
    assert len({d.fingerprint() for d in descriptions}) == len(descriptions)
    assert len({(d.weights_digest, d.native_width, d.max_seq_length) for d in descriptions}) == 1
    assert other_calibration.graph_path != static.graph_path and other_calibration.graph_path.is_file()


def test_precision_settings():
    assert load_settings(["--backend", "torch", "--precision", "bf16"], {}).backend.precision == "bf16"
    static_settings = load_settings(["--backend", "onnx", "--precision", "int8-static"], {})
    assert static_settings.backend.keep_fp32 == STATIC_KEEP == ()
    assert load_settings(["--backend", "onnx", "--precision", "int8"], {}).backend.keep_fp32 == ("layer.0.",)
    assert load_settings(["--backend", "openvino", "--precision", "bf16"], {}).backend.precision == "bf16"
    assert load_settings(["--backend", "openvino"], {}).backend.precision == "fp32"
    for argv in (["--backend", "onnx", "--precision", "bf16"], ["--backend", "torch", "--precision", "int8-static"],
                 ["--backend", "openvino", "--precision", "int8"],
                 ["--backend", "auto", "--precision", "fp32"], ["--backend", "torch", "--int8-keep-fp32", "x"]):
        with pytest.raises(SystemExit):
            load_settings(argv, {})
    assert load_settings(["--backend", "auto"], {}).backend_name == "auto"


# ---- the gates on known numbers ------------------------------------------------------------

def test_gate_arithmetic():
    reference = {384: 0.80, 64: 0.70}
    assert gates.sts_gate({384: 0.797, 64: 0.6966}, reference).passed  # -0.375%, -0.486%
    failed = gates.sts_gate({384: 0.81, 64: 0.6960}, reference)  # better at 384, -0.57% at 64
    assert not failed.passed and failed.worst_drop == pytest.approx(0.04 / 7)
    assert gates.BatchGate({384: 0.99995, 64: 0.99991}, 10).passed
    assert not gates.BatchGate({384: 0.99995, 64: 0.99989}, 10).passed
    texts = gates.mixed_length_texts(["a", "b", "c"], 5, longest=4)
    assert [len(t.split()) for t in texts] == [1, 2, 3, 4, 1]


def test_sts_pairs_index_distinct_sentences():
    pairs = gates.StsPairs.load(first_existing((STS_TEST_FILE,)), 50)
    assert len(pairs.gold) == 50 and len(pairs.sentences) == len(set(pairs.sentences)) <= 100
    gold, first, _ = gates.load_sts(first_existing((STS_TEST_FILE,)))
    assert [pairs.sentences[i] for i in pairs.first] == first[:50]


# ---- the tuner and --backend auto ------------------------------------------------------------

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
flags\t\t: fpu sse avx2 fma avx512f avx512_vnni amx_tile amx_bf16 amx_int8
processor\t: 1
model name\t: Test CPU 9000
flags\t\t: fpu sse avx2 fma avx512f avx512_vnni amx_tile amx_bf16 amx_int8
"""


def test_cpu_identity_reads_model_and_relevant_flags():
    cpu = tuned.cpu_identity(CPUINFO)
    assert cpu.model == "Test CPU 9000"
    assert cpu.flags == ("avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    no_amx = tuned.cpu_identity(CPUINFO.replace(" amx_tile amx_bf16 amx_int8", ""))
    assert no_amx.model == cpu.model and no_amx.key != cpu.key
    here = tuned.cpu_identity()
    assert here.model and here.key.startswith(here.model)


def measured(candidate: str, texts_per_s: float, latency_ms: float, sts_drop: float,
             batch_cosine: float = 0.99999) -> tune.Result:
    result = tune.Result(candidate, tuned.Choice(*candidate.split(":"), ()))
    result.texts, result.seconds, result.latencies_ms = 100, [100 / texts_per_s], [latency_ms]
    result.sts = gates.sts_gate({384: 0.8 * (1 - sts_drop)}, {384: 0.8})
    result.batch = gates.BatchGate({384: batch_cosine}, 1)
    return result


def test_the_winner_is_the_fastest_that_passes_and_a_close_call_goes_to_latency():
    dynamic = measured("onnx:int8", 1000, 2.0, 0.002, batch_cosine=0.99)  # fastest, but batch-dependent
    bf16 = measured("torch:bf16", 600, 4.0, 0.0)
    static = measured("onnx:int8-static", 590, 3.0, 0.002)  # within 3% of bf16: a tie, lower latency
    fp32 = measured("onnx:fp32", 300, 6.0, 0.0)
    assert tune.decide([dynamic, bf16, static, fp32]) is static
    static.seconds = [100 / 560]  # 7% slower: no longer a tie
    assert tune.decide([dynamic, bf16, static, fp32]) is bf16
    too_lossy = measured("onnx:int8-static", 2000, 1.0, 0.006)  # 0.6% STS-B drop
    assert tune.decide([too_lossy, fp32]) is fp32
    assert tune.decide([dynamic]) is None


def test_a_much_slower_lone_text_does_not_win_on_batch_throughput():
    static = measured("onnx:int8-static", 590, 3.0, 0.002)
    bf16 = measured("openvino:bf16", 700, 4.6, 0.0)  # 19% more texts/s, but a lone text 1.53x slower
    assert tune.decide([bf16, static]) is static
    bf16.latencies_ms = [4.4]  # 1.47x: within the spread, so throughput decides
    assert tune.decide([bf16, static]) is bf16
    quick_but_lossy = measured("torch:bf16", 900, 1.0, 0.006)  # fails STS-B: sets no latency bar
    assert tune.decide([quick_but_lossy, bf16, static]) is bf16


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, cache_dir, static, onnx_fp32):
    """`sutra tune --quick` through the CLI, on the graphs this module built."""
    out = tmp_path_factory.mktemp("tune") / "tuned.json"
    proc = subprocess.run([sys.executable, "-m", "deploy", "tune", "--quick", "--out", str(out),
                           "--onnx-cache-dir", str(cache_dir), "--calibration-texts", str(CALIBRATION_TEXTS)],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_tune_records_a_winner_that_passed_both_gates(tuned_run):
    out, stdout = tuned_run
    cpu = tuned.cpu_identity()
    record = json.loads(out.read_text())["records"][cpu.key]
    assert record["cpu"]["model"] == cpu.model and record["cpu"]["flags"] == list(cpu.flags)
    assert record["mode"] == "quick" and record["model_digest"] == tuned.model_digest(MODEL)
    rows = {r["candidate"]: r for r in record["candidates"]}
    assert set(rows) == {"torch:fp32", "torch:bf16", "onnx:fp32", "onnx:int8", "onnx:int8-static"}
    winner = record["choice"]
    row = rows[f"{winner['backend']}:{winner['precision']}"]
    assert row["passed"] and row["sts_passed"] and row["batch_passed"] and row["label"] == winner["label"]
    assert all(float(v) <= 100 * gates.STS_TOLERANCE for v in row["sts_drop_pct"].values())
    assert min(row["batch_min_cosine"].values()) >= gates.MIN_BATCH_COSINE
    eligible = [r for r in rows.values()
                if r["passed"] and r["latency_ms"] <= tune.LATENCY_SPREAD * min(
                    p["latency_ms"] for p in rows.values() if p["passed"])]
    assert row in eligible
    assert row["texts_per_s"] >= max(r["texts_per_s"] for r in eligible) * 0.97 - 1e-9
    assert not rows["onnx:int8"]["batch_passed"] and not rows["onnx:int8"]["passed"]
    assert set(rows["torch:fp32"]["sts_spearman"]) == {"384", "256", "128", "64"}
    assert "winner:" in stdout and "onnx:int8-static" in stdout


def auto_settings(path: Path, cache_dir: Path | None = None) -> MLBaseSettings:
    return MLBaseSettings(backend_name="auto", tuned_file=str(path), onnx_cache_dir=str(cache_dir or ""), threads=1)


def test_backend_auto_picks_the_record_for_this_cpu_else_the_default(tmp_path, caplog):
    path = tmp_path / "tuned.json"
    cpu = tuned.cpu_identity(CPUINFO)
    caplog.set_level(logging.INFO, logger="mlbase.tuned")
    fallback = tuned.resolve(auto_settings(path), cpu)  # no file at all
    assert (fallback.backend_name, fallback.backend.precision) == ("onnx", "fp32")
    assert "no record for this CPU" in caplog.text and "using the default" in caplog.text

    choice = {"backend": "onnx", "precision": "int8-static", "keep_fp32": list(STATIC_KEEP), "label": "x"}
    tuned.write(path, cpu, {"choice": choice, "model_digest": tuned.model_digest(MODEL), "threads": 1})
    tuned.write(path, tuned.cpu_identity(CPUINFO.replace(" amx_tile amx_bf16 amx_int8", "")),
                {"choice": {**choice, "precision": "fp32", "keep_fp32": []}, "model_digest": "other"})
    assert len(tuned.read(path)["records"]) == 2  # merged, not overwritten
    caplog.clear()
    picked = tuned.resolve(auto_settings(path), cpu)
    assert (picked.backend_name, picked.backend.precision, picked.backend.keep_fp32) == (
        "onnx", "int8-static", STATIC_KEEP)
    assert "--backend auto: onnx int8-static" in caplog.text and "measured at" not in caplog.text
    caplog.clear()
    assert tuned.resolve(dataclasses.replace(auto_settings(path), threads=2), cpu).backend.precision == "int8-static"
    assert "runs 2 threads but the record was measured at 1" in caplog.text
    caplog.clear()
    other_cpu = tuned.cpu_identity(CPUINFO.replace("9000", "8000"))
    assert tuned.resolve(auto_settings(path), other_cpu).backend_name == "onnx"
    assert "no record for this CPU (Test CPU 8000" in caplog.text
    caplog.clear()
    same_model_name_no_amx = tuned.cpu_identity(CPUINFO.replace(" amx_tile amx_bf16 amx_int8", ""))
    assert tuned.resolve(auto_settings(path), same_model_name_no_amx).backend.precision == "fp32"
    assert "another model" in caplog.text
    explicit = dataclasses.replace(auto_settings(path), backend_name="torch")
    assert tuned.resolve(explicit, cpu) is explicit


@pytest.fixture(scope="module")
def auto_replica(tmp_path_factory, cache_dir, static):
    folder = tmp_path_factory.mktemp("auto-replica")
    path = folder / "tuned.json"
    choice = {"backend": "onnx", "precision": "int8-static", "keep_fp32": list(STATIC_KEEP),
              "label": static.describe().precision}
    tuned.write(path, tuned.cpu_identity(), {"choice": choice, "model_digest": tuned.model_digest(MODEL)})
    yield from serving(service("mlbase", folder / "mlbase.log",
                               {"backend_name": "auto", "tuned_file": str(path), "threads": 1,
                                "server.drain_seconds": 0.0, "onnx_cache_dir": str(cache_dir),
                                "calibration_texts": CALIBRATION_TEXTS}))


def test_replica_with_backend_auto_serves_the_recorded_choice(auto_replica, static):
    with grpc.insecure_channel(auto_replica.address) as channel:
        stub = pb_grpc.MLBaseServiceStub(channel)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        reply = stub.Embed(pb.EmbedRequest(texts=TEXTS, full_width=True), timeout=30)
    assert (info.backend, info.precision) == ("onnx", static.describe().precision)
    assert info.fingerprint == static.describe().fingerprint() == reply.model_fingerprint
    vectors = np.frombuffer(reply.vectors, dtype="<f4").reshape(reply.count, reply.width)
    assert cosines(vectors, static.encode(TEXTS)[0]).min() > 0.9999
    assert "--backend auto: onnx int8-static" in auto_replica.log()


@pytest.fixture(scope="module")
def openvino_replica(tmp_path_factory, cache_dir, onnx_fp32):
    """A real replica process on the openvino backend: bf16 where the CPU has it, else fp32."""
    folder = tmp_path_factory.mktemp("openvino-replica")
    precision = "bf16" if cpu_has_bf16() else "fp32"
    yield from serving(service("mlbase", folder / "mlbase.log",
                               {"backend_name": "openvino", "precision": precision, "threads": 1,
                                "server.drain_seconds": 0.0, "onnx_cache_dir": str(cache_dir)}))


def test_replica_serves_the_openvino_backend(openvino_replica, ov_bf16, cache_dir):
    in_process = ov_bf16 or load("openvino", "fp32", cache_dir)
    with grpc.insecure_channel(openvino_replica.address) as channel:
        stub = pb_grpc.MLBaseServiceStub(channel)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        reply = stub.Embed(pb.EmbedRequest(texts=TEXTS, full_width=True), timeout=30)
        alone = [stub.Embed(pb.EmbedRequest(texts=[text], full_width=True), timeout=30) for text in TEXTS]
    assert (info.backend, info.precision) == ("openvino", in_process.describe().precision)
    assert info.fingerprint == in_process.describe().fingerprint() == reply.model_fingerprint
    vectors = np.frombuffer(reply.vectors, dtype="<f4").reshape(reply.count, reply.width)
    one_by_one = np.concatenate([np.frombuffer(r.vectors, dtype="<f4").reshape(1, r.width) for r in alone])
    assert cosines(vectors, in_process.encode(TEXTS)[0]).min() > 0.9999
    assert cosines(vectors, one_by_one).min() > gates.MIN_BATCH_COSINE  # batch mates do not move a vector


def test_openvino_backend_is_safe_to_share_between_threads(onnx_fp32, cache_dir):
    """Like an onnxruntime session, one loaded backend may be called from several threads."""
    from concurrent.futures import ThreadPoolExecutor

    openvino = load("openvino", "fp32", cache_dir)
    texts = [f"{i} " + "word " * (i % 40) for i in range(64)]
    expected = np.concatenate([openvino.encode([t])[0] for t in texts])
    with ThreadPoolExecutor(4) as pool:
        got = np.concatenate(list(pool.map(lambda t: openvino.encode([t])[0], texts)))
    assert cosines(got, expected).min() > 0.99999


def test_openvino_on_an_empty_cache_builds_a_graph_checked_by_onnxruntime(tmp_path):
    """The graph an openvino replica exports first is the one every backend shares: its build-time
    check runs onnxruntime against sentence-transformers, not openvino's own rounding."""
    precision = "bf16" if cpu_has_bf16() else "fp32"
    openvino = load("openvino", precision, tmp_path)
    assert openvino.graph_path.is_file() and openvino.graph_path.parent.parent == tmp_path
    record = json.loads(openvino.graph_path.with_suffix(".json").read_text())
    assert record["check"]["min_cosine_vs_sentence_transformers"] >= 0.9999  # fp32's floor, met by onnxruntime
    onnx = load("onnx", "fp32", tmp_path)
    assert onnx.graph_path == openvino.graph_path and not onnx.graphs.built  # reused, not rebuilt

"""The ONNX Runtime backend: vectors equal sentence-transformers', graphs are
exported once into a shared cache (safe for replicas starting together), the
fingerprint follows backend and precision, and a real replica serves it.

One export per module into a temporary cache folder (the fp32 export, then
the fused and int8 graphs derived from it); every other load reuses it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

from common import matryoshka
from harness.procs import ROOT
from harness.stack import service
from mlbase.backends import registry
from mlbase.backends.base import BackendOptions
from mlbase.backends.onnx_backend import OnnxBackend, pool, pooling_modes, read_layout
from mlbase.backends.onnx_export import GraphCache, GraphSpec, select_nodes
from mlbase.settings import bundled_model_path, load_settings
from sutra.mlbase.v1 import mlbase_service_pb2 as pb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as pb_grpc
from tests.support import AWKWARD_TEXTS, cosines, serving

MODEL = bundled_model_path()
TEXTS = AWKWARD_TEXTS + [
    "Matryoshka embeddings keep the most useful information in the leading dimensions. " * 4,
    "word " * 300,  # over the 256-token window: truncated
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def options(cache_dir: Path, **kw) -> BackendOptions:
    return BackendOptions(model_path=MODEL, threads=1, cache_dir=str(cache_dir), **kw)


@pytest.fixture(scope="module")
def fp32(cache_dir):
    b = registry.create("onnx", options(cache_dir))
    b.load()
    return b


def test_fp32_vector_does_not_depend_on_batch_mates_but_int8_does(fp32, int8):
    """Why fp32 is the default: a cache is only sound if a text's vector is the same
    whichever texts shared its batch. int8's dynamic quantization scales activations
    over the whole batch, so its vectors move with their batch mates."""
    text = ["how do I learn python quickly?"]
    mates = ["a much longer sentence about something else entirely, with numbers 12345 and more words"] * 7
    for backend, same in ((fp32, True), (int8, False)):
        alone, _ = backend.encode(text)
        together, _ = backend.encode(text + mates, batch_size=8)
        if same:
            np.testing.assert_allclose(alone[0], together[0], atol=1e-6)
        else:
            assert np.abs(alone[0] - together[0]).max() > 1e-3


@pytest.fixture(scope="module")
def int8(cache_dir, fp32):
    b = registry.create("onnx", options(cache_dir, precision="int8"))
    b.load()
    return b


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(MODEL, device="cpu", local_files_only=True)
    return model.encode(TEXTS, batch_size=3, show_progress_bar=False)


def test_fp32_vectors_equal_sentence_transformers(fp32, reference):
    ours, truncated = fp32.encode(TEXTS, batch_size=3)  # mixed lengths in a batch: padding matters
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    assert cosines(ours, reference).min() > 0.9999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert truncated == [False] * 6 + [True]
    alone = np.concatenate([fp32.encode([t])[0] for t in TEXTS])  # no padding at all
    assert cosines(alone, reference).min() > 0.9999


def test_the_fused_graph_fuses_attention_and_agrees(fp32, cache_dir, reference):
    assert not fp32.spec.fused and fp32.graph_path.name == "fp32-plain.onnx"  # the measured default
    fused = OnnxBackend(options(cache_dir), fused=True)
    fused.load()
    assert fused.graphs.built == ["fp32-fused.onnx"]  # derived from the cached plain export
    manifest = fused.graphs.manifest(fused.spec)
    assert manifest["fused_operators"].get("Attention", 0) == 6
    assert manifest["fused_operators"].get("EmbedLayerNormalization", 0) == 1
    assert manifest["check"]["min_cosine_vs_sentence_transformers"] > 0.9999
    assert cosines(fused.encode(TEXTS, batch_size=4)[0], reference).min() > 0.9999
    assert fused.describe().fingerprint() == fp32.describe().fingerprint()


def test_int8_is_quantized_and_stays_close(int8, fp32, reference):
    manifest = int8.graphs.manifest(int8.spec)
    assert int8.graph_path.name == "int8-plain.onnx"
    assert manifest["quantized_matmuls"] == 36 and manifest["fp32_matmuls"] == []
    assert int8.graph_path.stat().st_size < 0.7 * fp32.graph_path.stat().st_size
    ours, _ = int8.encode(TEXTS, batch_size=3)
    cos = cosines(ours, reference)
    assert cos.min() > 0.95 and cos.mean() > 0.98, cos
    assert cos.min() < 0.9999  # it really is a different computation
    assert manifest["check"]["min_cosine_vs_sentence_transformers"] >= 0.95


def test_fingerprint_differs_by_backend_and_precision(fp32, int8, cache_dir):
    torch_backend = registry.create("torch", BackendOptions(model_path=MODEL, threads=1))
    torch_backend.load()
    keep = registry.create("onnx", options(cache_dir, precision="int8", keep_fp32=("attention.output.dense",)))
    keep.load()
    descriptions = [b.describe() for b in (torch_backend, fp32, int8, keep)]
    assert [(d.backend, d.precision) for d in descriptions] == [
        ("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8"), ("onnx", "int8+fp32:attention.output.dense")]
    assert len({d.fingerprint() for d in descriptions}) == 4
    assert len({(d.weights_digest, d.native_width, d.max_seq_length, d.normalize) for d in descriptions}) == 1
    kept = keep.graphs.manifest(keep.spec)
    assert kept["quantized_matmuls"] == 30 and len(kept["fp32_matmuls"]) == 6


def test_second_load_reuses_the_cached_graphs(fp32, int8, cache_dir):
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache_dir.rglob("*.onnx")}
    assert {"fp32-plain.onnx", "int8-plain.onnx"} <= set(mtimes)
    for precision in ("fp32", "int8"):
        again = registry.create("onnx", options(cache_dir, precision=precision))
        again.load()
        assert again.graphs.built == []
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.rglob("*.onnx")} == mtimes
    assert not list(cache_dir.rglob(".tmp-*"))


def test_a_graph_that_fails_its_check_never_enters_the_cache(fp32, tmp_path):
    source = fp32.graphs.source
    # A cache that has the plain export already (copied), so only the optimiser runs.
    seeded = GraphCache(tmp_path, source)
    seeded.folder.mkdir(parents=True)
    shutil.copy(fp32.graphs.path(GraphSpec("fp32", False)), seeded.folder / "fp32-plain.onnx")
    (seeded.folder / ".tmp-999-left-by-a-killed-builder.onnx").write_bytes(b"partial")

    def reject(path: Path, spec: GraphSpec) -> dict:
        assert path.is_file() and path.name.startswith(".tmp-")
        raise RuntimeError("vectors differ")

    with pytest.raises(RuntimeError, match="vectors differ"):
        GraphCache(tmp_path, source, check=reject).ensure(GraphSpec("fp32", True))
    assert sorted(p.name for p in seeded.folder.iterdir()) == [".lock", "fp32-plain.onnx"]


_CONCURRENT_LOAD = textwrap.dedent("""
    import json, sys
    from mlbase.backends.base import BackendOptions
    from mlbase.backends.onnx_backend import OnnxBackend
    b = OnnxBackend(BackendOptions(model_path=sys.argv[1], threads=1, cache_dir=sys.argv[2]), fused=False)
    b.load()
    print(json.dumps({"built": b.graphs.built, "vector": b.encode(["concurrent start"])[0][0, :8].tolist()}))
""")


def test_replicas_starting_together_export_once(tmp_path):
    cache = tmp_path / "shared-cache"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_LOAD, MODEL, str(cache)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(len(o["built"]) for o in outs) == [0, 1]  # one exported, the other waited and reused it
    assert np.allclose(outs[0]["vector"], outs[1]["vector"], atol=1e-6)
    assert [p.name for p in next(cache.iterdir()).glob("*.onnx")] == ["fp32-plain.onnx"]


def test_pooling_matches_the_sentence_transformers_definitions():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    assert np.allclose(pool(hidden, mask, ["mean"]), [[1, 2], [8, 9]])
    assert np.allclose(pool(hidden, mask, ["max"]), [[2, 3], [10, 11]])
    assert np.allclose(pool(hidden, mask, ["cls"]), [[0, 1], [6, 7]])
    assert np.allclose(pool(hidden, mask, ["mean_sqrt_len_tokens"]), [[2 / np.sqrt(2), 4 / np.sqrt(2)],
                                                                      [24 / np.sqrt(3), 27 / np.sqrt(3)]])
    assert pool(hidden, mask, ["cls", "mean"]).shape == (2, 4)
    assert pooling_modes({"pooling_mode_mean_tokens": True}) == ("mean",)
    assert pooling_modes({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}) == ("cls", "mean")
    assert pooling_modes({"pooling_mode": ["max"]}) == ("max",)
    with pytest.raises(ValueError, match="lasttoken"):
        pooling_modes({"pooling_mode": "lasttoken"})


def test_models_with_other_modules_are_refused(tmp_path):
    layout = read_layout(Path(MODEL))
    assert layout.pooling_modes == ("mean",) and layout.normalize and layout.max_seq_length == 256
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        read_layout(tmp_path)


def test_keep_fp32_patterns_must_match_a_layer():
    names = ["/inner/encoder/layer.0/attention/output/dense/MatMul", "/inner/encoder/layer.10/output/dense/MatMul"]
    assert select_nodes(names, ["layer.0."]) == names[:1]
    assert select_nodes(names, ["attention.output.dense", "layer.0."]) == names[:1]
    with pytest.raises(ValueError, match="attn.out"):
        select_nodes(names, ["attn.out"])


def test_precision_and_cache_settings(tmp_path):
    s = load_settings(["--backend", "onnx", "--precision", "int8", "--int8-keep-fp32", "layer.0.,layer.5."],
                      {"SUTRA_ONNX_CACHE": str(tmp_path)})
    assert (s.backend_name, s.backend.precision, s.backend.cache_dir, s.backend.keep_fp32) == (
        "onnx", "int8", str(tmp_path), ("layer.0.", "layer.5."))
    assert load_settings([], {"SUTRA_MLBASE_BACKEND": "onnx"}).backend.precision == "fp32"
    assert load_settings(["--precision", "fp32"], {}).backend.keep_fp32 == ()
    for argv in (["--backend", "torch", "--precision", "int8"], ["--backend", "onnx", "--precision", "fp16"],
                 ["--backend", "onnx", "--precision", "fp32", "--int8-keep-fp32", "layer.0."]):
        with pytest.raises(SystemExit):
            load_settings(argv, {})


@pytest.fixture(scope="module")
def replica(cache_dir, fp32, tmp_path_factory):
    yield from serving(service("mlbase", tmp_path_factory.mktemp("onnx-replica") / "mlbase.log",
                               {"backend_name": "onnx", "precision": "fp32", "threads": 1,
                                "server.drain_seconds": 0.0, "onnx_cache_dir": str(cache_dir)}))


def test_replica_with_backend_onnx_serves_and_says_so(replica, fp32, reference):
    with grpc.insecure_channel(replica.address) as channel:
        stub = pb_grpc.MLBaseServiceStub(channel)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        assert (info.backend, info.precision, info.native_width) == ("onnx", "fp32", 384)
        assert info.fingerprint == fp32.describe().fingerprint()
        reply = stub.Embed(pb.EmbedRequest(texts=TEXTS, dimensions=128), timeout=30)
        full = stub.Embed(pb.EmbedRequest(texts=TEXTS, full_width=True), timeout=30)
    got = np.frombuffer(reply.vectors, dtype="<f4").reshape(reply.count, reply.width)
    assert (reply.count, reply.width, list(reply.truncated_indices)) == (len(TEXTS), 128, [6])
    expected = matryoshka.reduce(reference, 128, info.layer_norm)
    assert cosines(got, expected).min() > 0.9999
    vectors = np.frombuffer(full.vectors, dtype="<f4").reshape(full.count, full.width)
    assert cosines(vectors, reference).min() > 0.9999
    assert "from cache" in replica.log()  # the replica found the graph this module exported

"""One real replica (`python -m mlbase`) on a loopback port, against the
model's own `SentenceTransformer.encode` in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from common import matryoshka
from harness.procs import ROOT, SERVING, health_status
from harness.stack import service
from mlbase.settings import bundled_model_path
from sutra.mlbase.v1 import mlbase_service_pb2 as pb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as pb_grpc
from tests.support import cosines, serving

CORPUS = Path(__file__).resolve().parents[1] / "bench" / "data" / "corpus.txt"
GRPCURL = Path(sys.executable).parent / "grpcurl"
LONG = "a text well past the model window of two hundred and fifty six tokens " * 30


def corpus_texts(n: int, start: int = 0) -> list[str]:
    if CORPUS.exists():
        lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]
        return lines[start:start + n]
    return [f"sentence number {i} about topic {i % 7}" for i in range(start, start + n)]


TEXTS = corpus_texts(20) + ["", "hello", "Ünïcödé 🙂 中文", LONG]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    # torch explicitly: these tests compare with sentence-transformers' own encode.
    yield from serving(service("mlbase", tmp_path_factory.mktemp("mlbase") / "mlbase.log",
                               {"backend_name": "torch", "threads": 2, "server.drain_seconds": 0.0}))


@pytest.fixture(scope="module")
def stub(replica):
    with grpc.insecure_channel(replica.address) as channel:
        yield pb_grpc.MLBaseServiceStub(channel)


@pytest.fixture(scope="module")
def reference():
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    model = SentenceTransformer(bundled_model_path(), device="cpu", local_files_only=True)
    return lambda texts: model.encode(texts, show_progress_bar=False, convert_to_numpy=True)


def vectors(reply: pb.EmbedResponse) -> np.ndarray:
    out = np.frombuffer(reply.vectors, dtype="<f4").reshape(reply.count, reply.width)
    assert len(reply.vectors) == reply.count * reply.width * 4
    return out


def test_full_width_equals_sentence_transformers_encode(stub, reference):
    reply = stub.Embed(pb.EmbedRequest(texts=TEXTS, full_width=True))
    got = vectors(reply)
    assert got.shape == (len(TEXTS), 384)
    assert cosines(got, reference(TEXTS)).min() > 0.9999
    assert list(reply.truncated_indices) == [len(TEXTS) - 1]


def test_reduced_widths_are_the_shared_transform_of_the_full_vector(stub):
    full = vectors(stub.Embed(pb.EmbedRequest(texts=TEXTS, full_width=True)))
    info = stub.GetInfo(pb.GetInfoRequest())
    for dims, width in ((64, 64), (0, info.default_width), (384, 384), (32, 32)):
        reply = stub.Embed(pb.EmbedRequest(texts=TEXTS, dimensions=dims))
        got = vectors(reply)
        assert reply.width == width and got.shape == (len(TEXTS), width)
        np.testing.assert_allclose(got, matryoshka.reduce(full, width, info.layer_norm), atol=2e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_concurrent_requests_are_batched_without_mixing_rows(stub, reference):
    requests = [corpus_texts(6, start=100 + 10 * r) + [f"request {r}"] for r in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda t: stub.Embed(pb.EmbedRequest(texts=t, full_width=True)), requests))
    expected = reference([t for req in requests for t in req])
    got = np.concatenate([vectors(r) for r in replies])
    assert cosines(got, expected).min() > 0.9999


def test_get_info_describes_model_and_limits(stub):
    info = stub.GetInfo(pb.GetInfoRequest())
    assert (info.model_id, info.native_width, info.max_seq_length, info.backend, info.precision) == (
        "all-MiniLM-L6-v2", 384, 256, "torch", "fp32")
    assert (info.min_width, info.default_width, list(info.allowed_widths), info.layer_norm) == (32, 256, [], False)
    assert (info.max_inputs, info.max_chars) == (2048, 100_000)
    assert len(info.fingerprint) == 64
    assert stub.Embed(pb.EmbedRequest(texts=["x"])).model_fingerprint == info.fingerprint


def test_truncation_is_reported_or_rejected(stub):
    reply = stub.Embed(pb.EmbedRequest(texts=["short", LONG, "also short", LONG], dimensions=64))
    assert list(reply.truncated_indices) == [1, 3] and reply.count == 4
    ok = stub.Embed(pb.EmbedRequest(texts=["short"], truncation=pb.TRUNCATION_REJECT))
    assert ok.count == 1 and not ok.truncated_indices
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(texts=["short", LONG], truncation=pb.TRUNCATION_REJECT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "256 tokens" in err.value.details() and "texts[1]" in err.value.details()


@pytest.mark.parametrize("request_kwargs, needle", [
    ({"texts": []}, "cannot be empty"),
    ({"texts": ["x"] * 2049}, "2048"),
    ({"texts": ["ok", "y" * 100_001]}, "100000"),
    ({"texts": ["x"], "dimensions": 16}, "32 to 384"),
    ({"texts": ["x"], "dimensions": 385}, "32 to 384"),
])
def test_bad_input_is_invalid_argument_and_the_replica_stays_serving(stub, replica, request_kwargs, needle):
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(**request_kwargs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    assert health_status(replica.address) == SERVING
    assert stub.Embed(pb.EmbedRequest(texts=["still fine"])).count == 1


def test_grpcurl_lists_services_and_embeds(replica):
    listed = subprocess.run([str(GRPCURL), "-plaintext", replica.address, "list"],
                            capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert "sutra.mlbase.v1.MLBaseService" in listed and "grpc.health.v1.Health" in listed
    out = subprocess.run([str(GRPCURL), "-plaintext", "-d", '{"texts":["hello"],"dimensions":64}', replica.address,
                          "sutra.mlbase.v1.MLBaseService/Embed"],
                         capture_output=True, text=True, timeout=60, check=True, cwd=ROOT).stdout
    reply = json.loads(out)
    assert reply["count"] == 1 and reply["width"] == 64

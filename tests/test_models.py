"""Two models side by side in one frontend: the bundled all-MiniLM-L6-v2 (mean pooling) and a
second model built here from it (the same weights with CLS pooling, so other vectors), each on
its own replica, sharing one RocksDB shard. Their caches never mix: the same text is computed
once per model, each later answer (from L2: L1 is off) is that model's own vector, the two
fingerprints differ, and concurrent requests coalesce per model only."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from harness.procs import wait_until
from harness.stack import ShardClient, service
from mlbase.settings import MLBaseSettings
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

SECOND = "minilm-cls"


def cls_pooling_copy(dest: Path) -> Path:
    """The bundled model with CLS pooling instead of mean: links to its files, a new pooling config."""
    source = Path(MLBaseSettings().model_path)
    dest.mkdir()
    for item in source.iterdir():
        if item.name != "1_Pooling":
            (dest / item.name).symlink_to(item)
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (dest / "1_Pooling").mkdir()
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return dest


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    work = tmp_path_factory.mktemp("models")
    one = {"threads": 1, "server.drain_seconds": 0.0}
    procs = [
        service("mlbase", work / "default.log", one),
        service("mlbase", work / "second.log", {**one, "model_path": str(cls_pooling_copy(work / "cls-model")),
                                                "model_id": SECOND}),
        service("cacheshard", work / "shard.log", {"path": work / "db"}),
    ]
    front = None
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_serving(240)
        default, second, shard = procs
        front = service("embedding", work / "frontend.log", {
            "mlbase_address": default.address, "extra_models": (f"{SECOND}={second.address}",),
            "cache_shards": (shard.address,), "admin_port": 0, "l1_entries": 0, "mlbase_connections": 2})
        front.start().wait_serving(120)
        front.shard = shard  # the tests wait for write-backs on it before they expect L2 hits
        yield front
    finally:
        for proc in [front, *procs]:
            if proc is not None and proc.popen is not None and proc.popen.poll() is None:
                proc.kill()


def stored(shard) -> int:
    with ShardClient(shard.address) as client:
        return client.stats().stores


def settled(shard) -> int:
    """The shard's store count once it has not moved for half a second."""
    last = stored(shard)
    while True:
        time.sleep(0.5)
        now = stored(shard)
        if now == last:
            return now
        last = now


def embed(stub, texts, model=""):
    reply = stub.Embed(pb.EmbedRequest(inputs=texts, dimensions=384, model=model), timeout=120)
    return np.array([e.values for e in reply.embeddings]), reply


def test_two_models_serve_side_by_side_and_their_caches_never_mix(frontend):
    texts = [f"one text, two models {i}" for i in range(5)]
    with grpc.insecure_channel(frontend.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        default_info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        second_info = stub.GetInfo(pb.GetInfoRequest(model=SECOND), timeout=10)
        assert list(default_info.models) == [default_info.model_id, SECOND]
        assert second_info.model_id == SECOND and second_info.fingerprint != default_info.fingerprint

        before = stored(frontend.shard)
        first_a, reply_a = embed(stub, texts)
        first_b, reply_b = embed(stub, texts, SECOND)
        # The second model does not read the first's entries: computed again, and other vectors.
        assert reply_a.usage.computed == 5 and reply_b.usage.computed == 5
        assert reply_a.model == default_info.model_id and reply_b.model == SECOND
        cosines = np.sum(first_a * first_b, axis=1)
        assert np.all(cosines < 0.99), cosines
        # Each later answer comes from L2 and is that model's own vector (float16 storage), once
        # the write-backs (which linger up to --writeback-linger-ms for company) are stored.
        wait_until(lambda: stored(frontend.shard) - before == 10, 60, "both models' write-backs stored")
        again_b, reply = embed(stub, texts, SECOND)
        assert reply.usage.l2_hits == 5
        np.testing.assert_allclose(again_b, first_b, atol=2e-3)
        again_a, reply = embed(stub, texts, default_info.model_id)  # the default by its name
        assert reply.usage.l2_hits == 5
        np.testing.assert_allclose(again_a, first_a, atol=2e-3)

        with pytest.raises(grpc.RpcError) as caught:
            embed(stub, texts, "no-such-model")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and SECOND in caught.value.details()
        # A hostile name (1 MiB): the same clear error, which does not repeat it, and the frontend serves on.
        for call in (lambda: embed(stub, texts, "m" * (1 << 20)),
                     lambda: stub.GetInfo(pb.GetInfoRequest(model="m" * (1 << 20)), timeout=10)):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "(1048576 characters)" in caught.value.details() and len(caught.value.details()) < 400
        assert embed(stub, texts, SECOND)[1].usage.l2_hits == 5


def test_concurrent_requests_coalesce_per_model_only(frontend):
    """The same new texts asked of both models at once: computed once per model, never shared."""
    texts = [f"asked of both at once {i}" for i in range(4)]
    with grpc.insecure_channel(frontend.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        before = stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=10).computed
        results: dict[tuple[str, int], np.ndarray] = {}

        def ask(model: str, i: int) -> None:
            results[(model, i)] = embed(stub, texts, model)[0]

        threads = [threading.Thread(target=ask, args=(m, i)) for m in ("", SECOND) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        computed = stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=10).computed - before
        assert computed == 2 * len(texts)
        for i in range(3):
            np.testing.assert_allclose(results[("", i)], results[("", 0)], atol=2e-3)
            np.testing.assert_allclose(results[(SECOND, i)], results[(SECOND, 0)], atol=2e-3)
        assert np.all(np.sum(results[("", 0)] * results[(SECOND, 0)], axis=1) < 0.99)
        # Nothing pending afterwards, and a new request still computes.
        assert embed(stub, ["a last new text"], SECOND)[1].usage.computed == 1


def test_sutra_up_with_a_models_file_serves_both_models(tmp_path):
    """`sutra up --models-file`: the second model gets its own replica and its own HAProxy, and the
    frontend serves it by name beside the default, with separate caches."""
    from harness.deployed import deployed, free_run, sutra

    model_dir = cls_pooling_copy(tmp_path / "cls-model")
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - name: {SECOND}\n    path: {model_dir}\n    replicas: 1\n")
    base = free_run(20, set())
    with deployed(tmp_path / "run", 1, "--models-file", str(models), "--models-base-port", str(base)) as (s, out):
        assert f"model {SECOND}" in out
        status = json.loads(sutra("status", "--run-dir", str(s.run_dir), "--json").stdout)
        by_name = {p["name"]: p for p in status["processes"]}
        assert by_name[f"{SECOND}-mlbase1"]["health"] == "SERVING"
        assert by_name[f"haproxy-{SECOND}"]["address"] == s.address(base)
        with grpc.insecure_channel(s.frontend_address) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            b_info = stub.GetInfo(pb.GetInfoRequest(model=SECOND), timeout=10)
            assert list(info.models) == [info.model_id, SECOND]
            texts = ["served by two models from one stack"]
            a, reply_a = embed(stub, texts)
            b, reply_b = embed(stub, texts, SECOND)
            assert reply_a.usage.computed == reply_b.usage.computed == 1
            assert float(np.sum(a * b)) < 0.99
            assert embed(stub, texts, SECOND)[1].usage.l1_hits == 1
        # The OpenAI-compatible API routes by `model` too, and lists both.
        http = f"http://{s.address(s.http_port)}/v1"
        body = json.dumps({"input": texts, "model": SECOND, "dimensions": 384}).encode()
        request = urllib.request.Request(f"{http}/embeddings", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            doc = json.loads(answer.read())
        assert doc["model"] == SECOND
        np.testing.assert_allclose(np.array(doc["data"][0]["embedding"]), b[0], atol=1e-6)
        with urllib.request.urlopen(f"{http}/models", timeout=10) as answer:
            assert [m["id"] for m in json.loads(answer.read())["data"]] == [info.model_id, SECOND]
        # A rollout of one model's replicas leaves the other model alone.
        done = sutra("rollout", "--run-dir", str(s.run_dir), "--target", SECOND, "--backend", "torch")
        assert done.returncode == 0 and "one replica" in done.stdout, done.stdout + done.stderr
        with grpc.insecure_channel(s.frontend_address) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            moved = stub.GetInfo(pb.GetInfoRequest(model=SECOND), timeout=10)
            assert moved.backend == "torch" and moved.fingerprint != b_info.fingerprint
            assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).fingerprint == info.fingerprint
            again, reply = embed(stub, texts, SECOND)
            assert reply.usage.computed == 1  # the new fingerprint's keys: nothing cached yet
            np.testing.assert_allclose(again, b, atol=1e-3)  # the same weights and pooling, another backend


def test_cache_management_names_the_model(frontend):
    """InvalidateCache with `model` drops that model's entries only (the default's stay), a whole
    fingerprint of the second model can be invalidated by name, and an unknown name is a clear
    INVALID_ARGUMENT (as for Embed)."""
    texts = [f"managed per model {i}" for i in range(3)]
    with grpc.insecure_channel(frontend.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        # Earlier tests' write-backs may still land: wait until the shard's count stops moving.
        before = settled(frontend.shard)
        embed(stub, texts)
        embed(stub, texts, SECOND)
        wait_until(lambda: stored(frontend.shard) - before == 6, 60, "both models' write-backs stored")

        reply = stub.InvalidateCache(pb.InvalidateCacheRequest(inputs=texts, model=SECOND), timeout=30)
        assert reply.l2_deleted == 3
        assert embed(stub, texts, SECOND)[1].usage.computed == 3  # the second model's entries are gone
        assert embed(stub, texts)[1].usage.l2_hits == 3  # the default model's are not

        second_fp = stub.GetInfo(pb.GetInfoRequest(model=SECOND), timeout=10).fingerprint
        whole = stub.InvalidateCache(pb.InvalidateCacheRequest(all_entries=True, model=SECOND), timeout=30)
        assert whole.fingerprint == second_fp and whole.generation >= 1
        default_fp = stub.GetInfo(pb.GetInfoRequest(), timeout=10).fingerprint
        assert whole.fingerprint != default_fp

        for request in (pb.InvalidateCacheRequest(inputs=texts, model="no-such-model"),
                        pb.InvalidateCacheRequest(inputs=texts, model="m" * (1 << 20))):
            with pytest.raises(grpc.RpcError) as caught:
                stub.InvalidateCache(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and SECOND in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.PrewarmCache(pb.PrewarmCacheRequest(model="no-such-model"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert embed(stub, texts)[1].usage.l2_hits == 3  # still serving

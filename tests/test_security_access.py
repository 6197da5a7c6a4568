"""Bearer tokens, tenant isolation, per-tenant widths and message-size limits,
against real processes on loopback.

One replica (--threads 1), one cache shard and two frontends share the module:

- `authed`: tokens from a tenants file (acme, beta) plus an anonymous
  `--auth-token`, so tenants are isolated by default, `--max-message-bytes
  1 MiB`, L1 on;
- `header`: no tokens, `--isolate-tenants` with the tenant taken from the
  `x-sutra-tenant` header, `--l1-entries 0` so every hit it reports is an
  L2 hit. It shares the shard, so it reads what `authed` wrote back, in
  the namespace of the tenant name.

Every test uses its own texts (a uuid prefix).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from common.cache_key import cache_key
from embedding.client import Client
from harness.procs import ROOT, SERVING, Proc, health_status
from harness.stack import backends, service
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

TOKENS = {"acme": "acme-7d1f9c", "beta": "beta-41ab02", "": "anon-93c5e1"}
MAX_MESSAGE = 1 << 20
TENANTS_YAML = f"""
tenants:
  acme:
    tokens: ["{TOKENS['acme']}"]
    allowed_widths: [64, 128, 256]
    default_width: 128
  beta:
    token: "{TOKENS['beta']}"
    allowed_widths: [384]
"""


def frontend(tmp, name: str, replica: Proc, shard: Proc, values: dict) -> Proc:
    """A frontend on `replica` and `shard`; `values` are further FrontendSettings fields."""
    return service("embedding", tmp / f"{name}.log",
                   {"mlbase_address": replica.address, "cache_shards": (shard.address,), "admin_port": 0,
                    "mlbase_connections": 1, **values})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access")
    (tmp / "tenants.yaml").write_text(TENANTS_YAML)
    replica, shard = backends(tmp)
    authed = frontend(tmp, "authed", replica, shard, {"tenants_file": str(tmp / "tenants.yaml"),
                                                      "auth_tokens": (TOKENS[""],),
                                                      "server.max_message_bytes": MAX_MESSAGE})
    header = frontend(tmp, "header", replica, shard, {"l1_entries": 0, "isolate_tenants": True})
    procs = [replica, shard, authed, header]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_serving()
        yield {"replica": replica, "shard": shard, "authed": authed, "header": header, "tmp": tmp}
    finally:
        for p in reversed(procs):
            p.stop()


def bearer(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


def embed(proc: Proc, inputs, metadata=(), dimensions: int = 0) -> pb.EmbedResponse:
    with grpc.insecure_channel(proc.address) as ch:
        return pb_grpc.EmbeddingServiceStub(ch).Embed(
            pb.EmbedRequest(inputs=list(inputs), dimensions=dimensions), metadata=metadata, timeout=60)


def stats(proc: Proc) -> pb.GetCacheStatsResponse:
    with grpc.insecure_channel(proc.address) as ch:
        return pb_grpc.EmbeddingServiceStub(ch).GetCacheStats(pb.GetCacheStatsRequest(), metadata=bearer(""),
                                                              timeout=10)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def fresh(label: str) -> str:
    return f"{label} {uuid.uuid4().hex}"


# --- authentication -------------------------------------------------------------------------

def test_missing_or_wrong_token_is_unauthenticated(stack):
    fe = stack["authed"]
    for metadata in [(), (("authorization", "Bearer not-a-token"),), (("authorization", TOKENS["acme"]),),
                     (("authorization", f"Basic {TOKENS['acme']}"),), (("x-sutra-tenant", "acme"),)]:
        assert code_of(lambda: embed(fe, ["hello"], metadata)) == grpc.StatusCode.UNAUTHENTICATED, metadata
    with grpc.insecure_channel(fe.address) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        assert code_of(lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=10)) \
            == grpc.StatusCode.UNAUTHENTICATED
        stream = stub.EmbedStream(iter([pb.EmbedStreamRequest(inputs=["hello"])]), timeout=10)
        assert code_of(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(pb.EmbedRequest(inputs=["hello"]), timeout=10)
        assert "Bearer" in err.value.details()
    assert stats(fe).l1.entries >= 0  # with a token (here the anonymous one) the same call answers


def test_health_and_reflection_stay_open_without_a_token(stack):
    fe = stack["authed"]
    assert health_status(fe.address) == SERVING
    assert health_status(fe.address, "sutra.embedding.v1.EmbeddingService") == SERVING
    with grpc.insecure_channel(fe.address) as ch:
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert "sutra.embedding.v1.EmbeddingService" in services


def test_right_token_works_from_the_client_library_and_the_cli(stack):
    fe = stack["authed"]
    text = fresh("client token")
    with Client(fe.address, token=TOKENS["acme"], timeout=60) as client:
        vectors = client.embed([text])
        assert vectors.shape == (1, 128)  # acme's default width
        assert client.info().default_width == 128
    with Client(fe.address, token="wrong", timeout=10, retries=0) as client:
        assert code_of(lambda: client.embed([text])) == grpc.StatusCode.UNAUTHENTICATED
    out = subprocess.run([sys.executable, "-m", "embedding.cli", "embed", text, "--json", "--address", fe.address,
                          "--token", TOKENS["acme"]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["dimensions"] == 128 and doc["usage"]["l1_hits"] == 1
    assert np.allclose(doc["embeddings"][0]["embedding"], vectors[0], atol=1e-6)
    out = subprocess.run([sys.executable, "-m", "embedding.cli", "embed", text, "--address", fe.address],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin"})
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr


# --- tenants --------------------------------------------------------------------------------

def test_each_tenant_gets_its_own_width_policy(stack):
    fe = stack["authed"]
    text = fresh("widths")
    assert embed(fe, [text], bearer("acme")).dimensions == 128
    assert embed(fe, [text], bearer("acme"), dimensions=64).dimensions == 64
    with pytest.raises(grpc.RpcError) as err:
        embed(fe, [text], bearer("acme"), dimensions=384)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one of 64, 128, 256" in err.value.details()
    assert embed(fe, [text], bearer("beta")).dimensions == 384  # beta: only 384, so that is its default
    with pytest.raises(grpc.RpcError) as err:
        embed(fe, [text], bearer("beta"), dimensions=128)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one of 384" in err.value.details()
    assert embed(fe, [text], bearer(""), dimensions=200).dimensions == 200  # no tenant policy: the model's
    with grpc.insecure_channel(fe.address) as ch:
        info = pb_grpc.EmbeddingServiceStub(ch).GetInfo(pb.GetInfoRequest(), metadata=bearer("acme"), timeout=10)
    assert list(info.allowed_widths) == [64, 128, 256] and info.default_width == 128


def shard_has(stack, fingerprint: str, text: str, tenant: str) -> bool:
    with grpc.insecure_channel(stack["shard"].address) as ch:
        reply = next(cpb_grpc.CacheShardServiceStub(ch).Lookup(
            iter([cpb.LookupRequest(batch_id=1, keys=[cache_key(fingerprint, text, tenant)])]), timeout=10))
    return bool(reply.found[0])


def test_one_tenants_cache_is_never_served_to_another(stack):
    authed, header = stack["authed"], stack["header"]
    text = fresh("isolated")
    first = embed(authed, [text], bearer("acme")).usage
    assert (first.computed, first.l1_hits, first.l2_hits) == (1, 0, 0)
    again = embed(authed, [text], bearer("acme")).usage
    assert (again.computed, again.l1_hits) == (0, 1)  # acme's own entry is a hit
    other = embed(authed, [text], bearer("beta")).usage
    assert (other.computed, other.l1_hits, other.l2_hits) == (1, 0, 0)
    anon = embed(authed, [text], bearer("")).usage
    assert (anon.computed, anon.l1_hits, anon.l2_hits) == (1, 0, 0)
    # With tokens the x-sutra-tenant header cannot claim another namespace.
    claimed = fresh("claimed")
    embed(authed, [claimed], bearer("acme"))
    usage = embed(authed, [claimed], (*bearer("beta"), ("x-sutra-tenant", "acme"))).usage
    assert (usage.computed, usage.l1_hits, usage.l2_hits) == (1, 0, 0)

    # L2: acme's write-back lands under acme's key only...
    with grpc.insecure_channel(authed.address) as ch:
        fingerprint = pb_grpc.EmbeddingServiceStub(ch).GetInfo(pb.GetInfoRequest(), metadata=bearer("acme"),
                                                               timeout=10).fingerprint
    deadline = time.monotonic() + 30
    while not shard_has(stack, fingerprint, text, "acme"):
        assert time.monotonic() < deadline, "acme's write-back never reached the shard"
        time.sleep(0.05)
    # ...so through the L2-only frontend acme hits, while other tenants (and no tenant) compute.
    assert embed(header, [text], (("x-sutra-tenant", "acme"),)).usage.l2_hits == 1
    gamma = embed(header, [text], (("x-sutra-tenant", "gamma"),)).usage
    assert (gamma.computed, gamma.l2_hits) == (1, 0)
    unnamed = fresh("unnamed")
    embed(authed, [unnamed], bearer("beta"))
    while not shard_has(stack, fingerprint, unnamed, "beta"):
        assert time.monotonic() < deadline, "beta's write-back never reached the shard"
        time.sleep(0.05)
    none = embed(header, [unnamed]).usage
    assert (none.computed, none.l2_hits) == (1, 0)
    assert not shard_has(stack, fingerprint, unnamed, "acme")
    assert code_of(lambda: embed(header, [text], (("x-sutra-tenant", "bad tenant!"),))) \
        == grpc.StatusCode.INVALID_ARGUMENT


def concurrent_embeds(fe: Proc, text: str, tenants: list[str]) -> list[pb.EmbedUsage]:
    """The same text from several tenants at the same moment."""
    start = threading.Barrier(len(tenants))
    results: list = [None] * len(tenants)

    def one(i: int, tenant: str) -> None:
        start.wait()
        results[i] = embed(fe, [text], bearer(tenant)).usage

    threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(tenants)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_single_flight_never_joins_two_tenants(stack):
    """Two tenants asking for one uncached text at once each cause a computation:
    no tenant can learn from a faster answer that another asked for it first.
    The same tenant twice is computed once (joined or then cached)."""
    fe = stack["authed"]
    before = stats(fe).computed
    usages = concurrent_embeds(fe, fresh("flight two tenants"), ["acme", "beta"])
    assert [(u.computed, u.l1_hits, u.l2_hits) for u in usages] == [(1, 0, 0), (1, 0, 0)]
    assert stats(fe).computed - before == 2
    before = stats(fe).computed
    concurrent_embeds(fe, fresh("flight one tenant"), ["acme", "acme"])
    assert stats(fe).computed - before == 1


# --- message size ---------------------------------------------------------------------------

def test_oversize_message_is_refused_and_the_server_stays_serving(stack):
    fe = stack["authed"]
    big = [fresh("x" * 60_000) for _ in range(20)]  # ~1.2 MB > the 1 MiB limit; each input is within max_chars
    options = [("grpc.max_send_message_length", 8 << 20)]
    with grpc.insecure_channel(fe.address, options=options) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(pb.EmbedRequest(inputs=big), metadata=bearer("acme"), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stream = stub.EmbedStream(iter([pb.EmbedStreamRequest(inputs=big)]), metadata=bearer("acme"), timeout=30)
        assert code_of(lambda: list(stream)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert health_status(fe.address) == SERVING
    assert embed(fe, [fresh("after oversize")], bearer("acme")).usage.computed == 1
    # The client library caps what it sends too: refused before it leaves the process.
    with Client(fe.address, token=TOKENS["acme"], max_message_bytes=64 << 10, retries=0) as client:
        assert code_of(lambda: client.embed(["y" * 100_000 + uuid.uuid4().hex])) \
            == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Traceback" not in fe.log()

"""Cache management: invalidate by texts and by fingerprint (a cache generation), export to a
file and import it back, admin-only RPCs when tokens are on; on real processes (model, RocksDB
shard, HAProxy, frontend), through the `sutra cache` command."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from deploy.settings import ROOT
from embedding import cache_file, generations
from embedding.recent import RecentTexts
from deploy.scrape import fetch
from harness.impatient.metrics import IDLE_GAUGES
from harness.procs import free_port, wait_until
from harness.stack import Stack
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

ADMIN, USER = "admin-token-for-tests", "user-token-for-tests"


# -- units ----------------------------------------------------------------------------------------
def test_recent_texts_keep_the_latest_distinct_texts_within_both_bounds():
    recent = RecentTexts(capacity=3, max_chars=100)
    recent.touch("", ["a", "b", "c"])
    recent.touch("", ["a"])  # used again: newest
    recent.touch("t", ["d"])
    assert recent.latest(10) == [("t", "d"), ("", "a"), ("", "c")]
    recent.touch("", ["x" * 100])  # the character bound drops the oldest until it holds
    assert recent.latest(10) == [("", "x" * 100)] and recent.chars == 100


def test_the_export_file_round_trips_and_refuses_what_is_not_one():
    entries = [(bytes([i]) * 16, bytes([i]) * 40) for i in range(5)]
    out = io.BytesIO()
    assert cache_file.write(out, entries) == 5
    assert list(cache_file.read(io.BytesIO(out.getvalue()))) == entries
    with pytest.raises(cache_file.BadCacheFile):
        list(cache_file.read(io.BytesIO(out.getvalue()[:-3])))
    with pytest.raises(cache_file.BadCacheFile):
        list(cache_file.read(io.BytesIO(b"not a cache file")))


def test_a_generation_changes_the_keys_fingerprint_and_survives_the_codec():
    assert generations.effective("fp", 0) == "fp" and generations.effective("fp", 3) == "fp#g3"
    assert generations.decode(generations.encode(7)) == 7
    assert generations.record_key("fp") != generations.record_key("fp2")


# -- on a running stack ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("cache-admin"), replica_count=1,
              frontend_flags=("--admin-token", ADMIN, "--auth-token", USER, "--admin-port", str(free_port())))
    try:
        yield s.start()
    finally:
        s.stop()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def embed(stub, texts: list[str]) -> pb.EmbedResponse:
    return stub.Embed(pb.EmbedRequest(inputs=texts, dimensions=64), metadata=bearer(USER), timeout=60)


def metrics_url(stack) -> str:
    args = stack.frontend.args  # the harness passes --admin-port 0; the fixture's flag, last, wins
    admin_port = int(args[len(args) - 1 - args[::-1].index("--admin-port") + 1])
    return f"http://127.0.0.1:{admin_port}/metrics"


def write_backs_stored(stack) -> None:
    """Wait until the frontend holds no write-back (they linger a little before they are stored)."""
    wait_until(lambda: fetch(metrics_url(stack), timeout=5, token=ADMIN).value("sutra_embedding_writeback_queued")
               == 0, 60, "the write-backs stored")


def cache(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy", "cache", "--address", stack.frontend.address,
                           "--token", ADMIN, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cache_management_needs_an_admin_token(stack):
    with grpc.insecure_channel(stack.frontend.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        calls = {
            "InvalidateCache": lambda md: stub.InvalidateCache(pb.InvalidateCacheRequest(all_entries=True),
                                                               metadata=md, timeout=30),
            "ExportCache": lambda md: list(stub.ExportCache(pb.ExportCacheRequest(), metadata=md, timeout=30)),
            "ImportCache": lambda md: stub.ImportCache(iter([pb.ImportCacheRequest()]), metadata=md, timeout=30),
            "PrewarmCache": lambda md: stub.PrewarmCache(pb.PrewarmCacheRequest(), metadata=md, timeout=30),
        }
        for name, call in calls.items():
            for metadata, code in ((bearer(USER), grpc.StatusCode.PERMISSION_DENIED),
                                   ((), grpc.StatusCode.UNAUTHENTICATED)):
                with pytest.raises(grpc.RpcError) as caught:
                    call(metadata)
                assert caught.value.code() == code, name
        # Nothing was invalidated by the refused calls, and embedding still works with the user token.
        assert embed(stub, ["after the refused admin calls"]).usage.computed == 1


def test_invalidate_export_import_and_a_new_generation(stack, tmp_path):
    texts = [f"cache management text {i}" for i in range(6)]
    with grpc.insecure_channel(stack.frontend.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        first = embed(stub, texts)
        assert first.usage.computed == 6
        vectors = np.array([e.values for e in first.embeddings])
        assert embed(stub, texts).usage.l1_hits == 6

        export = tmp_path / "cache.bin"
        write_backs_stored(stack)
        done = cache(stack, "export", str(export))
        assert done.returncode == 0, done.stderr
        with open(export, "rb") as f:
            exported = list(cache_file.read(f))
        assert len(exported) >= 6

        # By texts: gone from L1 and L2; the others untouched.
        done = cache(stack, "invalidate", *texts[:3])
        assert done.returncode == 0, done.stderr
        assert "3 L1 entries dropped, 3 L2 keys deleted" in done.stdout
        again = embed(stub, texts)
        assert (again.usage.computed, again.usage.l1_hits) == (3, 3)

        # Every text invalidated, then the export imported: all six come back from L2, unchanged.
        assert cache(stack, "invalidate", *texts).returncode == 0
        done = cache(stack, "import", str(export))
        assert done.returncode == 0 and f"{len(exported)} entries imported" in done.stdout, done.stderr
        restored = embed(stub, texts)
        assert (restored.usage.l2_hits, restored.usage.computed) == (6, 0)
        # (L2 keeps float16: the vectors match the computed ones within its rounding)
        np.testing.assert_allclose(np.array([e.values for e in restored.embeddings]), vectors, atol=1e-3)

        # A new generation: every entry of the active fingerprint reads as a miss at once.
        done = cache(stack, "invalidate", "--all")
        assert done.returncode == 0 and "cache generation 1" in done.stdout, done.stderr
        assert embed(stub, texts).usage.computed == 6
        assert embed(stub, texts).usage.l1_hits == 6  # cached again, under the new generation

        # The generation lives in the cache: a restarted frontend reads it and keeps old entries hidden
        # (generation 0's, imported above, would otherwise answer).
        done = cache(stack, "invalidate", "--all")
        assert done.returncode == 0 and "cache generation 2" in done.stdout, done.stderr
        stack.frontend.kill()
        stack.frontend = stack.relaunch(stack.frontend).wait_serving(120)
    with grpc.insecure_channel(stack.frontend.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        assert embed(stub, texts).usage.computed == 6

        # Not a cache entry: refused, nothing stored.
        with pytest.raises(grpc.RpcError) as caught:
            stub.ImportCache(iter([pb.ImportCacheRequest(entries=[pb.CacheEntry(key=b"short", value=b"x")])]),
                             metadata=bearer(ADMIN), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Pre-warming needs a replica of another fingerprint (a rollout's): there is none.
        with pytest.raises(grpc.RpcError) as caught:
            stub.PrewarmCache(pb.PrewarmCacheRequest(count=10), metadata=bearer(ADMIN), timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        final = embed(stub, ["a new text after all that"])
        assert final.usage.computed == 1


def test_impatient_and_hostile_admin_callers_leave_the_frontend_serving(stack):
    """Cache management as the client we fear calls it: a 1 ms deadline, an export dropped after
    its first page, an import stream cancelled while open and one never finished before its
    deadline, a message over the 4 MiB limit. Afterwards a whole export, an import and an Embed
    still work, and nothing the storm started is left pending."""
    texts = [f"impatient admin text {i}" for i in range(8)]
    admin = bearer(ADMIN)
    with grpc.insecure_channel(stack.frontend.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        embed(stub, texts)
        write_backs_stored(stack)
        entries = [e for page in stub.ExportCache(pb.ExportCacheRequest(), metadata=admin, timeout=60)
                   for e in page.entries]
        assert len(entries) >= len(texts)

        # A 1 ms deadline on each admin call: it ends in time or with DEADLINE_EXCEEDED, never else.
        for call in (lambda: list(stub.ExportCache(pb.ExportCacheRequest(), metadata=admin, timeout=0.001)),
                     lambda: stub.ImportCache(iter([pb.ImportCacheRequest(entries=entries[:2])]), metadata=admin,
                                              timeout=0.001),
                     lambda: stub.InvalidateCache(pb.InvalidateCacheRequest(inputs=["nothing cached"]),
                                                  metadata=admin, timeout=0.001)):
            try:
                call()
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc

        # A model this frontend does not serve: the same clear error as Embed gives, for both calls
        # that name one; the default model by its own name is fine.
        served = stub.GetInfo(pb.GetInfoRequest(), metadata=admin, timeout=10).model_id
        for call in (lambda m: stub.InvalidateCache(pb.InvalidateCacheRequest(inputs=["x"], model=m), metadata=admin,
                                                    timeout=30),
                     lambda m: stub.PrewarmCache(pb.PrewarmCacheRequest(count=1, model=m), metadata=admin,
                                                 timeout=30)):
            with pytest.raises(grpc.RpcError) as caught:
                call("no-such-model")
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and served in caught.value.details()
        probe = "invalidated through the model's own name"
        embed(stub, [probe])
        named = stub.InvalidateCache(pb.InvalidateCacheRequest(inputs=[probe], model=served), metadata=admin,
                                     timeout=30)
        assert named.l1_dropped == 1  # the default model by its own name: its entry was there, and is gone

        # An export read for one page, then dropped.
        pages = stub.ExportCache(pb.ExportCacheRequest(), metadata=admin, timeout=60)
        next(pages)
        pages.cancel()

        # Import streams that never close: one cancelled by the caller, one cut by its deadline.
        hold = threading.Event()

        def open_stream():
            yield pb.ImportCacheRequest(entries=entries[:1])
            hold.wait(30)

        pending = stub.ImportCache.future(open_stream(), metadata=admin, timeout=60)
        time.sleep(0.2)
        pending.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ImportCache(open_stream(), metadata=admin, timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        hold.set()

        # One message far over the frontend's 4 MiB limit: refused before any of it is stored.
        huge = pb.ImportCacheRequest(entries=[pb.CacheEntry(key=bytes(16), value=bytes(5 << 20))])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ImportCache(iter([huge]), metadata=admin, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # Still serving: a whole export, an import of what it gave, and embeddings from the cache.
        again = [e for page in stub.ExportCache(pb.ExportCacheRequest(), metadata=admin, timeout=60)
                 for e in page.entries]
        assert {e.key for e in entries} <= {e.key for e in again}
        stored = stub.ImportCache(iter([pb.ImportCacheRequest(entries=entries)]), metadata=admin, timeout=60)
        assert stored.stored == len(entries)
        reply = embed(stub, texts)
        assert reply.usage.computed == 0
        assert embed(stub, ["a new text after the admin storm"]).usage.computed == 1
    gauges = {}
    for _ in range(120):  # the cancelled calls settle asynchronously
        page = fetch(metrics_url(stack), timeout=5, token=ADMIN)
        gauges = {name.removeprefix("sutra_embedding_"): page.value(name) for name in IDLE_GAUGES
                  if IDLE_GAUGES[name] == 0}
        if not any(gauges.values()):
            break
        time.sleep(0.25)
    assert not any(gauges.values()), gauges

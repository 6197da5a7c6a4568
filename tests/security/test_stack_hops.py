"""The internal hops of a default `sutra up` stack, attacked from the same host.

A hostile neighbour can reach every port. On the stack `make up` starts (one replica here, free
ports, its own run directory) it must not be able to store into the cache shard, call a replica
directly or through HAProxy, or send the frontend a 36 MB request; and a flood of idle sockets on
HAProxy must not lock out the frontend's reconnects. After each attack normal traffic through the
frontend still works, and nothing forged is served.
"""

from __future__ import annotations

import selectors
import socket
import stat
import threading
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from common.cache_key import cache_key
from common.codec import encode
from common.tls import TlsClientOptions, open_channel
from deploy import probe
from deploy.pki import StackPki
from deploy.supervisor import Supervisor
from embedding.client import Client, EmbedOutput
from harness.deployed import deployed
from harness.procs import wait_until
from lb import runtime
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from sutra.mlbase.v1 import mlbase_service_pb2 as mpb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as mpb_grpc
from tests.certs import make_pki

MESSAGE_BYTES = 8 << 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with deployed(tmp_path_factory.mktemp("hops") / "run", 1) as (settings, out):
        yield settings, out


@pytest.fixture(scope="module")
def rogue(tmp_path_factory):
    """A certificate from a CA the stack does not trust."""
    pki = make_pki(tmp_path_factory.mktemp("rogue"))
    return TlsClientOptions(ca=str(pki.ca), cert=str(pki.rogue_cert), key=str(pki.rogue_key))


def with_stack_ca(settings, role: str) -> TlsClientOptions:
    """Role `role`'s certificate, trusting the stack's CA."""
    pki = StackPki(settings.tls_dir)
    return TlsClientOptions(ca=str(pki.ca), cert=str(pki.cert(role)), key=str(pki.key(role)))


def callers(settings, rogue) -> dict[str, TlsClientOptions | None]:
    """Everyone who must not get data from an internal port: no TLS, TLS without a client
    certificate, a certificate from another CA, and the stack's own certificates of other roles."""
    pki = StackPki(settings.tls_dir)
    return {"plaintext": None, "no client certificate": TlsClientOptions(ca=str(pki.ca)), "rogue CA": rogue,
            "haproxy's certificate": with_stack_ca(settings, "haproxy"),
            "a server's certificate": with_stack_ca(settings, "mlbase")}


def frontend_works(settings) -> EmbedOutput:
    """A new text through the frontend: computed, and the reply is a real vector."""
    with Client(settings.frontend_address, retries=3) as client:
        out = client.embed_detailed([f"still serving {uuid.uuid4()}"])
    assert out.vectors.shape[0] == 1 and abs(float((out.vectors[0] ** 2).sum()) - 1.0) < 1e-3
    return out


def test_up_says_internal_hops_use_mutual_tls_and_keys_are_private(stack):
    settings, out = stack
    assert "mutual TLS" in out
    assert stat.S_IMODE(settings.tls_dir.stat().st_mode) == 0o700
    keys = list(settings.tls_dir.glob("*.key")) + list(settings.tls_dir.glob("*.pem"))
    assert len(keys) >= 6
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_nobody_but_the_frontend_and_operator_stores_into_the_shard(stack, rogue):
    settings, _ = stack
    fingerprint = Client(settings.frontend_address).info().fingerprint
    text = f"poison me {uuid.uuid4()}"
    forged = np.eye(1, 384, dtype=np.float32)[0]
    entry = cpb.Entry(key=cache_key(fingerprint, text), value=encode(forged))
    for who, tls in callers(settings, rogue).items():
        with open_channel(settings.shard_address, tls, max_message_bytes=MESSAGE_BYTES, aio=False) as ch:
            with pytest.raises(grpc.RpcError) as err:
                cpb_grpc.CacheShardServiceStub(ch).Store(cpb.StoreRequest(entries=[entry]), timeout=10)
        expected = grpc.StatusCode.PERMISSION_DENIED if who == "haproxy's certificate" else grpc.StatusCode.UNAVAILABLE
        assert err.value.code() == expected, who
    # Nothing was stored: the frontend computes the text and does not serve the forged vector.
    with Client(settings.frontend_address) as client:
        out = client.embed_detailed([text])
    assert out.computed == 1 and out.l2_hits == 0
    assert out.vectors[0][0] < 0.99
    frontend_works(settings)


def test_a_checkpoint_is_a_name_in_the_shards_backup_dir_never_a_path(stack, rogue, tmp_path):
    settings, _ = stack
    outside = tmp_path / "evil"
    request = cpb.CheckpointRequest(name=str(outside))
    for who, tls in callers(settings, rogue).items():
        with open_channel(settings.shard_address, tls, max_message_bytes=MESSAGE_BYTES, aio=False) as ch:
            with pytest.raises(grpc.RpcError) as err:
                cpb_grpc.CacheShardServiceStub(ch).Checkpoint(request, timeout=30)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED), who
    with open_channel(settings.shard_address, settings.client_tls("operator"), max_message_bytes=MESSAGE_BYTES,
                      aio=False) as ch:
        stub = cpb_grpc.CacheShardServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Checkpoint(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and str(outside) not in err.value.details()
        reply = stub.Checkpoint(cpb.CheckpointRequest(name="nightly"), timeout=60)
    assert not outside.exists()
    written = Path(reply.directory)
    assert written.is_dir() and written.name == "nightly" and written.is_relative_to(settings.run_dir)
    frontend_works(settings)


def test_the_operator_certificate_reads_shard_stats(stack):
    settings, _ = stack
    with open_channel(settings.shard_address, settings.client_tls("operator"), max_message_bytes=MESSAGE_BYTES,
                      aio=False) as ch:
        stats = cpb_grpc.CacheShardServiceStub(ch).GetStats(cpb.GetStatsRequest(), timeout=10)
    assert stats.uptime_seconds > 0


@pytest.mark.parametrize("through", ["replica", "haproxy"])
def test_nobody_but_the_frontend_calls_a_replica(stack, rogue, through):
    settings, _ = stack
    address = settings.replica_addresses()[0] if through == "replica" else settings.lb_address
    refused = {**callers(settings, rogue), "operator": settings.client_tls("operator")}
    for who, tls in refused.items():
        with open_channel(address, tls, max_message_bytes=MESSAGE_BYTES, aio=False) as ch:
            with pytest.raises(grpc.RpcError) as err:
                mpb_grpc.MLBaseServiceStub(ch).Embed(mpb.EmbedRequest(texts=["direct"]), timeout=10)
        allowed_cert = who in ("haproxy's certificate", "operator")
        expected = grpc.StatusCode.PERMISSION_DENIED if allowed_cert else grpc.StatusCode.UNAVAILABLE
        assert err.value.code() == expected, who
    # The frontend's own certificate is the one that gets vectors.
    with open_channel(address, settings.client_tls("embedding"), max_message_bytes=MESSAGE_BYTES, aio=False) as ch:
        reply = mpb_grpc.MLBaseServiceStub(ch).Embed(mpb.EmbedRequest(texts=["direct"]), timeout=30)
    assert reply.count == 1
    frontend_works(settings)


def test_a_36_mb_embed_is_refused_before_it_is_parsed(stack):
    settings, _ = stack
    texts = ["z" * 90_000] * 400
    with open_channel(settings.frontend_address, None, max_message_bytes=64 << 20, aio=False) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=texts), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    log = (settings.log_dir / "embedding.log").read_text()
    assert "Traceback" not in log
    frontend_works(settings)


class IdleFlood(threading.Thread):
    """Keeps `size` silent connections open to a port, opening a new one for each the server
    closes, as an attacker would; counts the closes."""

    def __init__(self, port: int, size: int) -> None:
        super().__init__(daemon=True)
        self.port, self.size = port, size
        self.selector = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.peak = 0
        self.closed_by_peer = 0

    def run(self) -> None:
        while not self.stop.is_set():
            while len(self.selector.get_map()) < self.size and not self.stop.is_set():
                try:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
                except OSError:
                    break
                self.selector.register(sock, selectors.EVENT_READ)
            self.peak = max(self.peak, len(self.selector.get_map()))
            for key, _ in self.selector.select(timeout=0.2):
                self.selector.unregister(key.fileobj)
                try:
                    self.closed_by_peer += key.fileobj.recv(1) == b""
                except ConnectionResetError:
                    self.closed_by_peer += 1
                key.fileobj.close()

    def close(self) -> None:
        self.stop.set()
        self.join(30)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def test_idle_socket_flood_on_haproxy_does_not_lock_out_reconnects(stack):
    """5,000 silent sockets held open on HAProxy's port, more than its old 4,096-connection cap, topped
    up as fast as HAProxy closes them: the frontend, restarted so that it must open new connections,
    still becomes ready and computes new texts, and HAProxy keeps closing the silent sockets."""
    settings, _ = stack
    before = _lb_counts(settings)
    flood = IdleFlood(settings.lb_port, 5000)
    flood.start()
    try:
        wait_until(lambda: flood.peak >= 4500, 120, "the flood to be in place")
        Supervisor(settings.supervisor_socket).restart("embedding")
        wait_until(lambda: _serving(settings), 120, "the frontend to be SERVING again (it asks ML-base first)")
        assert frontend_works(settings).computed == 1
        wait_until(lambda: flood.closed_by_peer >= 1000, 60, "HAProxy to close silent sockets")
    finally:
        flood.close()
    after = _lb_counts(settings)
    # HAProxy refused the silent sockets at the door; they never took a replica connection.
    assert after["denied"] - before["denied"] >= 1000
    assert after["to_replicas"] - before["to_replicas"] < 200
    frontend_works(settings)


def _lb_counts(settings) -> dict[str, int]:
    rows = {(r["pxname"], r["svname"]): r for r in runtime.show_stat(settings.haproxy_socket)}
    return {"denied": int(rows[("mlbase_in", "FRONTEND")]["dreq"] or 0),
            "to_replicas": int(rows[("mlbase", "BACKEND")]["stot"] or 0)}


def _serving(settings) -> bool:
    return probe.grpc_health(settings.frontend_address) == "SERVING"

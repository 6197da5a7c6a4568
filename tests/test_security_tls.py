"""TLS on every hop and mutual TLS between components, with real processes
and throwaway certificates (tests/certs.py).

The chain, every server requiring client certificates signed by the test CA:

    client --mTLS--> frontend --mTLS, through HAProxy (tcp)--> replica
                        └----------------mTLS----------------> cache shard

HAProxy passes the frontend's TLS through untouched; its own health check
speaks TLS to the replica (check-ssl, ALPN h2, the test CA, a client
certificate). The frontend runs with `--l1-entries 0`, so a repeated text
can only be answered from the shard.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from common.tls import TlsClientOptions, open_channel
from embedding.client import Client
from harness.procs import ROOT, SERVING, free_port, health_status
from harness.stack import service
from lb import render, runtime
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc
from tests.certs import Pki, make_pki

HAPROXY = "/usr/sbin/haproxy"


class HAProxy:
    def __init__(self, settings: render.LbSettings, path) -> None:
        self.settings = settings
        cfg = render.write(settings, path / f"haproxy-{settings.port}.cfg")
        check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self._log = open(path / f"haproxy-{settings.port}.log", "wb")
        self.popen = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)
        self._log.close()


def server_flags(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)]


def client_flags(prefix: str, pki: Pki) -> list[str]:
    return [f"--{prefix}tls-ca", str(pki.ca), f"--{prefix}tls-cert", str(pki.client_cert),
            f"--{prefix}tls-key", str(pki.client_key)]


def mtls(pki: Pki, **kw) -> TlsClientOptions:
    return TlsClientOptions(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key), **kw)


def credentials(pki: Pki) -> grpc.ChannelCredentials:
    return mtls(pki).credentials()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    pki = make_pki(tmp / "pki")
    # The TLS flags stay raw flags: paths of this test's own PKI, given to the launch recipe last.
    replica = service("mlbase", tmp / "mlbase.log", {"threads": 1, "server.drain_seconds": 0.0}, *server_flags(pki))
    shard = service("cacheshard", tmp / "shard.log", {"path": tmp / "db"}, *server_flags(pki))
    lb = render.LbSettings(replicas=(replica.address,), socket=str(tmp / "haproxy.sock"), port=free_port(),
                           stats_port=free_port(), check_ssl=True, check_ca_file=str(pki.ca),
                           check_crt=str(pki.client_pem))
    frontend = service("embedding", tmp / "embedding.log",
                       {"mlbase_address": f"127.0.0.1:{lb.port}", "cache_shards": (shard.address,), "l1_entries": 0,
                        "admin_port": 0, "mlbase_connections": 2},
                       *server_flags(pki), *client_flags("mlbase-", pki), *client_flags("shard-", pki))
    for proc in (replica, shard, frontend):
        proc.credentials = credentials(pki)  # wait_serving's health checks speak mTLS
    haproxy = None
    try:
        replica.start()
        shard.start()
        replica.wait_serving()
        shard.wait_serving()
        haproxy = HAProxy(lb, tmp)
        runtime.wait_all_up(lb.socket, count=1, timeout=30)
        frontend.start().wait_serving()
        yield {"pki": pki, "replica": replica, "shard": shard, "frontend": frontend, "lb": lb, "tmp": tmp}
    finally:
        frontend.stop()
        if haproxy is not None:
            haproxy.stop()
        shard.stop()
        replica.stop()


def health_over(address: str, tls: TlsClientOptions | None):
    """Health/Check with these client options: the status, or the error code."""
    with open_channel(address, tls, max_message_bytes=1 << 20, aio=False) as ch:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as exc:
            return exc.code()


def test_tls_client_embeds_through_haproxy_with_the_replica_up(chain):
    fe, pki = chain["frontend"], chain["pki"]
    with Client(fe.address, tls=mtls(pki), timeout=60) as client:
        out = client.embed_detailed([f"tls chain {uuid.uuid4().hex}"], 64)
    assert out.vectors.shape == (1, 64) and out.computed == 1
    [server] = runtime.servers(chain["lb"].socket)
    assert server.up and server.check_status == "L7OK"  # HAProxy's TLS health check sees SERVING
    # The frontend knows only HAProxy's address: its connections went through it to the replica.
    assert server.sessions_total >= 1


@pytest.mark.parametrize("name", ["frontend", "replica", "shard"])
def test_plaintext_and_certificateless_clients_are_refused(chain, name):
    address, pki = chain[name].address, chain["pki"]
    assert health_over(address, mtls(pki)) == SERVING
    assert health_over(address, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert health_over(address, TlsClientOptions(ca=str(pki.ca))) == grpc.StatusCode.UNAVAILABLE  # no cert
    rogue = TlsClientOptions(ca=str(pki.ca), cert=str(pki.rogue_cert), key=str(pki.rogue_key))
    assert health_over(address, rogue) == grpc.StatusCode.UNAVAILABLE  # cert from an untrusted CA


def test_server_certificate_is_verified_by_name(chain):
    address = chain["frontend"].address
    assert health_over(address, mtls(chain["pki"], server_name="localhost")) == SERVING
    assert health_over(address, mtls(chain["pki"], server_name="elsewhere.example")) == grpc.StatusCode.UNAVAILABLE
    with Client(address, timeout=10, retries=0) as plaintext:
        with pytest.raises(grpc.RpcError) as err:
            plaintext.embed(["plaintext"])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_shard_over_mutual_tls(chain):
    """Write-back (Store) and lookup (the Lookup stream) both reach the shard over mTLS."""
    fe, pki = chain["frontend"], chain["pki"]
    text = f"shard over tls {uuid.uuid4().hex}"
    with Client(fe.address, tls=mtls(pki), timeout=60) as client:
        assert client.embed_detailed([text]).computed == 1
        deadline = time.monotonic() + 30
        while (hits := client.embed_detailed([text]).l2_hits) == 0:
            assert time.monotonic() < deadline, "no L2 hit over TLS within 30 s"
        assert hits == 1
        assert client.cache_stats().l2.errors == 0
    with open_channel(chain["shard"].address, mtls(pki), max_message_bytes=1 << 20, aio=False) as ch:
        assert cpb_grpc.CacheShardServiceStub(ch).GetStats(cpb.GetStatsRequest(), timeout=10).entries >= 1


def test_cli_and_checkpoint_speak_tls(chain):
    pki, fe = chain["pki"], chain["frontend"]
    out = subprocess.run([sys.executable, "-m", "embedding.cli", "embed", "cli over tls", "--json", "--dims", "32",
                          "--address", fe.address, *client_flags("", pki)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["dimensions"] == 32
    out = subprocess.run([sys.executable, "-m", "cacheshard", "checkpoint", "--address", chain["shard"].address,
                          "--name", "over-tls", *client_flags("", pki)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_dir() and Path(out.stdout.strip()).name == "over-tls"


def test_haproxy_check_without_client_certificate_marks_the_replica_down(chain):
    """The replica requires client certificates, so a TLS check without `crt` fails:
    the check really runs over mutual TLS (and the UP above is not a fluke)."""
    tmp = chain["tmp"]
    lb = render.LbSettings(replicas=(chain["replica"].address,), socket=str(tmp / "haproxy-nocrt.sock"),
                           port=free_port(), stats_port=free_port(), check_ssl=True)
    haproxy = HAProxy(lb, tmp)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                [server] = runtime.servers(lb.socket)
            except OSError:
                server = None
            if server is not None and server.status == "DOWN":
                break
            assert time.monotonic() < deadline, f"replica not DOWN without a client certificate: {server}"
            time.sleep(0.1)
        assert server.check_status != "L7OK", server
    finally:
        haproxy.stop()
    assert health_status(chain["replica"].address, credentials=credentials(chain["pki"])) == SERVING

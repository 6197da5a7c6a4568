"""HAProxy in front of real ML-base replicas, fed by the real frontend.

One module-scoped set of processes: two ML-base replicas (--threads 1, a
short max connection age so connections re-spread), HAProxy from the
generated config, and the embedding frontend with caching off (every
request reaches a replica). The tests run in order and share it:

1. requests from the one frontend reach every replica; a lone client's
   requests stay on one replica (the warm one: replica affinity), while
   concurrent clients keep both busy; a batch the warm replica refuses
   (its queue full) is retried once, on the other replica, never on
   another connection to the full one (on a second pair of replicas whose
   connections do not age out);
2. a replica told to stop (SIGTERM, long drain: alive but NOT_SERVING) is
   marked DOWN within about 1.5 s and gets no new batches, with no failed
   client request;
3. kill -9 of a replica during a steady stream causes zero failed requests;
4. the killed replica, started again, gets traffic again.

Per-replica traffic is HAProxy's own count of bytes each replica sent back
(`show stat` bout; with `option contstats` open connections add theirs
every 5 s, closed ones at once); one full-width vector is 4 x 384 bytes,
so a replica that answered an Embed call shows at least that much.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from harness.impatient.metrics import scrape
from harness.load import Load
from harness.procs import Proc, free_port, wait_until
from harness.stack import cache_stats, service
from lb import render, runtime
from sutra.embedding.v1 import embedding_service_pb2 as epb
from sutra.embedding.v1 import embedding_service_pb2_grpc as epb_grpc
from sutra.mlbase.v1 import mlbase_service_pb2 as mpb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as mpb_grpc
from tests.support import started

HAPROXY = "/usr/sbin/haproxy"
ONE_VECTOR = 4 * 384
DRAIN_SECONDS = 30.0
CONNECTION_AGE_MS = 3000
# Small enough that one direct request fills a replica (test_1c), large enough for the load tests.
MAX_QUEUE = 384


def replica(name: str, port: int, metrics_port: int, tmp: Path, connection_age_ms: int) -> Proc:
    return service("mlbase", tmp / f"{name}.log",
                   {"server.port": port, "server.metrics_port": metrics_port, "threads": 1,
                    "server.drain_seconds": DRAIN_SECONDS, "max_queue": MAX_QUEUE,
                    "server.grace_seconds": 5.0, "server.max_connection_age_ms": connection_age_ms,
                    "server.max_connection_age_grace_ms": 2000})


class Cluster:
    def __init__(self, tmp: Path, connection_age_ms: int = CONNECTION_AGE_MS) -> None:
        self.tmp = tmp
        self.ports = {"mlbase1": free_port(), "mlbase2": free_port()}
        self.metrics_ports = {name: free_port() for name in self.ports}
        self.replicas = {name: replica(name, port, self.metrics_ports[name], tmp, connection_age_ms)
                         for name, port in self.ports.items()}
        self.lb = render.LbSettings(
            replicas=tuple(f"127.0.0.1:{p}" for p in self.ports.values()), server_names=tuple(self.ports),
            socket=str(tmp / "haproxy.sock"), port=free_port(), stats_port=free_port())
        self.haproxy: subprocess.Popen | None = None
        self.frontend = service("embedding", tmp / "embedding.log", {
            "mlbase_address": f"127.0.0.1:{self.lb.port}", "cache_enabled": False, "cache_shards": (),
            "admin_port": 0, "mlbase_connections": 4, "mlbase_timeout_s": 30.0})

    @property
    def sock(self) -> str:
        return self.lb.socket

    def start(self) -> "Cluster":
        for proc in self.replicas.values():
            proc.start()
        for proc in self.replicas.values():
            proc.wait_serving()
        cfg = render.write(self.lb, self.tmp / "haproxy.cfg")
        self._hlog = open(self.tmp / "haproxy.log", "wb")
        self.haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=self._hlog,
                                        stderr=subprocess.STDOUT)
        runtime.wait_all_up(self.sock, count=2, timeout=30)
        self.frontend.start().wait_serving()
        return self

    def stop(self) -> None:
        procs = [self.frontend, *self.replicas.values()]
        for proc in procs:
            if proc.popen and proc.popen.poll() is None:
                proc.kill()  # draining replicas would wait DRAIN_SECONDS; nothing to keep here
        if self.haproxy:
            self.haproxy.terminate()
            self.haproxy.wait(10)
            self._hlog.close()

    def bytes_out(self) -> dict[str, int]:
        return {v.name: v.bytes_out for v in runtime.servers(self.sock)}

    def batches(self) -> dict[str, float]:
        """Inference batches each replica has run, from its own /metrics."""
        return {name: scrape(f"http://127.0.0.1:{port}/metrics")["sutra_mlbase_batches_total"]
                for name, port in self.metrics_ports.items()}

    def queued(self, name: str) -> float:
        """Texts the replica has admitted (queued or computing), from its own /metrics."""
        return scrape(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics")["sutra_mlbase_queue_texts"]

    def view(self, name: str) -> runtime.ServerView:
        return next(v for v in runtime.servers(self.sock) if v.name == name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started(Cluster(tmp_path_factory.mktemp("lb")))


@pytest.fixture(scope="module")
def steady_cluster(tmp_path_factory):
    """The same, with connections that never age out: the pool learns which replica each one
    reaches from its answers, and a reconnect (to either replica) would leave that stale."""
    yield from started(Cluster(tmp_path_factory.mktemp("lb-steady"), connection_age_ms=0))


def wait_until_traffic(cluster: Cluster, names: list[str], timeout: float = 120.0) -> dict[str, int]:
    """Run load until each named replica has sent back at least one vector."""
    before = cluster.bytes_out()
    with Load(cluster.frontend.address, timeout=60) as load:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            load.wait_for(4)
            delta = {n: b - before[n] for n, b in cluster.bytes_out().items()}
            if all(delta[n] >= ONE_VECTOR for n in names):
                break
    assert not load.failures(), load.details[:5]
    return delta


def test_1_requests_from_one_frontend_reach_every_replica(cluster):
    delta = wait_until_traffic(cluster, list(cluster.ports))
    print(f"bytes each replica sent back: {delta}")
    assert all(delta[n] >= ONE_VECTOR for n in cluster.ports), delta
    assert all(v.up for v in runtime.servers(cluster.sock))


def batches_under_load(cluster: Cluster, threads: int, calls: int) -> dict[str, float]:
    """Inference batches each replica ran while `threads` clients made `calls` single-text calls."""
    before = cluster.batches()
    with Load(cluster.frontend.address, threads=threads, texts=1, timeout=60) as load:
        load.wait_for(calls)
    assert not load.failures(), load.details[:5]
    return {n: b - before[n] for n, b in cluster.batches().items()}


def test_1b_a_lone_client_stays_on_the_warm_replica_and_concurrent_clients_use_both(cluster):
    """Replica affinity: with nothing else in flight, each batch goes to the replica that answered
    last (awake, weights cached), so a one-client stream runs on one replica; once requests
    overlap, the least busy replica (over all its connections) takes the next one."""
    alone = batches_under_load(cluster, threads=1, calls=30)
    print(f"one client, batches per replica: {alone}")
    # Spread in turn over the 4 connections it would be about half each. Affinity keeps it on one
    # replica unless a max-connection-age reconnect (3 s here) takes both of that replica's
    # connections to the other one.
    assert max(alone.values()) >= 0.8 * sum(alone.values()), alone
    together = batches_under_load(cluster, threads=4, calls=40)
    print(f"four clients, batches per replica: {together}")
    assert min(together.values()) >= 5, together


def test_1c_a_refused_batch_is_retried_on_the_other_replica(steady_cluster):
    """The pool knows which connections reach which replica (the replica id in each answer), so
    a retry skips every connection to the replica that refused. Ranked by affinity alone, the
    full replica's other connection (warm: it answered last) would take the retry and be
    refused again: two retries for one batch."""
    cluster = steady_cluster
    # Concurrent calls use every pooled connection, so the pool knows where each one leads; then a
    # lone client's calls settle on one replica, the warm one.
    spread = batches_under_load(cluster, threads=4, calls=40)
    assert min(spread.values()) > 0, spread
    before = cluster.batches()
    for i in range(6):
        embed_one(cluster.frontend.address, f"warm replica probe {i}")
    moved = {n: b - before[n] for n, b in cluster.batches().items()}
    warm = max(moved, key=moved.get)
    other = next(n for n in cluster.ports if n != warm)
    # One direct request takes the warm replica's whole queue for seconds.
    long_text = " ".join(f"word{i}" for i in range(100))
    ended: list[str] = []

    def fill() -> None:
        try:
            embed_direct(f"127.0.0.1:{cluster.ports[warm]}", [f"{i} {long_text}" for i in range(MAX_QUEUE)])
            ended.append("OK")
        except grpc.RpcError as exc:
            ended.append(f"{exc.code().name}: {exc.details()}")

    filler = threading.Thread(target=fill)
    filler.start()
    try:
        wait_until(lambda: cluster.queued(warm) == MAX_QUEUE, 60, "the warm replica's queue full")
        print(f"warm replica {warm}: {cluster.view(warm).sessions_current} frontend connection(s), "
              f"{other}: {cluster.view(other).sessions_current}")
        per_request = []
        for i in range(4):
            retries = cache_stats(cluster.frontend.address).mlbase_retries
            embed_one(cluster.frontend.address, f"a text while {warm} is full {i}")
            per_request.append(cache_stats(cluster.frontend.address).mlbase_retries - retries)
        assert cluster.queued(warm) == MAX_QUEUE, "the full replica emptied its queue meanwhile: inconclusive"
    finally:
        filler.join(120)
    print(f"retries per request while {warm} was full: {per_request}; the filling request: {ended}")
    assert ended == ["OK"], ended
    assert per_request[0] == 1, per_request  # the warm (full) replica was tried first, then the other one
    assert max(per_request) <= 1, per_request


def embed_one(address: str, text: str) -> None:
    with grpc.insecure_channel(address) as ch:
        reply = epb_grpc.EmbeddingServiceStub(ch).Embed(epb.EmbedRequest(inputs=[text]), timeout=60)
    assert len(reply.embeddings) == 1


def embed_direct(address: str, texts: list[str]) -> None:
    with grpc.insecure_channel(address) as ch:
        mpb_grpc.MLBaseServiceStub(ch).Embed(mpb.EmbedRequest(texts=texts, full_width=True), timeout=120)


def test_2_not_serving_replica_is_out_within_1_5_s(cluster):
    target, other = "mlbase1", "mlbase2"
    bound = (cluster.lb.inter_ms + (cluster.lb.fall - 1) * cluster.lb.fastinter_ms) / 1000
    with Load(cluster.frontend.address, timeout=60) as load:
        load.wait_for(8)
        before = cluster.view(target)
        start = time.monotonic()
        cluster.replicas[target].signal(signal.SIGTERM)  # drains: alive, NOT_SERVING
        runtime.wait_status(cluster.sock, target, "DOWN", timeout=15, poll=0.02)
        took = time.monotonic() - start
        marked = cluster.view(target)
        assert cluster.replicas[target].popen.poll() is None, "replica should still be draining"
        # on-marked-down shutdown-sessions closes its connections; a closed
        # session's byte counts are final, so from here they must not move.
        deadline = time.monotonic() + 10
        while cluster.view(target).sessions_current and time.monotonic() < deadline:
            time.sleep(0.02)
        after_down = cluster.bytes_out()
        # Open connections report their bytes only every few seconds (contstats),
        # so keep the load going until the remaining replica's count moves.
        deadline = time.monotonic() + 60
        load.wait_for(12)
        while True:
            final = cluster.bytes_out()
            if final[other] - after_down[other] >= ONE_VECTOR or time.monotonic() > deadline:
                break
            load.wait_for(4)
    print(f"SIGTERM -> DOWN in {took:.2f}s (configured bound {bound:.1f}s)")
    assert not load.failures(), load.details[:5]
    assert final[target] == after_down[target], (after_down, final)
    assert final[other] - after_down[other] >= ONE_VECTOR
    view = cluster.view(target)
    assert view.check_status == "L7RSP" and view.sessions_current == 0
    # Out after exactly `fall` failed checks (the first at `inter`, the rest at `fastinter`): the
    # configured bound, judged by HAProxy's own counts rather than a wall clock on a shared machine.
    assert marked.went_down - before.went_down == 1, (before, marked)
    assert marked.checks_failed - before.checks_failed == cluster.lb.fall, (before, marked)
    # Bring it back for the next tests (kill: its drain would take 30 s).
    cluster.replicas[target].kill()
    cluster.replicas[target].start().wait_serving()
    runtime.wait_status(cluster.sock, target, "UP", timeout=30)


def test_3_kill_9_during_a_steady_stream_fails_no_request(cluster):
    victim = "mlbase2"
    wait_until_traffic(cluster, [victim])
    with Load(cluster.frontend.address, threads=4, timeout=60) as load:
        load.wait_for(8)
        ok_before = load.ok
        cluster.replicas[victim].kill()
        runtime.wait_status(cluster.sock, victim, "DOWN", timeout=15, poll=0.02)
        load.wait_for(16)
    print(f"requests: {ok_before} before the kill, {load.ok - ok_before} after; failures: {len(load.failures())}")
    assert load.failures() == [], load.details[:5]
    # Either the health check (L4...) or `observe layer4` on live traffic (HANA) saw the dead port first.
    assert cluster.view(victim).check_status.startswith(("L4", "HANA")), cluster.view(victim)


def test_4_returned_replica_gets_traffic_again(cluster):
    victim = "mlbase2"
    assert cluster.replicas[victim].popen.poll() is not None, "killed in test_3"
    cluster.replicas[victim].start().wait_serving()
    runtime.wait_status(cluster.sock, victim, "UP", timeout=30)
    # Connections opened while it was down all go to mlbase1; the replicas'
    # max connection age (3 s) closes them and leastconn spreads the new ones.
    delta = wait_until_traffic(cluster, [victim], timeout=120)
    print(f"after return, bytes each replica sent back: {delta}")
    assert delta[victim] >= ONE_VECTOR

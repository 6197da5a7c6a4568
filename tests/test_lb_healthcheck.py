"""HAProxy's tcp-mode gRPC health check against a real gRPC server.

The server here is the shared ServiceServer (aio server + health service) run
in a background thread so the test can flip its health; it stands in for
nothing of ours but the health endpoint every service exposes. The replica
tests (test_lb_replicas.py) use the real ML-base and frontend.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time

import pytest

from common.grpc_server import ServerOptions, ServiceServer
from harness.procs import free_port
from lb import h2check, render, runtime

HAPROXY = "/usr/sbin/haproxy"


class HealthServer:
    """A gRPC server on its own event loop whose health the test controls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: ServiceServer | None = None
        self.port = 0

    def call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, port: int = 0) -> "HealthServer":
        async def go():
            server = ServiceServer(ServerOptions(port=port), ["sutra.test.v1.TestService"])
            await server.start()
            await server.set_serving(True)
            return server
        self.server = self.call(go())
        self.port = self.server.port
        return self

    def set_serving(self, serving: bool) -> None:
        self.call(self.server.set_serving(serving))

    def stop(self) -> None:
        if self.server is not None:
            self.call(self.server.server.stop(0))
            self.server = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def raw_exchange(port: int, request: bytes, pattern_hexes: list[str], timeout: float = 5.0) -> bytes:
    """Send the check bytes over a plain socket; read until a pattern shows up."""
    patterns = [bytes.fromhex(p) for p in pattern_hexes]
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not any(p in data for p in patterns):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


@pytest.fixture
def health_server():
    server = HealthServer().start()
    yield server
    server.close()


def test_real_grpc_server_answers_the_hand_built_request(health_server):
    request = h2check.health_check_request()
    serving, not_serving = h2check.reply_pattern(h2check.SERVING), h2check.reply_pattern(h2check.NOT_SERVING)
    data = raw_exchange(health_server.port, request, [serving.hex(), not_serving.hex()])
    assert serving in data and not_serving not in data
    health_server.set_serving(False)
    data = raw_exchange(health_server.port, request, [serving.hex(), not_serving.hex()])
    assert not_serving in data and serving not in data
    # A named service is answered too (the servicer knows the names it serves).
    named = h2check.health_check_request(service="sutra.test.v1.TestService")
    health_server.set_serving(True)
    assert serving in raw_exchange(health_server.port, named, [serving.hex()])


@pytest.fixture
def balancer(tmp_path, health_server):
    sock = tmp_path / "haproxy.sock"
    settings = render.LbSettings(replicas=(f"127.0.0.1:{health_server.port}",), socket=str(sock),
                                 port=free_port(), stats_port=free_port())
    cfg = render.write(settings, tmp_path / "haproxy.cfg")
    log = open(tmp_path / "haproxy.log", "wb")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        runtime.wait_all_up(sock, count=1, timeout=30)
        yield settings, sock
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def time_to_status(sock, wanted: str, timeout: float = 10.0) -> float:
    start = time.monotonic()
    runtime.wait_status(sock, "replica1", wanted, timeout=timeout, poll=0.02)
    return time.monotonic() - start


def check_bound(settings: render.LbSettings) -> float:
    """Worst case to notice: the next check, then fall-1 fast checks."""
    return (settings.inter_ms + (settings.fall - 1) * settings.fastinter_ms) / 1000


def assert_down_after_fall_checks(before: runtime.ServerView, after: runtime.ServerView,
                                  settings: render.LbSettings) -> None:
    """Marked down once, by exactly `fall` failed checks: the first at `inter`, the rest at
    `fastinter`, which is the configured bound. HAProxy's own counts, not a wall clock, which a
    shared machine stretches."""
    assert after.went_down - before.went_down == 1, (before, after)
    assert after.checks_failed - before.checks_failed == settings.fall, (before, after)


def test_haproxy_marks_not_serving_down_and_serving_up_again(balancer, health_server):
    settings, sock = balancer
    [before] = runtime.servers(sock)
    assert before.up and before.check_status == "L7OK"

    health_server.set_serving(False)
    took = time_to_status(sock, "DOWN")
    [view] = runtime.servers(sock)
    # Failed on the status byte, not by timing out: the check is conclusive.
    assert view.check_status == "L7RSP" and "status SERVING" in view.check_desc
    print(f"NOT_SERVING -> DOWN in {took:.2f}s (bound {check_bound(settings):.1f}s)")
    assert_down_after_fall_checks(before, view, settings)

    health_server.set_serving(True)
    time_to_status(sock, "UP")


def test_haproxy_marks_a_stopped_server_down(balancer, health_server):
    settings, sock = balancer
    [before] = runtime.servers(sock)
    health_server.stop()
    took = time_to_status(sock, "DOWN")
    [view] = runtime.servers(sock)
    assert view.check_status.startswith("L4")
    print(f"stopped -> DOWN in {took:.2f}s (bound {check_bound(settings):.1f}s)")
    assert_down_after_fall_checks(before, view, settings)


def test_stats_page_and_prometheus_exporter_answer(balancer):
    import urllib.request
    settings, _ = balancer
    base = f"http://{settings.stats_host}:{settings.stats_port}"
    page = urllib.request.urlopen(f"{base}/stats;csv", timeout=5).read().decode()
    assert "mlbase,replica1," in page
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    assert 'haproxy_server_status{proxy="mlbase",server="replica1",state="UP"} 1' in metrics

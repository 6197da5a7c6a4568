"""Services as real processes: loopback ports chosen at run time, readiness by
gRPC health (never by sleeping), stop by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# Ports this process has handed out. The kernel may give the same free port to two calls in a
# row (nothing listens on it yet), and gRPC servers and HAProxy both bind with SO_REUSEPORT, so
# two of our processes would then share one port and the kernel would split connections between
# them (seen once: HAProxy's stats page answered by a replica's HTTP/2).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now and that this process has not handed out before."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port that was not handed out already")


def health_status(address: str, service: str = "", timeout: float = 1.0,
                  credentials: grpc.ChannelCredentials | None = None) -> int | None:
    """The Health/Check status of `address` (over TLS with `credentials`), or None if it does not answer."""
    channel = (grpc.insecure_channel(address) if credentials is None
               else grpc.secure_channel(address, credentials))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
        return reply.status


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"not within {timeout}s: {what}")


@dataclass
class Proc:
    """A service started as `python -m <module> ...`, with its log file."""

    module: str
    args: list[str]
    log_path: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None
    # For a process serving TLS: what wait_serving's health checks connect with.
    credentials: grpc.ChannelCredentials | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> "Proc":
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_serving(self, timeout: float = 180.0) -> "Proc":
        """Poll health until SERVING; fail with the log if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.popen.returncode}:\n{self.log()[-4000:]}")
            if health_status(self.address, credentials=self.credentials) == SERVING:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"{self.module} not SERVING after {timeout}s:\n{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """kill -9: no cleanup runs."""
        if self.popen and self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.popen is None:
            return 0
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.popen.returncode

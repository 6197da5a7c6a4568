"""The whole request path as real processes, and its launchers.

`Stack` is the whole request path on loopback ports chosen at run time: a
RocksDB cache shard (--sync), ML-base replicas (--threads 1), HAProxy from
the generated configuration (lb.render) and the embedding frontend. Every
piece can be killed and started again on the same port, so a test injects a
fault into one process and watches the others cope.

The launchers (`replica`, `shard`, `frontend`) build each command line with
the service's own launch recipe (`command(settings)`, the one deploy uses),
and also serve the fuzz, overload and shutdown tests, which start smaller
stacks. A disk that fills
up is in `harness.disk`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cacheshard import settings as shard_settings
from common.flags import split_csv
from common.settings import evolve
from embedding import settings as frontend_settings
from harness.procs import Proc, free_port, wait_until
from mlbase import settings as mlbase_settings
from lb import render, runtime
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
# Long enough for HAProxy (inter 1 s, fastinter 500 ms, fall 2) to see NOT_SERVING.
DRAIN_SECONDS = 2.0
# Connections re-spread after a replica returns; in-flight calls keep a long grace.
CONNECTION_AGE_MS = 5000
CONNECTION_AGE_GRACE_MS = 30_000


# Each service's settings class and launch recipe: the same `command()` deploy uses.
RECIPES = {
    "mlbase": (mlbase_settings.MLBaseSettings, mlbase_settings.command),
    "cacheshard": (shard_settings.ShardSettings, shard_settings.command),
    "embedding": (frontend_settings.FrontendSettings, frontend_settings.command),
}


def service(module: str, log_path: Path, values: Mapping[str, Any], *extra: str) -> Proc:
    """`python -m module` started with `values` (dotted setting names, e.g. "server.port") through
    the service's own launch recipe; settings not named keep the service's defaults (and the
    environment's, as in production). `extra` flags go last, as a test's deliberate additions.
    A port is chosen at run time unless `values` names "server.port"."""
    values = {"server.port": free_port(), **values}
    cls, command = RECIPES[module]
    _python, _dash_m, name, *flags = command(evolve(cls(), values), only=values)
    return Proc(name, [*flags, *extra], log_path, values["server.port"])


def replica(workdir: Path, name: str, port: int | None = None, *extra: str) -> Proc:
    """An ML-base replica with one torch thread and a drain the balancer can see."""
    port = port or free_port()
    values = {"server.port": port, "threads": 1, "server.drain_seconds": DRAIN_SECONDS,
              "server.grace_seconds": 30.0, "server.max_connection_age_ms": CONNECTION_AGE_MS,
              "server.max_connection_age_grace_ms": CONNECTION_AGE_GRACE_MS}
    return service("mlbase", workdir / f"{name}.log", values, *extra)


def shard(workdir: Path, path: Path, name: str = "shard", port: int | None = None, *extra: str) -> Proc:
    """A cache shard that fsyncs before acknowledging (--sync)."""
    port = port or free_port()
    values = {"server.port": port, "path": path, "sync": True}
    return service("cacheshard", workdir / f"{name}.log", values, *extra)


def frontend(workdir: Path, mlbase: str, shards: str, name: str = "frontend", *extra: str) -> Proc:
    """The embedding frontend, admin HTTP off, 4 connections to ML-base."""
    values = {"mlbase_address": mlbase, "cache_shards": split_csv(shards), "admin_port": 0,
              "mlbase_connections": 4, "mlbase_timeout_s": 30.0}
    return service("embedding", workdir / f"{name}.log", values, *extra)


def backends(workdir: Path) -> tuple[Proc, Proc]:
    """What a test of the frontend alone puts behind it: one replica (one thread, no drain) and a
    cache shard in `workdir/db`, not yet started."""
    replica = service("mlbase", workdir / "mlbase.log", {"threads": 1, "server.drain_seconds": 0.0})
    return replica, service("cacheshard", workdir / "shard.log", {"path": workdir / "db"})


def fingerprint(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.EmbeddingServiceStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10).fingerprint


def cache_stats(address: str) -> pb.GetCacheStatsResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.EmbeddingServiceStub(ch).GetCacheStats(pb.GetCacheStatsRequest(), timeout=10)


class ShardClient:
    """Direct calls to a cache shard: the test's own view of what it holds."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = cpb_grpc.CacheShardServiceStub(self.channel)

    def store(self, keys: list[bytes], values: list[bytes], timeout: float = 10.0) -> int:
        entries = [cpb.Entry(key=k, value=v) for k, v in zip(keys, values)]
        return self.stub.Store(cpb.StoreRequest(entries=entries), timeout=timeout).stored

    def lookup(self, keys: list[bytes], batch: int = 1024) -> list[bytes | None]:
        requests = [cpb.LookupRequest(batch_id=i, keys=keys[i:i + batch]) for i in range(0, len(keys), batch)]
        out: list[bytes | None] = []
        for reply in self.stub.Lookup(iter(requests), timeout=60):
            out += [v if f else None for f, v in zip(reply.found, reply.values)]
        return out

    def stats(self) -> cpb.GetStatsResponse:
        return self.stub.GetStats(cpb.GetStatsRequest(), timeout=10)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ShardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HAProxy:
    """HAProxy in the foreground from a generated configuration; killable and restartable on its port."""

    def __init__(self, settings: render.LbSettings, workdir: Path) -> None:
        self.settings = settings
        self.config = render.write(settings, workdir / "haproxy.cfg")
        self.log_path = workdir / "haproxy.log"
        self.popen: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.settings.port}"

    @property
    def sock(self) -> str:
        return self.settings.socket

    def start(self) -> "HAProxy":
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=self._log,
                                      stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)
        if self._log:
            self._log.close()

    def stop(self) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        if self._log:
            self._log.close()

    def views(self) -> dict[str, runtime.ServerView]:
        return {v.name: v for v in runtime.servers(self.sock)}


@dataclass
class Stack:
    """Shard + replicas + HAProxy + frontend; see the module docstring."""

    workdir: Path
    replica_count: int = 2
    frontend_flags: tuple[str, ...] = ("--l1-entries", "0")
    replicas: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shard_path = self.workdir / "shard-db"
        self.shard = shard(self.workdir, self.shard_path)
        for i in range(1, self.replica_count + 1):
            name = f"mlbase{i}"
            self.replicas[name] = replica(self.workdir, name)
        self.lb = HAProxy(render.LbSettings(
            replicas=tuple(p.address for p in self.replicas.values()), server_names=tuple(self.replicas),
            socket=str(self.workdir / "haproxy.sock"), port=free_port(), stats_port=free_port()), self.workdir)
        self.frontend = frontend(self.workdir, self.lb.address, self.shard.address, "frontend",
                                 *self.frontend_flags)
        self._restarts = 0

    def start(self) -> "Stack":
        self.shard.start()
        for proc in self.replicas.values():
            proc.start()
        self.shard.wait_serving(60)
        for proc in self.replicas.values():
            proc.wait_serving(240)
        self.lb.start()
        runtime.wait_all_up(self.lb.sock, count=self.replica_count, timeout=30)
        self.frontend.start().wait_serving(60)
        return self

    def stop(self) -> None:
        for proc in [self.frontend, *self.replicas.values(), self.shard]:
            if proc.popen is not None and proc.popen.poll() is None:
                proc.kill()  # nothing to keep, and a draining replica would wait its drain out
            if getattr(proc, "_log", None):
                proc._log.close()
        self.lb.stop()

    # -- restarts on the same port ----------------------------------------------------------
    def relaunch(self, proc: Proc, *, name: str | None = None) -> Proc:
        """Start `proc` again (same module, flags and port); the log gets a new file."""
        self._restarts += 1
        stem = name or proc.log_path.stem
        again = Proc(proc.module, list(proc.args), self.workdir / f"{stem}-{self._restarts}.log", proc.port,
                     dict(proc.env))
        return again.start()

    def restart_replica(self, name: str) -> Proc:
        proc = self.relaunch(self.replicas[name], name=name)
        self.replicas[name] = proc
        return proc

    def restart_shard(self) -> Proc:
        self.shard = self.relaunch(self.shard, name="shard")
        return self.shard

    def ensure_healthy(self) -> None:
        """Bring back whatever an earlier test left dead, and wait until all of it serves."""
        for name, proc in list(self.replicas.items()):
            if proc.popen.poll() is not None:
                self.restart_replica(name)
        if self.shard.popen.poll() is not None:
            self.restart_shard()
        if not self.lb.alive():
            self.lb.start()
        self.shard.wait_serving(60)
        for proc in self.replicas.values():
            proc.wait_serving(240)
        runtime.wait_all_up(self.lb.sock, count=self.replica_count, timeout=30)
        assert self.frontend.popen.poll() is None, f"the frontend died:\n{self.frontend.log()[-3000:]}"
        self.frontend.wait_serving(30)

    def wait_traffic(self, name: str, load, timeout: float = 60.0) -> None:
        """Keep `load` running until replica `name` has sent back at least one vector."""
        before = self.lb.views()[name].bytes_out
        wait_until(lambda: load.ok and self.lb.views()[name].bytes_out - before >= 4 * 384, timeout,
                   f"traffic on {name}", poll=0.1)

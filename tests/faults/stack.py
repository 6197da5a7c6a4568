"""Real processes for the fault, fuzz and overload suites.

`Stack` is the whole request path on loopback ports chosen at run time: a
RocksDB cache shard (--sync), ML-base replicas (--threads 1), HAProxy from
the generated configuration (lb.render) and the embedding frontend. Every
piece can be killed and started again on the same port, so a test injects a
fault into one process and watches the others cope.

`PrivateDisk` gives a cache shard a small tmpfs of its own, mounted in a
private mount namespace that a holder process keeps alive: a real
filesystem that really returns ENOSPC, invisible to the rest of the
machine, gone when the holder exits.

The launchers (`replica`, `shard`, `frontend`) are shared with the fuzz and
overload suites, which start smaller stacks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lb import render, runtime
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.support import ROOT, Proc, free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
# Long enough for HAProxy (inter 1 s, fastinter 500 ms, fall 2) to see NOT_SERVING.
DRAIN_SECONDS = 2.0
# Connections re-spread after a replica returns; in-flight calls keep a long grace.
CONNECTION_AGE_MS = 5000
CONNECTION_AGE_GRACE_MS = 30_000


def replica(workdir: Path, name: str, port: int | None = None, *extra: str) -> Proc:
    """An ML-base replica with one torch thread and a drain the balancer can see."""
    port = port or free_port()
    return Proc("mlbase", ["--port", str(port), "--threads", "1", "--drain-seconds", str(DRAIN_SECONDS),
                           "--grace-seconds", "30", "--max-connection-age-ms", str(CONNECTION_AGE_MS),
                           "--max-connection-age-grace-ms", str(CONNECTION_AGE_GRACE_MS), *extra],
                workdir / f"{name}.log", port)


def shard(workdir: Path, path: Path, name: str = "shard", port: int | None = None, *extra: str) -> Proc:
    """A cache shard that fsyncs before acknowledging (--sync)."""
    port = port or free_port()
    return Proc("cacheshard", ["--port", str(port), "--path", str(path), "--sync", *extra],
                workdir / f"{name}.log", port)


def frontend(workdir: Path, mlbase: str, shards: str, name: str = "frontend", *extra: str) -> Proc:
    """The embedding frontend, admin HTTP off, 4 connections to ML-base."""
    port = free_port()
    return Proc("embedding", ["--port", str(port), "--mlbase", mlbase, "--cache-shard", shards,
                              "--admin-port", "0", "--mlbase-connections", "4", "--mlbase-timeout", "30", *extra],
                workdir / f"{name}.log", port)


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


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"not within {timeout}s: {what}")


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


class PrivateDisk:
    """A tmpfs of `size_mb` at `mountpoint`, visible only to processes started with `command()`.

    The holder (`sleep`) owns a private mount namespace; processes join it
    with nsenter; this side reads and writes the files through
    /proc/<holder>/root. Root uses a plain mount namespace; other users a
    user namespace in which they are root (unprivileged user namespaces).
    """

    def __init__(self, mountpoint: Path, size_mb: int) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.rootless = os.geteuid() != 0
        ns = ["--user", "--map-root-user"] if self.rootless else []
        script = f'mount -t tmpfs -o size={size_mb}m sutra-fault-disk "$0" && echo mounted && exec sleep 3600'
        self.holder = subprocess.Popen(["unshare", *ns, "--mount", "--propagation", "private", "sh", "-c",
                                        script, str(mountpoint)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        line = self.holder.stdout.readline().strip()
        if line != "mounted":
            self.holder.wait(10)
            raise RuntimeError(f"cannot mount a private tmpfs (unshare/mount refused): {self.holder.stderr.read()}")

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace (nsenter execs it: the PID stays the same)."""
        user = ["--user", "--preserve-credentials"] if self.rootless else []
        return ["nsenter", f"--target={self.holder.pid}", *user, "--mount", "--", *argv]

    def path(self, inside: Path | str) -> Path:
        """Where a path inside the namespace can be reached from here."""
        return Path(f"/proc/{self.holder.pid}/root") / Path(inside).relative_to("/")

    def free_bytes(self) -> int:
        st = os.statvfs(self.path(self.mountpoint))
        return st.f_bavail * st.f_frsize

    def fill(self, name: str = "filler") -> int:
        """Write a file until the filesystem says ENOSPC; returns the bytes written."""
        written = 0
        with open(self.path(self.mountpoint / name), "wb", buffering=0) as f:
            for chunk in (1 << 16, 1 << 10, 64):
                try:
                    while True:
                        written += f.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != 28:  # ENOSPC
                        raise
        return written

    def free(self, name: str = "filler") -> None:
        self.path(self.mountpoint / name).unlink()

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(10)


@dataclass
class NsProc(Proc):
    """A `python -m <module>` process started inside a PrivateDisk's namespace."""

    disk: PrivateDisk | None = None

    def start(self) -> "NsProc":
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.disk.command([sys.executable, "-m", self.module, *self.args]),
                                      cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

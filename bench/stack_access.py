"""Access to a running benchmark stack: start it with a chosen backend, extra
frontends beside it, cache and shard counters, PIDs, CPU time, RSS, and the
shard's bytes per entry on disk.

Separate from `bench.stack_bench` (which decides what to measure) so the
plumbing that talks to supervisord, the shard and the frontends is in one
place.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import psutil

from bench import frontend_bench
from common import codec
from common.cache_key import cache_key
from common.tls import DEFAULT_MAX_MESSAGE_BYTES, open_channel
from deploy import stack
from deploy.settings import StackSettings
from deploy.supervisor import Supervisor
from harness.procs import Proc, free_port
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from sutra.mlbase.v1 import mlbase_service_pb2 as mpb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as mpb_grpc

Printer = Callable[[str], None]


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports (replicas number theirs from a base)."""
    base = free_port()
    while any(not stack.probe.port_free("127.0.0.1", base + i) for i in range(1, count)):
        base = free_port()
    return base


def stack_settings(run_dir: Path, replicas: int, backend: str, precision: str = "") -> StackSettings:
    """A stack of `backend` replicas (`precision`; empty = the backend's default, and none with
    `auto`) on free loopback ports in `run_dir`, metrics ports included (so it runs beside `make
    up` or another bench stack), admin and OpenAI HTTP off."""
    return StackSettings(run_dir=run_dir, replicas=replicas, frontend_port=free_port(), shard_port=free_port(),
                         lb_port=free_port(), stats_port=free_port(), admin_port=0, http_port=0,
                         replica_base_port=consecutive_free_ports(replicas), shard_metrics_port=free_port(),
                         replica_metrics_base_port=consecutive_free_ports(replicas),
                         backend=backend, precision=precision)


def start_stack(run_dir: Path, replicas: int, backend: str, precision: str,
                out: Printer) -> tuple[StackSettings, float]:
    """`stack.up` on free ports in `run_dir` (`stack_settings`); (settings, seconds to healthy)."""
    settings = stack_settings(run_dir, replicas, backend, precision)
    started = time.perf_counter()
    stack.up(settings, out=lambda line: None)
    took = time.perf_counter() - started
    out(f"  stack up in {took:.1f}s: {replicas} replica(s) x {settings.torch_threads} thread(s), "
        f"frontend {settings.frontend_address}")
    return settings, took


@contextlib.contextmanager
def stack_and_second_frontend(work: Path, replicas: int, backend: str, precision: str, name: str, **overrides):
    """A stack (`start_stack`) and a second frontend on its replicas and shard, holding the stack
    frontend's certificate and differing from it by `overrides` (FrontendSettings fields): the
    setup of every A/B of one frontend setting. Both are stopped on exit."""
    settings, _ = start_stack(work / "stack", replicas, backend, precision, print)
    second = None
    try:
        tls = settings.client_tls("embedding")
        second = frontend_bench.start_frontend(
            work, settings.lb_address, settings.shard_address, name, http_port=0,
            mlbase_connections=settings.frontend_connections, mlbase_tls=tls, shard_tls=tls, **overrides)
        yield settings, second
    finally:
        if second is not None:
            second.stop()
        stack.down(settings, out=lambda line: None)


def internal_channel(settings: StackSettings, address: str, role: str) -> grpc.Channel:
    """A blocking channel to an internal port, holding `role`'s certificate when the stack has internal TLS."""
    return open_channel(address, settings.client_tls(role), max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, aio=False)


def replica_info(settings: StackSettings) -> mpb.GetInfoResponse:
    # The replicas answer only the frontend's certificate (with internal TLS on).
    with internal_channel(settings, settings.lb_address, "embedding") as ch:
        return mpb_grpc.MLBaseServiceStub(ch).GetInfo(mpb.GetInfoRequest(), timeout=30)


def extra_frontend(settings: StackSettings, workdir: Path, name: str, l1_entries: int) -> Proc:
    """Another frontend on the stack's balancer and shard, differing only in its L1 size (it holds
    the stack frontend's certificate, as a second frontend of the stack would)."""
    tls = settings.client_tls("embedding")
    return frontend_bench.start_frontend(workdir, settings.lb_address, settings.shard_address, name,
                                         l1_entries=l1_entries, mlbase_connections=settings.frontend_connections,
                                         mlbase_tls=tls, shard_tls=tls)


def cache_stats(address: str) -> pb.GetCacheStatsResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.EmbeddingServiceStub(ch).GetCacheStats(pb.GetCacheStatsRequest(), timeout=30)


def shard_stats(settings: StackSettings) -> cpb.GetStatsResponse:
    with internal_channel(settings, settings.shard_address, "operator") as ch:
        return cpb_grpc.CacheShardServiceStub(ch).GetStats(cpb.GetStatsRequest(), timeout=30)


def wait_shard_entries(settings: StackSettings, at_least: int, timeout: float = 60.0) -> int:
    """Write-backs are asynchronous: poll the shard until it holds `at_least` entries."""
    deadline = time.monotonic() + timeout
    while True:
        entries = shard_stats(settings).entries
        if entries >= at_least or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def stack_pids(settings: StackSettings) -> dict[str, int]:
    """supervisord's programs (shard, replicas, HAProxy, frontend) by name."""
    return {p["name"]: p["pid"] for p in Supervisor(settings.supervisor_socket).processes() if p["pid"]}


def cpu_seconds(pids: dict[str, int]) -> float:
    total = 0.0
    for pid in pids.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def role_of(program: str) -> str:
    """The part of the stack a supervisord program is: replicas, cache shard, HAProxy, frontend."""
    if "mlbase" in program:  # mlbase2, or a --models-file model's replica: e2-mlbase1
        return "replicas"
    if program.startswith("cacheshard"):
        return "cache shard"
    return "haproxy" if "haproxy" in program else "frontend"


def cpu_by_role(settings: StackSettings) -> Callable[[], dict[str, float]]:
    """A probe of cumulative CPU seconds per part of the stack: each role's processes, the
    replicas' forward passes (the inference thread's CPU in them, from their /metrics; all of the
    model's CPU with one thread per replica) and this process (the client). Differences between
    two probes split a phase's cost per request, which is what says where two cores go."""
    from harness.impatient.metrics import scrape

    roles: dict[str, dict[str, int]] = {}
    for name, pid in stack_pids(settings).items():
        roles.setdefault(role_of(name), {})[name] = pid
    urls = [settings.metrics_url(name) for name in settings.replica_names()]

    def probe() -> dict[str, float]:
        out = {role: 0.0 for role in ("replicas", "replicas: inference", "frontend", "cache shard", "haproxy")}
        out.update({role: cpu_seconds(pids) for role, pids in roles.items()})
        out["replicas: inference"] = sum(scrape(url).get("sutra_mlbase_inference_cpu_seconds_total", 0.0)
                                         for url in urls)
        out["client"] = time.process_time()
        return out

    return probe


def rss_snapshot(settings: StackSettings, extra: dict[str, int]) -> dict[str, float]:
    """RSS in MiB of supervisord, each program it runs, our extra frontends and this process."""
    pids = {"supervisord": Supervisor(settings.supervisor_socket).pid(), **stack_pids(settings)}
    pids.update(extra)
    pids["bench client (in-process models)"] = os.getpid()
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            out[name] = None
    return out


def disk_phase(settings: StackSettings, fingerprint: str, native_width: int) -> dict:
    """Checkpoint the shard (memtables flushed into SSTs) and divide SST bytes by entries.

    The checkpoint goes into the shard's own backup directory (on this machine: the stack is
    local) under a name of this run; the shard prunes old ones to its --keep."""
    name = f"bench-disk-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    with internal_channel(settings, settings.shard_address, "operator") as ch:
        reply = cpb_grpc.CacheShardServiceStub(ch).Checkpoint(cpb.CheckpointRequest(name=name), timeout=120)
    dest = Path(reply.directory)
    stats = shard_stats(settings)
    sst = sum(f.stat().st_size for f in dest.glob("*.sst"))
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    key = cache_key(fingerprint, "example")
    value = codec.encode(np.zeros(native_width, dtype=np.float32))
    entries = stats.entries
    return {
        "method": "shard Checkpoint (flushes memtables; FIFO compaction keeps SSTs as flushed): "
                  "SST bytes in the checkpoint / GetStats entries",
        "entries": entries, "stores": stats.stores, "sst_bytes": sst, "checkpoint_bytes": total,
        "bytes_per_entry": sst / entries if entries else None,
        "live_bytes_on_disk": stats.bytes_on_disk,
        "payload_bytes": {"key": len(key), "value": len(value), "sum": len(key) + len(value)},
        "stored_width": native_width, "stored_dtype": "float16 (codec default)",
    }

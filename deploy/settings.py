"""The local stack's one settings object: ports, replica count, run directory.

Built once in the CLI from flags and environment (declared here once, see
common/settings.py); a setting that is also a service's reads that service's
own variable (`_as`), so the frontend's port variable means the same to
`sutra up` and to the frontend and is written only where the frontend declares it.
Written to `<run dir>/stack.json` by `up`, and read back by `status`, `down`
and `validate`, so those need no flags to find what `up` started.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cacheshard.settings import ShardSettings
from common.grpc_server import ServerOptions
from common.settings import Settings, at_least, item, not_negative, setting
from common.tls import TlsClientOptions
from deploy.models_file import ModelSpec
from deploy.models_file import read as read_models
from deploy.pki import StackPki
from embedding.settings import FrontendSettings
from lb.render import LbSettings
from mlbase.backends import registry
from mlbase.settings import AUTO_BACKEND, DEFAULT_TUNED_FILE, MLBaseSettings

ROOT = Path(__file__).resolve().parent.parent
STATE_FILE = "stack.json"


MAX_AUTO_REPLICAS = 8


def auto_replicas(cores: int) -> int:
    """One replica per core, at most MAX_AUTO_REPLICAS (each holds a copy of the model in memory)."""
    return max(1, min(cores, MAX_AUTO_REPLICAS))


def _as(cls: type, key: str) -> str:
    """The environment variable a service declares for `key`: the stack reads the same one."""
    return item(cls, key).env


def _in_run_dir(name: str) -> property:
    """A read-only attribute: `name` inside the stack's run directory."""
    return property(lambda self: self.run_dir / name, doc=f"<run dir>/{name}")


@dataclass(frozen=True)
class StackSettings(Settings):
    """What `sutra up` starts and where."""

    run_dir: Path = setting(ROOT / ".run", "directory for configs, logs, PID files, sockets and the shard's data")
    host: str = setting("127.0.0.1", "address every process binds", env=_as(ServerOptions, "host"))
    # 0 = from the core count (auto_replicas): one single-threaded replica per core measured best on
    # 2 cores (README, Interactive latency), with no OpenMP threads waiting on each other.
    replicas: int = setting(0, "ML-base replicas behind HAProxy; 0 = one per core, at most "
                               f"{MAX_AUTO_REPLICAS} (with --threads 0, each gets cores // replicas threads)",
                            check=not_negative, shown="one per core")
    frontend_port: int = setting(50051, "embedding frontend gRPC port", env=_as(FrontendSettings, "server.port"))
    shard_port: int = setting(50052, "cache shard gRPC port", env=_as(ShardSettings, "server.port"))
    lb_port: int = setting(50060, "HAProxy port the frontend sends batches to", env=_as(LbSettings, "port"))
    # Replica i (1-based) listens on replica_base_port + i - 1.
    replica_base_port: int = setting(50061, "port of the first replica; replica i uses base + i - 1")
    stats_port: int = setting(9999, "HAProxy stats page (/stats) and Prometheus exporter (/metrics)",
                              env=_as(LbSettings, "stats_port"))
    # Frontend's HTTP admin port (/cache/stats, /metrics); 0 disables it.
    admin_port: int = setting(9100, "frontend HTTP admin port (/cache/stats, /metrics); 0 disables",
                              env=_as(FrontendSettings, "admin_port"))
    # The frontend's OpenAI-compatible HTTP API (POST /v1/embeddings); 0 disables it.
    http_port: int = setting(8080, "frontend's OpenAI-compatible HTTP API port (POST /v1/embeddings); 0 disables",
                             env=_as(FrontendSettings, "http_port"))
    # Prometheus endpoints (plain HTTP on `host`); the frontend's is its admin port, HAProxy's its stats port.
    shard_metrics_port: int = setting(9102, "cache shard's Prometheus endpoint (GET /metrics, plain HTTP)",
                                      env=_as(ShardSettings, "server.metrics_port"))
    replica_metrics_base_port: int = setting(9111, "Prometheus endpoint (GET /metrics, plain HTTP) of the first "
                                                   "replica; replica i uses base + i - 1")
    # Torch threads per replica; 0 = max(1, cores // replicas).
    threads: int = setting(0, "inference threads per replica (onnxruntime or torch intra-op); 0 = max(1, cores // "
                              "replicas)", env="SUTRA_TORCH_THREADS")
    # The replicas' backend. auto: the fastest backend and precision that passed both quality gates
    # on this CPU, as `sutra tune` recorded it (which one wins depends on the CPU; README, Backends).
    backend: str = setting(
        AUTO_BACKEND, f"replica inference backend: {AUTO_BACKEND} (the backend and precision `sutra tune` recorded "
        "for this CPU in --tuned; with no record `up` tunes first, once per machine and model, about 2 minutes "
        f"on 2 cores), or {', '.join(registry.names())}", env=_as(MLBaseSettings, "backend_name"))
    precision: str = setting("", "replica precision with an explicit --backend; empty = that backend's default",
                             env=_as(MLBaseSettings, "precision"))
    tuned: str = setting(DEFAULT_TUNED_FILE, "the tuner's record that --backend auto reads (and `up` writes when "
                         "it has no record for this CPU)", env=_as(MLBaseSettings, "tuned_file"))
    # SIGTERM budget, passed to each program as flags (supervisor.py derives
    # every stop wait from these). A stopping frontend or replica stays
    # NOT_SERVING this long first, so HAProxy (about 1.5 s to notice) takes a
    # replica out and health checkers see the frontend go before its port closes.
    drain_seconds: float = setting(
        2.0, "seconds a stopping replica or frontend reports NOT_SERVING before closing its port, so HAProxy "
        "(about 1.5 s) takes a replica out first", env=_as(ServerOptions, "drain_seconds"))
    # Then in-flight RPCs (open EmbedStreams included) get this long to finish
    # (every gRPC process; the programs' own default).
    grace_seconds: float = setting(
        ServerOptions.grace_seconds, "seconds in-flight RPCs (open EmbedStreams too) get to finish once a stopping "
        "process closes its port; supervisord waits drain + grace (+ the frontend's write-back flush) + a margin "
        "before SIGKILL", env=_as(ServerOptions, "grace_seconds"))
    # Then the frontend stores queued L2 write-backs for up to this long.
    writeback_flush_seconds: float = setting(
        FrontendSettings.writeback_flush_s, "seconds a stopping frontend spends storing queued L2 write-backs, after "
        "the grace", flag="writeback-flush", env=_as(FrontendSettings, "writeback_flush_s"))
    # Replicas close connections older than this (plus grace) so that traffic
    # re-spreads after a replica comes back.
    max_connection_age_ms: int = setting(
        30_000, "replicas close connections older than this so traffic re-spreads after a replica returns",
        env=_as(MLBaseSettings, "server.max_connection_age_ms"))
    max_connection_age_grace_ms: int = setting(
        10_000, "time in-flight RPCs get on an aged-out connection",
        env=_as(MLBaseSettings, "server.max_connection_age_grace_ms"))
    # Frontend connections to HAProxy (each is pinned to one replica).
    mlbase_connections: int = setting(0, "frontend connections to HAProxy; 0 = max(4, 2 x replicas)",
                                      env=_as(FrontendSettings, "mlbase_connections"))
    # Frontend's in-process LRU (L1) size in entries.
    l1_entries: int = setting(10_000, "frontend's in-process LRU (L1) size in entries; 0 disables L1",
                              env=_as(FrontendSettings, "l1_entries"))
    # Seconds `up` waits for every process to be SERVING (model loading).
    wait_seconds: float = setting(300.0, "how long `up` waits for everything to be healthy")
    internal_tls: bool = setting(
        True, "mutual TLS on every internal hop (frontend -> shard, frontend -> HAProxy -> replicas, HAProxy's "
        "checks) with a stack-local CA made under <run dir>/tls; each server answers only the roles it serves. "
        "--no-internal-tls runs them in plaintext, for development only (anyone on the host can then store into "
        "the cache or call a replica)")
    shard_sync: bool = setting(False, "cache shard fsyncs before acknowledging writes (the shard's own variable)",
                               env=_as(ShardSettings, "sync"))
    # Shard i (1-based) uses shard_port + i - 1, shard_metrics_port + i - 1 and its own data directory;
    # the frontend reads the list from <run dir>/shards.txt (re-read while it runs).
    shards: int = setting(1, "cache shards (L2); keys are spread by rendezvous hashing. Shard i uses --shard-port "
                             "+ i - 1 and --shard-metrics-port + i - 1", check=at_least(1))
    l2_copies: int = setting(1, "shards that hold each L2 entry (the frontend's --l2-copies); 2 keeps the hit "
                                "rate when a shard is lost", env=_as(FrontendSettings, "l2_copies"), check=at_least(1))
    # More models beside the default one (deploy/models_file.py): each its own replicas and HAProxy.
    models_file: str = setting(
        "", "YAML (or .json) `models: [{name, path, replicas, backend}]`: more models served beside the default "
        "one, each with its own replicas and HAProxy; EmbedRequest.model names one (deploy/models_file.py)")
    models_base_port: int = setting(
        50100, "first port of the --models-file models: model k uses a block of 20 ports from base + 20 (k - 1) "
        "(its HAProxy, stats page, replicas, replica metrics)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir).resolve())
        if self.models_file:  # recorded for later commands, which may run elsewhere
            object.__setattr__(self, "models_file", str(Path(self.models_file).expanduser().resolve()))
        if self.replicas == 0:
            object.__setattr__(self, "replicas", auto_replicas(os.cpu_count() or 1))
        super().__post_init__()

    def problems(self) -> list[str]:
        if "%" in str(self.run_dir):
            # supervisord expands %(name)s, twice for log paths; keep paths plain.
            return ["--run-dir must not contain '%'"]
        if self.replicas < 1 or self.shards < 1:
            return []  # the per-setting check said it
        if self.l2_copies > self.shards:
            return [f"--l2-copies {self.l2_copies} needs at least as many --shards"]
        if self.backend not in (AUTO_BACKEND, *registry.names()):
            return [f"--backend must be {AUTO_BACKEND} or one of {', '.join(registry.names())}"]
        if self.precision and self.backend == AUTO_BACKEND:
            return [f"--backend {AUTO_BACKEND} takes its precision from --tuned; give --precision with an explicit "
                    "--backend"]
        if self.precision and self.precision not in registry.PRECISIONS[self.backend]:
            return [f"--precision {self.precision} needs --backend {' or '.join(registry.backends_for(self.precision))}"]
        problems = [f"{flag} must not be negative" for flag, value in (
            ("--drain-seconds", self.drain_seconds), ("--grace-seconds", self.grace_seconds),
            ("--writeback-flush", self.writeback_flush_seconds)) if value < 0]
        try:
            self.models
        except (OSError, ValueError) as exc:
            return [f"--models-file: {exc}"]
        ports = self.ports()
        if len(set(ports.values())) != len(ports):
            problems.append(f"ports overlap: {ports}")
        problems += [f"{name} port {port} out of range" for name, port in ports.items() if not 0 < port < 65536]
        return problems

    # --- derived values ---

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.replicas)

    @property
    def frontend_connections(self) -> int:
        # At least two connections per replica so leastconn can spread them.
        return self.mlbase_connections or max(4, 2 * self.replicas)

    def replica_port(self, index: int) -> int:
        return self.replica_base_port + index - 1

    def replica_metrics_port(self, index: int) -> int:
        return self.replica_metrics_base_port + index - 1

    def replica_names(self) -> list[str]:
        return [f"mlbase{i}" for i in range(1, self.replicas + 1)]

    def replica_addresses(self) -> list[str]:
        return [f"{self.host}:{self.replica_port(i)}" for i in range(1, self.replicas + 1)]

    def ports(self) -> dict[str, int]:
        ports = {"frontend": self.frontend_port, "shard": self.shard_port, "lb": self.lb_port,
                 "stats": self.stats_port}
        if self.admin_port:
            ports["admin"] = self.admin_port
        if self.http_port:
            ports["http"] = self.http_port
        for i, name in enumerate(self.replica_names(), start=1):
            ports[name] = self.replica_port(i)
        ports["shard_metrics"] = self.shard_metrics_port
        for i, name in enumerate(self.shard_names()[1:], start=2):
            ports[name] = self.shard_port_of(i)
            ports[f"{name}_metrics"] = self.shard_metrics_port_of(i)
        for i, name in enumerate(self.replica_names(), start=1):
            ports[f"{name}_metrics"] = self.replica_metrics_port(i)
        for model in self.models:
            ports.update(model.ports())
        return ports

    def model_haproxy_config(self, model: ModelSpec) -> Path:
        return self.run_dir / f"{model.haproxy_name}.cfg"

    def model_haproxy_socket(self, model: ModelSpec) -> Path:
        return self.run_dir / f"{model.haproxy_name}.sock"

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        """The --models-file models (none without one)."""
        return read_models(self.models_file, self.models_base_port) if self.models_file else ()

    def metrics_port(self, name: str) -> int | None:
        """The port where process `name` (supervisord's name) serves GET /metrics; None if it has none
        (a frontend without an admin port)."""
        if name in self.replica_names():
            return self.replica_metrics_port(self.replica_names().index(name) + 1)
        for model in self.models:
            if name in model.replica_names():
                return model.metrics_port(model.replica_names().index(name) + 1)
            if name == model.haproxy_name:
                return model.stats_port
        if name in self.shard_names():
            return self.shard_metrics_port_of(self.shard_names().index(name) + 1)
        return {"embedding": self.admin_port or None, "haproxy": self.stats_port}.get(name)

    def metrics_url(self, name: str) -> str | None:
        port = self.metrics_port(name)
        return None if port is None else f"http://{self.address(port)}/metrics"

    def address(self, port: int) -> str:
        return f"{self.host}:{port}"

    @property
    def frontend_address(self) -> str:
        return self.address(self.frontend_port)

    @property
    def shard_address(self) -> str:
        return self.address(self.shard_port)

    # Shard 1 keeps the names a one-shard stack always had (program `cacheshard`, data in `cache`).
    def shard_names(self) -> list[str]:
        return ["cacheshard"] + [f"cacheshard{i}" for i in range(2, self.shards + 1)]

    def shard_port_of(self, index: int) -> int:
        return self.shard_port + index - 1

    def shard_metrics_port_of(self, index: int) -> int:
        return self.shard_metrics_port + index - 1

    def shard_path_of(self, index: int) -> Path:
        return self.shard_path if index == 1 else self.run_dir / f"cache-{index}"

    def shard_addresses(self) -> list[str]:
        return [self.address(self.shard_port_of(i)) for i in range(1, self.shards + 1)]

    @property
    def lb_address(self) -> str:
        return self.address(self.lb_port)

    # --- run directory layout ---

    log_dir = _in_run_dir("logs")
    haproxy_socket = _in_run_dir("haproxy.sock")
    haproxy_config = _in_run_dir("haproxy.cfg")
    supervisor_config = _in_run_dir("supervisord.conf")
    supervisor_socket = _in_run_dir("supervisor.sock")
    supervisor_pidfile = _in_run_dir("supervisord.pid")
    pid_dir = _in_run_dir("pids")
    shard_path = _in_run_dir("cache")
    shards_file = _in_run_dir("shards.txt")  # the frontend's --cache-shards-file
    tls_dir = _in_run_dir("tls")

    @property
    def pki(self) -> StackPki | None:
        """The stack's certificates (made by `up`), or None with --no-internal-tls."""
        return StackPki(self.tls_dir) if self.internal_tls else None

    def client_tls(self, role: str = "operator") -> TlsClientOptions | None:
        """How a tool holding `role`'s certificate reaches an internal port (None: plaintext)."""
        return None if self.pki is None else self.pki.client(role)

    # --- persistence ---

    def save(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        path = self.run_dir / STATE_FILE
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: Path) -> "StackSettings | None":
        """The settings `up` recorded in `run_dir`, or None if there are none."""
        path = Path(run_dir) / STATE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["run_dir"] = Path(data["run_dir"])
        return cls(**data)

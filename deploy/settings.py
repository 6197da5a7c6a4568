"""The local stack's one settings object: ports, replica count, run directory.

Built once in the CLI from flags and environment (the environment mirrors the
flags), written to `<run dir>/stack.json` by `up`, and read back by `status`,
`down` and `validate`, so those need no flags to find what `up` started.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from common.grpc_server import ServerOptions
from embedding.settings import FrontendSettings

ROOT = Path(__file__).resolve().parent.parent
STATE_FILE = "stack.json"


@dataclass(frozen=True)
class StackSettings:
    """What `sutra up` starts and where."""

    run_dir: Path = ROOT / ".run"
    host: str = "127.0.0.1"
    replicas: int = 3
    frontend_port: int = 50051
    shard_port: int = 50052
    lb_port: int = 50060
    # Replica i (1-based) listens on replica_base_port + i - 1.
    replica_base_port: int = 50061
    stats_port: int = 9999
    # Frontend's HTTP admin port (/cache/stats, /metrics); 0 disables it.
    admin_port: int = 9100
    # Torch threads per replica; 0 = max(1, cores // replicas).
    threads: int = 0
    # SIGTERM budget, passed to each program as flags (supervisor.py derives
    # every stop wait from these). A stopping frontend or replica stays
    # NOT_SERVING this long first, so HAProxy (about 1.5 s to notice) takes a
    # replica out and health checkers see the frontend go before its port closes.
    drain_seconds: float = 2.0
    # Then in-flight RPCs (open EmbedStreams included) get this long to finish
    # (every gRPC process; the programs' own default).
    grace_seconds: float = ServerOptions.grace_seconds
    # Then the frontend stores queued L2 write-backs for up to this long.
    writeback_flush_seconds: float = FrontendSettings.writeback_flush_s
    # Replicas close connections older than this (plus grace) so that traffic
    # re-spreads after a replica comes back.
    max_connection_age_ms: int = 30_000
    max_connection_age_grace_ms: int = 10_000
    # Frontend connections to HAProxy (each is pinned to one replica).
    mlbase_connections: int = 0
    # Frontend's in-process LRU (L1) size in entries.
    l1_entries: int = 10_000
    # Seconds `up` waits for every process to be SERVING (model loading).
    wait_seconds: float = 300.0
    shard_sync: bool = False

    def __post_init__(self) -> None:
        if "%" in str(self.run_dir):
            # supervisord expands %(name)s, twice for log paths; keep paths plain.
            raise ValueError("--run-dir must not contain '%'")
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        for flag, value in (("--drain-seconds", self.drain_seconds), ("--grace-seconds", self.grace_seconds),
                            ("--writeback-flush", self.writeback_flush_seconds)):
            if value < 0:
                raise ValueError(f"{flag} must not be negative")
        ports = self.ports()
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"ports overlap: {ports}")
        for name, port in ports.items():
            if not 0 < port < 65536:
                raise ValueError(f"{name} port {port} out of range")

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

    def replica_names(self) -> list[str]:
        return [f"mlbase{i}" for i in range(1, self.replicas + 1)]

    def replica_addresses(self) -> list[str]:
        return [f"{self.host}:{self.replica_port(i)}" for i in range(1, self.replicas + 1)]

    def ports(self) -> dict[str, int]:
        ports = {"frontend": self.frontend_port, "shard": self.shard_port, "lb": self.lb_port,
                 "stats": self.stats_port}
        if self.admin_port:
            ports["admin"] = self.admin_port
        for i, name in enumerate(self.replica_names(), start=1):
            ports[name] = self.replica_port(i)
        return ports

    def address(self, port: int) -> str:
        return f"{self.host}:{port}"

    @property
    def frontend_address(self) -> str:
        return self.address(self.frontend_port)

    @property
    def shard_address(self) -> str:
        return self.address(self.shard_port)

    @property
    def lb_address(self) -> str:
        return self.address(self.lb_port)

    # --- run directory layout ---

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def haproxy_socket(self) -> Path:
        return self.run_dir / "haproxy.sock"

    @property
    def haproxy_config(self) -> Path:
        return self.run_dir / "haproxy.cfg"

    @property
    def supervisor_config(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def supervisor_socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def supervisor_pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def pid_dir(self) -> Path:
        return self.run_dir / "pids"

    @property
    def shard_path(self) -> Path:
        return self.run_dir / "cache"

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

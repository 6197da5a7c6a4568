"""supervisord for the local stack: the generated configuration and a client.

supervisord (PyPI `supervisor`) owns every process of the stack: it restarts
one that crashes, keeps each one's log in the run directory, and stops them
all in reverse start order on `shutdown`. Programs are declared with
`autostart=false` so `sutra up` can start them in dependency order and wait
for each to be healthy; `autorestart=true` applies once they have started.
The client speaks supervisord's XML-RPC over its unix socket (what
`supervisorctl` does).
"""

from __future__ import annotations

import math
import shlex
import sys
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from cacheshard import settings as shard_recipe
from common.settings import evolve
from common.tls import TlsClientOptions
from deploy.settings import ROOT, StackSettings
from embedding import settings as frontend_recipe
from lb.render import HAPROXY_BIN, haproxy_command
from mlbase import settings as replica_recipe

MLBASE_GROUP = "mlbase"
# Seconds past a program's own shutdown budget before supervisord sends SIGKILL:
# room for cleanup after the grace (closing channels, RocksDB, inference
# threads) and interpreter exit on a loaded machine.
STOP_MARGIN_SECONDS = 10.0
# Nothing balances over the cache shard (frontends fail open and reconnect),
# so it closes its port at once on SIGTERM.
SHARD_DRAIN_SECONDS = 0.0
HAPROXY_STOP_WAIT = 10
ROLES = ("frontend", "cacheshard", "mlbase", "haproxy")


@dataclass(frozen=True)
class Program:
    """One supervised process."""

    name: str
    command: list[str]
    priority: int
    # Seconds supervisord waits after SIGTERM before SIGKILL.
    stop_wait: int
    kind: str  # "grpc" (health-checked over gRPC) or "haproxy"
    port: int
    group: str | None = None
    # How the stack's own tools reach this port (health probes): None = plaintext.
    tls: TlsClientOptions | None = None
    # What it is in the architecture, for `sutra status --json`: one of ROLES.
    role: str = ""
    # Flags appended at each start (deploy/launch.py), written by `sutra rollout`; None = none.
    overrides: Path | None = None

    @property
    def full_name(self) -> str:
        """The name supervisorctl uses: `group:name` for grouped programs."""
        return f"{self.group}:{self.name}" if self.group else self.name


def stop_wait(*budget: float) -> int:
    """supervisord's stopwaitsecs for a program whose SIGTERM sequence takes up to sum(budget) seconds."""
    return math.ceil(sum(budget) + STOP_MARGIN_SECONDS)


def shutdown_seconds(progs: list[Program]) -> int:
    """The longest a full `shutdown` can take: supervisord stops programs one priority at a time."""
    by_priority: dict[int, int] = {}
    for prog in progs:
        by_priority[prog.priority] = max(by_priority.get(prog.priority, 0), prog.stop_wait)
    return sum(by_priority.values())


def _launch(recipe, values: dict, python: str) -> list[str]:
    """A child's argv from its own settings object: the service's defaults with `values` (dotted
    names) set, rendered by the service's launch recipe. Exactly those flags are passed, so what the
    stack does not set (a backend, say) still comes from the child's environment."""
    return recipe.command(evolve(recipe.load_settings([], {}), values), python, only=values)


def programs(settings: StackSettings, python: str = sys.executable, haproxy: str = HAPROXY_BIN) -> list[Program]:
    """Every process of the stack, in start order. Each gRPC program gets its SIGTERM timings as
    flags from `settings`, and a stop wait derived from the same numbers."""
    drain, grace = settings.drain_seconds, settings.grace_seconds
    pki, probe_tls = settings.pki, settings.client_tls("operator")
    # With internal TLS each server requires its callers' certificates, and the frontend presents its own.
    served = (lambda role: {"server.tls": pki.server(role)}) if pki else (lambda role: {})
    calling = {"shard_tls": pki.client("embedding"), "mlbase_tls": pki.client("embedding")} if pki else {}

    # Replica stop: drain (NOT_SERVING while HAProxy notices), then in-flight work finishes.
    def replica(name: str, port: int, metrics_port: int, model: dict) -> Program:
        """One ML-base replica, the default model's or a --models-file model's; `model`: what it serves."""
        command = _launch(replica_recipe, {
            "server.host": settings.host, "server.port": port, "threads": settings.torch_threads,
            "server.drain_seconds": drain, "server.grace_seconds": grace,
            "server.max_connection_age_ms": settings.max_connection_age_ms,
            "server.max_connection_age_grace_ms": settings.max_connection_age_grace_ms,
            "server.metrics_host": settings.host, "server.metrics_port": metrics_port,
            **model, **served("mlbase"),
        }, python)
        return Program(name, command, 20, stop_wait(drain, grace), "grpc", port, group=MLBASE_GROUP, tls=probe_tls,
                       role="mlbase", overrides=overrides_file(settings, name))

    found = []
    for i, name in enumerate(settings.shard_names(), start=1):
        shard = _launch(shard_recipe, {
            "server.host": settings.host, "server.port": settings.shard_port_of(i), "path": settings.shard_path_of(i),
            "server.drain_seconds": SHARD_DRAIN_SECONDS, "server.grace_seconds": grace, "sync": settings.shard_sync,
            "server.metrics_host": settings.host, "server.metrics_port": settings.shard_metrics_port_of(i),
            **served("cacheshard"),
        }, python)
        found.append(Program(name, shard, 10, stop_wait(SHARD_DRAIN_SECONDS, grace), "grpc", settings.shard_port_of(i),
                             tls=probe_tls, role="cacheshard"))
    for i, name in enumerate(settings.replica_names(), start=1):
        found.append(replica(name, settings.replica_port(i), settings.replica_metrics_port(i), {
            "backend_name": settings.backend, "tuned_file": settings.tuned,
            **({"precision": settings.precision} if settings.precision else {})}))
    found.append(Program("haproxy", haproxy_command(settings.haproxy_config, haproxy), 30, HAPROXY_STOP_WAIT,
                         "haproxy", settings.lb_port, role="haproxy"))
    # --models-file: each model's replicas and its own HAProxy (deploy/models_file.py).
    for model in settings.models:
        for i, name in enumerate(model.replica_names(), start=1):
            found.append(replica(name, model.replica_port(i), model.metrics_port(i), {
                "model_path": model.path, "model_id": model.name,
                **({"backend_name": model.backend} if model.backend else {})}))
        found.append(Program(model.haproxy_name, haproxy_command(settings.model_haproxy_config(model), haproxy), 30,
                             HAPROXY_STOP_WAIT, "haproxy", model.lb_port, role="haproxy"))
    # Frontend stop: drain, in-flight RPCs (open EmbedStreams too) finish, then queued L2
    # write-backs are stored; SIGKILL before the end would lose them.
    flush = settings.writeback_flush_seconds
    frontend = _launch(frontend_recipe, {
        "server.host": settings.host, "server.port": settings.frontend_port, "mlbase_address": settings.lb_address,
        # The shard list is a file (written by `up`), re-read while the frontend runs: edit it to add a shard.
        "cache_shards_file": str(settings.shards_file), "l2_copies": settings.l2_copies,
        "admin_port": settings.admin_port, "http_port": settings.http_port,
        "mlbase_connections": settings.frontend_connections, "l1_entries": settings.l1_entries,
        **({"extra_models": tuple(f"{m.name}={settings.address(m.lb_port)}" for m in settings.models)}
           if settings.models else {}),
        "server.drain_seconds": drain, "server.grace_seconds": grace, "writeback_flush_s": flush, **calling,
    }, python)
    found.append(Program("embedding", frontend, 40, stop_wait(drain, grace, flush), "grpc", settings.frontend_port,
                         role="frontend"))
    return found


def overrides_file(settings: StackSettings, name: str) -> Path:
    """Where `sutra rollout` keeps the extra flags of replica `name` (deploy/launch.py)."""
    return settings.run_dir / "overrides" / f"{name}.json"


def launched(prog: Program) -> list[str]:
    """The command supervisord runs: through deploy/launch.py when the program takes overrides."""
    if prog.overrides is None:
        return prog.command
    return [prog.command[0], "-m", "deploy.launch", str(prog.overrides), "--", *prog.command]


def _escape(text: str) -> str:
    """supervisord expands %(name)s in its configuration; keep literal % signs."""
    return text.replace("%", "%%")


def render_config(settings: StackSettings, progs: list[Program], environment: dict[str, str]) -> str:
    run = settings.run_dir
    env = ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(environment.items()))
    lines = [
        "; Generated by `sutra up`; do not edit (it is rewritten on every start).",
        "[unix_http_server]",
        f"file={_escape(str(settings.supervisor_socket))}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={_escape(str(settings.log_dir / 'supervisord.log'))}",
        "logfile_maxbytes=10MB",
        "logfile_backups=2",
        f"pidfile={_escape(str(settings.supervisor_pidfile))}",
        f"childlogdir={_escape(str(settings.log_dir))}",
        f"directory={_escape(str(ROOT))}",
        f"identifier=sutra:{_escape(str(run))}",
        "nodaemon=false",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{_escape(str(settings.supervisor_socket))}",
        "",
    ]
    groups: dict[str, list[str]] = {}
    for prog in progs:
        if prog.group:
            groups.setdefault(prog.group, []).append(prog.name)
        lines += [
            f"[program:{prog.name}]",
            f"command={_escape(shlex.join(launched(prog)))}",
            f"directory={_escape(str(ROOT))}",
            f"environment={env}",
            f"priority={prog.priority}",
            "autostart=false",
            "autorestart=true",
            # Up for 2 s counts as started; a crash loop gives up after 3 tries (FATAL).
            "startsecs=2",
            "startretries=3",
            "stopsignal=TERM",
            f"stopwaitsecs={prog.stop_wait}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={_escape(str(settings.log_dir / (prog.name + '.log')))}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=2",
            "",
        ]
    for group, names in groups.items():
        priority = min(p.priority for p in progs if p.group == group)
        lines += [f"[group:{group}]", f"programs={','.join(names)}", f"priority={priority}", ""]
    return "\n".join(lines)


class Supervisor:
    """XML-RPC client for the stack's supervisord."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = Path(socket_path)
        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.socket_path}")
        self.proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    @property
    def rpc(self):
        return self.proxy.supervisor

    def reachable(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            return self.rpc.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def pid(self) -> int:
        return int(self.rpc.getPID())

    def processes(self) -> list[dict]:
        """getAllProcessInfo: name, group, statename, pid, description, exitstatus..."""
        return self.rpc.getAllProcessInfo()

    def info(self, full_name: str) -> dict:
        return self.rpc.getProcessInfo(full_name)

    def start(self, full_name: str) -> None:
        # wait=False: readiness is gRPC health, which the caller polls.
        self.rpc.startProcess(full_name, False)

    def stop(self, full_name: str) -> None:
        self.rpc.stopProcess(full_name, True)

    def restart(self, full_name: str) -> None:
        try:
            self.stop(full_name)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString:
                raise
        self.start(full_name)

    def signal(self, full_name: str, sig: str) -> None:
        self.rpc.signalProcess(full_name, sig)

    def shutdown(self) -> None:
        self.rpc.shutdown()

    def tail(self, full_name: str, length: int = 4000) -> str:
        text, _offset, _overflow = self.rpc.tailProcessStdoutLog(full_name, 0, length)
        return text

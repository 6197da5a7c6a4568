"""`sutra up`, `sutra down`, `sutra status`: the local stack's life cycle.

`up` writes HAProxy's and supervisord's configurations into the run
directory, starts supervisord, then starts the processes in dependency order
(cache shard and replicas, HAProxy, frontend) and waits for each to be
healthy by gRPC health or, for HAProxy, by every replica being UP on its
runtime API. `down` asks supervisord to stop everything and then checks, by
PID, that nothing it started is left. PID files live in `<run dir>/pids`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from deploy import probe
from deploy.models_file import ModelSpec
from deploy.settings import ROOT, StackSettings
from deploy.supervisor import HAPROXY_BIN, Program, Supervisor, programs, render_config, shutdown_seconds
from lb import render as lb_render
from lb import runtime

Printer = Callable[[str], None]

# Environment every supervised process gets (offline model loading, logs unbuffered).
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
             "PYTHONDONTWRITEBYTECODE": "1"}


class StackError(RuntimeError):
    """`up` could not bring the stack to a healthy state; the message says why."""


def haproxy_binary(out: Printer) -> str:
    """Path of haproxy, installing Debian's package when it is missing."""
    found = shutil.which("haproxy") or (HAPROXY_BIN if Path(HAPROXY_BIN).exists() else None)
    if found:
        return found
    out("haproxy not found: installing Debian's package (tools/install_debian_packages.sh haproxy)")
    # One installer for every command: it also leaves the package's system service disabled.
    subprocess.run(["bash", str(ROOT / "tools" / "install_debian_packages.sh"), "haproxy"], check=True)
    found = shutil.which("haproxy") or HAPROXY_BIN
    if not Path(found).exists():
        raise StackError("installing haproxy finished but no haproxy binary was found")
    return found


def lb_settings(settings: StackSettings, model: ModelSpec | None = None) -> lb_render.LbSettings:
    """HAProxy in front of the default model's replicas, or of a --models-file `model`'s."""
    pki = settings.pki
    # With internal TLS the checks speak TLS to the replicas and present HAProxy's own certificate.
    check = {"check_ssl": True, "check_ca_file": str(pki.ca), "check_crt": str(pki.pem("haproxy"))} if pki else {}
    if model is not None:
        return lb_render.LbSettings(
            replicas=tuple(settings.address(model.replica_port(i)) for i in range(1, model.replicas + 1)),
            server_names=tuple(model.replica_names()), socket=str(settings.model_haproxy_socket(model)),
            host=settings.host, port=model.lb_port, stats_host=settings.host, stats_port=model.stats_port, **check)
    return lb_render.LbSettings(
        replicas=tuple(settings.replica_addresses()), server_names=tuple(settings.replica_names()),
        socket=str(settings.haproxy_socket), host=settings.host, port=settings.lb_port,
        stats_host=settings.host, stats_port=settings.stats_port, **check,
    )


def write_haproxy_config(settings: StackSettings, haproxy: str, model: ModelSpec | None = None) -> Path:
    target = settings.haproxy_config if model is None else settings.model_haproxy_config(model)
    path = lb_render.write(lb_settings(settings, model), target)
    result = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise StackError(f"generated HAProxy config is invalid:\n{result.stdout}{result.stderr}")
    return path


def start_supervisord(settings: StackSettings, timeout: float = 30.0) -> Supervisor:
    """Launch supervisord (it daemonizes) and wait for its socket to answer."""
    subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(settings.supervisor_config)],
                   check=True, cwd=settings.run_dir)
    sup = Supervisor(settings.supervisor_socket)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sup.reachable():
            return sup
        time.sleep(0.1)
    raise StackError(f"supervisord did not come up; see {settings.log_dir / 'supervisord.log'}")


def check_alive(sup: Supervisor, prog: Program) -> None:
    """Fail fast when a program died for good instead of waiting out the timeout."""
    info = sup.info(prog.full_name)
    # EXITED and BACKOFF are transient (autorestart); FATAL means supervisord gave up.
    if info["statename"] in ("FATAL", "STOPPED", "UNKNOWN"):
        last = "\n".join(sup.tail(prog.full_name).splitlines()[-8:])
        raise StackError(f"{prog.name} is {info['statename']} ({info['description']}); "
                         f"last log lines ({settings_log_hint(sup, prog)}):\n{last}")


def settings_log_hint(sup: Supervisor, prog: Program) -> str:
    return sup.info(prog.full_name).get("stdout_logfile", "") or "see the run directory's logs/"


def wait_serving(sup: Supervisor, progs: list[Program], settings: StackSettings, out: Printer) -> None:
    deadline = time.monotonic() + settings.wait_seconds
    pending = list(progs)
    while pending:
        if time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending)
            raise StackError(f"not SERVING after {settings.wait_seconds:.0f}s: {names} "
                             f"(logs in {settings.log_dir})")
        for prog in list(pending):
            check_alive(sup, prog)
            # RUNNING: supervisord counts it as started (up for startsecs).
            if sup.info(prog.full_name)["statename"] == "RUNNING" and \
                    probe.grpc_health(settings.address(prog.port), timeout=0.5, tls=prog.tls) == "SERVING":
                out(f"  {prog.name:12} SERVING on {settings.address(prog.port)}")
                pending.remove(prog)
        time.sleep(0.2)


def wait_lb(sup: Supervisor, prog: Program, settings: StackSettings, out: Printer,
            model: ModelSpec | None = None) -> None:
    deadline = time.monotonic() + settings.wait_seconds
    socket = settings.haproxy_socket if model is None else settings.model_haproxy_socket(model)
    count = settings.replicas if model is None else model.replicas
    while True:
        check_alive(sup, prog)
        try:
            views = runtime.servers(socket)
        except OSError:
            views = []
        running = sup.info(prog.full_name)["statename"] == "RUNNING"
        if running and len(views) == count and all(v.up for v in views):
            out(f"  {prog.name:12} all {len(views)} replicas UP behind {settings.address(prog.port)}")
            return
        if time.monotonic() > deadline:
            raise StackError(f"HAProxy replicas not all UP: {[(v.name, v.status) for v in views]}")
        time.sleep(0.2)


def write_pid_files(settings: StackSettings, sup: Supervisor) -> dict[str, dict]:
    """`<run>/pids/<name>.pid` for supervisord and each process; pids.json adds
    start times so a later `down` never signals a recycled PID."""
    settings.pid_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    entries = [("supervisord", sup.pid())] + [(p["name"], p["pid"]) for p in sup.processes() if p["pid"]]
    for name, pid in entries:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            continue
        records[name] = {"pid": pid, "create_time": created}
        (settings.pid_dir / f"{name}.pid").write_text(f"{pid}\n")
    (settings.run_dir / "pids.json").write_text(json.dumps(records, indent=2) + "\n")
    return records


def recorded_pids(settings: StackSettings) -> dict[str, dict]:
    path = settings.run_dir / "pids.json"
    return json.loads(path.read_text()) if path.exists() else {}


def same_process(record: dict) -> bool:
    try:
        return abs(psutil.Process(record["pid"]).create_time() - record["create_time"]) < 0.01
    except psutil.NoSuchProcess:
        return False


def up(settings: StackSettings, out: Printer = print) -> int:
    sup = Supervisor(settings.supervisor_socket)
    if sup.reachable():
        out(f"stack already running (supervisord pid {sup.pid()}, run dir {settings.run_dir})")
        return status(StackSettings.load(settings.run_dir) or settings, out)
    haproxy = haproxy_binary(out)
    taken = [f"{name} {port}" for name, port in settings.ports().items() if not probe.port_free(settings.host, port)]
    if taken:
        raise StackError(f"ports already in use on {settings.host}: {', '.join(taken)} "
                         "(another stack? `sutra down`, or choose ports with flags)")
    for path in (settings.run_dir, settings.log_dir, settings.pid_dir):
        path.mkdir(parents=True, exist_ok=True)
    if settings.pki is not None:
        made = settings.pki.ensure([settings.host])
        out(f"internal hops use mutual TLS; certificates in {settings.tls_dir}"
            + (f" (issued now: {', '.join(made)})" if made else ""))
    else:
        out("WARNING: --no-internal-tls: the cache shard and the replicas accept any caller in plaintext; "
            "for development only")
    ensure_tuned(settings, out)
    progs = programs(settings, haproxy=haproxy)
    # A new stack starts with the flags given to `up`: a previous stack's rollout flags are dropped.
    for prog in progs:
        if prog.overrides is not None:
            prog.overrides.unlink(missing_ok=True)
    write_haproxy_config(settings, haproxy)
    for model in settings.models:
        write_haproxy_config(settings, haproxy, model)
    settings.supervisor_config.write_text(render_config(settings, progs, CHILD_ENV))
    write_shards_file(settings)
    settings.save()
    out(f"starting the stack in {settings.run_dir} ({settings.replicas} replicas, "
        f"{settings.torch_threads} inference thread(s) each)")
    sup = start_supervisord(settings)
    try:
        by_kind = {p.name: p for p in progs}
        first = [p for p in progs if p.role == "cacheshard" or p.group]
        for prog in first:
            sup.start(prog.full_name)
        wait_serving(sup, first, settings, out)
        sup.start("haproxy")
        for model in settings.models:
            sup.start(model.haproxy_name)
        wait_lb(sup, by_kind["haproxy"], settings, out)
        for model in settings.models:
            wait_lb(sup, by_kind[model.haproxy_name], settings, out, model)
        sup.start("embedding")
        wait_serving(sup, [by_kind["embedding"]], settings, out)
        write_pid_files(settings, sup)
    except BaseException:
        out("start failed: stopping what was started")
        down(settings, out=lambda line: None)
        raise
    print_endpoints(settings, out)
    return 0


def write_shards_file(settings: StackSettings) -> None:
    """The frontend's --cache-shards-file: one shard address a line. The frontend re-reads it every few
    seconds, so a shard started by hand and added here joins without a restart."""
    settings.shards_file.write_text("# cache shards the frontend uses (re-read while it runs)\n"
                                    + "".join(f"{a}\n" for a in settings.shard_addresses()))


def ensure_tuned(settings: StackSettings, out: Printer) -> tuple[str, str]:
    """The replicas' (backend, precision): with --backend auto, the tuner's record for this CPU,
    made before any replica starts when there is none.

    Tuning takes minutes; done here, the user sees why `up` waits, and the replicas (which
    resolve `auto` themselves from the same file, so GetInfo and the fingerprint name the
    choice) start in seconds instead of running into `up`'s health wait."""
    from common.settings import evolve
    from mlbase import settings as replica_recipe
    from mlbase import tuned

    if settings.backend != replica_recipe.AUTO_BACKEND:
        return settings.backend, settings.precision or replica_recipe.DEFAULT_PRECISION[settings.backend]
    replica = evolve(replica_recipe.load_settings([], {}), {"threads": settings.torch_threads,
                                                            "tuned_file": settings.tuned})
    record, why = tuned.ensure(replica, announce=out)
    if record is None:
        fallback = replica_recipe.DEFAULT_BACKEND
        out(f"WARNING: --backend auto: {why}; the replicas run the default, {fallback} "
            f"{replica_recipe.DEFAULT_PRECISION[fallback]}")
        return fallback, replica_recipe.DEFAULT_PRECISION[fallback]
    choice = tuned.Choice.from_json(record["choice"])
    out(f"replicas: --backend auto -> {choice.backend} {choice.precision}, the tuner's choice for this CPU ({why})")
    return choice.backend, choice.precision


def print_endpoints(settings: StackSettings, out: Printer) -> None:
    s = settings
    out("")
    out("stack is up:")
    out(f"  embedding frontend  {s.frontend_address}   sutra.embedding.v1.EmbeddingService")
    if s.http_port:
        out(f"  HTTP API            http://{s.address(s.http_port)}/v1/embeddings   (OpenAI-compatible)")
    for i, name in enumerate(s.shard_names(), start=1):
        out(f"  cache shard{'' if s.shards == 1 else ' ' + str(i):8} {s.address(s.shard_port_of(i))}   "
            f"sutra.cache.v1.CacheShardService ({s.shard_path_of(i)})")
    if s.shards > 1 or s.l2_copies > 1:
        out(f"  shard list          {s.shards_file}   (the frontend re-reads it; {s.l2_copies} copies per entry)")
    out(f"  HAProxy             {s.lb_address}   -> {', '.join(s.replica_addresses())}")
    for m in s.models:
        out(f"  model {m.name:13} {s.address(m.lb_port)}   (its HAProxy; EmbedRequest.model = {m.name!r}) -> "
            + ", ".join(s.address(m.replica_port(i)) for i in range(1, m.replicas + 1)))
    out(f"  stats page          http://{s.address(s.stats_port)}/stats   (Prometheus: /metrics)")
    if s.admin_port:
        out(f"  frontend admin      http://{s.address(s.admin_port)}/cache/stats   (Prometheus: /metrics)")
    out(f"  shard metrics       {s.metrics_url('cacheshard')}")
    replicas = s.replica_names()
    out(f"  replica metrics     {s.metrics_url(replicas[0])}"
        + (f" ... {s.metrics_url(replicas[-1])}" if len(replicas) > 1 else ""))
    out(f"  logs                {s.log_dir}")
    out("")
    out("try:")
    out(f"  grpcurl -plaintext -d '{{\"inputs\": [\"hello world\"], \"dimensions\": 64}}' "
        f"{s.frontend_address} sutra.embedding.v1.EmbeddingService/Embed")
    if s.http_port:
        out(f"  curl -s http://{s.address(s.http_port)}/v1/embeddings -H 'Content-Type: application/json' "
            "-d '{\"input\": [\"hello world\"], \"dimensions\": 64}'")
    out("  sutra status [--json]    sutra top    sutra validate    sutra down")


def down(settings: StackSettings, out: Printer = print, timeout: float | None = None) -> int:
    """Stop everything `up` started and make sure, by PID, that it is gone."""
    sup = Supervisor(settings.supervisor_socket)
    records = recorded_pids(settings)
    live: dict[str, dict] = {}
    if sup.reachable():
        # Current PIDs (a restarted process has a new one), then shut down.
        live = {name: rec for name, rec in write_pid_files(settings, sup).items()}
        out(f"stopping supervisord (pid {sup.pid()}) and its {len(live) - 1} processes")
        sup.shutdown()
    targets = {name: rec for name, rec in {**records, **live}.items() if same_process(rec)}
    if not targets and not live:
        out(f"nothing running for {settings.run_dir}")
    # supervisord stops one priority at a time, each up to its stop wait (drain + grace + flush + margin).
    # Stop waits do not depend on TLS, and the certificates may be gone: plan without them.
    plain = dataclasses.replace(settings, internal_tls=False)
    wait_for = timeout if timeout is not None else shutdown_seconds(programs(plain)) + 5
    deadline = time.monotonic() + wait_for
    while time.monotonic() < deadline and any(same_process(r) for r in targets.values()):
        time.sleep(0.1)
    leftovers = {name: rec for name, rec in targets.items() if same_process(rec)}
    for name, rec in leftovers.items():
        # supervisord is gone or stuck: stop what it left behind ourselves.
        out(f"  {name} (pid {rec['pid']}) still running: SIGKILL")
        try:
            os.kill(rec["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    for path in [settings.supervisor_socket, settings.haproxy_socket, settings.run_dir / "pids.json",
                 *(settings.model_haproxy_socket(m) for m in _recorded_models(settings)),
                 *settings.pid_dir.glob("*.pid")]:
        path.unlink(missing_ok=True)
    if targets:
        out(f"stopped {len(targets)} processes; none left running (logs kept in {settings.log_dir})")
    return 0


def _recorded_models(settings: StackSettings) -> tuple[ModelSpec, ...]:
    try:
        return settings.models
    except (OSError, ValueError):  # the models file changed or went away since `up`
        return ()


@dataclass(frozen=True)
class ProcessView:
    """One supervised process as `sutra status` reports it (and `--json` prints it)."""

    name: str
    role: str  # frontend, cacheshard, mlbase or haproxy
    state: str  # supervisord's: RUNNING, STARTING, BACKOFF, EXITED, FATAL...
    pid: int | None
    address: str  # where it takes its traffic (gRPC; HAProxy: the port the frontend sends batches to)
    health: str  # gRPC health (SERVING...), HAProxy: RUNNING or NO SOCKET, "-" when not running
    metrics_url: str | None  # its GET /metrics (plain HTTP)
    uptime: str

    @property
    def ok(self) -> bool:
        return self.state == "RUNNING" and self.health in ("SERVING", "RUNNING")


def processes(settings: StackSettings, sup: Supervisor | None = None) -> list[ProcessView]:
    """Every process of a running stack with its state, health and endpoints: what `status`
    prints and what `top` scrapes. Health is probed now (gRPC health, with the operator's
    certificate on internal ports)."""
    sup = sup or Supervisor(settings.supervisor_socket)
    progs = {p.name: p for p in programs(settings)}
    found = []
    for info in sup.processes():
        prog = progs.get(info["name"])
        if prog is None:
            continue
        address = settings.address(prog.port)
        if info["statename"] not in ("RUNNING", "STARTING"):
            health = "-"
        elif prog.kind == "grpc":
            health = probe.grpc_health(address, tls=prog.tls)
        else:
            health = "RUNNING" if settings.haproxy_socket.exists() else "NO SOCKET"
        uptime = info["description"].split("uptime ")[-1] if "uptime" in info["description"] else ""
        found.append(ProcessView(info["name"], prog.role, info["statename"], info["pid"] or None, address, health,
                                 settings.metrics_url(info["name"]), uptime))
    return found


def status(settings: StackSettings, out: Printer = print, as_json: bool = False) -> int:
    """Each process's supervisor state and health, and HAProxy's view of each replica; as text,
    or as one JSON object (`as_json`: {"processes": [...], "replicas": [...]}, see ProcessView).
    Exit code 0 when everything is healthy, 1 when something is not, 3 when not running."""
    sup = Supervisor(settings.supervisor_socket)
    if not sup.reachable():
        if as_json:
            out(json.dumps({"running": False, "run_dir": str(settings.run_dir), "processes": []}))
        else:
            out(f"stack not running (no supervisord at {settings.supervisor_socket})")
        return 3
    views = processes(settings, sup)
    healthy = all(v.ok for v in views)
    try:
        replicas, lb_error = runtime.servers(settings.haproxy_socket), None
    except OSError as exc:
        replicas, lb_error = [], f"runtime API not answering: {exc}"
    healthy &= lb_error is None and len(replicas) == settings.replicas and all(r.up for r in replicas)
    from deploy.rollout import model_view  # the frontend's fingerprints, live ones included
    model = model_view(settings)
    if as_json:
        out(json.dumps({"running": True, "healthy": healthy, "run_dir": str(settings.run_dir),
                        "supervisord_pid": sup.pid(), "processes": [dataclasses.asdict(v) for v in views],
                        "replicas": [dataclasses.asdict(r) for r in replicas], "model": model,
                        **({"haproxy_error": lb_error} if lb_error else {})}, indent=2))
        return 0 if healthy else 1
    out(f"supervisord pid {sup.pid()}, run dir {settings.run_dir}")
    out(f"{'process':12} {'state':9} {'pid':>7}  {'health':12} {'address':22} {'metrics':32} uptime")
    for v in views:
        out(f"{v.name:12} {v.state:9} {v.pid or '-':>7}  {v.health:12} {v.address:22} {v.metrics_url or '-':32} "
            f"{v.uptime}")
    if model is not None:
        live = ", ".join(f"{f['fingerprint'][:12]} ({f['connections']} conn{'' if f['connections'] == 1 else 's'}"
                         f"{', active' if f['active'] else ''})" for f in model["live_fingerprints"])
        out(f"model: {model['model_id']} {model['backend']} {model['precision']} fingerprint "
            f"{model['fingerprint'][:12]}; live: {live or 'none'}")
    out("")
    out(f"HAProxy {settings.lb_address} (stats http://{settings.address(settings.stats_port)}/stats):")
    if lb_error:
        out(f"  {lb_error}")
        return 1
    out(f"  {'server':10} {'address':22} {'status':9} {'check':7} {'conns':>5} {'total':>6} {'bytes in':>10}")
    for r in replicas:
        out(f"  {r.name:10} {r.address:22} {r.status:9} {r.check_status:7} {r.sessions_current:>5} "
            f"{r.sessions_total:>6} {r.bytes_in:>10}")
    return 0 if healthy else 1

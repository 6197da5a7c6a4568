"""`sutra rollout [replica flags]`: move a running stack's replicas to new flags, one at a time.

For each replica in turn: store the flags in its overrides file
(deploy/launch.py), stop it through supervisord (it reports NOT_SERVING,
HAProxy takes it out within about 1.5 s, its in-flight work finishes), start
it again, and wait until it is SERVING and HAProxy has it UP before touching
the next. The other replicas carry the traffic meanwhile, so a stack of two
or more replicas loses no request; with one replica the stack has no replica
for the model's load time, and rollout says so.

The frontend needs no restart: it follows the replicas' fingerprints and
switches by the policy in embedding/fingerprints.py (old model while any
replica still serves it, then the new one; never both in one response). At
the end rollout waits until the frontend's GetInfo reports the new
fingerprint.

Flags are the replica's own (`python -m mlbase --help`): `--backend torch`,
`--model PATH`, `--precision bf16`, `--max-seq-length 128`... They are
checked with the replica's parser before anything stops. The flags that
place a replica in the stack (host, ports, TLS) belong to `sutra up` and are
refused. Each rollout replaces the previous one's flags; `sutra rollout`
with no flags returns the replicas to what `up` started.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from deploy import probe
from deploy.launch import read_overrides, write_overrides
from deploy.settings import StackSettings
from deploy.supervisor import Program, Supervisor, programs
from lb import runtime
from mlbase import settings as replica_recipe
from sutra.embedding.v1 import embedding_service_pb2 as epb
from sutra.embedding.v1 import embedding_service_pb2_grpc as epb_grpc

Printer = Callable[[str], None]
STATE_FILE = "rollout.json"


class RolloutError(RuntimeError):
    """The rollout stopped; the message says where and why (replicas already moved stay moved)."""


def _placement(settings) -> tuple:
    """What a replica's flags may not change: where it listens and how it is reached."""
    server = settings.server
    return server.host, server.port, server.metrics_host, server.metrics_port, server.tls


def check_flags(prog: Program, flags: list[str]) -> None:
    """Parse the replica's command line with `flags` appended, as the replica will; raise
    RolloutError for a flag the replica refuses or one that moves it out of its place."""
    base = prog.command[3:]  # python -m mlbase FLAGS...
    try:
        before = replica_recipe.load_settings(base, {})
        after = replica_recipe.load_settings([*base, *flags], {})
    except SystemExit as exc:  # argparse has printed why
        raise RolloutError(f"the replica refuses these flags: {' '.join(flags)}") from exc
    except ValueError as exc:
        raise RolloutError(f"the replica refuses these flags: {exc}") from exc
    if _placement(before) != _placement(after):
        raise RolloutError("host, ports and TLS of a replica belong to `sutra up`; rollout cannot change them")


def frontend_info(settings: StackSettings, timeout: float = 5.0, model: str = "") -> epb.GetInfoResponse:
    with grpc.insecure_channel(settings.frontend_address) as channel:
        return epb_grpc.EmbeddingServiceStub(channel).GetInfo(epb.GetInfoRequest(model=model), timeout=timeout)


def model_view(settings: StackSettings) -> dict | None:
    """The frontend's model as `sutra status` shows it: the fingerprint it answers with and every
    fingerprint its connections see live (two only during a rollout); None if it does not answer."""
    try:
        reply = frontend_info(settings, timeout=2.0)
    except grpc.RpcError:
        return None
    return {"model_id": reply.model_id, "backend": reply.backend, "precision": reply.precision,
            "fingerprint": reply.fingerprint, "live_fingerprints": [
                {"fingerprint": f.fingerprint, "connections": f.connections, "active": f.active}
                for f in reply.live_fingerprints]}


def _wait_replica(sup: Supervisor, prog: Program, settings: StackSettings, deadline: float, socket: Path) -> None:
    while True:
        state = sup.info(prog.full_name)["statename"]
        if state in ("FATAL", "STOPPED", "EXITED"):
            tail = "\n".join(sup.tail(prog.full_name).splitlines()[-8:])
            raise RolloutError(f"{prog.name} did not start with the new flags ({state}); last log lines:\n{tail}")
        if state == "RUNNING" and probe.grpc_health(settings.address(prog.port), timeout=0.5,
                                                    tls=prog.tls) == "SERVING":
            try:
                view = {v.name: v for v in runtime.servers(socket)}.get(prog.name)
            except OSError:
                view = None
            if view is not None and view.up:
                return
        if time.monotonic() > deadline:
            raise RolloutError(f"{prog.name} not SERVING and UP in HAProxy after {settings.wait_seconds:.0f}s")
        time.sleep(0.2)


def _wait_frontend(settings: StackSettings, old: str, deadline: float, out: Printer,
                   model: str = "") -> epb.GetInfoResponse | None:
    """The frontend's GetInfo once it serves one fingerprint other than `old` (or, when the
    flags left the fingerprint alone, once every connection sees `old` again)."""
    last = None
    while time.monotonic() < deadline:
        try:
            last = frontend_info(settings, model=model)
        except grpc.RpcError:
            time.sleep(0.5)
            continue
        live = [f.fingerprint for f in last.live_fingerprints]
        if len(live) == 1 and live[0] == last.fingerprint:
            return last
        time.sleep(0.5)
    out(f"  the frontend still reports {last.fingerprint[:12] if last else 'nothing'} "
        f"(live: {[f.fingerprint[:12] for f in last.live_fingerprints] if last else []}); it follows the "
        "replicas on its own (embedding/fingerprints.py)")
    return last


def prewarm_first(settings: StackSettings, count: int, out: Printer) -> None:
    """PrewarmCache once the first replica runs the new flags (a failure is reported, not fatal)."""
    from deploy.cache_cmd import prewarm
    token = os.environ.get("SUTRA_ADMIN_TOKEN", "")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(settings.frontend_address) as channel:
        try:
            reply = prewarm(epb_grpc.EmbeddingServiceStub(channel), count, metadata=metadata)
        except grpc.RpcError as exc:
            out(f"  pre-warm failed ({exc.code().name}: {exc.details()}); continuing without it")
            return
    out(f"  pre-warmed {reply.fingerprint[:16]}: {reply.computed} of {reply.texts} recent texts embedded and "
        f"stored ({reply.already} already there) in {reply.seconds:.1f}s")


def rollout(settings: StackSettings, flags: list[str], out: Printer = print, prewarm: int = 0,
            target: str = "") -> int:
    """Move the replicas of the default model, or of --models-file model `target`, to `flags`."""
    sup = Supervisor(settings.supervisor_socket)
    if not sup.reachable():
        raise RolloutError(f"stack not running (no supervisord at {settings.supervisor_socket})")
    if target:
        model = next((m for m in settings.models if m.name == target), None)
        if model is None:
            raise RolloutError(f"no model {target!r} in this stack (models: "
                               f"{', '.join(m.name for m in settings.models) or 'only the default'})")
        if prewarm:
            raise RolloutError("--prewarm applies to the default model only")
        names, socket = model.replica_names(), settings.model_haproxy_socket(model)
    else:
        names, socket = settings.replica_names(), settings.haproxy_socket
    by_name = {p.name: p for p in programs(settings)}
    replicas = [by_name[name] for name in names]
    for prog in replicas:
        check_flags(prog, flags)
    if len(replicas) < 2:
        out("WARNING: one replica: while it restarts no replica serves, and cache misses fail "
            "(use `sutra up --replicas 2` or more for a rollout without failed requests)")
    try:
        before = frontend_info(settings, model=target)
        out(f"frontend serves {before.model_id} {before.backend} {before.precision} "
            f"fingerprint {before.fingerprint[:16]}")
    except grpc.RpcError:
        before = None
    started = time.monotonic()
    for prog in replicas:
        assert prog.overrides is not None
        previous = read_overrides(prog.overrides)
        write_overrides(prog.overrides, flags)
        step = time.monotonic()
        out(f"  {prog.name}: restarting with {' '.join(flags) or '(the flags of `sutra up`)'}"
            + (f" (was: {' '.join(previous)})" if previous else ""))
        sup.stop(prog.full_name)  # waits: NOT_SERVING, HAProxy takes it out, in-flight work ends
        sup.start(prog.full_name)
        _wait_replica(sup, prog, settings, time.monotonic() + settings.wait_seconds, socket)
        out(f"  {prog.name}: SERVING and UP in HAProxy after {time.monotonic() - step:.1f}s")
        if prewarm and prog is replicas[0] and len(replicas) > 1:
            prewarm_first(settings, prewarm, out)
    after = _wait_frontend(settings, before.fingerprint if before else "", time.monotonic() + 60, out, target)
    record = {"flags": flags, "model": target or "default", "replicas": [p.name for p in replicas],
              "seconds": round(time.monotonic() - started, 1),
              "fingerprint_before": before.fingerprint if before else None,
              "fingerprint_after": after.fingerprint if after else None,
              "backend_after": after.backend if after else None}
    (settings.run_dir / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if after is not None:
        out(f"rolled out in {record['seconds']}s: frontend serves {after.model_id} {after.backend} "
            f"{after.precision} fingerprint {after.fingerprint[:16]}"
            + (" (unchanged)" if before is not None and after.fingerprint == before.fingerprint else ""))
    return 0

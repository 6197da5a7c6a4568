"""The `sutra` command: run the local stack and check it.

    sutra up [--replicas N] [ports...]   start everything, wait until healthy
    sutra status                          health of each process, HAProxy's view of each replica
    sutra validate [--phases 0,1,2]       the seed's validation against the running stack
    sutra down                            stop exactly what `up` started
    sutra ctl ARGS...                     supervisorctl against the stack (e.g. `ctl restart cacheshard`)
    sutra manifests [--check]             regenerate the HAProxy config in deploy/compose and deploy/k8s
    sutra embed / embed-file ...          the frontend's client commands (embedding/cli.py)

Flags fall back to environment variables of the same meaning (shown in each
flag's help) and then to the architecture's defaults. `status`, `validate`
and `down` read what `up` recorded in the run directory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common.flags import parse_bool
from deploy import stack
from deploy.settings import ROOT, StackSettings

CLIENT_COMMANDS = ("embed", "embed-file")


def _env(name: str, default):
    return os.environ.get(name, default)


def add_run_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path(_env("SUTRA_RUN_DIR", ROOT / ".run")),
                        help="directory for configs, logs, PID files, sockets and the shard's data "
                             "(env SUTRA_RUN_DIR; default %(default)s)")


def add_up_flags(parser: argparse.ArgumentParser) -> None:
    d = StackSettings()
    add_run_dir(parser)
    parser.add_argument("--replicas", type=int, default=int(_env("SUTRA_REPLICAS", d.replicas)),
                        help="ML-base replicas behind HAProxy (env SUTRA_REPLICAS; default %(default)s)")
    parser.add_argument("--threads", type=int, default=int(_env("SUTRA_TORCH_THREADS", d.threads)),
                        help="inference threads per replica (onnxruntime or torch intra-op); 0 = max(1, cores // replicas) "
                             "(env SUTRA_TORCH_THREADS; default %(default)s)")
    parser.add_argument("--host", default=_env("SUTRA_HOST", d.host),
                        help="address every process binds (env SUTRA_HOST; default %(default)s)")
    parser.add_argument("--frontend-port", type=int, default=int(_env("SUTRA_EMBEDDING_PORT", d.frontend_port)),
                        help="embedding frontend gRPC port (env SUTRA_EMBEDDING_PORT; default %(default)s)")
    parser.add_argument("--shard-port", type=int, default=int(_env("SUTRA_CACHE_SHARD_PORT", d.shard_port)),
                        help="cache shard gRPC port (env SUTRA_CACHE_SHARD_PORT; default %(default)s)")
    parser.add_argument("--lb-port", type=int, default=int(_env("SUTRA_LB_PORT", d.lb_port)),
                        help="HAProxy port the frontend sends batches to (env SUTRA_LB_PORT; default %(default)s)")
    parser.add_argument("--replica-base-port", type=int,
                        default=int(_env("SUTRA_REPLICA_BASE_PORT", d.replica_base_port)),
                        help="port of the first replica; replica i uses base + i - 1 "
                             "(env SUTRA_REPLICA_BASE_PORT; default %(default)s)")
    parser.add_argument("--stats-port", type=int, default=int(_env("SUTRA_LB_STATS_PORT", d.stats_port)),
                        help="HAProxy stats page (/stats) and Prometheus exporter (/metrics) "
                             "(env SUTRA_LB_STATS_PORT; default %(default)s)")
    parser.add_argument("--admin-port", type=int, default=int(_env("SUTRA_ADMIN_PORT", d.admin_port)),
                        help="frontend HTTP admin port (/cache/stats, /metrics); 0 disables "
                             "(env SUTRA_ADMIN_PORT; default %(default)s)")
    parser.add_argument("--drain-seconds", type=float, default=float(_env("SUTRA_DRAIN_SECONDS", d.drain_seconds)),
                        help="seconds a stopping replica or frontend reports NOT_SERVING before closing its port, "
                             "so HAProxy (about 1.5 s) takes a replica out first (env SUTRA_DRAIN_SECONDS; "
                             "default %(default)s)")
    parser.add_argument("--grace-seconds", type=float, default=float(_env("SUTRA_GRACE_SECONDS", d.grace_seconds)),
                        help="seconds in-flight RPCs (open EmbedStreams too) get to finish once a stopping "
                             "process closes its port; supervisord waits drain + grace (+ the frontend's "
                             "write-back flush) + a margin before SIGKILL (env SUTRA_GRACE_SECONDS; "
                             "default %(default)s)")
    parser.add_argument("--writeback-flush", type=float,
                        default=float(_env("SUTRA_WRITEBACK_FLUSH", d.writeback_flush_seconds)),
                        help="seconds a stopping frontend spends storing queued L2 write-backs, after the grace "
                             "(env SUTRA_WRITEBACK_FLUSH; default %(default)s)")
    parser.add_argument("--max-connection-age-ms", type=int,
                        default=int(_env("SUTRA_MAX_CONNECTION_AGE_MS", d.max_connection_age_ms)),
                        help="replicas close connections older than this so traffic re-spreads after a "
                             "replica returns (env SUTRA_MAX_CONNECTION_AGE_MS; default %(default)s)")
    parser.add_argument("--max-connection-age-grace-ms", type=int,
                        default=int(_env("SUTRA_MAX_CONNECTION_AGE_GRACE_MS", d.max_connection_age_grace_ms)),
                        help="time in-flight RPCs get on an aged-out connection "
                             "(env SUTRA_MAX_CONNECTION_AGE_GRACE_MS; default %(default)s)")
    parser.add_argument("--mlbase-connections", type=int,
                        default=int(_env("SUTRA_MLBASE_CONNECTIONS", d.mlbase_connections)),
                        help="frontend connections to HAProxy; 0 = max(4, 2 x replicas) "
                             "(env SUTRA_MLBASE_CONNECTIONS; default %(default)s)")
    parser.add_argument("--l1-entries", type=int, default=int(_env("SUTRA_L1_ENTRIES", d.l1_entries)),
                        help="frontend's in-process LRU (L1) size in entries; 0 disables L1 "
                             "(env SUTRA_L1_ENTRIES; default %(default)s)")
    parser.add_argument("--shard-sync", action="store_true",
                        default=parse_bool(_env("SUTRA_CACHE_SHARD_SYNC", "")),
                        help="cache shard fsyncs before acknowledging writes (env SUTRA_CACHE_SHARD_SYNC, as for the shard itself; default off)")
    parser.add_argument("--wait-seconds", type=float, default=float(_env("SUTRA_WAIT_SECONDS", d.wait_seconds)),
                        help="how long `up` waits for everything to be healthy "
                             "(env SUTRA_WAIT_SECONDS; default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sutra", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_up_flags(sub.add_parser("up", help="start the stack and wait until it is healthy"))
    add_run_dir(sub.add_parser("down", help="stop everything `up` started"))
    add_run_dir(sub.add_parser("status", help="health of each process and HAProxy's view of each replica"))
    v = sub.add_parser("validate", help="phase 0/1/2 checks against the running stack")
    add_run_dir(v)
    v.add_argument("--phases", default="0,1,2", help="comma-separated phases to run (default %(default)s)")
    v.add_argument("--address", default=None,
                   help="frontend HOST:PORT (default: the one `up` recorded, else 127.0.0.1:50051)")
    c = sub.add_parser("ctl", help="run supervisorctl against the stack's supervisord")
    add_run_dir(c)
    c.add_argument("args", nargs=argparse.REMAINDER, help="supervisorctl arguments, e.g. `restart cacheshard`")
    m = sub.add_parser("manifests", help="regenerate HAProxy's config for compose and Kubernetes")
    m.add_argument("--check", action="store_true", help="only report whether the committed files are current")
    client = client_module()
    if client is not None:
        client.add_subcommands(sub)
    return parser


def settings_from(args: argparse.Namespace) -> StackSettings:
    return StackSettings(
        run_dir=args.run_dir.resolve(), host=args.host, replicas=args.replicas,
        frontend_port=args.frontend_port, shard_port=args.shard_port, lb_port=args.lb_port,
        replica_base_port=args.replica_base_port, stats_port=args.stats_port, admin_port=args.admin_port,
        threads=args.threads, drain_seconds=args.drain_seconds, grace_seconds=args.grace_seconds,
        writeback_flush_seconds=args.writeback_flush,
        max_connection_age_ms=args.max_connection_age_ms,
        max_connection_age_grace_ms=args.max_connection_age_grace_ms,
        mlbase_connections=args.mlbase_connections, l1_entries=args.l1_entries, wait_seconds=args.wait_seconds, shard_sync=args.shard_sync,
    )


def recorded(run_dir: Path) -> StackSettings:
    """What `up` recorded in run_dir, or the defaults placed there."""
    run_dir = run_dir.resolve()
    return StackSettings.load(run_dir) or StackSettings(run_dir=run_dir)


def client_module():
    """embedding/cli.py, which contributes `embed` and `embed-file`; None if absent."""
    try:
        from embedding import cli as client
    except ImportError:
        return None
    return client if hasattr(client, "add_subcommands") else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        import grpc
        try:
            return int(args.func(args) or 0)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.command == "manifests":
        from deploy import manifests
        return manifests.main(["--check"] if args.check else [])
    try:
        if args.command == "up":
            try:
                settings = settings_from(args)
            except ValueError as exc:
                print(f"sutra up: {exc}", file=sys.stderr)
                return 2
            return stack.up(settings)
        settings = recorded(args.run_dir)
        if args.command == "down":
            return stack.down(settings)
        if args.command == "status":
            return stack.status(settings)
        if args.command == "validate":
            from deploy.validate import validate
            phases = [int(p) for p in args.phases.split(",") if p.strip()]
            if any(p not in (0, 1, 2) for p in phases):
                print("sutra validate: --phases takes 0, 1 and/or 2", file=sys.stderr)
                return 2
            return validate(settings, phases, args.address)
        if args.command == "ctl":
            return subprocess.call([sys.executable, "-m", "supervisor.supervisorctl",
                                    "-c", str(settings.supervisor_config), *args.args])
    except stack.StackError as exc:
        print(f"sutra {args.command}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())

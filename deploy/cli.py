"""The `sutra` command: run the local stack and check it.

    sutra up [--replicas N] [ports...]   start everything, wait until healthy
    sutra status [--json]                 health of each process, its /metrics URL, HAProxy's view of each replica
    sutra top [--once] [--interval S]     live rates, hit rates, latencies and queues from every /metrics
    sutra validate [--phases 0,1,2]       the seed's validation against the running stack
    sutra down                            stop exactly what `up` started
    sutra rollout [--prewarm N] [replica flags]
                                          move the replicas to new flags one at a time, without failed
                                          requests (e.g. `--backend torch`, `--model PATH`; deploy/rollout.py)
    sutra cache invalidate|export|import|prewarm ...
                                          manage the frontend's cache (deploy/cache_cmd.py)
    sutra ctl ARGS...                     supervisorctl against the stack (e.g. `ctl restart cacheshard`)
    sutra manifests [--check]             regenerate the HAProxy config in deploy/compose and deploy/k8s
    sutra tune [--quick] [--out FILE]     measure backends x precisions on this CPU, record the winner
                                          for `python -m mlbase --backend auto` (mlbase/tune.py)
    sutra embed / embed-file ...          the frontend's client commands (embedding/cli.py)

Flags fall back to environment variables of the same meaning (shown in each
flag's help; StackSettings declares them) and then to the architecture's
defaults. `status`, `top`, `validate`
and `down` read what `up` recorded in the run directory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from common.settings import add_flags, from_args, load
from deploy import cache_cmd, stack, top
from deploy.settings import StackSettings

CLIENT_COMMANDS = ("embed", "embed-file")


def add_run_dir(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    add_flags(parser, StackSettings, env, keys=["run_dir"])


def add_up_flags(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    add_flags(parser, StackSettings, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sutra", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_up_flags(sub.add_parser("up", help="start the stack and wait until it is healthy"))
    add_run_dir(sub.add_parser("down", help="stop everything `up` started"))
    st = sub.add_parser("status", help="health of each process and HAProxy's view of each replica")
    add_run_dir(st)
    st.add_argument("--json", action="store_true",
                    help='print one JSON object instead: {"processes": [{"name", "role", "address", "metrics_url", '
                         '"health", "state", "pid", "uptime"}...], "replicas": [HAProxy\'s view]}')
    t = sub.add_parser("top", help="a live view of the stack, read from every process's /metrics")
    add_run_dir(t)
    top.add_flags(t)
    v = sub.add_parser("validate", help="phase 0/1/2 checks against the running stack")
    add_run_dir(v)
    v.add_argument("--phases", default="0,1,2", help="comma-separated phases to run (default %(default)s)")
    v.add_argument("--address", default=None,
                   help="frontend HOST:PORT (default: the one `up` recorded, else 127.0.0.1:50051)")
    r = sub.add_parser("rollout", help="restart the replicas one at a time with new flags (replica flags follow, "
                                       "see `python -m mlbase --help`); the frontend follows without a restart",
                       description=rollout_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_dir(r)
    r.add_argument("--prewarm", type=int, default=0, metavar="N",
                   help="once the first replica runs the new flags, embed the N most recently used texts with it "
                        "and store them (PrewarmCache), so the new model starts warm (default: 0, off)")
    r.add_argument("--target", default="", metavar="MODEL",
                   help="roll out the replicas of this --models-file model instead of the default model's")
    cc = sub.add_parser("cache", help="invalidate, export, import or pre-warm the frontend's cache",
                        description=cache_cmd.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_dir(cc)
    cache_cmd.add_flags(cc)
    c = sub.add_parser("ctl", help="run supervisorctl against the stack's supervisord")
    add_run_dir(c)
    c.add_argument("args", nargs=argparse.REMAINDER, help="supervisorctl arguments, e.g. `restart cacheshard`")
    m = sub.add_parser("manifests", help="regenerate HAProxy's config for compose and Kubernetes")
    m.add_argument("--check", action="store_true", help="only report whether the committed files are current")
    from mlbase.tune import TuneSettings, __doc__ as tune_doc  # light: measuring imports torch/onnxruntime lazily
    add_flags(sub.add_parser("tune", help="measure each backend x precision on this CPU (speed and both quality "
                                          "gates) and record the winner for --backend auto",
                             description=tune_doc, formatter_class=argparse.RawDescriptionHelpFormatter),
              TuneSettings)
    client = client_module()
    if client is not None:
        client.add_subcommands(sub)
    return parser


def rollout_doc() -> str:
    from deploy import rollout
    return rollout.__doc__ or ""


def load_settings(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> StackSettings:
    """StackSettings from `sutra up`'s flags alone (tests, scripts)."""
    parser = argparse.ArgumentParser(prog="sutra up")
    add_up_flags(parser, env)
    return load(StackSettings, argv, parser)


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
    parser = build_parser()
    # `sutra rollout` passes every flag it does not know itself on to the replicas.
    args, passed_on = parser.parse_known_args(argv)
    if passed_on and args.command != "rollout":
        parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
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
    if args.command == "tune":
        from mlbase import tune
        try:
            settings = from_args(tune.TuneSettings, args)
        except ValueError as exc:
            print(f"sutra tune: {exc}", file=sys.stderr)
            return 2
        return tune.run(settings)
    try:
        if args.command == "up":
            try:
                settings = from_args(StackSettings, args)
            except ValueError as exc:
                print(f"sutra up: {exc}", file=sys.stderr)
                return 2
            return stack.up(settings)
        settings = recorded(args.run_dir)
        if args.command == "down":
            return stack.down(settings)
        if args.command == "status":
            return stack.status(settings, as_json=args.json)
        if args.command == "top":
            return top.main(settings, args)
        if args.command == "validate":
            from deploy.validate import validate
            phases = [int(p) for p in args.phases.split(",") if p.strip()]
            if any(p not in (0, 1, 2) for p in phases):
                print("sutra validate: --phases takes 0, 1 and/or 2", file=sys.stderr)
                return 2
            return validate(settings, phases, args.address)
        if args.command == "rollout":
            from deploy import rollout
            try:
                return rollout.rollout(settings, [f for f in passed_on if f != "--"], prewarm=args.prewarm,
                                       target=args.target)
            except rollout.RolloutError as exc:
                print(f"sutra rollout: {exc}", file=sys.stderr)
                return 1
        if args.command == "cache":
            return cache_cmd.run(args, settings.frontend_address)
        if args.command == "ctl":
            return subprocess.call([sys.executable, "-m", "supervisor.supervisorctl",
                                    "-c", str(settings.supervisor_config), *args.args])
    except stack.StackError as exc:
        print(f"sutra {args.command}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())

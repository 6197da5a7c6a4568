"""`python -m lb render ...` prints an HAProxy configuration for the given
replicas; `python -m lb servers --socket PATH` prints HAProxy's view of them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from common.settings import add_flags, from_args, item
from lb import render, runtime


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog="python -m lb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="print the HAProxy configuration for a replica list")
    add_flags(r, render.LbSettings, env)
    r.add_argument("--out", type=Path, default=None,
                   help="write the configuration here instead of standard output")

    s = sub.add_parser("servers", help="print HAProxy's view of each replica (runtime API `show stat`)")
    socket = item(render.LbSettings, "socket")
    s.add_argument("--socket", default=env.get(socket.env, socket.default),
                   help=f"runtime API socket (env {socket.env}; default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "render":
        # A CA file or client certificate for the check implies a TLS check.
        args.check_ssl = args.check_ssl or bool(args.check_ca_file or args.check_crt)
        try:
            settings = from_args(render.LbSettings, args)
        except ValueError as exc:
            parser.error(str(exc))
        text = render.render(settings)
        if args.out:
            args.out.write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    for server in runtime.servers(args.socket):
        print(f"{server.name:10} {server.address:22} {server.status:10} {server.check_status:7} "
              f"sessions={server.sessions_total} bytes_in={server.bytes_in}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

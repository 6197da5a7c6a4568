"""`python -m lb render ...` prints an HAProxy configuration for the given
replicas; `python -m lb servers --socket PATH` prints HAProxy's view of them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lb import render, runtime


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m lb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="print the HAProxy configuration for a replica list")
    r.add_argument("--replica", action="append", default=[], metavar="HOST:PORT",
                   help="an ML-base replica; repeat for each (this or --dns-name is required)")
    r.add_argument("--dns-name", default=env("SUTRA_LB_DNS_NAME", ""), metavar="HOST:PORT",
                   help="discover replicas from the A records of HOST (a Kubernetes headless Service or a "
                        "scaled compose service) instead of --replica (env SUTRA_LB_DNS_NAME; default none)")
    r.add_argument("--dns-slots", type=int, default=int(env("SUTRA_LB_DNS_SLOTS", 10)),
                   help="most replicas DNS discovery can fill (env SUTRA_LB_DNS_SLOTS; default %(default)s)")
    r.add_argument("--host", default=env("SUTRA_LB_HOST", "127.0.0.1"),
                   help="address the balancer binds (env SUTRA_LB_HOST; default %(default)s)")
    r.add_argument("--port", type=int, default=int(env("SUTRA_LB_PORT", render.DEFAULT_PORT)),
                   help="port clients connect to (env SUTRA_LB_PORT; default %(default)s)")
    r.add_argument("--stats-host", default=env("SUTRA_LB_STATS_HOST", "127.0.0.1"),
                   help="address of the stats page and /metrics (env SUTRA_LB_STATS_HOST; default %(default)s)")
    r.add_argument("--stats-port", type=int, default=int(env("SUTRA_LB_STATS_PORT", render.DEFAULT_STATS_PORT)),
                   help="port of the stats page (/stats) and Prometheus exporter (/metrics) "
                        "(env SUTRA_LB_STATS_PORT; default %(default)s)")
    r.add_argument("--socket", default=env("SUTRA_LB_SOCKET", ".run/haproxy.sock"),
                   help="path of the runtime API socket (env SUTRA_LB_SOCKET; default %(default)s)")
    r.add_argument("--health-service", default=env("SUTRA_LB_HEALTH_SERVICE", ""),
                   help="service name sent in the health check; empty asks for the server's overall "
                        "status (env SUTRA_LB_HEALTH_SERVICE; default empty)")
    r.add_argument("--inter-ms", type=int, default=1000,
                   help="milliseconds between health checks (default %(default)s)")
    r.add_argument("--fastinter-ms", type=int, default=500,
                   help="milliseconds between checks while a state change is pending (default %(default)s)")
    r.add_argument("--fall", type=int, default=2,
                   help="failed checks in a row that mark a replica DOWN (default %(default)s)")
    r.add_argument("--rise", type=int, default=2,
                   help="passed checks in a row that mark a replica UP (default %(default)s)")
    r.add_argument("--check-ssl", action="store_true", default=env("SUTRA_LB_CHECK_SSL", "") in ("1", "true"),
                   help="replicas serve TLS: run the health check over TLS with ALPN h2 (traffic passes "
                        "through, TLS end to end) (env SUTRA_LB_CHECK_SSL; default off)")
    r.add_argument("--check-ca-file", default=env("SUTRA_LB_CHECK_CA_FILE", ""),
                   help="with --check-ssl, PEM CA that signed the replicas' certificates; empty = the check "
                        "does not verify them (env SUTRA_LB_CHECK_CA_FILE; default empty)")
    r.add_argument("--check-crt", default=env("SUTRA_LB_CHECK_CRT", ""),
                   help="with --check-ssl, one PEM file with a client certificate and its key, for replicas "
                        "that require client certificates (mutual TLS) (env SUTRA_LB_CHECK_CRT; default empty)")
    r.add_argument("--out", type=Path, default=None,
                   help="write the configuration here instead of standard output")

    s = sub.add_parser("servers", help="print HAProxy's view of each replica (runtime API `show stat`)")
    s.add_argument("--socket", default=env("SUTRA_LB_SOCKET", ".run/haproxy.sock"),
                   help="runtime API socket (env SUTRA_LB_SOCKET; default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "render":
        try:
            settings = render.LbSettings(
                replicas=tuple(args.replica), dns_name=args.dns_name, dns_slots=args.dns_slots,
                socket=args.socket, host=args.host, port=args.port,
                stats_host=args.stats_host, stats_port=args.stats_port,
                health_service=args.health_service, inter_ms=args.inter_ms,
                fastinter_ms=args.fastinter_ms, fall=args.fall, rise=args.rise,
                check_ssl=args.check_ssl or bool(args.check_ca_file or args.check_crt),
                check_ca_file=args.check_ca_file, check_crt=args.check_crt,
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
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

"""A container health check: exit 0 when this container's gRPC server is SERVING.

    python -m tools.containers.health PORT [--service NAME] [--tls-dir DIR]

Compose's `healthcheck` and the Kubernetes exec probes of the internal services run it
inside the container against localhost. Kubelet's native gRPC probe speaks plaintext
only, and the cache shard and the replicas speak mutual TLS only, so those probes go
through this instead. With --tls-dir (env SUTRA_HEALTH_TLS_DIR) it presents the
`operator` certificate from that directory (deploy/pki.py's layout): the role every
health service answers. --service asks a named health service, e.g. `liveness`
(common.grpc_server.LIVENESS), which stays SERVING while a process drains.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.tls import open_channel
from deploy.pki import StackPki

_MAX_MESSAGE_BYTES = 64 * 1024


def check(port: int, service: str, tls_dir: str, timeout: float) -> str:
    """The server's status name for `service` (SERVING, NOT_SERVING, ...), or DOWN."""
    tls = StackPki(Path(tls_dir)).client("operator") if tls_dir else None
    # Server certificates from deploy.pki also name localhost, so the dialled name verifies.
    with open_channel(f"localhost:{port}", tls, max_message_bytes=_MAX_MESSAGE_BYTES, aio=False) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"DOWN ({exc.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.containers.health", description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="the gRPC port to check on localhost")
    parser.add_argument("--service", default="", help="health service name (default: the server's overall status)")
    parser.add_argument("--tls-dir", default=os.environ.get("SUTRA_HEALTH_TLS_DIR", ""),
                        help="stack certificates to probe with (env SUTRA_HEALTH_TLS_DIR; default plaintext)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = check(args.port, args.service, args.tls_dir, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())

"""Readiness probes the stack commands use: gRPC health and free ports."""

from __future__ import annotations

import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.tls import TlsClientOptions, open_channel

# A health reply is a few bytes; nothing bigger needs to be accepted.
_MAX_MESSAGE_BYTES = 64 * 1024

STATUS_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


def grpc_health(address: str, timeout: float = 1.0, tls: TlsClientOptions | None = None) -> str:
    """SERVING, NOT_SERVING, ... or DOWN when nothing answers (over TLS with `tls`)."""
    with open_channel(address, tls, max_message_bytes=_MAX_MESSAGE_BYTES, aio=False) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return "DOWN"
    return STATUS_NAMES.get(reply.status, str(reply.status))


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (so `up` can bind it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True

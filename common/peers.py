"""Which certificate holders may call a service: authorization on top of mutual TLS.

Why: mutual TLS proves that a caller holds *some* certificate the stack's CA signed, and every
process of the stack holds one. That alone would let a replica's certificate store into the cache
shard. So a service started with `--tls-allowed-clients embedding,operator` also checks the common
name of the caller's certificate and answers PERMISSION_DENIED to anyone else, before its handler
runs. Health and reflection stay open to every certificate of the CA (HAProxy's check holds its
own), and carry no data.

grpc-python's server interceptors see the method and metadata but not the connection, so the check
wraps each handler and reads `context.auth_context()` when a call starts.
"""

from __future__ import annotations

from collections.abc import Collection

import grpc

from common.handlers import OPEN_PREFIXES, HandlerWrapper, checked


def common_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The common names of the caller's verified certificate ([] without one)."""
    return [name.decode(errors="replace") for name in context.auth_context().get("x509_common_name", [])]


class AllowedPeers(HandlerWrapper):
    def __init__(self, allowed: Collection[str]) -> None:
        super().__init__()
        self._allowed = frozenset(allowed)

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        names = common_names(context)
        if not self._allowed.intersection(names):
            who = ", ".join(names) or "no client certificate"
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"this service only answers {', '.join(sorted(self._allowed))} (caller: {who})")

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        return None if method.startswith(OPEN_PREFIXES) else checked(handler, self._check)

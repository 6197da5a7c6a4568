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

import inspect
from collections.abc import Awaitable, Callable, Collection

import grpc

# Methods every authenticated caller may use (health probes, `grpcurl list`); no data behind them.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def checked(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """`handler` with `check(context)` awaited before its behaviour starts (the check may abort)."""
    kind = {(False, False): "unary_unary", (False, True): "unary_stream",
            (True, False): "stream_unary", (True, True): "stream_stream"}[
        (handler.request_streaming, handler.response_streaming)]
    behaviour = getattr(handler, kind)
    if inspect.isasyncgenfunction(behaviour):
        async def wrapped(request, context):
            await check(context)
            async for reply in behaviour(request, context):
                yield reply
    else:
        async def wrapped(request, context):
            await check(context)
            return await behaviour(request, context)
    return handler._replace(**{kind: wrapped})


def common_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The common names of the caller's verified certificate ([] without one)."""
    return [name.decode(errors="replace") for name in context.auth_context().get("x509_common_name", [])]


class AllowedPeers(grpc.aio.ServerInterceptor):
    def __init__(self, allowed: Collection[str]) -> None:
        self._allowed = frozenset(allowed)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        names = common_names(context)
        if not self._allowed.intersection(names):
            who = ", ".join(names) or "no client certificate"
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"this service only answers {', '.join(sorted(self._allowed))} (caller: {who})")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        cached = self._wrapped.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, checked(handler, self._check))
            self._wrapped[handler_call_details.method] = cached
        return cached[1]

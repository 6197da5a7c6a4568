"""Server interceptors that wrap method handlers, written once.

grpc-python's aio interceptors see a call's method and metadata but not its
servicer context or its end; to act on those (check a certificate, start a
span, answer with a header) an interceptor swaps the method's handler for a
wrapped one. Every such interceptor needs the same two things, kept here:
the wrapped handler keeps the original's shape (unary or streaming, a
coroutine or an async generator), and it is built once per method, not per
call (`HandlerWrapper`).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import grpc

# Health and reflection: every service has them, and they carry no data.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_KINDS = {(False, False): "unary_unary", (False, True): "unary_stream",
          (True, False): "stream_unary", (True, True): "stream_stream"}

# scope(context): an async context manager entered when a call starts and left when it ends, with
# the exception that ended it, if any.
Scope = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager]
# check(context): awaited before a call's behaviour starts; it may abort the call.
Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def kind(handler: grpc.RpcMethodHandler) -> str:
    """The name of the handler's behaviour field: unary_unary, unary_stream, stream_unary or stream_stream."""
    return _KINDS[(handler.request_streaming, handler.response_streaming)]


def around(handler: grpc.RpcMethodHandler, scope: Scope) -> grpc.RpcMethodHandler:
    """`handler` with every call run inside `scope(context)`, a response stream to its last message."""
    name = kind(handler)
    behaviour = getattr(handler, name)
    if inspect.isasyncgenfunction(behaviour):
        async def wrapped(request, context):
            async with scope(context):
                async for reply in behaviour(request, context):
                    yield reply
    else:
        async def wrapped(request, context):
            async with scope(context):
                return await behaviour(request, context)
    return handler._replace(**{name: wrapped})


def status_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with, seen from a scope's exit: the code the handler set or aborted
    with; else OK, CANCELLED for a cancellation, UNKNOWN for an exception grpc reports as such."""
    code = context.code()
    if code is not None:
        return code
    if exc is None:
        return grpc.StatusCode.OK
    return grpc.StatusCode.CANCELLED if isinstance(exc, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN


class _Before:
    """The scope of `checked`: the check on entry, nothing on exit."""

    __slots__ = ("_check", "_context")

    def __init__(self, check: Check, context: grpc.aio.ServicerContext) -> None:
        self._check = check
        self._context = context

    async def __aenter__(self) -> None:
        await self._check(self._context)

    async def __aexit__(self, *exc) -> None:
        return None


def checked(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """`handler` with `check(context)` awaited before its behaviour starts (the check may abort)."""
    return around(handler, lambda context: _Before(check, context))


class HandlerWrapper(grpc.aio.ServerInterceptor):
    """An interceptor that replaces each method's handler by `wrap(method, handler)` (None: leave it
    as it is), built on the method's first call and reused while the server keeps the same handler."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self.wrap(method, handler) or handler)
            self._wrapped[method] = cached
        return cached[1]

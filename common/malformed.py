"""Request bytes that do not parse get INVALID_ARGUMENT, on every method.

grpc-python parses a unary request before the handler runs, and a parse
failure there ends the call as UNKNOWN ("Unexpected <class
DecodeError>..."): a status no contract of ours lists, with an internal
class name in its message. `MalformedRequests`, installed by
`common.grpc_server.ServiceServer` on every service, closes that gap:

- unary requests parse into a stand-in that the wrapped handler refuses
  with INVALID_ARGUMENT before the service code sees it;
- streamed requests are parsed by the handler itself as it reads each
  message, so there the parse error is raised as `InvalidInput`, which
  our handlers already turn into INVALID_ARGUMENT; a wrapper does the same
  for handlers that do not (server reflection).

Wrapped handlers are built once per method, not per call.
"""

from __future__ import annotations

import inspect

import grpc

from common.errors import InvalidInput
from common.handlers import HandlerWrapper


class _Unparsable:
    """Stands in for a unary request whose bytes did not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class _ParseError(InvalidInput):
    """A streamed request message did not parse."""


def _describe(exc: Exception) -> str:
    return f"the request message could not be parsed: {exc}"


class MalformedRequests(HandlerWrapper):
    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        return None if handler.request_deserializer is None else tolerant(handler)


def tolerant(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with a request parser whose failures become INVALID_ARGUMENT."""
    parse = handler.request_deserializer
    if handler.request_streaming:
        def parse_or_refuse(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's
                raise _ParseError(_describe(exc)) from None

        name = "stream_stream" if handler.response_streaming else "stream_unary"
        return handler._replace(request_deserializer=parse_or_refuse,
                                **{name: _refusing_parse_errors(getattr(handler, name))})

    def parse_or_stand_in(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's
            return _Unparsable(_describe(exc))

    if handler.unary_unary is not None:
        behaviour = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Unparsable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behaviour(request, context)

        return handler._replace(request_deserializer=parse_or_stand_in, unary_unary=unary_unary)

    behaviour = handler.unary_stream
    if inspect.isasyncgenfunction(behaviour):
        async def unary_stream(request, context):
            if isinstance(request, _Unparsable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for reply in behaviour(request, context):
                yield reply
    else:
        async def unary_stream(request, context):
            if isinstance(request, _Unparsable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behaviour(request, context)
    return handler._replace(request_deserializer=parse_or_stand_in, unary_stream=unary_stream)


def _refusing_parse_errors(behaviour):
    """A stream handler that answers INVALID_ARGUMENT when a message it reads does not parse."""
    if inspect.isasyncgenfunction(behaviour):
        async def streaming(requests, context):
            try:
                async for reply in behaviour(requests, context):
                    yield reply
            except _ParseError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return streaming

    async def single(requests, context):
        try:
            return await behaviour(requests, context)
        except _ParseError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    return single

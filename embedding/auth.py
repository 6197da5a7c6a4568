"""Bearer-token authentication as a server interceptor.

Installed only when tokens are configured. Every call except health and
reflection must carry a valid `authorization: Bearer <token>`; otherwise
the call ends with UNAUTHENTICATED before its handler runs (for a stream,
before any request message is read). Health stays open so balancers and
orchestrators can probe, reflection so `grpcurl list` works; neither
reveals data. Which tenant a valid token belongs to is the servicer's
business (`Gate.tenant`), not this interceptor's. The HTTP API
(embedding/http_api.py) and the admin HTTP port (embedding/admin.py) check
their bearer tokens with the same Gate.
"""

from __future__ import annotations

import grpc

from common.errors import Unauthenticated
from common.handlers import OPEN_PREFIXES
from embedding.tenants import Gate


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with UNAUTHENTICATED."""

    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        try:
            self._gate.tenant(handler_call_details.invocation_metadata)
        except Unauthenticated as exc:
            return _refusal(handler, str(exc))
        return handler

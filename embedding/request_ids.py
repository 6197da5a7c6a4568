"""`x-request-id`: one name for a call in the caller's logs, ours and the trace.

A caller may send `x-request-id`; a frontend call without one (or with one
that is not a short printable token) gets a fresh id. Either way the
frontend answers with it in the trailing metadata, on errors too, logs it
(a debug line when the call starts; a line when it fails, at WARNING when
the fault is ours or a backend's, at INFO when it is the caller's), and
puts it on the call's server span as `sutra.request_id`, so a complaint
that quotes the id finds the log lines and the trace. The HTTP API
(embedding/http_api.py) does the same with the HTTP header of that name,
answered as a response header.
"""

from __future__ import annotations

import logging
import re
import uuid

import grpc

from common import tracing
from common.handlers import HandlerWrapper, around, status_of

log = logging.getLogger(__name__)

HEADER = "x-request-id"
# Accepted as sent: ids that are safe to print in a log line and short enough to index.
_ACCEPTED = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# Failures caused by the request itself, logged at INFO; the rest are ours or a backend's. A
# deadline is the caller's choice: a client with 1 ms deadlines must not fill the log with warnings.
CALLER_FAULTS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                           grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
                           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
                           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.CANCELLED})


def request_id(metadata) -> str:
    """The caller's id when acceptable, else a new one (32 hex digits)."""
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and _ACCEPTED.fullmatch(value):
            return value
    return uuid.uuid4().hex


class _Call:
    """One call's scope: name it, answer with the name, and say how it ended when it failed."""

    __slots__ = ("_method", "_context", "_id")

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self._method = method
        self._context = context

    async def __aenter__(self) -> None:
        self._id = rid = request_id(self._context.invocation_metadata())
        self._context.set_trailing_metadata(((HEADER, rid),))
        tracing.annotate("sutra.request_id", rid)
        log.debug("request_id=%s %s started", rid, self._method)

    async def __aexit__(self, kind, exc, tb) -> None:
        code = status_of(self._context, exc)
        if code != grpc.StatusCode.OK:
            log_failure(self._id, self._method, code.name, code in CALLER_FAULTS, self._context.details() or exc or "")


def log_failure(rid: str, method: str, status: str, caller_fault: bool, details: object) -> None:
    """The one line a failed call leaves (either transport): INFO when the request itself was
    wrong, WARNING when the fault is ours or a backend's."""
    log.log(logging.INFO if caller_fault else logging.WARNING, "request_id=%s %s failed: %s: %s", rid, method,
            status, details)


class RequestIds(HandlerWrapper):
    """Names every call of the frontend's own service (health and reflection pass untouched)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        if not method.startswith(self._prefix):
            return None
        name = method.rpartition("/")[2]
        return around(handler, lambda context: _Call(name, context))

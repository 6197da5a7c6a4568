"""Domain errors and the one path that turns them into gRPC status.

Engines raise these; every handler, unary or streaming, goes through
`grpc_errors`, which hands whatever escapes to `abort_for`: a domain error
becomes its own code and message, an abort or a cancellation passes through,
and anything else is logged with its traceback and reported as INTERNAL.

The HTTP transport (embedding/http_api.py) answers the same errors with the
HTTP status of their gRPC code (`HTTP_STATUS`, the mapping grpc-gateway and
Google APIs use), so both transports refuse a request for the same reason.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import NoReturn

import grpc
from grpc._cython.cygrpc import ExecuteBatchError as _SEND_FAILED  # what a send to a gone caller raises

INTERNAL_MESSAGE = "internal error; see the server log"


class SutraError(Exception):
    """Base for errors whose message is safe and useful to show to a caller."""

    code = grpc.StatusCode.INTERNAL


class InvalidInput(SutraError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(SutraError):
    """What the request would create exists already; it will fail again unless that is removed."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Overloaded(SutraError):
    """A queue or pending-work bound is full; retry later or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SutraError):
    """The service is starting, draining, or has no backend to ask."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(SutraError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SutraError):
    """The caller is authenticated but may not do this (a cache-management call without an admin token)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(SutraError):
    """The caller's deadline (or a stream's idle limit) passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


# gRPC code -> HTTP status, for every code a SutraError carries (and INTERNAL for the rest).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(exc: SutraError) -> int:
    """The HTTP status that answers `exc`: its gRPC code's (500 for a code without one)."""
    return HTTP_STATUS.get(exc.code, 500)


async def abort_for(exc: BaseException, context: grpc.aio.ServicerContext, where: str,
                    log: logging.Logger) -> NoReturn:
    """End the RPC with the status `exc` stands for; `where` names the handler in the log.

    SutraError: its code and message. An abort already under way, a cancellation, or any
    BaseException that is not an Exception: raised again unchanged. Anything else: logged with its
    traceback, INTERNAL with a fixed message (the details stay in the log, not on the wire)."""
    if isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError)) or not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, SutraError):
        await _abort(context, exc.code, str(exc))
    log.error("unexpected error in %s", where, exc_info=exc)
    await _abort(context, grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """context.abort, unless the RPC is already over: a caller whose deadline passed (or who
    cancelled) at the moment we give up cannot be sent a status, and grpc would log the failed
    send as an error with a traceback. That RPC ends as what it is, cancelled. (grpc's core can
    fail the send before `cancelled()` says so, hence both checks.)"""
    if context.cancelled():
        raise asyncio.CancelledError()
    try:
        await context.abort(code, message)
    except _SEND_FAILED:
        raise asyncio.CancelledError() from None
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def grpc_errors(handler):
    """Wrap a grpc.aio handler, a coroutine (unary, or a stream handled with context.read/write) or
    an async generator (a response stream), so that whatever escapes it goes through `abort_for`."""
    log = logging.getLogger(handler.__module__)
    where = handler.__qualname__

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream_wrapper(self, request, context):
            responses = handler(self, request, context)
            try:
                async for response in responses:
                    yield response
            except Exception as exc:  # noqa: BLE001 - abort_for decides, and re-raises what it does not map
                await abort_for(exc, context, where, log)
            finally:
                await responses.aclose()  # closed with us, not later by the garbage collector

        return stream_wrapper

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            response = await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001 - abort_for decides, and re-raises what it does not map
            await abort_for(exc, context, where, log)
        if context.cancelled():  # the caller left while we finished: nothing to send it
            raise asyncio.CancelledError()
        return response

    return wrapper

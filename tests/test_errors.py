"""common.errors: one path from domain errors to gRPC status, for unary and streaming handlers."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from common.errors import (INTERNAL_MESSAGE, AlreadyExists, DeadlineExceeded, InvalidInput, Overloaded,
                           PermissionDenied, SutraError, Unauthenticated, Unavailable, grpc_errors, http_status)
from tests.support import aio


class FakeContext:
    """Records the status a handler ends with; `abort` raises as grpc.aio's does."""

    def __init__(self, gone: bool = False) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.gone = gone  # the caller's deadline passed, or it cancelled

    def cancelled(self) -> bool:
        return self.gone

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        self.status = (code, details)
        raise grpc.aio.AbortError()


class Servicer:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc
        self.closed = False

    @grpc_errors
    async def Unary(self, request, context):
        if self.exc is not None:
            raise self.exc
        return request

    @grpc_errors
    async def Stream(self, request_iterator, context):
        try:
            yield 1
            if self.exc is not None:
                raise self.exc
            yield 2
        finally:
            self.closed = True


async def unary(exc):
    context = FakeContext()
    try:
        result = await Servicer(exc).Unary("ok", context)
    except grpc.aio.AbortError:
        result = None
    return result, context.status


async def stream(exc):
    context, servicer, got = FakeContext(), Servicer(exc), []
    try:
        async for item in servicer.Stream(iter(()), context):
            got.append(item)
    except grpc.aio.AbortError:
        pass
    assert servicer.closed
    return got, context.status


CASES = [
    (InvalidInput("`inputs` cannot be empty"), (grpc.StatusCode.INVALID_ARGUMENT, "`inputs` cannot be empty")),
    (Overloaded("queue full"), (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")),
    (DeadlineExceeded("too late"), (grpc.StatusCode.DEADLINE_EXCEEDED, "too late")),
    (KeyError("secret detail"), (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)),
]


@pytest.mark.parametrize("exc,status", CASES)
@aio
async def test_unary_and_stream_handlers_map_errors_alike(exc, status):
    assert await unary(exc) == (None, status)
    assert await stream(exc) == ([1], status)


@aio
async def test_handlers_without_errors_answer_unchanged():
    assert await unary(None) == ("ok", None)
    assert await stream(None) == ([1, 2], None)


def test_unexpected_errors_are_logged_with_their_traceback(caplog):
    with caplog.at_level(logging.ERROR):
        asyncio.run(stream(KeyError("secret detail")))
    record = caplog.records[-1]
    assert "Servicer.Stream" in record.getMessage() and record.exc_info[0] is KeyError


@aio
async def test_cancellation_and_aborts_pass_through():
    with pytest.raises(asyncio.CancelledError):
        await unary(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await stream(asyncio.CancelledError())
    # An abort already under way keeps its own status.
    context = FakeContext()

    class Aborting:
        @grpc_errors
        async def Stream(self, request_iterator, context):
            yield 1
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    with pytest.raises(grpc.aio.AbortError):
        async for _ in Aborting().Stream(iter(()), context):
            pass
    assert context.status == (grpc.StatusCode.PERMISSION_DENIED, "no")


@aio
async def test_a_stream_closed_early_closes_the_handler():
    servicer = Servicer(None)
    responses = servicer.Stream(iter(()), FakeContext())
    assert await responses.__anext__() == 1
    await responses.aclose()
    assert servicer.closed


@aio
async def test_a_caller_already_gone_gets_no_status_and_no_error_log(caplog):
    """Giving up at the same moment as the caller's deadline: no status can be sent, and grpc
    would log the failed send as an error; the RPC ends as cancelled instead, quietly."""
    context = FakeContext(gone=True)
    with pytest.raises(asyncio.CancelledError):
        await Servicer(DeadlineExceeded("too late")).Unary("ok", context)
    assert context.status is None and not caplog.records


@aio
async def test_a_status_that_cannot_be_sent_ends_the_rpc_as_cancelled(caplog):
    """grpc's core can fail the send (the deadline passed in core) before `cancelled()` says so."""
    from grpc._cython.cygrpc import ExecuteBatchError

    class SendFails(FakeContext):
        async def abort(self, code, details=""):
            raise ExecuteBatchError("Failed execute_batch")

    with pytest.raises(asyncio.CancelledError):
        await Servicer(DeadlineExceeded("too late")).Unary("ok", SendFails())
    assert not caplog.records


def test_every_domain_error_has_its_http_status():
    """The HTTP API answers each domain error with the status of its gRPC code; none falls to 500."""
    expected = {InvalidInput: 400, Unauthenticated: 401, PermissionDenied: 403, AlreadyExists: 409, Overloaded: 429,
                Unavailable: 503, DeadlineExceeded: 504}
    assert set(SutraError.__subclasses__()) == set(expected)
    assert {cls: http_status(cls("x")) for cls in expected} == expected
    assert http_status(SutraError("x")) == 500

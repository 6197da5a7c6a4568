"""Domain errors and the one table that maps them to gRPC status codes.

Engines raise these; transports translate them with `status_for`. Anything
else that escapes a handler is logged and reported as INTERNAL.
"""

from __future__ import annotations

import grpc


class SutraError(Exception):
    """Base for errors whose message is safe and useful to show to a caller."""

    code = grpc.StatusCode.INTERNAL


class InvalidInput(SutraError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(SutraError):
    """A queue or pending-work bound is full; retry later or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SutraError):
    """The service is starting, draining, or has no backend to ask."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(SutraError):
    code = grpc.StatusCode.UNAUTHENTICATED


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, SutraError):
        return exc.code
    return grpc.StatusCode.INTERNAL


def grpc_errors(handler):
    """Wrap a unary grpc.aio handler: domain errors become their status code,
    anything unexpected is logged with its traceback and becomes INTERNAL."""
    import functools
    import logging

    log = logging.getLogger(handler.__module__)

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except SutraError as exc:
            await context.abort(exc.code, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error in %s", handler.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    return wrapper

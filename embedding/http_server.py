"""The frontend's HTTP servers, on aiohttp, on the frontend's own event loop: the
OpenAI-compatible API (embedding/http_api.py) and the admin port (embedding/admin.py).

Why aiohttp: it is an asyncio server, so its handlers run on the loop that grpc.aio
already runs and call `FrontendEngine` directly, as the gRPC servicer does (no thread,
no second loop, no ASGI layer between the socket and the handler); its request parser
is llhttp in C, so a request costs little; and it bounds what a client can make us
hold: the request line and each header line (MAX_LINE), the number of headers
(MAX_HEADERS) and the body (the app's `client_max_size`, which the API checks against
Content-Length before reading a byte of the body). uvicorn with Starlette would add an
ASGI hop per request, wants its own signal handlers, and has no body limit of its own.

What aiohttp leaves open, `_Connection` adds (the hand-written admin server had each):
- a request head (request line and headers) must be complete within `read_timeout_s` of
  its first byte, else 408 and the connection ends, so a client sending a byte at a time
  cannot hold a connection; an idle keep-alive connection is closed after KEEPALIVE_S;
- a client that sends its request and then half-closes is still answered (aiohttp would
  drop the connection at the end of the stream); a head that the end of the stream cuts
  short is a 400, and one that lacks only its blank line is taken as complete, as the end
  of the stream ended a head in HTTP/1.0;
- a malformed or oversized head gets aiohttp's 400 and one DEBUG line in the log, never a
  traceback (aiohttp logs those at ERROR, traceback included).
After a refusal it sends (408, 400) itself, it half-closes and reads what the client
still sends for DISCARD_S before closing: closing with unread input resets the
connection, and the client could lose the answer that explains the refusal.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from embedding.tenants import AUTH_HEADER, TENANT_HEADER

log = logging.getLogger(__name__)

MAX_LINE = 8190  # the request line, or one header line (aiohttp's default)
MAX_HEADERS = 64
READ_TIMEOUT_S = 10.0  # a request head's first byte to its blank line
KEEPALIVE_S = 75.0  # an idle keep-alive connection is closed after this
DISCARD_S = 1.0  # after a refusal, how long the client's further bytes are read and dropped
SHUTDOWN_S = 10.0  # on close, how long requests in progress get to finish


class _Connection(web.RequestHandler):
    """aiohttp's connection handler with a time limit on request heads, answers to clients
    that half-close, and quiet refusals (see the module docstring)."""

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, read_timeout_s: float,
                 **kwargs) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._clock = loop
        self._read_timeout_s = read_timeout_s
        self._awaiting_head = True  # between requests: the next byte starts a head
        self._head_timer: asyncio.TimerHandle | None = None  # armed by a head's first byte
        self._head_end = b""  # the last byte of the head so far
        self._refused = False

    def _head_complete(self) -> bool:
        # aiohttp queues each request its parser completes (or refuses) in `_messages`.
        return bool(self._messages)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until we close (see _refuse)
        if self._awaiting_head and data:
            if self._head_timer is None:
                self._head_timer = self._clock.call_later(self._read_timeout_s, self._head_late)
            self._head_end = data[-1:]
        super().data_received(data)
        if self._awaiting_head and self._head_complete():
            self._awaiting_head = False
            self._stop_head_timer()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        answered = await super().finish_response(request, resp, start_time)
        # The next byte starts the next head, unless a body the handler left unread is still
        # arriving (aiohttp reads and drops it, bounded by its lingering time).
        if request.content.is_eof() and not self._head_complete():
            self._awaiting_head = True
        return answered

    def eof_received(self) -> bool | None:
        if self._refused:
            self.force_close()
            return None
        if self._awaiting_head and self._head_timer is not None:  # the stream ended inside a head
            if self._head_end == b"\n":
                self.data_received(b"\r\n")  # only the blank line was missing
            if self._awaiting_head:
                self._refuse(400, "incomplete request: the connection ended inside the request head", closing=True)
                return True
        if self._awaiting_head:  # idle: nothing asked, nothing to answer
            return None
        self.close()  # answer the request in hand, then close
        return True  # keep our side open for that answer

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._awaiting_head:
            self._refuse(408, f"request head not received within {self._read_timeout_s:g} s")

    def _refuse(self, status: int, reason: str, closing: bool = False) -> None:
        """Answer `status` ourselves (aiohttp has no request to answer) and end the connection:
        at once when the client has finished sending (`closing`), else after DISCARD_S."""
        self._refused = True
        self._stop_head_timer()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.debug("refused a request: %d %s", status, reason)
        body = f"{reason}\n".encode()
        transport.write(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: text/plain; charset=utf-8"
                        f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        if closing or not transport.can_write_eof():
            self.force_close()
            return
        transport.write_eof()
        self._clock.call_later(DISCARD_S, self.force_close)

    def log_exception(self, *args, **kwargs) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):  # the client's malformed or oversized request
            log.debug("refused a malformed request: %s", " ".join(str(exc.message).split())[:300])
            return
        super().log_exception(*args, **kwargs)


class HttpServer:
    """One aiohttp Application served on host:port by `_Connection`s; `port` once started."""

    def __init__(self, app: web.Application, host: str, port: int, *, read_timeout_s: float = READ_TIMEOUT_S,
                 shutdown_s: float = SHUTDOWN_S) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._read_timeout_s = read_timeout_s
        # A request whose caller goes away is cancelled, as a gRPC call is.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_s, access_log=None)
        self._listener: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        """Start the app (its startup hooks) and listen; OSError when the port cannot be bound."""
        await self._runner.setup()
        manager = self._runner.server
        loop = asyncio.get_running_loop()

        def connection() -> _Connection:
            return _Connection(manager, loop=loop, read_timeout_s=self._read_timeout_s, max_line_size=MAX_LINE,
                               max_field_size=MAX_LINE, max_headers=MAX_HEADERS, keepalive_timeout=KEEPALIVE_S,
                               access_log=None, logger=log)

        try:
            self._listener = await loop.create_server(connection, self._host, self._port)
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"could not bind the HTTP port {self._host}:{self._port}: {exc.strerror or exc}") from None
        self.port = self._listener.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, let requests in progress finish (at most `shutdown_s`), close the rest."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await self._runner.cleanup()


def gate_metadata(request: web.BaseRequest) -> list[tuple[str, str]]:
    """The headers `Gate.tenant` reads, in the shape of gRPC metadata (lower-case names)."""
    return [(name, request.headers[name]) for name in (AUTH_HEADER, TENANT_HEADER) if name in request.headers]


def bearer_challenge(request: web.BaseRequest, realm: str) -> dict[str, str]:
    """The WWW-Authenticate header of a 401 (RFC 6750): `invalid_token` when a token was sent."""
    value = f'Bearer realm="{realm}"'
    if AUTH_HEADER in request.headers:
        value += ', error="invalid_token"'
    return {"WWW-Authenticate": value}

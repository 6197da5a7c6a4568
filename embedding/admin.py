"""The admin HTTP port: `GET /cache/stats` (JSON, the same content as the
GetCacheStats RPC, for parity with the seed's endpoint) and `GET /metrics`
(Prometheus text format), plus `GET /healthz`.

aiohttp is not a dependency, and the endpoints are three fixed GETs, so this
is a minimal HTTP/1.0-style server on asyncio streams: one request per
connection, answered and closed. It runs on the frontend's event loop, so it
reads the live counters without locks.

With bearer tokens configured, /cache/stats and /metrics need
`Authorization: Bearer TOKEN` (any accepted token, as the GetCacheStats RPC
does), else 401 with `WWW-Authenticate: Bearer`; /healthz stays open for
probes, which carry no token, and tells nothing but ready or not.

Whatever a client sends, the answer is a 4xx and never a traceback: a line
over MAX_LINE (the stream's buffer limit) is 414 for the request line and
431 for a header, more than MAX_HEADERS headers or MAX_HEADER_BYTES of them
is 431, and a request not read completely within `read_timeout_s` is 408, so
a slow client cannot hold a connection open.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from common.errors import Unauthenticated
from embedding.tenants import AUTH_HEADER, Gate, header

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
MAX_LINE = 8 * 1024  # the request line or one header line; also the StreamReader's buffer limit
MAX_HEADERS = 64
MAX_HEADER_BYTES = 32 * 1024
READ_TIMEOUT_S = 10.0  # request line to the blank line after the headers
ANSWER_TIMEOUT_S = 10.0  # /cache/stats asks the shards; a hung one must not hold the connection
DISCARD_BYTES = 1 << 20  # read (and drop) at most this much of a refused request before closing
DISCARD_S = 1.0
PROTECTED = ("/cache/stats", "/metrics")  # need a bearer token when tokens are configured


class Refused(Exception):
    """A request answered with a 4xx before it was read completely."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class AdminServer:
    def __init__(self, host: str, port: int, cache_stats: Callable[[], Awaitable[dict]],
                 registry: CollectorRegistry, ready: Callable[[], bool],
                 refresh: Callable[[], Awaitable[object]] | None = None, gate: Gate | None = None,
                 read_timeout_s: float = READ_TIMEOUT_S) -> None:
        """`refresh` runs before each /metrics scrape, to update counts kept elsewhere (the
        shards' evictions) in the Stats that the registry renders. `gate`, when it has tokens,
        checks the bearer token of PROTECTED paths (the same Gate as the gRPC port's)."""
        self._host = host
        self._port = port
        self._cache_stats = cache_stats
        self._registry = registry
        self._refresh = refresh
        self._ready = ready
        self._gate = gate if gate is not None and gate.auth_enabled else None
        self._read_timeout_s = read_timeout_s
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("admin HTTP on http://%s:%d (/cache/stats, /metrics: %s; /healthz open)", self._host, self.port,
                 "bearer token required" if self._gate else "open, no tokens configured")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        extra: tuple[tuple[str, str], ...] = ()
        read = False
        try:
            try:
                method, path, headers = await asyncio.wait_for(self._read(reader), self._read_timeout_s)
            except asyncio.TimeoutError:
                raise Refused(408, "request not received in time") from None
            read = True
            try:
                status, ctype, body = await asyncio.wait_for(self._answer(method, path, headers), ANSWER_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("admin: %s took over %g s", path, ANSWER_TIMEOUT_S)
                status, ctype, body = 503, "text/plain", b"timed out\n"
        except Refused as exc:
            log.debug("admin: refused a request: %d %s", exc.status, exc)
            status, ctype, body, extra = exc.status, "text/plain", f"{exc}\n".encode(), exc.headers
        except ConnectionError:
            writer.close()
            return
        except Exception:
            log.exception("admin request failed")
            status, ctype, body = 500, "text/plain", b"internal error\n"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in extra)
                + "Connection: close\r\n\r\n").encode()
        try:
            writer.write(head + body)
            await writer.drain()
            if not read:
                await _discard(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> tuple[str, str, list[tuple[str, str]]]:
        """Method, path (without the query) and headers (names lower-cased, in the gRPC metadata
        shape the Gate reads); Refused when the request is malformed or too large."""
        parts = (await _line(reader, 414, "request line")).decode("latin-1").split()
        if (not 2 <= len(parts) <= 3 or not (parts[0].isascii() and parts[0].isalpha() and parts[0].isupper())
                or (len(parts) == 3 and not parts[2].startswith("HTTP/"))):
            raise Refused(400, "bad request line: expected `METHOD PATH HTTP/1.x`")
        headers: list[tuple[str, str]] = []
        size = 0
        while (line := await _line(reader, 431, "header line", eof_ok=True)) not in (b"\r\n", b"\n", b""):
            size += len(line)
            if len(headers) == MAX_HEADERS or size > MAX_HEADER_BYTES:
                raise Refused(431, f"headers: at most {MAX_HEADERS} lines and {MAX_HEADER_BYTES} bytes")
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():
                raise Refused(400, "bad header line: expected `Name: value`")
            headers.append((name.lower(), value.strip()))
        return parts[0], parts[1].split("?", 1)[0], headers

    def _authorize(self, path: str, headers: list[tuple[str, str]]) -> None:
        """Refused(401) for a PROTECTED path without a token the Gate accepts (RFC 6750's challenge)."""
        if self._gate is None or path not in PROTECTED:
            return
        try:
            self._gate.tenant(headers)
        except Unauthenticated:
            if header(headers, AUTH_HEADER) is None:
                raise Refused(401, "unauthorized: send `Authorization: Bearer TOKEN`",
                              (("WWW-Authenticate", 'Bearer realm="sutra-admin"'),)) from None
            raise Refused(401, "unauthorized: invalid bearer token",
                          (("WWW-Authenticate", 'Bearer realm="sutra-admin", error="invalid_token"'),)) from None

    async def _answer(self, method: str, path: str, headers: list[tuple[str, str]]) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        self._authorize(path, headers)
        if path == "/cache/stats":
            if not self._ready():
                return 503, "application/json", b'{"error": "starting: ML-base has not answered yet"}\n'
            body = json.dumps(await self._cache_stats(), indent=2).encode() + b"\n"
            return 200, "application/json", body
        if path == "/metrics":
            if self._refresh is not None:
                await self._refresh()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return (200, "text/plain", b"ok\n") if self._ready() else (503, "text/plain", b"starting\n")
        return 404, "text/plain", b"not found: try /cache/stats or /metrics\n"


async def _line(reader: asyncio.StreamReader, too_long: int, what: str, eof_ok: bool = False) -> bytes:
    """One line, newline included; b"" at the end of the stream where `eof_ok` (a client that sent
    its request and shut down its side), else Refused. Longer than MAX_LINE: Refused(too_long)."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise Refused(too_long, f"{what} longer than {MAX_LINE} bytes") from None
    except asyncio.IncompleteReadError as exc:
        if eof_ok and not exc.partial:
            return b""
        raise Refused(400, "incomplete request") from None


async def _discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After refusing a request that was not read to its end: end our side and read (bounded in
    bytes and time) what the client is still sending. Closing with unread input would reset the
    connection, and the client could lose the answer that explains the refusal."""
    if writer.can_write_eof():
        writer.write_eof()
    left = DISCARD_BYTES
    try:
        async with asyncio.timeout(DISCARD_S):
            while left > 0 and (chunk := await reader.read(min(left, 65536))):
                left -= len(chunk)
    except (asyncio.TimeoutError, ConnectionError):
        pass

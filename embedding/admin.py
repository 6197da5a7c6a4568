"""The admin HTTP port: `GET /cache/stats` (JSON, the same content as the
GetCacheStats RPC, for parity with the seed's endpoint) and `GET /metrics`
(Prometheus text format), plus `GET /healthz`.

aiohttp is not a dependency, and the endpoints are three fixed GETs, so this
is a minimal HTTP/1.0-style server on asyncio streams: one request per
connection, answered and closed. It runs on the frontend's event loop, so it
reads the live counters without locks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
            500: "Internal Server Error", 503: "Service Unavailable"}


class AdminServer:
    def __init__(self, host: str, port: int, cache_stats: Callable[[], Awaitable[dict]],
                 registry: CollectorRegistry, ready: Callable[[], bool],
                 refresh: Callable[[], Awaitable[object]] | None = None) -> None:
        """`refresh` runs before each /metrics scrape, to update counts kept elsewhere (the
        shards' evictions) in the Stats that the registry renders."""
        self._host = host
        self._port = port
        self._cache_stats = cache_stats
        self._registry = registry
        self._refresh = refresh
        self._ready = ready
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("admin HTTP on http://%s:%d (/cache/stats, /metrics)", self._host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body = await asyncio.wait_for(self._answer(reader), 10.0)
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        except Exception:
            log.exception("admin request failed")
            status, ctype, body = 500, "text/plain", b"internal error\n"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(head + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        request_line = (await reader.readline()).decode("latin-1").strip()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # headers are not needed
        parts = request_line.split()
        if len(parts) < 2:
            return 400, "text/plain", b"bad request\n"
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
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

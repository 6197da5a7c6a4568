"""The admin HTTP port: `GET /cache/stats` (JSON, the same content as the
GetCacheStats RPC, for parity with the seed's endpoint) and `GET /metrics`
(Prometheus text format), plus `GET /healthz`; HEAD works on each.

Served by aiohttp on the frontend's event loop (embedding/http_server.py, which
also bounds and times requests), so it reads the live counters without locks.
It stays on a port of its own, apart from the HTTP API: operators and scrapers
use it, it binds loopback by default (`--admin-host`) while the API may face
clients, and `sutra status --json` names it as the frontend's metrics URL.

With bearer tokens configured, /cache/stats and /metrics need
`Authorization: Bearer TOKEN` (any accepted token, as the GetCacheStats RPC
does), else 401 with `WWW-Authenticate: Bearer`; /healthz stays open for
probes, which carry no token, and tells nothing but ready or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from common.errors import Unauthenticated
from embedding.http_server import READ_TIMEOUT_S, HttpServer, bearer_challenge, gate_metadata
from embedding.tenants import Gate

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 10.0  # /cache/stats asks the shards; a hung one must not hold the connection
PROTECTED = ("/cache/stats", "/metrics")  # need a bearer token when tokens are configured
REALM = "sutra-admin"


def _text(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text, headers=headers)


def admin_app(cache_stats: Callable[[], Awaitable[dict]], registry: CollectorRegistry, ready: Callable[[], bool],
              refresh: Callable[[], Awaitable[object]] | None = None, gate: Gate | None = None) -> web.Application:
    """The admin routes. `refresh` runs before each /metrics scrape, to update counts kept elsewhere
    (the shards' evictions) in the Stats that the registry renders. `gate`, when it has tokens,
    checks the bearer token of PROTECTED paths (the same Gate as the gRPC port's)."""
    guard = gate if gate is not None and gate.auth_enabled else None

    @web.middleware
    async def checked(request: web.Request, handler) -> web.StreamResponse:
        # A wrong method or path is answered as such (405, 404) before the token is asked for.
        if guard is not None and request.path in PROTECTED and request.match_info.http_exception is None:
            try:
                guard.tenant(gate_metadata(request))
            except Unauthenticated as exc:
                return _text(401, f"unauthorized: {exc}\n", bearer_challenge(request, REALM))
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                return await handler(request)
        except TimeoutError:
            log.warning("admin: %s took over %g s", request.path, ANSWER_TIMEOUT_S)
            return _text(503, "timed out\n")
        except web.HTTPNotFound:
            return _text(404, "not found: try /cache/stats or /metrics\n")

    async def stats(_request: web.Request) -> web.Response:
        if not ready():
            return web.json_response({"error": "starting: ML-base has not answered yet"}, status=503)
        return web.Response(text=json.dumps(await cache_stats(), indent=2) + "\n", content_type="application/json")

    async def metrics(_request: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return _text(200, "ok\n") if ready() else _text(503, "starting\n")

    app = web.Application(middlewares=[checked])
    app.router.add_get("/cache/stats", stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


class AdminServer(HttpServer):
    """The admin routes on `host:port` (`port` 0: any free port, read `.port` once started)."""

    def __init__(self, host: str, port: int, cache_stats: Callable[[], Awaitable[dict]],
                 registry: CollectorRegistry, ready: Callable[[], bool],
                 refresh: Callable[[], Awaitable[object]] | None = None, gate: Gate | None = None,
                 read_timeout_s: float = READ_TIMEOUT_S) -> None:
        super().__init__(admin_app(cache_stats, registry, ready, refresh, gate), host, port,
                         read_timeout_s=read_timeout_s)
        self._protected = gate is not None and gate.auth_enabled

    async def start(self) -> None:
        await super().start()
        log.info("admin HTTP on %s (/cache/stats, /metrics: %s; /healthz open)", self.url,
                 "bearer token required" if self._protected else "open, no tokens configured")

"""`python -m embedding`: run the frontend until SIGTERM.

Wires the pieces together from one FrontendSettings: ML-base pool, L2
client, engine, gRPC servicer, the OpenAI-compatible HTTP API and the admin
HTTP server (both aiohttp, on this event loop, calling the same engine).
Health stays NOT_SERVING until ML-base has answered GetInfo (fingerprint,
widths, limits); after that a watchdog turns it NOT_SERVING if cache misses
stop progressing. The HTTP API's /ready and /health read the same state.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from common import tracing
from common.grpc_server import ServiceServer, configure_logging, run_until_signalled
from embedding.admin import AdminServer
from embedding.auth import AuthInterceptor
from embedding.engine import FrontendEngine
from embedding.http_api import api_app
from embedding.http_server import HttpServer
from embedding.l2_client import L2Client
from embedding.mlbase_pool import MLBasePool
from embedding.request_ids import RequestIds
from embedding.server import SERVICE_NAME, EmbeddingServicer, add_to_server
from embedding.settings import FrontendSettings, load_settings
from embedding.stats import Stats, make_registry
from embedding.tenants import Gate
from embedding.token_counts import TokenCounter
from embedding.watchdog import StallWatchdog

log = logging.getLogger("embedding")


async def serve(settings: FrontendSettings) -> None:
    # Loaded first: a tokenizer that is not there stops the frontend before it takes a port.
    counter = TokenCounter.load(settings.tokenizer) if settings.http_port else None
    stats = Stats()
    pool = MLBasePool(settings.mlbase_address, settings.mlbase_connections, stats,
                      max_message_bytes=settings.server.max_message_bytes, max_attempts=settings.mlbase_attempts,
                      tls=settings.mlbase_tls)
    l2 = None
    if settings.l2_enabled:
        l2 = L2Client(settings.cache_shards, stats, timeout_s=settings.l2_timeout_ms / 1000.0,
                      max_message_bytes=settings.server.max_message_bytes,
                      reconnect_max_s=settings.l2_reconnect_max_ms / 1000.0, max_waiting=settings.l2_max_waiting,
                      keepalive_ms=settings.l2_keepalive_ms, tls=settings.shard_tls)
    engine = FrontendEngine(settings, stats, pool.embed_full, l2)
    gate = Gate(settings.access)
    log.info("%s", settings.access.describe())
    # Request ids outside authentication, so a refused call is named (and logged) too.
    auth = [AuthInterceptor(gate)] if gate.auth_enabled else []
    server = ServiceServer(settings.server, [SERVICE_NAME], interceptors=[RequestIds(f"/{SERVICE_NAME}/"), *auth])
    servicer = EmbeddingServicer(engine, settings.stream_window, gate, stream_idle_s=settings.stream_idle_s)
    add_to_server(servicer, server.server)
    watchdog = StallWatchdog(lambda: engine.inflight, server, stall_s=settings.stall_s)
    if settings.stall_s <= settings.mlbase_timeout_s + 1:
        log.warning("--stall-seconds %g is not above --mlbase-timeout %g + 1 s: a batch of callers without a "
                    "deadline may legitimately run that long, and health would turn NOT_SERVING meanwhile",
                    settings.stall_s, settings.mlbase_timeout_s)

    def gauges() -> dict:
        """Each returns to its idle value (in brackets) once traffic stops; tests/chaos checks it."""
        inflight = engine.inflight
        return {
            "l1_entries": len(engine.l1) if engine.l1 is not None else 0,
            "pending_flights": inflight.pending if inflight else 0,  # [0]
            "queued_flights": inflight.queued if inflight else 0,  # [0]
            "batches_inflight": inflight.running if inflight else 0,  # [0]
            "free_batch_slots": inflight.free_slots if inflight else settings.mlbase_concurrency,  # [concurrency]
            "writeback_queued": engine.writeback.queued if engine.writeback is not None else 0,  # [0]
            "open_streams": servicer.open_streams,  # [0]
            "l2_waiting_lookups": l2.waiting if l2 is not None else 0,  # [0]
            "mlbase_inflight": sum(pool.inflight()),  # [0]
            "stalled": int(watchdog.stalled),  # [0]
            "stalled_seconds": inflight.stalled_for() if inflight else 0.0,  # [0]
        }

    admin = None
    if settings.admin_port:
        admin = AdminServer(settings.admin_host, settings.admin_port, engine.cache_stats,
                            make_registry(stats, gauges), ready=lambda: engine.model is not None,
                            refresh=engine.refresh_l2_stats, gate=gate)
        await admin.start()
    api = None
    if counter is not None:
        api = HttpServer(api_app(engine, gate, counter, ready=lambda: server.ready, live=lambda: server.live,
                                 max_body_bytes=settings.server.max_message_bytes),
                         settings.http_host, settings.http_port, shutdown_s=settings.server.grace_seconds)
        await api.start()
        log.info("HTTP API on %s (POST /v1/embeddings, GET /v1/models; /health, /ready)", api.url)

    async def ready() -> None:
        log.info("waiting for ML-base at %s (%d connections)", settings.mlbase_address, pool.connections)
        info = await pool.wait_for_info(settings.mlbase_wait_s)
        engine.configure(info)
        if counter is not None:
            counter.configure(info.max_seq_length, info.model_id)
        watchdog.start()

    async def cleanup() -> None:
        await watchdog.close()
        if api is not None:  # requests still in progress finish first: they need the engine
            await api.close()
        await engine.close(settings.writeback_flush_s)
        if admin is not None:
            await admin.close()
        if l2 is not None:
            await l2.close()
        await pool.close()

    await run_until_signalled(server, ready, cleanup)


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    configure_logging(settings.log_level)
    try:
        with tracing.installed(settings.tracing, starts_traces=True):  # the edge: a call without a trace starts one
            asyncio.run(serve(settings))
    except Exception as exc:  # noqa: BLE001 - a clear one-line reason and a non-zero exit
        log.error("frontend failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

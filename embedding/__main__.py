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
from embedding.cache_admin import CacheAdmin
from embedding.engine import FrontendEngine
from embedding.http_api import api_app
from embedding.http_server import HttpServer
from embedding import shard_source
from embedding.l2_client import L2Client
from embedding.mlbase_pool import MLBasePool
from embedding.models import ModelRoute, Models, parse_extra
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

    def open_pool(address: str) -> MLBasePool:
        return MLBasePool(address, settings.mlbase_connections, stats,
                          max_message_bytes=settings.server.max_message_bytes, max_attempts=settings.mlbase_attempts,
                          tls=settings.mlbase_tls, watch_s=settings.fingerprint_watch_s,
                          affinity=settings.replica_affinity)

    pool = open_pool(settings.mlbase_address)
    l2 = None
    if settings.l2_enabled:
        source = shard_source.from_settings(settings)  # None: the fixed --cache-shard list
        addresses = (await source() or ()) if source else settings.cache_shards
        l2 = L2Client(addresses, stats, timeout_s=settings.l2_timeout_ms / 1000.0,
                      max_message_bytes=settings.server.max_message_bytes,
                      reconnect_max_s=settings.l2_reconnect_max_ms / 1000.0, max_waiting=settings.l2_max_waiting,
                      keepalive_ms=settings.l2_keepalive_ms, tls=settings.shard_tls, copies=settings.l2_copies)
        if source:
            l2.follow(source, settings.cache_shards_refresh_s)
    engine = FrontendEngine(settings, stats, pool.embed_full, l2)
    extra = []
    for spec in settings.extra_models:  # more models beside the default (embedding/models.py)
        name, address = parse_extra(spec)
        extra_pool = open_pool(address)
        extra.append(ModelRoute(name, extra_pool, FrontendEngine(settings, stats, extra_pool.embed_full, l2)))
    models = Models(ModelRoute("", pool, engine), extra)
    gate = Gate(settings.access)
    log.info("%s", settings.access.describe())
    # Request ids outside authentication, so a refused call is named (and logged) too.
    auth = [AuthInterceptor(gate)] if gate.auth_enabled else []
    server = ServiceServer(settings.server, [SERVICE_NAME], interceptors=[RequestIds(f"/{SERVICE_NAME}/"), *auth])
    servicer = EmbeddingServicer(engine, settings.stream_window, gate, stream_idle_s=settings.stream_idle_s,
                                 live=pool.live,
                                 cache_admins={r.name: CacheAdmin(r.engine, r.pool) for r in models.routes},
                                 models=models if extra else None)
    add_to_server(servicer, server.server)
    watchdog = StallWatchdog(lambda: engine.inflight, server, stall_s=settings.stall_s)
    if settings.stall_s <= settings.mlbase_timeout_s + 1:
        log.warning("--stall-seconds %g is not above --mlbase-timeout %g + 1 s: a batch of callers without a "
                    "deadline may legitimately run that long, and health would turn NOT_SERVING meanwhile",
                    settings.stall_s, settings.mlbase_timeout_s)

    def gauges() -> dict:
        """Each returns to its idle value (in brackets) once traffic stops; tests/chaos checks it."""
        inflight = engine.inflight
        # Every model's engine counts (the default's alone without --extra-model).
        engines = [r.engine for r in models.routes]
        flights = [e.inflight for e in engines if e.inflight is not None]
        return {
            "l1_entries": sum(len(e.l1) for e in engines if e.l1 is not None),
            "pending_flights": sum(f.pending for f in flights),  # [0]
            "queued_flights": sum(f.queued for f in flights),  # [0]
            "batches_inflight": sum(f.running for f in flights),  # [0]
            "free_batch_slots": inflight.free_slots if inflight else settings.mlbase_concurrency,  # [concurrency]
            "writeback_queued": sum(e.writeback.queued for e in engines if e.writeback is not None),  # [0]
            "open_streams": servicer.open_streams,  # [0]
            "l2_waiting_lookups": l2.waiting if l2 is not None else 0,  # [0]
            "mlbase_inflight": sum(sum(r.pool.inflight()) for r in models.routes),  # [0]
            "stalled": int(watchdog.stalled),  # [0]
            "stalled_seconds": inflight.stalled_for() if inflight else 0.0,  # [0]
        }

    admin = None
    if settings.admin_port:
        admin = AdminServer(settings.admin_host, settings.admin_port, engine.cache_stats,
                            make_registry(stats, gauges, pool.live), ready=lambda: engine.model is not None,
                            refresh=engine.refresh_l2_stats, gate=gate)
        await admin.start()
    api = None
    if counter is not None:
        api = HttpServer(api_app(engine, gate, counter, ready=lambda: server.ready, live=lambda: server.live,
                                 extra={r.name: r.engine for r in extra},
                                 max_body_bytes=settings.server.max_message_bytes),
                         settings.http_host, settings.http_port, shutdown_s=settings.server.grace_seconds)
        await api.start()
        log.info("HTTP API on %s (POST /v1/embeddings, GET /v1/models; /health, /ready)", api.url)

    async def ready() -> None:
        log.info("waiting for ML-base at %s (%d connections)", settings.mlbase_address, pool.connections)
        info = await pool.wait_for_info(settings.mlbase_wait_s)
        adopt(info)
        for route in extra:
            log.info("waiting for model %r at %s", route.name, route.pool.address)
            route.engine.configure(await route.pool.wait_for_info(settings.mlbase_wait_s))
            route.pool.on_switch = route.engine.configure
        for route in models.routes:
            await follow(route)
        pool.on_switch = adopt  # a rollout: the replicas moved to another fingerprint
        watchdog.start()

    async def follow(route: ModelRoute) -> None:
        """Watch the route's replicas for new fingerprints, re-reading its cache generation each round."""
        r_engine, r_pool = route.engine, route.pool
        await r_engine.generations.refresh(r_pool.fingerprint)
        r_pool.after_round = lambda: r_engine.generations.refresh(r_pool.fingerprint)
        r_pool.watch()

    def adopt(info) -> None:
        engine.configure(info)
        if counter is not None:
            counter.configure(info.max_seq_length, info.model_id)

    async def cleanup() -> None:
        await watchdog.close()
        if api is not None:  # requests still in progress finish first: they need the engine
            await api.close()
        for route in models.routes:
            await route.engine.close(settings.writeback_flush_s)
        if admin is not None:
            await admin.close()
        if l2 is not None:
            await l2.close()
        for route in models.routes:
            await route.pool.close()

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

"""`python -m embedding`: run the frontend until SIGTERM.

Wires the pieces together from one FrontendSettings: ML-base pool, L2
client, engine, gRPC servicer, admin HTTP server. Health stays NOT_SERVING
until ML-base has answered GetInfo (fingerprint, widths, limits).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from common.grpc_server import ServiceServer, configure_logging, run_until_signalled
from embedding.admin import AdminServer
from embedding.auth import AuthInterceptor
from embedding.engine import Engine
from embedding.l2_client import L2Client
from embedding.mlbase_pool import MLBasePool
from embedding.server import SERVICE_NAME, EmbeddingServicer, add_to_server
from embedding.settings import FrontendSettings, load_settings
from embedding.stats import Stats, make_registry
from embedding.tenants import Gate

log = logging.getLogger("embedding")


async def serve(settings: FrontendSettings) -> None:
    stats = Stats()
    pool = MLBasePool(settings.mlbase_address, settings.mlbase_connections, stats,
                      max_message_bytes=settings.server.max_message_bytes, max_attempts=settings.mlbase_attempts,
                      tls=settings.mlbase_tls)
    l2 = None
    if settings.l2_enabled:
        l2 = L2Client(settings.cache_shards, stats, timeout_s=settings.l2_timeout_ms / 1000.0,
                      max_message_bytes=settings.server.max_message_bytes,
                      reconnect_max_s=settings.l2_reconnect_max_ms / 1000.0, tls=settings.shard_tls)
    engine = Engine(settings, stats, pool.embed_full, l2)
    gate = Gate(settings.access)
    server = ServiceServer(settings.server, [SERVICE_NAME],
                           interceptors=[AuthInterceptor(gate)] if gate.auth_enabled else [])
    add_to_server(EmbeddingServicer(engine, settings.stream_window, gate), server.server)

    def gauges() -> dict:
        return {
            "l1_entries": len(engine.l1) if engine.l1 is not None else 0,
            "pending_texts": engine.pending,
            "writeback_queued": engine.writeback.queued if engine.writeback is not None else 0,
            "mlbase_inflight": sum(pool.inflight()),
        }

    admin = None
    if settings.admin_port:
        admin = AdminServer(settings.admin_host, settings.admin_port, engine.cache_stats,
                            make_registry(stats, gauges), ready=lambda: engine.model is not None)
        await admin.start()

    async def ready() -> None:
        log.info("waiting for ML-base at %s (%d connections)", settings.mlbase_address, pool.connections)
        engine.configure(await pool.wait_for_info(settings.mlbase_wait_s))

    async def cleanup() -> None:
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
        asyncio.run(serve(settings))
    except Exception as exc:  # noqa: BLE001 - a clear one-line reason and a non-zero exit
        log.error("frontend failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

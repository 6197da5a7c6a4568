"""A process's Prometheus endpoint: `GET /metrics` over plain HTTP on its own port.

The gRPC servers (cache shard, replicas) serve their registry here when started with
`--metrics-port` (common.grpc_server.ServerOptions); the frontend serves its own on the admin
port instead (embedding/admin.py), where bearer tokens guard it. prometheus_client's threaded
WSGI server does the HTTP: a scrape runs the collectors on a thread of its own, so it never
waits on the event loop, and the collectors read plain counters (atomic under the GIL) and
RocksDB's properties (thread-safe).

Plain HTTP with no authentication: bind it to loopback (the default `--metrics-host`) or to an
address only the scraper reaches.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import ProcessCollector, start_http_server
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger(__name__)


def process_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of this process's own `collectors` plus the standard process_* metrics (CPU
    seconds, resident memory, open files, start time). Not the library's global registry, so
    tests can build several in one interpreter."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in (*collectors, ProcessCollector(registry=None)):
        registry.register(collector)
    return registry


class MetricsEndpoint:
    """A started endpoint; `close` stops it and frees the port."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, host: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = host
        self.port = httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_metrics(host: str, port: int, registry: Collector) -> MetricsEndpoint:
    """Serve `registry` on http://host:port/metrics from a daemon thread (port 0: any free port).
    OSError when the port cannot be bound."""
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"could not bind the metrics port {host}:{port}: {exc.strerror or exc}") from None
    endpoint = MetricsEndpoint(httpd, thread, host)
    log.info("Prometheus metrics on %s (plain HTTP)", endpoint.url)
    return endpoint

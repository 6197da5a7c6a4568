"""gRPC server scaffolding shared by every service: options, health,
reflection, and the SIGTERM drain sequence.

Every service follows the same life cycle so the balancer and the stack
supervisor can treat them alike: NOT_SERVING while starting, SERVING when
ready, NOT_SERVING on SIGTERM, a drain period for the balancer to notice,
then `server.stop(grace)` which lets in-flight RPCs finish.

Two questions, two health names. Readiness ("" and each service's own name):
send me traffic; NOT_SERVING while starting, draining, or wedged. Liveness
(`liveness`): I am not wedged; SERVING while starting and draining, so an
orchestrator restarts a process only when a watchdog reports a fault that a
restart can cure (`set_fault`), never because it is busy loading or leaving.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.registry import Collector

from common import tracing
from common.malformed import MalformedRequests
from common.metrics_http import MetricsEndpoint, serve_metrics
from common.peers import AllowedPeers
from common.settings import Settings, group, setting
from common.tls import DEFAULT_MAX_MESSAGE_BYTES, TlsServerOptions, server_tls_group

log = logging.getLogger(__name__)

# Calls (streams included) one server runs at once; more get RESOURCE_EXHAUSTED at once.
DEFAULT_MAX_CONCURRENT_RPCS = 1000
# The health service name that answers "is this process wedged?" (see the module docstring).
LIVENESS = "liveness"
# Servers accept client keepalive pings this often at most; `keepalive_options` never asks for more.
MIN_PING_INTERVAL_MS = 500
# Longest wait for a keepalive ping's answer before a client closes the connection.
MAX_KEEPALIVE_TIMEOUT_MS = 5000


def keepalive_options(interval_ms: int) -> list[tuple[str, object]]:
    """Client channel options that ping every `interval_ms`, with or without calls, and close the
    connection when a ping goes unanswered: the only way to notice a peer that hangs without
    closing its socket (SIGSTOP, a partition that sends no RST). [] when `interval_ms` is 0."""
    if interval_ms <= 0:
        return []
    interval_ms = max(interval_ms, MIN_PING_INTERVAL_MS)
    timeout_ms = min(interval_ms, MAX_KEEPALIVE_TIMEOUT_MS)
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # grpc 1.85's core times an unanswered ping out after this (default 60 s), not after
        # keepalive_timeout_ms: without it a stopped peer goes unnoticed for a minute.
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


@dataclass(frozen=True)
class ServerOptions(Settings):
    """Transport knobs common to all services; each service mounts them with `server_settings`."""

    host: str = setting("127.0.0.1", "address to bind")
    # Each service names its own port variable (server_settings).
    port: int = setting(0, "port to bind, 0 = any free port")
    max_message_bytes: int = setting(DEFAULT_MAX_MESSAGE_BYTES, "largest gRPC message accepted or sent; a larger "
                                                                "request is refused before it is parsed")
    max_concurrent_rpcs: int = setting(DEFAULT_MAX_CONCURRENT_RPCS, "calls (open streams included) served at once; "
                                                                    "more get RESOURCE_EXHAUSTED straight away")
    # 0 disables; replicas set it so connections re-spread after a restart.
    max_connection_age_ms: int = setting(0, "close client connections after this long (GOAWAY) so that they "
                                            "re-spread over replicas behind a TCP balancer; 0 = never")
    max_connection_age_grace_ms: int = setting(0, "time RPCs on an aged connection get to finish")
    # Seconds between NOT_SERVING and closing the listener on SIGTERM.
    drain_seconds: float = setting(0.0, "on SIGTERM, seconds to report NOT_SERVING before closing the port, so "
                                        "a balancer can notice")
    # Seconds in-flight RPCs get to finish once the listener closes.
    grace_seconds: float = setting(30.0, "seconds in-flight RPCs get to finish after the port closes")
    # Not a transport knob, but every server process has it.
    log_level: str = setting("INFO", "logging level")
    # Not gRPC either: where the process serves its Prometheus metrics (common/metrics_http.py).
    metrics_port: int = setting(0, "port of the plain-HTTP Prometheus endpoint (GET /metrics), 0 = off")
    metrics_host: str = setting("127.0.0.1", "address the metrics endpoint binds; it has no authentication, so "
                                             "keep it on loopback or a network only the scraper reaches")
    # None = plaintext; see common/tls.py (client_ca set = mutual TLS).
    tls: TlsServerOptions | None = server_tls_group()

    def problems(self) -> list[str]:
        wrong = [f"--{name.replace('_', '-')} must not be negative" for name in
                 ("port", "metrics_port", "max_connection_age_ms", "max_connection_age_grace_ms", "drain_seconds",
                  "grace_seconds")
                 if getattr(self, name) < 0]
        return wrong + [f"--{name.replace('_', '-')} must be positive" for name in
                        ("max_message_bytes", "max_concurrent_rpcs") if getattr(self, name) <= 0]

    def channel_args(self) -> list[tuple[str, int]]:
        args = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Clients' keepalive pings (the frontend pings its shards to find a hung one) are
            # accepted down to one every 500 ms, even on an idle connection; grpc's default (one
            # per 5 min without data) answers them with GOAWAY "too_many_pings".
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if self.max_connection_age_ms > 0:
            args.append(("grpc.max_connection_age_ms", self.max_connection_age_ms))
            args.append(("grpc.max_connection_age_grace_ms", self.max_connection_age_grace_ms))
        return args


class ServiceServer:
    """An aio server with health and reflection, bound to one port (TLS when
    `options.tls` is set). `interceptors` run before every handler, health and
    reflection included; an interceptor that guards the service lets those two
    through itself."""

    def __init__(self, options: ServerOptions, service_names: Sequence[str],
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 metrics: Collector | None = None) -> None:
        """`metrics`: the process's Prometheus registry, served on `options.metrics_port` (when
        not 0) from construction, like the gRPC port, until `close_metrics`."""
        self.options = options
        # AllowedPeers first: a caller the service does not answer learns nothing more. MalformedRequests
        # last (innermost): a guard before it may refuse the call first. With tracing on, the server
        # span is outermost, so it also times (and shows) what the guards refuse.
        tls = options.tls
        peers = [AllowedPeers(tls.allowed_clients)] if tls is not None and tls.allowed_clients else []
        traced = [tracing.ServerSpans()] if tracing.enabled() else []
        self.server = grpc.aio.server(options=options.channel_args(),
                                      interceptors=[*traced, *peers, *interceptors, MalformedRequests()],
                                      maximum_concurrent_rpcs=options.max_concurrent_rpcs)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            self.service_names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        address = f"{options.host}:{options.port}"
        if options.tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, options.tls.credentials())
        if self.port == 0:
            raise OSError(f"could not bind {options.host}:{options.port}")
        self.metrics: MetricsEndpoint | None = None
        if metrics is not None and options.metrics_port:
            self.metrics = serve_metrics(options.metrics_host, options.metrics_port, metrics)
        self._ready = False
        self._draining = False
        self.fault: str | None = None

    def close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    async def set_serving(self, serving: bool) -> None:
        """Ready (or not) to take traffic; readiness also needs no draining and no fault."""
        self._ready = serving
        await self._publish()

    async def set_fault(self, reason: str | None) -> None:
        """A watchdog found the process wedged (`reason`), or recovered (None)."""
        self.fault = reason
        await self._publish()

    @property
    def ready(self) -> bool:
        """Readiness, as health "" and each service's name report it (an HTTP port mirrors it)."""
        return self._ready and not self._draining and self.fault is None

    @property
    def live(self) -> bool:
        """Liveness, as the `liveness` health name reports it."""
        return self.fault is None

    async def _publish(self) -> None:
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        ready = self.ready
        for name in ["", *self.service_names]:
            await self.health.set(name, serving if ready else not_serving)
        await self.health.set(LIVENESS, serving if self.live else not_serving)

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()

    async def drain_and_stop(self, pre_stop: Callable[[], None] | None = None) -> None:
        """NOT_SERVING, wait for the balancer to notice, run `pre_stop` (end what would hold the
        grace period open, such as long-lived streams), then finish in-flight work."""
        self._draining = True
        await self.set_serving(False)
        if self.options.drain_seconds > 0:
            await asyncio.sleep(self.options.drain_seconds)
        if pre_stop is not None:
            pre_stop()
        await self.server.stop(self.options.grace_seconds)


async def run_until_signalled(
    server: ServiceServer,
    ready: Callable[[], Awaitable[None]] | None = None,
    cleanup: Callable[[], Awaitable[None]] | None = None,
    pre_stop: Callable[[], None] | None = None,
) -> None:
    """Start, run `ready` (loading, warming), go SERVING, wait for SIGTERM/SIGINT, drain
    (`pre_stop` runs after the drain period, before the grace period), then `cleanup`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        started = True
        if ready is not None:
            # A signal during a slow `ready` (loading, waiting for a backend) must still stop us.
            ready_task = asyncio.ensure_future(ready())
            stop_task = asyncio.ensure_future(stop.wait())
            await asyncio.wait({ready_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            if not ready_task.done():
                log.info("signal received while starting: stopping before SERVING")
                ready_task.cancel()
                await asyncio.gather(ready_task, return_exceptions=True)
                started = False
            else:
                ready_task.result()
        if started:
            await server.set_serving(True)
            tls = server.options.tls
            log.info("serving on %s:%d (%s)", server.options.host, server.port,
                     tls.describe() if tls is not None else "plaintext")
            await stop.wait()
            log.info("signal received: draining for %.1fs", server.options.drain_seconds)
            await server.drain_and_stop(pre_stop)
    finally:
        await server.server.stop(0)
        # Scrapes read what `cleanup` closes (the shard's database): stop them first.
        server.close_metrics()
        if cleanup is not None:
            await cleanup()
    log.info("stopped cleanly")


def server_settings(*, port: int, port_env: str, connection_age: bool = False, metrics: bool = True,
                    **defaults: object):
    """The `server` field of a service's settings: ServerOptions' flags, this service's port and
    port variable, and its own defaults; the connection-age flags only where `connection_age`, the
    metrics endpoint's only where `metrics` (its port variable is the port's with METRICS_ before
    PORT, e.g. SUTRA_CACHE_SHARD_METRICS_PORT, so two services on one host never share one)."""
    overrides = {"port": {"default": port, "env": port_env},
                 "metrics_port": {"env": port_env.removesuffix("PORT") + "METRICS_PORT"},
                 **{k: {"default": v} for k, v in defaults.items()}}
    omit = () if connection_age else ("max_connection_age_ms", "max_connection_age_grace_ms")
    if not metrics:
        omit += ("metrics_port", "metrics_host")
    return group(ServerOptions, overrides=overrides, omit=omit)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

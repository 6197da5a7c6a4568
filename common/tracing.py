"""Distributed tracing with OpenTelemetry: one switch, and W3C trace context in and out.

Why one module: the three services and the client library must agree on how a trace context
travels and on what "off" costs, so all of it is here and the services only name their spans.

- Off (no `--otlp-endpoint`, the default): nothing is installed: no SDK tracer provider (the API's
  no-op one stays), no exporter thread, and no server interceptor (`ServiceServer` adds
  `ServerSpans` only when on). `span()`, `record()` and friends cost one check of a module global
  and hand back a shared no-op; `traceparent()` is "".
- On: an SDK TracerProvider whose batch processor exports over OTLP/gRPC (the SDK's `OTEL_BSP_*`
  variables tune it, e.g. `OTEL_BSP_SCHEDULE_DELAY` in ms), flushed when the process leaves
  `installed()`, which a SIGTERM'd service does after draining.

Context travels as W3C `traceparent` (and `tracestate`) gRPC metadata, written by the
OpenTelemetry propagator (`outgoing`) and read by `ServerSpans`; HAProxy in tcp mode passes it
untouched. Where one long-lived stream carries many callers' work (the frontend's Lookup stream to
a shard) it rides in each message instead (`traceparent()`, `remote_span()`). Work done once for
several callers (a batch) is a child of the first (sampled) caller's span with links to the others
(`span(callers=...)`).

Who starts traces: the frontend, the public edge, starts one for a call that arrives without a
context; the shard and the replicas only continue their callers' traces (sampler
ParentBased(ALWAYS_OFF)), so write-backs, stats polls and the like add no traces of their own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

from common.handlers import HandlerWrapper, around, status_of
from common.settings import Settings, group, setting

TRACEPARENT = "traceparent"
# Our services' methods; health and reflection are not traced.
TRACED_PREFIX = "/sutra."
# Longest an export may take, retries included; also bounds the flush when the process stops.
EXPORT_TIMEOUT_S = 5.0

# What every no-op returns (and a caller may use for a block it does not trace): a context manager
# yielding a span whose methods do nothing.
NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)
_tracer: trace.Tracer | None = None
_provider: Any = None


@dataclass(frozen=True)
class TracingOptions(Settings):
    """Where spans go (nowhere by default) and under which service name."""

    otlp_endpoint: str = setting(
        "", "OpenTelemetry collector that receives this process's trace spans over OTLP/gRPC: HOST:PORT or "
        "http://HOST:PORT (plaintext), https://HOST:PORT (TLS; OTEL_EXPORTER_OTLP_CERTIFICATE names its CA). "
        "Trace context (W3C traceparent) is read from and passed on in gRPC metadata. Empty = tracing off: "
        "nothing is installed and no span is made", metavar="HOST:PORT", shown="off")
    otlp_service_name: str = setting("", "service.name of this process's spans")

    def problems(self) -> list[str]:
        if self.otlp_endpoint and not self.otlp_service_name:
            return ["--otlp-service-name must not be empty"]
        return []


def tracing_group(service: str) -> Any:
    """A service's `tracing` settings field: --otlp-endpoint, and --otlp-service-name defaulting to `service`."""
    return group(TracingOptions, overrides={"otlp_service_name": {"default": service}})


# -- the switch ---------------------------------------------------------------------------------

def enabled() -> bool:
    return _tracer is not None


def install(options: TracingOptions, *, starts_traces: bool, exporter: Any = None) -> None:
    """Turn tracing on when `options` name an endpoint (or a test hands in `exporter`); else do nothing.
    `starts_traces`: whether a call that arrives without a trace context starts one (the edge)."""
    global _tracer, _provider
    if not options.otlp_endpoint and exporter is None:
        return
    # Imported here: a process with tracing off never loads the SDK or the exporter.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = options.otlp_endpoint
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"),
                                    timeout=EXPORT_TIMEOUT_S)
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON if starts_traces else ALWAYS_OFF),
                              resource=Resource.create({"service.name": options.otlp_service_name}),
                              shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter, export_timeout_millis=EXPORT_TIMEOUT_S * 1000))
    # Global for any library that traces through the API; ours uses `_tracer` (a test may install twice,
    # and the API keeps only the first global).
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = provider.get_tracer("sutra")


def shutdown() -> None:
    """Export what is buffered (at most EXPORT_TIMEOUT_S) and turn tracing off."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None:
        provider.shutdown()


@contextlib.contextmanager
def installed(options: TracingOptions, *, starts_traces: bool):
    """`install` for the block (a service's whole run), then `shutdown`, so spans survive a SIGTERM."""
    install(options, starts_traces=starts_traces)
    try:
        yield
    finally:
        shutdown()


# -- making spans -------------------------------------------------------------------------------

def current() -> SpanContext | None:
    """The current span's context, for a span made later elsewhere to link or descend from; None
    when tracing is off or no span is current."""
    if _tracer is None:
        return None
    found = trace.get_current_span().get_span_context()
    return found if found.is_valid else None


def distinct(contexts) -> list[SpanContext]:
    """`contexts` without repeats (a caller waiting on several texts of one batch), in order."""
    first: dict[tuple[int, int], SpanContext] = {}
    for c in contexts:
        first.setdefault((c.trace_id, c.span_id), c)
    return list(first.values())


def _parent(callers: Sequence[SpanContext] | None) -> tuple[Any, list[Link] | None]:
    """(parent context, links) for a span: the current span's child when `callers` is None; else
    the first sampled caller's child (the first caller's when none is) linked to the others, or a
    new trace when there are none."""
    if callers is None:
        return None, None
    if not callers:
        return otel_context.Context(), None
    first = next((i for i, c in enumerate(callers) if c.trace_flags.sampled), 0)
    others = [Link(c) for i, c in enumerate(callers) if i != first]
    return trace.set_span_in_context(NonRecordingSpan(callers[first])), others or None


def span(name: str, *, attributes: dict[str, Any] | None = None, kind: SpanKind = SpanKind.INTERNAL,
         callers: Sequence[SpanContext] | None = None):
    """A span around a block (the current span's child, or see `_parent` for `callers`); yields the
    span, or a no-op span when tracing is off."""
    tracer = _tracer
    if tracer is None:
        return NO_SPAN
    parent, links = _parent(callers)
    return tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes, links=links)


def record(name: str, start_ns: int, end_ns: int, *, attributes: dict[str, Any] | None = None,
           callers: Sequence[SpanContext] | None = None) -> None:
    """A span with explicit times (epoch ns), for time measured elsewhere: a queue, another thread."""
    tracer = _tracer
    if tracer is None:
        return
    parent, links = _parent(callers)
    tracer.start_span(name, context=parent, attributes=attributes, links=links, start_time=start_ns).end(end_ns)


# Wall clock minus monotonic clock, taken once: each conversion reading both clocks anew would
# jitter by the time between the two reads, and could put a span's end after the start of the
# span that followed it at the same monotonic instant.
_EPOCH_MINUS_MONOTONIC_NS = time.time_ns() - time.monotonic_ns()


def epoch_ns(monotonic_s: float) -> int:
    """The epoch nanoseconds of a time.monotonic() reading (asyncio's loop.time() too): spans take
    wall-clock times, our queues keep monotonic ones. Equal readings give equal times, and order
    is kept."""
    return int(monotonic_s * 1e9) + _EPOCH_MINUS_MONOTONIC_NS


def annotate(key: str, value: Any) -> None:
    """Set an attribute on the current span (nothing when tracing is off)."""
    if _tracer is not None:
        trace.get_current_span().set_attribute(key, value)


def event(name: str, attributes: dict[str, Any] | None = None) -> None:
    """Add an event to the current span (nothing when tracing is off)."""
    if _tracer is not None:
        trace.get_current_span().add_event(name, attributes)


# -- carrying the context -----------------------------------------------------------------------

def outgoing(metadata: tuple = ()) -> tuple:
    """`metadata` plus the current trace context (traceparent, tracestate) when a span is current,
    else `metadata` itself. It reads the API's context, not our switch, so the client library also
    carries the trace of a caller that traces with its own SDK."""
    if not trace.get_current_span().get_span_context().is_valid:
        return metadata
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*metadata, *carrier.items())


def traceparent() -> str:
    """The current span's W3C traceparent, for a message field; "" when off or no span is current."""
    if _tracer is None:
        return ""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get(TRACEPARENT, "")


def remote_span(name: str, traceparent_value: str, *, attributes: dict[str, Any] | None = None):
    """A server-side span continuing the trace a message carried; the no-op when off or it carried none."""
    tracer = _tracer
    if tracer is None or not traceparent_value:
        return NO_SPAN
    from opentelemetry import propagate

    parent = propagate.extract({TRACEPARENT: traceparent_value})
    return tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)


def incoming(name: str, carrier, *, attributes: dict[str, Any] | None = None):
    """A SERVER span for a call whose headers or metadata (`carrier`, a mapping) may carry a trace
    context: its child when they do, else a new trace (the edge) or none (ParentBased(ALWAYS_OFF)
    elsewhere); the no-op when off. Exceptions are neither recorded nor turned into a status: the
    caller sets the status its protocol ended with."""
    tracer = _tracer
    if tracer is None:
        return NO_SPAN
    from opentelemetry import propagate

    return tracer.start_as_current_span(name, context=propagate.extract(carrier), kind=SpanKind.SERVER,
                                        attributes=attributes, record_exception=False,
                                        set_status_on_exception=False)


def set_error(span, description: str) -> None:
    """Mark `span` (a no-op span too) as failed, with `description`."""
    span.set_status(Status(StatusCode.ERROR, description))


class _ServerSpan:
    """One call's SERVER span, the caller's child when its metadata carries a trace context."""

    __slots__ = ("_name", "_attributes", "_context", "_scope", "_span")

    def __init__(self, name: str, attributes: dict[str, Any], context: grpc.aio.ServicerContext) -> None:
        self._name = name
        self._attributes = attributes
        self._context = context

    async def __aenter__(self) -> None:
        # NO_SPAN when tracing was shut down while the server still runs.
        self._scope = incoming(self._name, dict(self._context.invocation_metadata() or ()),
                               attributes=self._attributes)
        self._span = self._scope.__enter__()

    async def __aexit__(self, kind, exc, tb) -> None:
        code = status_of(self._context, exc)
        self._span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            set_error(self._span, f"{code.name}: {self._context.details() or ''}")
        self._scope.__exit__(kind, exc, tb)


class ServerSpans(HandlerWrapper):
    """A SERVER span named `package.Service/Method` around every call of our services (health and
    reflection are not traced); `ServiceServer` installs it, outermost, when tracing is on."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        if not method.startswith(TRACED_PREFIX):
            return None
        name = method[1:]
        service, _, rpc = name.rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
        return around(handler, lambda context: _ServerSpan(name, attributes, context))

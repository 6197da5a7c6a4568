"""A real OTLP/gRPC trace receiver, in-process, on a free port: what a collector would get.

Tests check the spans the services export (`spans`, `wait_for`); the tracing benchmark gives the
traced frontend somewhere to send them, so the cost it measures includes the export.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from harness.procs import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened: ids as hex (as in `traceparent`), its service's name."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    kind: int
    links: tuple[tuple[str, str], ...]  # (trace id, span id)
    attributes: dict
    start_ns: int
    end_ns: int
    status_code: int


def _value(any_value) -> object:
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which else None


def _attributes(pairs) -> dict:
    return {kv.key: _value(kv.value) for kv in pairs}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: "OtlpReceiver") -> None:
        self._receiver = receiver

    def Export(self, request, context):
        self._receiver.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """`with OtlpReceiver() as r:` serves OTLP/gRPC on `r.endpoint` (plaintext) and keeps every span."""

    def __init__(self) -> None:
        self.port = free_port()
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.exports = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "OtlpReceiver":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(0)

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(ReceivedSpan(
                        service=service, name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(), kind=s.kind,
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                        attributes=_attributes(s.attributes), start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano, status_code=s.status.code))
        with self._lock:
            self._spans.extend(spans)
            self.exports += 1

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        """Every span received so far, or those of one trace (hex id)."""
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], trace_id: str | None = None,
                 timeout: float = 30.0) -> list[ReceivedSpan]:
        """The spans (of `trace_id`) once `done(spans)` holds; TimeoutError with what came otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.spans(trace_id)
            if done(found):
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout}s; received: {sorted((s.service, s.name) for s in found)}")
            time.sleep(0.05)

"""Tracing: one Embed is one trace across the frontend, the cache shard and a replica.

A real OTLP/gRPC receiver runs in this process (harness.otlp); a shard, a replica, HAProxy (tcp
mode, which passes the `traceparent` metadata untouched) and a frontend export to it
(`--otlp-endpoint`, a 100 ms export delay). The test sends one Embed of a new text with its own
`traceparent` and checks the spans every process exported: all in the test's trace, with the
expected names and parents. A second frontend, without an endpoint, serves the same backends: its
request works, carries an `x-request-id` back, and no process exports a span of its trace. The
batch spans' links are checked in-process, where two callers can be put in one batch on purpose,
and "off installs nothing" in a fresh interpreter.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import secrets
import subprocess
import sys
import time
import uuid

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from common import tracing
from embedding.inflight import InFlight
from harness.otlp import OtlpReceiver
from harness.procs import ROOT, Proc, free_port, wait_until
from harness.stack import HAProxy, frontend, replica, shard
from lb import render, runtime
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.support import aio, serving

EMBED = "sutra.embedding.v1.EmbeddingService/Embed"
REPLICA_EMBED = "sutra.mlbase.v1.MLBaseService/Embed"
SERVER = 2  # OTLP's SPAN_KIND_SERVER


def _exporting(proc: Proc) -> Proc:
    """Export every 100 ms instead of the SDK's 5 s, so the test does not wait for spans."""
    proc.env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tracing")


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as found:
        yield found


@pytest.fixture(scope="module")
def cache_shard(workdir, receiver):
    yield from serving(_exporting(shard(workdir, workdir / "db", "shard", None, "--otlp-endpoint", receiver.endpoint)))


@pytest.fixture(scope="module")
def model(workdir, receiver):
    yield from serving(_exporting(replica(workdir, "mlbase1", None, "--otlp-endpoint", receiver.endpoint)))


@pytest.fixture(scope="module")
def balancer(workdir, model):
    lb = HAProxy(render.LbSettings(replicas=(model.address,), server_names=("mlbase1",),
                                   socket=str(workdir / "haproxy.sock"), port=free_port(), stats_port=free_port()),
                 workdir).start()
    try:
        runtime.wait_all_up(lb.sock, count=1, timeout=30)
        yield lb
    finally:
        lb.stop()


@pytest.fixture(scope="module")
def http_port():
    return free_port()


@pytest.fixture(scope="module")
def traced(workdir, receiver, balancer, cache_shard, http_port):
    yield from serving(_exporting(frontend(workdir, balancer.address, cache_shard.address, "traced",
                                           "--otlp-endpoint", receiver.endpoint, "--log-level", "DEBUG",
                                           "--http-port", str(http_port))))


@pytest.fixture(scope="module")
def untraced(workdir, balancer, cache_shard):
    yield from serving(frontend(workdir, balancer.address, cache_shard.address, "untraced"))


def _embed(address: str, text: str, metadata: tuple = (), dimensions: int = 0):
    """(reply, trailing metadata as a dict) of one Embed."""
    with grpc.insecure_channel(address) as channel:
        reply, call = pb_grpc.EmbeddingServiceStub(channel).Embed.with_call(
            pb.EmbedRequest(inputs=[text], dimensions=dimensions), metadata=metadata, timeout=60)
    return reply, dict(call.trailing_metadata())


def _traceparent() -> tuple[str, str, str]:
    """(header value, trace id, parent span id) of a sampled context the test made up."""
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent}-01", trace_id, parent


def test_one_embed_is_one_trace_across_frontend_shard_and_replica(traced, receiver):
    header, trace_id, parent = _traceparent()
    reply, trailing = _embed(traced.address, f"traced text {uuid.uuid4()}",
                             (("traceparent", header), ("x-request-id", "trace-test-1")))
    assert reply.usage.computed == 1
    assert trailing["x-request-id"] == "trace-test-1"

    expected = {("embedding", EMBED), ("embedding", "l1.lookup"), ("embedding", "l2.lookup"),
                ("embedding", "inflight.wait"), ("embedding", "inflight.queue"), ("embedding", "mlbase.embed"),
                ("cacheshard", "cache.lookup"),
                ("mlbase", REPLICA_EMBED), ("mlbase", "replica.tokenize"), ("mlbase", "replica.queue"),
                ("mlbase", "replica.inference")}
    spans = receiver.wait_for(lambda found: expected <= {(s.service, s.name) for s in found}, trace_id)
    speculated = {("embedding", "inflight.speculate")}  # present when the miss was computed during L2
    assert {(s.service, s.name) for s in spans} - speculated == expected
    assert len(spans) == len(expected | {(s.service, s.name) for s in spans}), sorted(s.name for s in spans)
    span = {s.name: s for s in spans}

    server = span[EMBED]
    assert server.parent_id == parent and server.kind == SERVER
    assert server.attributes["sutra.request_id"] == "trace-test-1"
    assert server.attributes["rpc.grpc.status_code"] == 0
    for name in ("l1.lookup", "l2.lookup", "inflight.wait"):
        assert span[name].parent_id == server.span_id, name
    # The shard's lookup of the batch, parented through the LookupRequest's traceparent field.
    assert span["cache.lookup"].parent_id == span["l2.lookup"].span_id
    # The batch: queued, then one ML-base call, in the trace of the request that queued it: under
    # the wait for it, or (a miss on an idle frontend computes while L2 is asked) under the
    # speculative start, a child of the request's own span.
    queued_by = span.get("inflight.speculate", span["inflight.wait"])
    if "inflight.speculate" in span:
        assert queued_by.parent_id == server.span_id and queued_by.attributes["sutra.texts"] == 1
    for name in ("inflight.queue", "mlbase.embed"):
        assert span[name].parent_id == queued_by.span_id, name
        assert span[name].links == ()  # it served no other request
    # Through HAProxy: the replica's server span is the ML-base call's child, via metadata.
    replica_server = span[REPLICA_EMBED]
    assert replica_server.parent_id == span["mlbase.embed"].span_id and replica_server.kind == SERVER
    for name in ("replica.tokenize", "replica.queue", "replica.inference"):
        assert span[name].parent_id == replica_server.span_id, name
    assert span["replica.queue"].end_ns <= span["replica.inference"].start_ns
    assert span["mlbase.embed"].start_ns <= replica_server.start_ns <= replica_server.end_ns \
        <= span["mlbase.embed"].end_ns
    assert "request_id=trace-test-1 Embed started" in traced.log()


def test_an_http_request_is_a_server_span_in_the_callers_trace(traced, receiver, http_port):
    header, trace_id, parent = _traceparent()
    body = json.dumps({"input": [f"traced over HTTP {uuid.uuid4()}"]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    try:
        conn.request("POST", "/v1/embeddings", body, {"traceparent": header, "x-request-id": "http-trace-1"})
        reply = conn.getresponse()
        assert reply.status == 200 and reply.getheader("x-request-id") == "http-trace-1", reply.read()
    finally:
        conn.close()
    name = "POST /v1/embeddings"
    spans = receiver.wait_for(lambda found: {name, "mlbase.embed", REPLICA_EMBED} <= {s.name for s in found},
                              trace_id)
    server = next(s for s in spans if s.name == name)
    assert server.parent_id == parent and server.kind == SERVER
    assert server.attributes["sutra.request_id"] == "http-trace-1"
    assert server.attributes["http.response.status_code"] == 200
    assert [s.parent_id for s in spans if s.name in ("l1.lookup", "inflight.wait")] == [server.span_id] * 2


def test_request_id_is_returned_and_logged_on_errors(traced):
    with pytest.raises(grpc.RpcError) as failed:
        _embed(traced.address, "too narrow", (("x-request-id", "bad-width-1"),), dimensions=3)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(failed.value.trailing_metadata())["x-request-id"] == "bad-width-1"
    # context.abort sends the status before the handler ends: the line may come just after the reply.
    wait_until(lambda: "request_id=bad-width-1 Embed failed: INVALID_ARGUMENT" in traced.log(), 10,
               "the failure logged")


def test_a_stream_is_one_server_span_over_its_requests(traced, receiver):
    header, trace_id, parent = _traceparent()
    requests = [pb.EmbedStreamRequest(inputs=[f"streamed {i} {uuid.uuid4()}"]) for i in range(2)]
    with grpc.insecure_channel(traced.address) as channel:
        call = pb_grpc.EmbeddingServiceStub(channel).EmbedStream(iter(requests), metadata=(("traceparent", header),),
                                                                 timeout=60)
        assert len(list(call)) == 2
        assert re.fullmatch(r"[0-9a-f]{32}", dict(call.trailing_metadata())["x-request-id"])
    stream = f"{EMBED}Stream"
    spans = receiver.wait_for(lambda found: sum(s.name == "mlbase.embed" for s in found) >= 2
                              and any(s.name == stream for s in found), trace_id)
    server = next(s for s in spans if s.name == stream)
    assert server.parent_id == parent and server.attributes["rpc.grpc.status_code"] == 0
    assert [s.parent_id for s in spans if s.name == "l1.lookup"] == [server.span_id] * 2


def test_without_an_endpoint_nothing_is_traced_and_requests_work(untraced, receiver):
    header, trace_id, _ = _traceparent()
    reply, trailing = _embed(untraced.address, f"untraced text {uuid.uuid4()}", (("traceparent", header),))
    assert reply.usage.computed == 1 and len(reply.packed or reply.embeddings) > 0
    assert re.fullmatch(r"[0-9a-f]{32}", trailing["x-request-id"])  # none was sent: one was made up
    time.sleep(2.0)  # many export periods of the processes that do export
    # The frontend read no context and passed none on: neither the shard nor the replica, which
    # do trace, recorded anything of this request.
    assert receiver.spans(trace_id) == []
    # Internal services only continue traces: no root span from them, whatever they served.
    assert [s.name for s in receiver.spans() if s.service != "embedding" and not s.parent_id] == []


def test_off_installs_nothing():
    """Settings without an endpoint: no SDK loaded, the API's no-op provider, no-op spans."""
    code = """
import sys
from opentelemetry import trace
from common import tracing
from embedding.settings import load_settings
with tracing.installed(load_settings([]).tracing, starts_traces=True):
    assert not tracing.enabled()
    assert tracing.span("x") is tracing.NO_SPAN and tracing.traceparent() == "" and tracing.current() is None
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
    assert not [m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))]
print("off")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUTRA_OTLP", "OTEL_"))}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "off", done.stderr


@aio
async def test_a_batch_descends_from_its_first_caller_and_links_the_others():
    exporter = InMemorySpanExporter()
    tracing.install(tracing.TracingOptions(otlp_service_name="test"), starts_traces=True, exporter=exporter)
    sent: list[dict] = []
    first_call = asyncio.Event()

    async def compute(texts: list[str], timeout: float):
        sent.append(dict(tracing.outgoing()))  # what the ML-base call's metadata would carry
        if len(sent) == 1:
            await first_call.wait()
        return np.zeros((len(texts), 4), dtype=np.float32), set()

    try:
        inflight = InFlight(compute, lambda *_: None, max_batch=8, window_s=0.0, concurrency=1,
                            default_timeout_s=5.0, max_pending=100)
        callers = {}
        for name in ("a", "b", "c"):  # a's batch starts at once and holds the only slot: b and c queue
            with tracing.span(name) as caller:
                callers[name] = caller.get_span_context()
                inflight.request([name.encode()], [name], None)
            await asyncio.sleep(0)
        first_call.set()
        while not inflight.idle:
            await asyncio.sleep(0.01)
    finally:
        tracing.shutdown()
    spans = exporter.get_finished_spans()
    calls = sorted((s for s in spans if s.name == "mlbase.embed"), key=lambda s: s.start_time)
    queued = sorted((s for s in spans if s.name == "inflight.queue"), key=lambda s: s.start_time)
    assert len(calls) == len(queued) == 2 and len(sent) == 2
    assert calls[0].parent.span_id == callers["a"].span_id and not calls[0].links
    for batch in (calls[1], queued[1]):
        assert batch.parent.span_id == callers["b"].span_id
        assert batch.context.trace_id == callers["b"].trace_id
        assert [link.context for link in batch.links] == [callers["c"]]
    assert calls[1].kind == SpanKind.CLIENT
    # The call carries the batch span itself, so the replica's server span is its child.
    assert sent[1]["traceparent"].startswith(f"00-{calls[1].context.trace_id:032x}-{calls[1].context.span_id:016x}-")

"""Property-based bad input against a live frontend (hypothesis).

One replica (the bundled model, one thread), one cache shard and the
frontend, started once for the module. Every generated request gets an
answer with a documented status (embedding_service.proto: OK,
INVALID_ARGUMENT, RESOURCE_EXHAUSTED), and which one is predicted from the
request and the limits GetInfo reports: a valid request must succeed, with
vectors of the asked width and unit length; an invalid one must be refused
with INVALID_ARGUMENT. Garbage at the raw TCP port must not disturb the
server. The last test checks that the frontend is still SERVING and that
its memory grew by no more than a generous bound.
"""

from __future__ import annotations

import socket
import struct

import grpc
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.procs import SERVING, health_status
from harness.stack import frontend, replica, shard
from tests.support import left_behind
from lb.h2check import proto_varint
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

MAX_MESSAGE = 8 * 1024 * 1024
# Generous: L1 (10,000 full-width vectors is ~20 MB) plus allocator slack.
RSS_GROWTH_BOUND = 200 * 1024 * 1024
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                print_blob=True)

EDGE_TEXTS = ["", " ", "\x00", "\ufeff", "\u200b\u200d\u2060", "e\u0301\u0301\u0301", "\U0001F3F3\ufe0f\u200d\U0001F308",
              "\U0010FFFF", "\r\n\t\x0b\x0c", "مرحبا بالعالم", "日本語のテキスト", "a" * 300, "[CLS] [SEP] [MASK]",
              "\\u0000", "%s%n{0}", "<script>alert(1)</script>"]
texts = st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
                  st.sampled_from(EDGE_TEXTS))
enums = st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2 ** 31), 2 ** 31 - 1))


class Live:
    def __init__(self, proc, replica, shard) -> None:
        self.proc = proc
        self.replica = replica
        self.shard = shard
        self.channel = grpc.insecure_channel(proc.address, options=[("grpc.max_send_message_length", -1),
                                                                    ("grpc.max_receive_message_length", -1)])
        self.stub = pb_grpc.EmbeddingServiceStub(self.channel)
        self.raw = self.channel.unary_unary("/sutra.embedding.v1.EmbeddingService/Embed")
        self.info = self.stub.GetInfo(pb.GetInfoRequest(), timeout=30)

    def width_ok(self, d: int) -> bool:
        if d == 0:
            return True
        if self.info.allowed_widths:
            return d in self.info.allowed_widths
        return self.info.min_width <= d <= self.info.native_width

    def valid(self, inputs: list[str], dimensions: int) -> bool:
        return (0 < len(inputs) <= self.info.max_inputs and all(len(t) <= self.info.max_chars for t in inputs)
                and self.width_ok(dimensions))

    def call(self, request: pb.EmbedRequest | bytes):
        """(status name, reply or None, details)."""
        send = self.raw if isinstance(request, bytes) else self.stub.Embed
        try:
            reply = send(request, timeout=60)
        except grpc.RpcError as exc:
            return exc.code().name, None, exc.details() or ""
        if isinstance(reply, bytes):
            reply = pb.EmbedResponse.FromString(reply)
        return "OK", reply, ""


def check_reply(live: Live, inputs: list[str], dimensions: int, encoding: int, reply: pb.EmbedResponse) -> None:
    width = dimensions or live.info.default_width
    n = len(inputs)
    assert reply.dimensions == width
    if encoding == pb.ENCODING_PACKED:
        assert not reply.embeddings and len(reply.packed) == n * width * 4
        vectors = np.frombuffer(reply.packed, dtype="<f4").reshape(n, width)
    else:
        assert len(reply.embeddings) == n and not reply.packed
        vectors = np.array([e.values for e in reply.embeddings], dtype=np.float32).reshape(n, width)
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    u = reply.usage
    assert u.duplicates == n - len(set(inputs))
    assert u.l1_hits + u.l2_hits + u.computed + u.duplicates == n
    first = {}
    for i, text in enumerate(inputs):  # a repeated input gets the very same vector
        j = first.setdefault(text, i)
        assert np.array_equal(vectors[i], vectors[j])


def expect(live: Live, inputs: list[str], dimensions: int, status: str, details: str) -> None:
    assert status in DOCUMENTED, f"{status}: {details}"
    if live.valid(inputs, dimensions):
        assert status == "OK", f"valid request refused: {status}: {details}"
    else:
        assert status == "INVALID_ARGUMENT", f"invalid request answered {status}"
        assert details, "INVALID_ARGUMENT must say why"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    procs = [replica(workdir, "mlbase").start(), shard(workdir, workdir / "shard-db").start()]
    try:
        procs[1].wait_serving(60)
        procs[0].wait_serving(240)
        fe = frontend(workdir, procs[0].address, procs[1].address, "frontend",
                      "--max-message-bytes", str(MAX_MESSAGE)).start()
        procs.append(fe)
        fe.wait_serving(60)
        live = Live(fe, procs[0], procs[1])
        for i in range(20):  # warm up allocations before the memory baseline
            live.stub.Embed(pb.EmbedRequest(inputs=[f"warm up {i} {j}" for j in range(16)]), timeout=60)
        live.rss_before = psutil.Process(fe.pid).memory_info().rss
        yield live
        live.channel.close()
    finally:
        for proc in reversed(procs):
            proc.stop()


@FUZZ
@given(inputs=st.lists(texts, max_size=8), dimensions=st.one_of(
    st.just(0), st.integers(0, 400), st.sampled_from([1, 31, 32, 384, 385, 1024, 2 ** 31, 2 ** 32 - 1])),
    encoding=enums, truncation=enums)
@example(inputs=[], dimensions=0, encoding=0, truncation=0)
@example(inputs=[""], dimensions=0, encoding=0, truncation=0)
@example(inputs=["same", "same", "same"], dimensions=64, encoding=2, truncation=2)
def test_random_requests_get_documented_answers(live, inputs, dimensions, encoding, truncation):
    request = pb.EmbedRequest(inputs=inputs, dimensions=dimensions, encoding=encoding, truncation=truncation)
    status, reply, details = live.call(request)
    expect(live, inputs, dimensions, status, details)
    if reply is not None:
        check_reply(live, inputs, dimensions, encoding, reply)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.sampled_from([-1, 0, 1, 1000]), char=st.characters(blacklist_categories=("Cs",)),
       dimensions=st.sampled_from([0, 32, 999]))
def test_huge_strings(live, extra, char, dimensions):
    """Inputs at, just under and over `max_chars` (a valid one is truncated to the model window)."""
    length = live.info.max_chars + extra
    inputs = [("lead " + (char + " ") * length)[:length]]
    status, reply, details = live.call(pb.EmbedRequest(inputs=inputs, dimensions=dimensions))
    expect(live, inputs, dimensions, status, details)
    if status == "INVALID_ARGUMENT" and live.width_ok(dimensions):
        assert str(live.info.max_chars) in details, details  # the message names the limit
    if reply is not None:
        check_reply(live, inputs, dimensions, pb.ENCODING_FLOAT, reply)
        if char.isalnum():  # one token per character at least: far over the window
            assert list(reply.truncated_indices) == [0] and reply.usage.truncated == 1


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.sampled_from([-1, 0, 1, 3000]), distinct=st.integers(1, 8))
def test_huge_batches(live, extra, distinct):
    """Batches at and over `max_inputs` (mostly repeats, so a valid one costs a few computations)."""
    n = live.info.max_inputs + extra
    inputs = [f"batch item {i % distinct}" for i in range(n)]
    status, reply, details = live.call(pb.EmbedRequest(inputs=inputs, dimensions=32, encoding=pb.ENCODING_PACKED))
    expect(live, inputs, 32, status, details)
    if reply is not None:
        check_reply(live, inputs, 32, pb.ENCODING_PACKED, reply)
    else:
        assert str(live.info.max_inputs) in details, details


def test_message_over_the_size_limit_is_resource_exhausted(live):
    inputs = ["x" * 50_000] * (MAX_MESSAGE // 50_000 + 10)
    status, _, details = live.call(pb.EmbedRequest(inputs=inputs))
    assert status == "RESOURCE_EXHAUSTED", f"{status}: {details}"


varint = proto_varint


def field_bytes(number: int, data: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(data)) + data


@FUZZ
@given(negative=st.integers(-(2 ** 63), -1))
@example(negative=-1)
@example(negative=-(2 ** 32) + 64)  # parses to 64: a valid width
def test_negative_dimensions_on_the_wire(live, negative):
    """`dimensions` is uint32; a negative int64 varint parses to its low 32 bits."""
    raw = field_bytes(1, b"negative width") + varint(2 << 3) + varint(negative & (2 ** 64 - 1))
    status, reply, details = live.call(raw)
    width = negative & (2 ** 32 - 1)
    expect(live, ["negative width"], width, status, details)
    if reply is not None:
        check_reply(live, ["negative width"], width, pb.ENCODING_FLOAT, reply)


@FUZZ
@given(data=st.one_of(
    st.binary(max_size=64),
    st.builds(lambda junk, tail: field_bytes(1, junk) + tail, st.binary(max_size=16), st.binary(max_size=8)),
    st.builds(lambda body, cut: body[:cut], st.just(pb.EmbedRequest(inputs=["a", "bc"], dimensions=64).SerializeToString()),
              st.integers(0, 12)),
))
@example(data=b"\x0a\x02\xff\xfe")  # a string field that is not UTF-8
@example(data=b"\xff\xff\xff")  # not protobuf at all
def test_malformed_protobuf_bytes(live, data):
    """Arbitrary bytes as an EmbedRequest: parsed (OK or INVALID_ARGUMENT) or refused as INVALID_ARGUMENT."""
    status, reply, details = live.call(data)
    assert status in {"OK", "INVALID_ARGUMENT"}, f"{status}: {details}"
    try:
        parsed = pb.EmbedRequest.FromString(data)
    except Exception:  # noqa: BLE001 - not a message: must be refused
        assert status == "INVALID_ARGUMENT"
        return
    expect(live, list(parsed.inputs), parsed.dimensions, status, details)


# Every method of every service, fed bytes that cannot parse as its request.
METHODS = [
    ("proc", "/sutra.embedding.v1.EmbeddingService/Embed", "unary"),
    ("proc", "/sutra.embedding.v1.EmbeddingService/EmbedStream", "stream"),
    ("proc", "/sutra.embedding.v1.EmbeddingService/GetInfo", "unary"),
    ("proc", "/sutra.embedding.v1.EmbeddingService/GetCacheStats", "unary"),
    ("proc", "/grpc.health.v1.Health/Check", "unary"),
    ("proc", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream"),
    ("shard", "/sutra.cache.v1.CacheShardService/Lookup", "stream"),
    ("shard", "/sutra.cache.v1.CacheShardService/Store", "unary"),
    ("shard", "/sutra.cache.v1.CacheShardService/GetStats", "unary"),
    ("replica", "/sutra.mlbase.v1.MLBaseService/Embed", "unary"),
    ("replica", "/sutra.mlbase.v1.MLBaseService/GetInfo", "unary"),
]


@pytest.mark.parametrize("target,method,kind", METHODS, ids=[m.rsplit("/", 2)[-1] for _, m, _ in METHODS])
def test_unparsable_bytes_are_invalid_argument_on_every_service(live, target, method, kind):
    garbage = b"\xff\xff\xff"  # an unterminated field tag: no message type parses it
    with grpc.insecure_channel(getattr(live, target).address) as ch:
        try:
            if kind == "unary":
                ch.unary_unary(method)(garbage, timeout=10)
            else:
                list(ch.stream_stream(method)(iter([garbage]), timeout=10))
            status, details = "OK", ""
        except grpc.RpcError as exc:
            status, details = exc.code().name, exc.details()
    assert status == "INVALID_ARGUMENT", f"{status}: {details}"
    assert "could not be parsed" in details


@FUZZ
@given(requests=st.lists(st.tuples(st.lists(texts, max_size=4), st.sampled_from([0, 32, 5, 999])), min_size=1,
                         max_size=4))
def test_embed_stream_answers_in_order_or_ends_with_a_documented_status(live, requests):
    sent = [pb.EmbedStreamRequest(inputs=i, dimensions=d) for i, d in requests]
    answers = []
    status, details = "OK", ""
    try:
        for reply in live.stub.EmbedStream(iter(sent), timeout=60):
            answers.append(reply.result)
    except grpc.RpcError as exc:
        status, details = exc.code().name, exc.details()
    assert status in DOCUMENTED, f"{status}: {details}"
    valid = [live.valid(list(r.inputs), r.dimensions) for r in sent]
    # Every answer before the first invalid request; an invalid one ends the stream.
    expected = valid.index(False) if False in valid else len(sent)
    assert len(answers) == expected, (len(answers), valid, status, details)
    assert status == ("OK" if all(valid) else "INVALID_ARGUMENT"), (status, details)
    for request, answer in zip(sent, answers):
        check_reply(live, list(request.inputs), request.dimensions, pb.ENCODING_FLOAT, answer)


def tcp_send(port: int, payload: bytes) -> None:
    """Connect, send `payload`, give the server a moment to react, hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(payload)
        s.settimeout(0.2)
        try:
            s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            pass


def h2_frame(kind: int, flags: int, stream: int, body: bytes) -> bytes:
    return struct.pack(">I", len(body))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + body


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.one_of(
    st.binary(min_size=1, max_size=512),
    st.integers(1, len(PREFACE) - 1).map(lambda n: PREFACE[:n]),  # truncated preface
    st.binary(max_size=256).map(lambda junk: PREFACE + junk),  # preface, then garbage frames
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2 ** 31 - 1), st.binary(max_size=64)).map(
        lambda f: PREFACE + h2_frame(4, 0, 0, b"") + h2_frame(*f)),  # a well-formed frame of any type
    st.just(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
))
def test_garbage_at_the_raw_port_leaves_the_server_serving(live, payload):
    tcp_send(live.proc.port, payload)
    assert health_status(live.proc.address, timeout=5) == SERVING


def test_many_half_open_connections_do_not_block_real_calls(live):
    held = []
    try:
        for i in range(64):
            s = socket.create_connection(("127.0.0.1", live.proc.port), timeout=2)
            s.sendall(PREFACE[: 1 + i % (len(PREFACE) - 1)])
            held.append(s)
        status, reply, details = live.call(pb.EmbedRequest(inputs=["still answering"], dimensions=32))
        assert status == "OK", details
    finally:
        for s in held:
            s.close()


def test_zz_still_serving_with_bounded_memory(live):
    """Runs last: after everything above, the frontend serves and its RSS stayed bounded."""
    assert live.proc.popen.poll() is None
    assert health_status(live.proc.address) == SERVING
    status, reply, _ = live.call(pb.EmbedRequest(inputs=["after the fuzz"], dimensions=64))
    assert status == "OK"
    rss = psutil.Process(live.proc.pid).memory_info().rss
    growth = rss - live.rss_before
    print(f"frontend RSS {live.rss_before / 2**20:.0f} MiB -> {rss / 2**20:.0f} MiB (bound +{RSS_GROWTH_BOUND / 2**20:.0f} MiB)")
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.0f} MiB"
    assert not left_behind(live.proc.log()), f"a future or task left behind: {left_behind(live.proc.log())}"

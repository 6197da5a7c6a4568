"""A replica's life cycle and overload behaviour: NOT_SERVING while loading,
SERVING when warm, RESOURCE_EXHAUSTED when its queue is full, and on
SIGTERM NOT_SERVING -> drain -> in-flight work finishes -> exit 0.

One replica for the module, with a small queue and a drain period; the
SIGTERM test stops it and therefore runs last.
"""

from __future__ import annotations

import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from harness.impatient.metrics import scrape
from harness.procs import NOT_SERVING, SERVING, free_port, health_status
from harness.stack import service
from sutra.mlbase.v1 import mlbase_service_pb2 as pb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as pb_grpc

MAX_QUEUE = 100
DRAIN_SECONDS = 1.5
# About 200 tokens each: long enough that a few dozen keep the replica busy for a while.
BUSY_TEXT = "replicas finish the work they accepted before they exit " * 20


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Start the replica and record what health said (and what Embed said) while it loaded."""
    metrics_port = free_port()
    proc = service("mlbase", tmp_path_factory.mktemp("mlbase") / "mlbase.log",
                   {"threads": 2, "max_queue": MAX_QUEUE, "server.drain_seconds": DRAIN_SECONDS,
                    "server.metrics_port": metrics_port})
    proc.start()
    seen: list[int] = []
    embed_while_loading = None
    deadline = time.monotonic() + 180
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = pb_grpc.MLBaseServiceStub(channel)
            while time.monotonic() < deadline and proc.popen.poll() is None:
                status = health_status(proc.address)
                if status is not None and (not seen or seen[-1] != status):
                    seen.append(status)
                if status == NOT_SERVING and embed_while_loading is None:
                    try:
                        stub.Embed(pb.EmbedRequest(texts=["too early"]), timeout=10)
                        embed_while_loading = grpc.StatusCode.OK
                    except grpc.RpcError as exc:
                        embed_while_loading = exc.code()
                if status == SERVING:
                    break
                time.sleep(0.05)
        proc.wait_serving(timeout=5)
        yield proc, seen, embed_while_loading, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def replica(started):
    return started[0]


@pytest.fixture(scope="module")
def stub(replica):
    with grpc.insecure_channel(replica.address) as channel:
        yield pb_grpc.MLBaseServiceStub(channel)


def test_not_serving_until_loaded_and_warm_then_serving(started):
    _, seen, embed_while_loading, _ = started
    assert seen[0] == NOT_SERVING and seen[-1] == SERVING
    assert embed_while_loading == grpc.StatusCode.UNAVAILABLE


def test_a_full_queue_answers_resource_exhausted_at_once(stub, replica):
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(texts=["x"] * (MAX_QUEUE + 1)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"--max-queue {MAX_QUEUE}" in err.value.details()

    # Six concurrent requests of 60 texts: the queue holds one of them at a time.
    texts = [f"{BUSY_TEXT} {i}" for i in range(60)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stub.Embed, pb.EmbedRequest(texts=texts, dimensions=64)) for _ in range(6)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result().count)
            except grpc.RpcError as exc:
                outcomes.append(exc.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes, outcomes
    assert 60 in outcomes, outcomes
    assert set(outcomes) <= {60, grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes
    # Nothing leaked: the whole queue is free again.
    assert health_status(replica.address) == SERVING
    assert stub.Embed(pb.EmbedRequest(texts=["y"] * MAX_QUEUE, dimensions=32)).count == MAX_QUEUE


def test_a_deadline_stops_the_call_and_frees_its_queue_room(stub, replica):
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(texts=[f"{i} {BUSY_TEXT}" for i in range(MAX_QUEUE)]), timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The abandoned texts stop counting against the queue: a full-size request gets in once the
    # replica has seen the deadline too (it may see it a moment after this client does).
    deadline = time.monotonic() + 30
    while True:
        try:
            reply = stub.Embed(pb.EmbedRequest(texts=["z"] * MAX_QUEUE, dimensions=32), timeout=120)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, exc
            time.sleep(0.05)
    assert reply.count == MAX_QUEUE
    assert health_status(replica.address) == SERVING


def test_impatient_callers_of_small_texts_leave_nothing_pending(stub, replica, started):
    """Small texts take the inline path (computed on the replica's event loop when it is idle):
    1 ms deadlines, cancels at random moments and plain calls from six threads at once. Afterwards
    nothing is queued, the inline path did run, and a new request is answered."""
    metrics_url = started[3]
    before = scrape(metrics_url)
    rng = random.Random(7)
    outcomes: list[str] = []

    def caller(seed: int) -> None:
        local = random.Random(seed)
        for i in range(40):
            request = pb.EmbedRequest(texts=[f"impatient {seed}-{i}"], dimensions=32)
            kind = local.choice(["deadline", "cancel", "plain"])
            try:
                if kind == "deadline":
                    stub.Embed(request, timeout=0.001)
                elif kind == "cancel":
                    future = stub.Embed.future(request, timeout=30)
                    time.sleep(local.random() * 0.01)
                    future.cancel()
                    future.result(timeout=30)
                else:
                    assert stub.Embed(request, timeout=30).count == 1
                outcomes.append("ok")
            except grpc.FutureCancelledError:
                outcomes.append("cancelled")
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), exc
                outcomes.append(exc.code().name)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(caller, [rng.randrange(1 << 30) for _ in range(6)]))
    assert len(outcomes) == 240 and "ok" in outcomes
    deadline = time.monotonic() + 30
    while (after := scrape(metrics_url))["sutra_mlbase_queue_texts"] != 0:
        assert time.monotonic() < deadline, after["sutra_mlbase_queue_texts"]
        time.sleep(0.05)
    assert after["sutra_mlbase_inline_batches_total"] > before["sutra_mlbase_inline_batches_total"]
    assert health_status(replica.address) == SERVING
    reply = stub.Embed(pb.EmbedRequest(texts=["still answering"], full_width=True), timeout=30)
    got = np.frombuffer(reply.vectors, dtype="<f4")
    assert reply.count == 1 and abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_sigterm_goes_not_serving_finishes_in_flight_work_and_exits_0(stub, replica):
    busy = [f"{i} {BUSY_TEXT}" for i in range(32)]
    in_flight = stub.Embed.future(pb.EmbedRequest(texts=busy, full_width=True))
    replica.signal(signal.SIGTERM)
    seen_not_serving_while_in_flight = False
    while not in_flight.done():
        status = health_status(replica.address, timeout=0.5)
        if status == NOT_SERVING:
            seen_not_serving_while_in_flight = not in_flight.done()
            break
        time.sleep(0.02)
    reply = in_flight.result(timeout=120)
    got = np.frombuffer(reply.vectors, dtype="<f4").reshape(reply.count, reply.width)
    assert got.shape == (32, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert seen_not_serving_while_in_flight
    assert replica.popen.wait(timeout=60) == 0  # one SIGTERM is enough: it exits by itself
    assert "stopped cleanly" in replica.log()

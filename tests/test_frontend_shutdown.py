"""SIGTERM on the frontend keeps its promises, with real processes on loopback.

One cache shard, one replica (the frontend talks to it directly, no HAProxy)
and a frontend with a short drain and grace. An EmbedStream is answered and
left open (never half-closed) when the frontend gets SIGTERM: the frontend
must still drain, end the stream, store the stream's vectors on the shard,
log that it stopped cleanly and exit 0 within drain + grace + write-back
flush (plus a margin for a loaded machine, only as a bound on a hang).
"""

from __future__ import annotations

import queue
import signal
import subprocess
import uuid

import grpc
import numpy as np
import pytest

from common import codec, matryoshka
from common.cache_key import cache_key
from embedding.settings import FrontendSettings
from harness.procs import Proc
from harness.stack import ShardClient, fingerprint, frontend, replica, shard
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

DRAIN_SECONDS = 0.5
GRACE_SECONDS = 3.0
FLUSH_SECONDS = FrontendSettings.writeback_flush_s
# Only a bound on a hang (interpreter exit, channel teardown on a shared, loaded machine).
MARGIN_SECONDS = 30.0


def _halt(proc: Proc) -> None:
    """Stop by PID whatever is still running (kill -9: nothing here needs its cleanup) and close its log."""
    if proc.popen is None:
        return
    proc.kill()
    log = getattr(proc, "_log", None)
    if log is not None:
        log.close()


def _open_stream(stub: pb_grpc.EmbeddingServiceStub):
    """An EmbedStream whose request side stays open until None is put on the queue."""
    requests: queue.Queue = queue.Queue()

    def produce():
        while (item := requests.get()) is not None:
            yield item

    return requests, stub.EmbedStream(produce(), timeout=300)


def _stream_end(responses) -> tuple[grpc.StatusCode, list]:
    """Read the stream to its end: (its status, any answers still coming)."""
    rest = []
    try:
        for reply in responses:
            rest.append(reply)
    except grpc.RpcError as exc:
        return exc.code(), rest
    return responses.code(), rest


def test_sigterm_with_an_open_stream_flushes_and_exits_cleanly(tmp_path):
    cache = shard(tmp_path, tmp_path / "shard-db")
    model = replica(tmp_path, "mlbase")
    front = frontend(tmp_path, model.address, cache.address, "frontend",
                     "--drain-seconds", str(DRAIN_SECONDS), "--grace-seconds", str(GRACE_SECONDS),
                     "--writeback-flush", str(FLUSH_SECONDS))
    requests = None
    try:
        cache.start()
        model.start()
        cache.wait_serving(60)
        model.wait_serving(240)
        front.start().wait_serving(60)
        model_fingerprint = fingerprint(front.address)

        texts = [f"shutdown keeps its promises {uuid.uuid4()} #{i}" for i in range(5)]
        with grpc.insecure_channel(front.address) as channel:
            requests, responses = _open_stream(pb_grpc.EmbeddingServiceStub(channel))
            requests.put(pb.EmbedStreamRequest(inputs=texts))
            answer = next(responses).result
            assert len(answer.embeddings) == len(texts)
            assert answer.usage.computed == len(texts)

            # The stream stays open (no half-close) while the frontend is told to stop.
            front.signal(signal.SIGTERM)
            budget = DRAIN_SECONDS + GRACE_SECONDS + FLUSH_SECONDS + MARGIN_SECONDS
            try:
                code = front.popen.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                pytest.fail(f"frontend still running {budget:.0f}s after SIGTERM:\n{front.log()[-4000:]}")
            assert code == 0, front.log()[-4000:]
            assert "stopped cleanly" in front.log(), front.log()[-4000:]

            status, rest = _stream_end(responses)
            assert rest == []
            # Ended by the server going away or by the server itself, never by our own deadline.
            assert status != grpc.StatusCode.DEADLINE_EXCEEDED, status

        # Every answer the stream got is on the shard, under the frontend's own key.
        keys = [cache_key(model_fingerprint, text, "") for text in texts]
        with ShardClient(cache.address) as client:
            values = client.lookup(keys)
        missing = [t for t, v in zip(texts, values) if v is None]
        assert not missing, f"not stored on the shard: {missing}\n{front.log()[-3000:]}"
        width = answer.dimensions
        for value, got in zip(values, answer.embeddings):
            # The replica's default: no layer norm before truncating.
            [stored] = matryoshka.reduce(codec.decode(value), width, layer_norm=False)
            assert float(np.dot(stored, np.asarray(got.values))) > 0.99
    finally:
        if requests is not None:
            requests.put(None)  # lets gRPC's request thread finish
        for proc in (front, model, cache):
            _halt(proc)

"""Every server caps the calls it serves at once (`--max-concurrent-rpcs`): streams a caller opens
and never closes cannot pile up without bound. Past the cap a call is refused at once with
RESOURCE_EXHAUSTED; once the streams end, calls are served again."""

from __future__ import annotations

import queue

import grpc
import pytest

from harness.procs import wait_until
from harness.stack import service
from sutra.cache.v1 import cache_shard_service_pb2 as cpb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cpb_grpc

CAP = 4


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    proc = service("cacheshard", tmp / "shard.log", {"path": tmp / "db", "server.max_concurrent_rpcs": CAP})
    proc.start().wait_serving(60)
    try:
        yield proc
    finally:
        proc.stop()


def open_stream(stub) -> tuple[queue.Queue, grpc.RpcContext]:
    """A Lookup stream that stays open (its request iterator blocks) after one answered batch."""
    requests: queue.Queue = queue.Queue()
    requests.put(cpb.LookupRequest(batch_id=1, keys=[b"k" * 16]))
    call = stub.Lookup(iter(requests.get, None), timeout=60)
    assert next(call).batch_id == 1
    return requests, call


def test_streams_past_the_cap_are_refused_and_served_again_once_closed(shard):
    with grpc.insecure_channel(shard.address) as channel:
        stub = cpb_grpc.CacheShardServiceStub(channel)
        streams = [open_stream(stub) for _ in range(CAP)]
        with pytest.raises(grpc.RpcError) as err:
            stub.GetStats(cpb.GetStatsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for requests, call in streams:
            requests.put(None)
            assert list(call) == []

        def served() -> bool:
            try:
                return stub.GetStats(cpb.GetStatsRequest(), timeout=10).uptime_seconds > 0
            except grpc.RpcError:
                return False

        wait_until(served, 10, "a call to be served once the streams closed")
    assert "Traceback" not in shard.log()

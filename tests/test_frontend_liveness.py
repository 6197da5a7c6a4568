"""The frontend under the client we fear, with real processes on loopback: a
replica (the bundled model), a RocksDB shard and `python -m embedding`.

- Impatient clients (1-12 ms deadlines), calls cancelled mid-way, streams
  abandoned without closing: afterwards a brand-new text is computed, every
  in-flight gauge on /metrics is back to idle, and health is SERVING.
- A frontend whose misses stop progressing turns NOT_SERVING on readiness
  and on `liveness`, and SERVING again when progress resumes. The stall is
  made real by SIGSTOPping the only replica the frontend talks to (no
  balancer in between to route around it).
"""

from __future__ import annotations

import asyncio
import random
import signal
import uuid

import grpc
import pytest

from common.grpc_server import LIVENESS
from harness.procs import NOT_SERVING, SERVING, Proc, free_port, health_status, wait_until
from harness.impatient.metrics import gauge_view, scrape
from harness.stack import service
from tests.support import left_behind
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

CONCURRENCY = 2  # few batch slots: a leaked slot would wedge the frontend within the test


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("liveness")
    replica = service("mlbase", workdir / "mlbase.log", {"threads": 1, "server.drain_seconds": 0.0})
    shard = service("cacheshard", workdir / "shard.log", {"path": workdir / "db"})
    procs = [replica.start(), shard.start()]
    try:
        shard.wait_serving(60)
        replica.wait_serving(240)
        yield workdir, replica, shard
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.signal(signal.SIGCONT)
            proc.stop()


def frontend(workdir, replica: Proc, shard: Proc, name: str, **values) -> tuple[Proc, int]:
    """A serving frontend and its admin port; `values` are further FrontendSettings fields."""
    admin = free_port()
    proc = service("embedding", workdir / f"{name}.log",
                   {"mlbase_address": replica.address, "cache_shards": (shard.address,), "admin_port": admin,
                    "mlbase_concurrency": CONCURRENCY, "mlbase_connections": 2, **values})
    return proc.start().wait_serving(60), admin


def gauges(admin_port: int) -> dict[str, float | None]:
    return gauge_view(scrape(f"http://127.0.0.1:{admin_port}/metrics"), CONCURRENCY)[0]


def idle(admin_port: int) -> bool:
    return gauge_view(scrape(f"http://127.0.0.1:{admin_port}/metrics"), CONCURRENCY)[1]


async def impatient_storm(address: str, seed: int, calls: int, cancelled: int, abandoned: int) -> dict:
    """Single fresh texts with 1-12 ms deadlines, calls cancelled at random moments, and streams
    that send a request and are never closed nor read (kept referenced until the end)."""
    rng = random.Random(seed)
    codes: dict[str, int] = {}
    run = uuid.uuid4().hex[:8]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def one(i: int, cancel_after: float | None) -> None:
            call = stub.Embed(pb.EmbedRequest(inputs=[f"impatient {run} {i} {rng.random()}"]),
                              timeout=rng.uniform(0.001, 0.012) if cancel_after is None else 5.0)
            if cancel_after is not None:
                asyncio.get_running_loop().call_later(cancel_after, call.cancel)
            try:
                await call
                code = "OK"
            except asyncio.CancelledError:
                code = "CANCELLED"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1

        streams = []
        for i in range(abandoned):
            call = stub.EmbedStream()
            await call.write(pb.EmbedStreamRequest(inputs=[f"abandoned {run} {i}"]))
            streams.append(call)  # never half-closed, never read
        kinds = [None] * calls + [rng.uniform(0, 0.05) for _ in range(cancelled)]
        rng.shuffle(kinds)
        tasks = []
        for i, cancel_after in enumerate(kinds):
            tasks.append(asyncio.create_task(one(i, cancel_after)))
            if i % 20 == 0:
                await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        return {"codes": codes, "streams": streams}


def test_impatient_clients_leave_the_frontend_computing_and_idle(backends):
    workdir, replica, shard = backends
    fe, admin = frontend(workdir, replica, shard, "impatient", stream_idle_s=2.0)
    try:
        async def run() -> dict:
            storm = await impatient_storm(fe.address, seed=10, calls=400, cancelled=60, abandoned=8)
            # The streams are still referenced and their channel still open here: only the server's
            # idle timeout can end them.
            wait_until(lambda: gauges(admin).get("open_streams") == 0, 30, "abandoned streams ended by the server")
            return storm["codes"]

        codes = asyncio.run(run())
        assert sum(codes.values()) == 460 and codes.get("DEADLINE_EXCEEDED", 0) > 0, codes
        # A brand-new text is computed, and every in-flight gauge returns to idle.
        with grpc.insecure_channel(fe.address) as ch:
            reply = pb_grpc.EmbeddingServiceStub(ch).Embed(
                pb.EmbedRequest(inputs=[f"brand new {uuid.uuid4()}"]), timeout=10)
        assert reply.usage.computed == 1
        wait_until(lambda: idle(admin), 20, f"gauges back to idle (now {gauges(admin)})")
        assert health_status(fe.address) == SERVING and health_status(fe.address, LIVENESS) == SERVING
        assert not left_behind(fe.log()), f"a future or task left behind: {left_behind(fe.log())}"
    finally:
        assert fe.stop() == 0


def test_stalled_misses_turn_readiness_and_liveness_not_serving_until_progress_resumes(backends):
    workdir, replica, shard = backends
    fe, admin = frontend(workdir, replica, shard, "stall", stall_s=2.0, mlbase_timeout_s=60.0)
    pending = None
    try:
        assert health_status(fe.address, LIVENESS) == SERVING
        replica.signal(signal.SIGSTOP)
        channel = grpc.insecure_channel(fe.address)
        pending = channel, pb_grpc.EmbeddingServiceStub(channel).Embed.future(
            pb.EmbedRequest(inputs=[f"stuck {uuid.uuid4()}"]))  # no deadline: waits for the replica
        wait_until(lambda: health_status(fe.address, LIVENESS) == NOT_SERVING, 30, "liveness NOT_SERVING")
        assert health_status(fe.address) == NOT_SERVING
        assert gauges(admin)["stalled"] == 1
        assert "cache misses are not progressing" in fe.log()
        replica.signal(signal.SIGCONT)
        assert pending[1].result(timeout=60).usage.computed == 1
        wait_until(lambda: health_status(fe.address) == SERVING, 30, "readiness SERVING again")
        assert health_status(fe.address, LIVENESS) == SERVING and gauges(admin)["stalled"] == 0
    finally:
        replica.signal(signal.SIGCONT)
        if pending is not None:
            pending[0].close()
        assert fe.stop() == 0

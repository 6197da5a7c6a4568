"""The stall watchdog against a real gRPC server's health service: a stall or a
broken in-flight invariant turns readiness and `liveness` NOT_SERVING, and
progress turns them back. (The same with real processes:
tests/test_frontend_liveness.py.)"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_server import LIVENESS, ServerOptions, ServiceServer
from embedding.inflight import Flight, InFlight
from embedding.watchdog import StallWatchdog
from tests.support import aio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=5)
        return reply.status


async def eventually(condition, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


class Gate:
    """A compute that answers only when the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def __call__(self, texts, timeout):
        await self.open.wait()
        return np.zeros((len(texts), 4), np.float32), set()


@contextlib.asynccontextmanager
async def watched(stall_s: float):
    """An in-flight owner whose compute waits on a gate, a SERVING gRPC server, and a watchdog
    on both; everything is stopped afterwards."""
    gate = Gate()
    inflight = InFlight(gate, lambda *a: None, max_batch=8, window_s=0, concurrency=1, default_timeout_s=30,
                        max_pending=100)
    server = ServiceServer(ServerOptions(port=0), ["test.Service"])
    await server.start()
    await server.set_serving(True)
    watchdog = StallWatchdog(lambda: inflight, server, stall_s=stall_s, interval_s=0.05)
    watchdog.start()
    try:
        yield gate, inflight, server, watchdog
    finally:
        await watchdog.close()
        await inflight.close()
        await server.server.stop(0)


@aio
async def test_a_stall_turns_readiness_and_liveness_not_serving_until_a_batch_ends():
    async with watched(stall_s=0.2) as (gate, inflight, server, watchdog):
        waiters, _ = inflight.request([b"k"], ["stuck"], None)
        await eventually(lambda: watchdog.stalled)
        assert await health(server.port, "") == NOT_SERVING
        assert await health(server.port, "test.Service") == NOT_SERVING
        assert await health(server.port, LIVENESS) == NOT_SERVING
        assert "no batch ended" in server.fault
        gate.open.set()
        await asyncio.gather(*waiters)
        await eventually(lambda: not watchdog.stalled)
        assert await health(server.port, "") == SERVING and await health(server.port, LIVENESS) == SERVING


@aio
async def test_a_broken_invariant_is_a_fault_even_when_nothing_looks_pending_for_long():
    async with watched(stall_s=60) as (_, inflight, server, watchdog):
        # Work queued beside a free slot with nothing to dispatch it: the shape of the old wedge.
        flight = Flight(b"k", "lost", 0.0)
        inflight._table[b"k"] = flight
        inflight._queue[flight] = None
        await eventually(lambda: watchdog.stalled)
        assert "nothing will dispatch it" in server.fault
        assert await health(server.port, LIVENESS) == NOT_SERVING
        del inflight._queue[flight], inflight._table[b"k"]
        await eventually(lambda: not watchdog.stalled)
        assert await health(server.port, "") == SERVING


@aio
async def test_while_draining_readiness_is_not_serving_and_liveness_is_serving():
    server = ServiceServer(ServerOptions(port=0, drain_seconds=0.5, grace_seconds=0), ["test.Service"])
    await server.start()
    await server.set_serving(True)
    draining = asyncio.create_task(server.drain_and_stop())
    try:
        await eventually(lambda: server._draining)
        assert await health(server.port, "") == NOT_SERVING
        assert await health(server.port, LIVENESS) == SERVING  # leaving is not a reason to restart
        await server.set_fault(None)  # a watchdog clearing a fault must not bring readiness back
        assert await health(server.port, "") == NOT_SERVING
    finally:
        await draining
        await server.server.stop(0)

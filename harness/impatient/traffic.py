"""The client side of each kind of operation, and what it saw."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import Counter, defaultdict

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.impatient.mix import CHANNEL_OPTIONS, ROUTINE, Op
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc


# -- running it -------------------------------------------------------------------------------

class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.codes: dict[str, Counter] = defaultdict(Counter)
        self.details: dict[str, list[str]] = defaultdict(list)
        self.sent: Counter = Counter()
        self.extra: dict[str, Counter] = defaultdict(Counter)
        self.abandoned_calls: list = []
        self.channel = grpc.aio.insecure_channel(args.target, options=CHANNEL_OPTIONS)
        # Abandoned streams live on their own channel, so closing it is the only thing that ends
        # them from this side, and it is closed only after the hold.
        self.abandon_channel = grpc.aio.insecure_channel(args.target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.EmbeddingServiceStub(self.channel)
        self.abandon_stub = pb_grpc.EmbeddingServiceStub(self.abandon_channel)

    def record(self, kind: str, code: str, detail: str = "") -> None:
        self.codes[kind][code] += 1
        key = f"{kind}:{code}"
        if code not in ROUTINE and len(self.details[key]) < 3:
            self.details[key].append(detail[:300])

    def request(self, texts: list[str]) -> pb.EmbedRequest:
        return pb.EmbedRequest(inputs=texts, dimensions=self.args.width)

    async def unary(self, kind: str, texts: list[str], timeout: float, cancel_after: float | None) -> str:
        """One Embed call, cancelled after `cancel_after` seconds if given; records and returns its code."""
        call = self.stub.Embed(self.request(texts), timeout=timeout)
        state = {"cancelled": False}
        handle = None
        if cancel_after is not None:
            def cancel() -> None:
                state["cancelled"] = call.cancel()
            handle = asyncio.get_running_loop().call_later(cancel_after, cancel)
        detail = ""
        try:
            reply = await call
            code = "OK" if len(reply.embeddings) == len(texts) else "BAD_REPLY"
        except asyncio.CancelledError:
            if not state["cancelled"]:
                raise
            code = "CANCELLED"
        except grpc.aio.AioRpcError as exc:
            code, detail = exc.code().name, exc.details() or ""
        finally:
            if handle is not None:
                handle.cancel()
        if cancel_after is not None:
            self.extra[kind]["cancel_took_effect" if state["cancelled"] else "ended_before_cancel"] += 1
        self.record(kind, code, detail)
        return code

    async def op(self, op: Op) -> None:
        a = op.args
        self.sent[op.kind] += 1
        try:
            if op.kind == "single":
                await self.unary("single", [a["text"]], a["timeout"], None)
            elif op.kind == "cancelled":
                await self.unary("cancelled", [a["text"]], self.args.cancel_deadline_ms / 1000.0, a["cancel_after"])
            elif op.kind == "stream_cancelled":
                await self.stream_cancelled(a)
            elif op.kind == "stream_abandoned":
                await self.stream_abandoned(a)
            elif op.kind == "group":
                await self.group(a)
            elif op.kind == "oversized":
                await self.oversized(a)
        except Exception as exc:  # noqa: BLE001 - a generator bug or a client-side failure, reported
            self.record(op.kind, "CLIENT_ERROR", f"{type(exc).__name__}: {exc}")

    async def _write_all(self, call, requests: list[list[str]]) -> None:
        for texts in requests:
            await asyncio.wait_for(call.write(pb.EmbedStreamRequest(inputs=texts, dimensions=self.args.width)), 5.0)

    async def stream_cancelled(self, a: dict) -> None:
        call = self.stub.EmbedStream()
        answers = 0

        async def read() -> None:
            nonlocal answers
            while (await call.read()) is not grpc.aio.EOF:
                answers += 1

        reader = asyncio.ensure_future(read()) if a["read"] else None
        try:
            await self._write_all(call, a["requests"])
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.TimeoutError, grpc.aio.UsageError):
            pass  # the stream already ended; its status says how
        await asyncio.sleep(a["cancel_after"])
        cancelled = call.cancel()
        if reader is not None:
            await asyncio.gather(reader, return_exceptions=True)
        self.extra["stream_cancelled"]["answers_read"] += answers
        if cancelled:
            self.record("stream_cancelled", "CANCELLED")
        else:
            code = await call.code()
            self.record("stream_cancelled", code.name, await call.details() or "")

    async def stream_abandoned(self, a: dict) -> None:
        call = self.abandon_stub.EmbedStream()
        self.abandoned_calls.append(call)  # referenced until the hold ends; never read, never half-closed
        try:
            await self._write_all(call, a["requests"])
            self.record("stream_abandoned", "SENT")
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.TimeoutError, grpc.aio.UsageError) as exc:
            self.record("stream_abandoned", "WRITE_FAILED", f"{type(exc).__name__}: {exc}")

    async def group(self, a: dict) -> None:
        async def caller(c: dict) -> None:
            await asyncio.sleep(c["stagger"])
            self.extra["group"][c["action"]] += 1
            await self.unary("group_caller", [a["text"]], c["timeout"], c["cancel_after"])

        await asyncio.gather(*(caller(c) for c in a["callers"]))

    async def oversized(self, a: dict) -> None:
        text = (a["tag"] + " ") + "x" * (a["size"] - len(a["tag"]) - 1)
        variant = a["variant"]
        detail = ""
        try:
            if variant == "stream_over_chars":
                call = self.stub.EmbedStream(timeout=10.0)
                await call.write(pb.EmbedStreamRequest(inputs=[text], dimensions=self.args.width))
                await call.done_writing()
                while (await call.read()) is not grpc.aio.EOF:
                    pass
                code = (await call.code()).name
            else:
                await self.stub.Embed(self.request([text]), timeout=10.0)
                code = "OK"
        except grpc.aio.AioRpcError as exc:
            code, detail = exc.code().name, exc.details() or ""
        self.extra["oversized_by_variant"][f"{variant}:{code}"] += 1
        self.record("oversized", code, detail)

    async def drive(self, ops: list[Op]) -> dict:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.args.concurrency)
        tasks: set[asyncio.Task] = set()
        t0 = loop.time()
        for op in ops:
            delay = t0 + op.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            task = asyncio.create_task(self.op(op))
            task.add_done_callback(lambda _t: slots.release())
            tasks.add(task)
        # Every op is bounded by a deadline, a cancel or a write timeout; this is a last guard.
        done, pending = await asyncio.wait(tasks, timeout=60.0) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        return {"traffic_s": round(loop.time() - t0, 3), "stragglers": len(pending)}

    async def probe(self) -> dict:
        """A brand-new text with a 1 s deadline, a new text each try, for at most --probe-budget-s."""
        start = time.monotonic()
        attempts: list[str] = []
        while (left := self.args.probe_budget_s - (time.monotonic() - start)) > 0:
            began = time.monotonic()
            try:
                reply = await self.stub.Embed(self.request([f"impatient probe {uuid.uuid4()}"]),
                                              timeout=min(1.0, left))
                attempts.append("OK")
                return {"ok": True, "first_success_s": round(time.monotonic() - start, 3),
                        "latency_s": round(time.monotonic() - began, 3), "attempts": attempts,
                        "computed": reply.usage.computed}
            except grpc.aio.AioRpcError as exc:
                attempts.append(exc.code().name)
                await asyncio.sleep(min(0.2, max(0.0, self.args.probe_budget_s - (time.monotonic() - start))))
        return {"ok": False, "first_success_s": None, "attempts": attempts}

    async def health(self, service: str) -> str:
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    async def max_chars(self) -> int:
        try:
            info = await self.stub.GetInfo(pb.GetInfoRequest(), timeout=5.0)
            return info.max_chars or 100_000
        except grpc.aio.AioRpcError:
            return 100_000

    async def abandoned_state(self) -> dict:
        """How each abandoned stream ended, checked when the hold is over: STILL_OPEN = the server had
        not ended it. A client only sees a stream's status once it has read the stream's answers, so
        this drains them (the one read these streams ever get, after the decision is the server's)."""
        async def settle(call) -> str:
            try:
                while (await asyncio.wait_for(call.read(), 1.0)) is not grpc.aio.EOF:
                    pass
                return (await call.code()).name
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            except asyncio.TimeoutError:
                return "STILL_OPEN"
            except Exception as exc:  # noqa: BLE001 - reported as what it is
                return f"CLIENT_ERROR {type(exc).__name__}"

        return dict(Counter(await asyncio.gather(*(settle(c) for c in self.abandoned_calls))))

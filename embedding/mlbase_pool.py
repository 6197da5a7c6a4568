"""A pool of separate TCP connections to ML-base (normally HAProxy).

HAProxy in `mode tcp` balances connections, not RPCs, and grpc-python
channels with identical arguments share one TCP connection. Each channel here
therefore gets its own arguments (`grpc.sutra_channel_id`) and a local
subchannel pool, so N channels are N connections the balancer can spread.
Each batch goes on the connection with the fewest RPCs in flight.

A batch that meets UNAVAILABLE or RESOURCE_EXHAUSTED (a replica died, is
draining or is full) is retried on another connection within the caller's
deadline, with a short doubling backoff (50 ms, 100 ms, ... capped at 1 s)
that spans the second or so a balancer needs to mark a dead replica down,
at most `max_attempts` times. Every answer's model fingerprint is checked
against the one read at startup: a replica running another model must never
fill our caches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np

from common import tracing
from common.errors import DeadlineExceeded, InvalidInput, Unavailable
from common.grpc_server import keepalive_options
from common.tls import TlsClientOptions, open_channel
from embedding.stats import Stats
from sutra.mlbase.v1 import mlbase_service_pb2 as pb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
REPLICA_KEEPALIVE_MS = 10_000


@dataclass(frozen=True)
class ReplicaInfo:
    """What ML-base's GetInfo told us; fixed for the frontend's lifetime."""

    model_id: str
    fingerprint: str
    native_width: int
    max_seq_length: int
    backend: str
    precision: str
    allowed_widths: tuple[int, ...]
    min_width: int
    default_width: int
    layer_norm: bool
    max_inputs: int
    max_chars: int

    @classmethod
    def from_proto(cls, r: pb.GetInfoResponse) -> "ReplicaInfo":
        return cls(
            model_id=r.model_id, fingerprint=r.fingerprint, native_width=r.native_width,
            max_seq_length=r.max_seq_length, backend=r.backend, precision=r.precision,
            allowed_widths=tuple(r.allowed_widths), min_width=r.min_width, default_width=r.default_width,
            layer_norm=r.layer_norm, max_inputs=r.max_inputs, max_chars=r.max_chars,
        )


class _Connection:
    def __init__(self, index: int, address: str, options: list[tuple[str, object]], *,
                 tls: TlsClientOptions | None, max_message_bytes: int) -> None:
        self.index = index
        self.channel = open_channel(
            address, tls, max_message_bytes=max_message_bytes,
            options=[*options, ("grpc.sutra_channel_id", index), ("grpc.use_local_subchannel_pool", 1)],
        )
        self.stub = pb_grpc.MLBaseServiceStub(self.channel)
        self.inflight = 0
        self.calls = 0


class MLBasePool:
    def __init__(self, address: str, connections: int, stats: Stats, *, max_message_bytes: int,
                 max_attempts: int = 8, tls: TlsClientOptions | None = None) -> None:
        options = [
            # Reconnect promptly after a replica or the balancer comes back.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # A replica (or balancer) that hangs without closing the connection is found within
            # about 15 s, and the batches on that connection are retried elsewhere.
            *keepalive_options(REPLICA_KEEPALIVE_MS),
        ]
        self.address = address
        self._conns = [_Connection(i, address, options, tls=tls, max_message_bytes=max_message_bytes)
                       for i in range(connections)]
        self._stats = stats
        self._max_attempts = max(1, max_attempts)
        self.fingerprint: str | None = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    def inflight(self) -> list[int]:
        return [c.inflight for c in self._conns]

    def _pick(self, tried: set[int]) -> _Connection:
        fresh = [c for c in self._conns if c.index not in tried] or self._conns
        return min(fresh, key=lambda c: (c.inflight, c.calls))

    async def get_info(self, timeout: float = 5.0) -> ReplicaInfo:
        conn = self._pick(set())
        reply = await conn.stub.GetInfo(pb.GetInfoRequest(), timeout=timeout)
        return ReplicaInfo.from_proto(reply)

    async def wait_for_info(self, max_wait_s: float = 0.0) -> ReplicaInfo:
        """GetInfo, retried with backoff until a replica answers (or `max_wait_s` passes, if > 0)."""
        start = time.monotonic()
        delay = 0.1
        while True:
            try:
                info = await self.get_info(timeout=5.0)
                if not info.fingerprint or info.native_width <= 0:
                    raise Unavailable(f"ML-base at {self.address} sent an incomplete GetInfo")
                self.fingerprint = info.fingerprint
                return info
            except (grpc.aio.AioRpcError, Unavailable) as exc:
                detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                if max_wait_s > 0 and time.monotonic() - start > max_wait_s:
                    raise Unavailable(f"ML-base at {self.address} did not answer GetInfo in {max_wait_s}s") from exc
                log.info("waiting for ML-base at %s (%s); retrying in %.1fs", self.address, detail, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def embed_full(self, texts: list[str], timeout: float) -> tuple[np.ndarray, set[int]]:
        """Full-width vectors (n, D) float32 and the truncated positions; retried across connections."""
        deadline = time.monotonic() + timeout
        request = pb.EmbedRequest(texts=texts, full_width=True, truncation=pb.TRUNCATION_TRUNCATE)
        tried: set[int] = set()
        last: str = "no attempt made"
        # The batch's span (embedding/inflight.py), so the replica's server span is its child.
        metadata = tracing.outgoing()
        for attempt in range(self._max_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn = self._pick(tried)
            tried.add(conn.index)
            conn.inflight += 1
            conn.calls += 1
            started = time.monotonic()
            try:
                reply = await conn.stub.Embed(request, timeout=remaining, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in RETRYABLE:
                    last = f"{code.name}: {exc.details()}"
                    self._stats.mlbase_retries += 1
                    log.warning("ML-base batch of %d on connection %d failed (%s); retrying",
                                len(texts), conn.index, last)
                    tracing.event("retry", {"rpc.grpc.status_code": code.value[0], "sutra.connection": conn.index})
                    if attempt + 1 < self._max_attempts:
                        await asyncio.sleep(min(0.05 * (2 ** attempt), 1.0, max(0.0, deadline - time.monotonic())))
                    continue
                self._stats.mlbase_errors += 1
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded("deadline exceeded while the model replica was computing") from exc
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidInput(f"model replica refused the input: {exc.details()}") from exc
                raise Unavailable(f"model replica failed: {code.name}: {exc.details()}") from exc
            finally:
                conn.inflight -= 1
            if reply.model_fingerprint != self.fingerprint:
                self._stats.fingerprint_mismatches += 1
                self._stats.mlbase_retries += 1
                last = f"replica answered with fingerprint {reply.model_fingerprint!r}, expected {self.fingerprint!r}"
                log.error("%s (connection %d); retrying elsewhere", last, conn.index)
                continue
            if reply.count != len(texts) or len(reply.vectors) != reply.count * reply.width * 4:
                self._stats.mlbase_errors += 1
                raise Unavailable(f"model replica sent a malformed answer ({reply.count} x {reply.width})")
            self._stats.mlbase_latency.record(time.monotonic() - started)
            self._stats.mlbase_batches += 1
            self._stats.computed += len(texts)
            full = np.frombuffer(reply.vectors, dtype="<f4").reshape(reply.count, reply.width)
            return full, set(reply.truncated_indices)
        if not tried:  # the callers' deadline passed while the batch waited for a slot
            raise DeadlineExceeded("deadline exceeded before the batch reached a model replica")
        self._stats.mlbase_errors += 1
        if time.monotonic() >= deadline:
            raise Unavailable(f"no model replica answered within the deadline (last error: {last})")
        raise Unavailable(f"no model replica answered after {self._max_attempts} attempts (last error: {last})")

    async def close(self) -> None:
        await asyncio.gather(*(c.channel.close() for c in self._conns), return_exceptions=True)

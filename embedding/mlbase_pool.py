"""A pool of separate TCP connections to ML-base (normally HAProxy).

HAProxy in `mode tcp` balances connections, not RPCs, and grpc-python
channels with identical arguments share one TCP connection. Each channel here
therefore gets its own arguments (`grpc.sutra_channel_id`) and a local
subchannel pool, so N channels are N connections the balancer can spread.
Each batch goes to the least busy replica, counted over every connection
that reaches it: replicas put their id in each answer (Embed and GetInfo,
which `watch` asks of every connection every few seconds), so the pool
learns which connections share one, and relearns it after a reconnect.
Among idle replicas it prefers the one that answered last (`affinity`): a
replica that has just run has its threads awake and its weights in the CPU
caches (one client's single-text p50 x0.90-x1.00 against taking the
connections in turn, bench.replica_affinity). A retry goes to another
replica when one is known.

A batch that meets UNAVAILABLE or RESOURCE_EXHAUSTED (a replica died, is
draining or is full) is retried on another connection within the caller's
deadline (another replica when one is known), with a short doubling
backoff (50 ms, 100 ms, ... capped at 1 s) that spans the second or so a
balancer needs to mark a dead replica down, at most `max_attempts` times.

Every answer's model fingerprint is checked against the batch's: a replica
running another model must never fill our caches. The fingerprint is not
pinned at start-up: the pool asks every connection for GetInfo on a schedule
(`watch`) and on every mismatch (`refresh`), and `embedding.fingerprints`
decides, by the written rollout policy, which fingerprint is active. Batches
go only on connections that reach their fingerprint (or are not known yet),
so a rollout wastes no inference; a batch whose fingerprint stops being
active ends with FingerprintChanged, and the engine starts its requests again
under the new one. `on_switch` tells the engine about each switch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np

from common import tracing
from common.errors import DeadlineExceeded, InvalidInput, Unavailable
from common.grpc_server import keepalive_options
from common.tls import TlsClientOptions, open_channel
from embedding.fingerprints import FingerprintChanged, LiveFingerprints
from embedding.stats import Stats
from sutra.mlbase.v1 import mlbase_service_pb2 as pb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
REPLICA_KEEPALIVE_MS = 10_000
# GetInfo on one connection: a replica that takes longer counts as not reachable this round.
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ReplicaInfo:
    """What one replica's GetInfo told us; the pool keeps one per live fingerprint."""

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
        self.replica = ""  # the replica id of its last answer; "" while unknown (new, or reconnecting)
        self.answered_at = 0.0  # monotonic time of its last answer


def pick_connection(conns: list[_Connection], *, avoid_connections: set[int] = frozenset(),
                    avoid_replicas: set[str] = frozenset(), prefer: Callable[[_Connection], bool] = lambda c: True,
                    affinity: bool = True) -> _Connection:
    """The connection for the next batch: to the least busy replica (RPCs in flight over all the
    connections that reach it), then the fewest RPCs on the connection itself, then one `prefer`
    likes, then (with `affinity`) the replica that answered last, then the least used connection.
    A retry avoids the connections already tried and, where another is known, their replicas."""
    busy: dict[str, int] = {}
    last: dict[str, float] = {}
    for c in conns:
        if c.replica:
            busy[c.replica] = busy.get(c.replica, 0) + c.inflight
            last[c.replica] = max(last.get(c.replica, 0.0), c.answered_at)
    fresh = [c for c in conns if c.index not in avoid_connections] or conns
    fresh = [c for c in fresh if c.replica not in avoid_replicas] or fresh

    def rank(c: _Connection) -> tuple:
        replica_busy = busy[c.replica] if c.replica else c.inflight
        warm = last.get(c.replica, c.answered_at) if affinity else 0.0
        return (replica_busy, c.inflight, not prefer(c), -warm, c.calls)

    return min(fresh, key=rank)


class MLBasePool:
    def __init__(self, address: str, connections: int, stats: Stats, *, max_message_bytes: int,
                 max_attempts: int = 8, tls: TlsClientOptions | None = None, watch_s: float = 2.0,
                 affinity: bool = True) -> None:
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
        self._options, self._tls, self._max_message_bytes = options, tls, max_message_bytes
        self._extra_ids = 0
        self._conns = [_Connection(i, address, options, tls=tls, max_message_bytes=max_message_bytes)
                       for i in range(connections)]
        self._stats = stats
        self._max_attempts = max(1, max_attempts)
        self._watch_s = watch_s
        self._affinity = affinity
        self.live = LiveFingerprints()
        # Called (on the event loop) with the new fingerprint's ReplicaInfo at each switch.
        self.on_switch: Callable[[ReplicaInfo], None] | None = None
        self._probe: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        # Awaited after each watch round (the engine re-reads its cache generation).
        self.after_round: Callable[[], Awaitable[object]] | None = None

    @property
    def fingerprint(self) -> str | None:
        """The active fingerprint (None until a replica has answered GetInfo)."""
        return self.live.active

    @property
    def connections(self) -> int:
        return len(self._conns)

    def inflight(self) -> list[int]:
        return [c.inflight for c in self._conns]

    def _pick(self, tried: set[int], failed: set[str], fingerprint: str | None) -> _Connection:
        usable = [c for c in self._conns if self.live.usable(c.index, fingerprint)] or self._conns
        return pick_connection(usable, avoid_connections=tried, avoid_replicas=failed, affinity=self._affinity,
                               prefer=lambda c: self.live.known_match(c.index, fingerprint))

    # -- which fingerprint: probes and the policy ---------------------------------------------
    async def _probe_one(self, conn: _Connection) -> None:
        try:
            reply = await conn.stub.GetInfo(pb.GetInfoRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            self.live.forget(conn.index)
            conn.replica = ""  # broken or reconnecting: it may come back on another replica
            return
        if reply.replica_id:  # where it leads now, even if no batch has used it since a reconnect
            conn.replica = reply.replica_id
        info = ReplicaInfo.from_proto(reply)
        if not info.fingerprint or info.native_width <= 0:
            log.warning("ML-base at %s sent an incomplete GetInfo on connection %d", self.address, conn.index)
            self.live.forget(conn.index)
            return
        self.live.observe(conn.index, info.fingerprint, info)

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self._probe_one(c) for c in self._conns))
        switch_to = self.live.decide()
        if switch_to is None:
            return
        previous = self.live.active
        info: ReplicaInfo = self.live.infos[switch_to]  # type: ignore[assignment]
        self.live.adopt(switch_to)
        if previous is not None:
            log.warning("model fingerprint %s -> %s (%s %s %s): no connection reaches a replica of the old one "
                        "any more; live %s", previous[:12], switch_to[:12], info.model_id, info.backend,
                        info.precision, {fp[:12]: n for fp, n in self.live.counts().items()})
        if self.on_switch is not None:
            self.on_switch(info)

    async def refresh(self) -> str | None:
        """Ask every connection for GetInfo and apply the rollout policy; returns the active
        fingerprint. Concurrent callers share one round."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_all())
        await asyncio.shield(self._probe)
        return self.live.active

    def info(self) -> ReplicaInfo | None:
        """GetInfo of the active fingerprint."""
        active = self.live.active
        return None if active is None else self.live.infos.get(active)  # type: ignore[return-value]

    async def wait_for_info(self, max_wait_s: float = 0.0) -> ReplicaInfo:
        """The active fingerprint's GetInfo, retried with backoff until a replica answers (or
        `max_wait_s` passes, if > 0)."""
        start = time.monotonic()
        delay = 0.1
        while True:
            await self.refresh()
            info = self.info()
            if info is not None:
                return info
            if max_wait_s > 0 and time.monotonic() - start > max_wait_s:
                raise Unavailable(f"ML-base at {self.address} did not answer GetInfo in {max_wait_s}s")
            log.info("waiting for ML-base at %s; retrying in %.1fs", self.address, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def watch(self) -> None:
        """Re-read every connection's GetInfo each `watch_s` seconds until `close`."""
        if self._watcher is None and self._watch_s > 0:
            self._watcher = asyncio.create_task(self._watch(), name="fingerprint-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._watch_s)
            try:
                await self.refresh()
                if self.after_round is not None:
                    await self.after_round()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("fingerprint watch round failed")

    # -- pre-warming a rollout's new model -------------------------------------------------------
    async def reaching(self, fingerprint: str = "", fresh: int = 4) -> tuple[str, list[_Connection], list[_Connection]]:
        """Connections that reach replicas of `fingerprint` (empty: of any fingerprint but the active
        one, i.e. a rollout's new model), as (fingerprint, connections, the ones opened here, which
        the caller closes with `close_extra`). Pooled connections known to lead there come first;
        if there are none, `fresh` new connections are opened: HAProxy's leastconn puts them on the
        replicas with the fewest connections, which a just-restarted replica is."""
        await self.refresh()
        active = self.live.active

        def wanted(fp: str | None) -> bool:
            return fp is not None and (fp == fingerprint if fingerprint else fp != active)

        pooled: dict[str, list[_Connection]] = {}
        for conn in self._conns:
            fp = self.live.by_connection.get(conn.index)
            if wanted(fp):
                pooled.setdefault(fp, []).append(conn)
        if pooled:
            target = max(pooled, key=lambda fp: len(pooled[fp]))
            return target, pooled[target], []
        opened = [_Connection(10_000 + self._extra_ids + i, self.address, self._options, tls=self._tls,
                              max_message_bytes=self._max_message_bytes) for i in range(fresh)]
        self._extra_ids += fresh
        found: dict[str, list[_Connection]] = {}
        for conn in opened:
            try:
                reply = await conn.stub.GetInfo(pb.GetInfoRequest(), timeout=PROBE_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                continue
            if wanted(reply.fingerprint):
                found.setdefault(reply.fingerprint, []).append(conn)
        if not found:
            await self.close_extra(opened)
            return fingerprint, [], []
        target = max(found, key=lambda fp: len(found[fp]))
        keep = found[target]
        await self.close_extra([c for c in opened if c not in keep])
        return target, keep, keep

    async def close_extra(self, conns: list[_Connection]) -> None:
        await asyncio.gather(*(c.channel.close() for c in conns), return_exceptions=True)

    async def embed_on(self, conn: _Connection, texts: list[str], fingerprint: str,
                       timeout: float) -> tuple[np.ndarray, set[int]]:
        """One batch on `conn`, which must answer with `fingerprint` (Unavailable otherwise)."""
        reply = await conn.stub.Embed(pb.EmbedRequest(texts=texts, full_width=True,
                                                      truncation=pb.TRUNCATION_TRUNCATE), timeout=timeout)
        if reply.model_fingerprint != fingerprint:
            raise Unavailable(f"connection {conn.index} now reaches {reply.model_fingerprint[:12]}, "
                              f"not {fingerprint[:12]}")
        if reply.count != len(texts) or len(reply.vectors) != reply.count * reply.width * 4:
            raise Unavailable(f"model replica sent a malformed answer ({reply.count} x {reply.width})")
        _answered(conn, reply)
        full = np.frombuffer(reply.vectors, dtype="<f4").reshape(reply.count, reply.width)
        return full, set(reply.truncated_indices)

    # -- batches ------------------------------------------------------------------------------
    async def embed_full(self, texts: list[str], timeout: float,
                         fingerprint: str | None = None) -> tuple[np.ndarray, set[int]]:
        """Full-width vectors (n, D) float32 and the truncated positions, computed under
        `fingerprint` (default: the active one); retried across connections. Raises
        FingerprintChanged once `fingerprint` is no longer the active one."""
        expected = fingerprint or self.live.active
        deadline = time.monotonic() + timeout
        request = pb.EmbedRequest(texts=texts, full_width=True, truncation=pb.TRUNCATION_TRUNCATE)
        tried: set[int] = set()
        failed: set[str] = set()  # replicas that answered UNAVAILABLE or RESOURCE_EXHAUSTED
        last: str = "no attempt made"
        # The batch's span (embedding/inflight.py), so the replica's server span is its child.
        metadata = tracing.outgoing()
        for attempt in range(self._max_attempts):
            if self.live.active != expected:
                raise FingerprintChanged(expected or "", self.live.active or "")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn = self._pick(tried, failed, expected)
            tried.add(conn.index)
            conn.inflight += 1
            conn.calls += 1
            started = time.monotonic()
            try:
                reply = await conn.stub.Embed(request, timeout=remaining, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in RETRYABLE:
                    if conn.replica:
                        failed.add(conn.replica)
                    if code == grpc.StatusCode.UNAVAILABLE:  # it reconnects, perhaps to another replica
                        self.live.forget(conn.index)
                        conn.replica = ""
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
            if reply.model_fingerprint != expected:
                # A rollout (or a restart with new flags): learn where this connection leads, re-read
                # every connection and apply the policy before trying again.
                self.live.observe(conn.index, reply.model_fingerprint)
                self._stats.fingerprint_mismatches += 1
                self._stats.mlbase_retries += 1
                last = f"replica answered with fingerprint {reply.model_fingerprint!r}, expected {expected!r}"
                log.info("%s (connection %d); re-reading the replicas' GetInfo", last, conn.index)
                try:
                    await asyncio.wait_for(self.refresh(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass  # the deadline passed: the loop ends below
                continue
            self.live.observe(conn.index, expected)
            _answered(conn, reply)
            if reply.count != len(texts) or len(reply.vectors) != reply.count * reply.width * 4:
                self._stats.mlbase_errors += 1
                raise Unavailable(f"model replica sent a malformed answer ({reply.count} x {reply.width})")
            self._stats.mlbase_latency.record(time.monotonic() - started)
            self._stats.mlbase_batches += 1
            self._stats.computed += len(texts)
            full = np.frombuffer(reply.vectors, dtype="<f4").reshape(reply.count, reply.width)
            return full, set(reply.truncated_indices)
        if self.live.active != expected:
            raise FingerprintChanged(expected or "", self.live.active or "")
        if not tried:  # the callers' deadline passed while the batch waited for a slot
            raise DeadlineExceeded("deadline exceeded before the batch reached a model replica")
        self._stats.mlbase_errors += 1
        if time.monotonic() >= deadline:
            raise Unavailable(f"no model replica answered within the deadline (last error: {last})")
        raise Unavailable(f"no model replica answered after {self._max_attempts} attempts (last error: {last})")

    async def close(self) -> None:
        for task in (self._watcher, self._probe):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._watcher, self._probe) if t is not None), return_exceptions=True)
        await asyncio.gather(*(c.channel.close() for c in self._conns), return_exceptions=True)


def _answered(conn: _Connection, reply: pb.EmbedResponse) -> None:
    """Note which replica the connection reaches now, and that it has just run."""
    conn.replica = reply.replica_id
    conn.answered_at = time.monotonic()

"""`sutra validate`: the seed's phase 0/1/2 checks, against a running stack.

Phase 0  every allowed width (sampled when any width is allowed) returns
         unit vectors of exactly that width; a width outside the policy is
         refused with INVALID_ARGUMENT.
Phase 1  a repeated workload reaches the expected L1 hit rate; after the
         write-backs land, the cache shard is restarted and then the frontend
         (empty L1), and the same texts come back as L2 hits, none computed.
Phase 2  HAProxy lists every replica UP and cold requests reach every one
         (per-replica bytes returned, from the runtime
         API's `show stat`).

Each workload uses texts with a fresh random tag, so a run never depends on
what earlier runs left in the caches. Restarts need the local stack's
supervisord; against a stack started elsewhere those checks report FAIL with
the reason rather than pretending.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from common.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from common.tls import open_channel
from deploy import probe
from deploy.settings import ROOT, StackSettings
from deploy.supervisor import Supervisor
from lb import runtime
from sutra.cache.v1 import cache_shard_service_pb2 as cache_pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cache_grpc
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

Printer = Callable[[str], None]
SAMPLE_WIDTHS = (32, 64, 128, 256, 384)
# Realistic texts to tag: the corpus committed with the benchmarks, found from this checkout,
# so no machine path is involved; any readable file of lines would do.
CORPUS = Path(__file__).resolve().parent.parent / "bench" / "data" / "corpus.txt"


def until_every_replica_answers(embed: Callable[[list[str]], object], servers: Callable[[], list],
                                views: list, enough_bytes: int, max_requests: int) -> tuple[int, dict[str, int]]:
    """Cold 4-text requests, 8 in flight, until every balancer server (`servers()`: views with
    `name` and `bytes_out`) has sent back `enough_bytes` since `views`, or `max_requests` are sent;
    (requests sent, bytes each sent back). Overlapping requests are what spreads them: a lone
    client's batches stay on the replica that answered last (the frontend's --replica-affinity)."""
    before = {v.name: v.bytes_out for v in views}
    tag = uuid.uuid4().hex[:8]
    sent = 0
    reached: dict[str, int] = {}
    with ThreadPoolExecutor(8) as pool:
        while sent < max_requests:
            batch = [sample_sentences(4, f"{tag}-{sent + i}") for i in range(16)]
            list(pool.map(embed, batch))
            sent += len(batch)
            reached = {v.name: v.bytes_out - before.get(v.name, 0) for v in servers()}
            if all(delta >= enough_bytes for delta in reached.values()):
                break
    return sent, reached


@dataclass
class PhaseResult:
    phase: int
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, bool(ok), detail))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)


def sample_sentences(count: int, tag: str, corpus: Path = CORPUS) -> list[str]:
    """`count` distinct texts, tagged so no cache has seen them; a fixed sentence if `corpus` is missing."""
    lines: list[str] = []
    if corpus.exists():
        with corpus.open(errors="replace") as f:
            for line in f:
                line = line.strip()
                if line:
                    lines.append(line[:200])
                if len(lines) >= 500:
                    break
    if not lines:
        lines = ["the quick brown fox jumps over the lazy dog"]
    rng = random.Random(tag)
    return [f"[{tag}-{i}] {rng.choice(lines)}" for i in range(count)]


class Validator:
    def __init__(self, settings: StackSettings, address: str | None = None, out: Printer = print,
                 timeout: float = 60.0) -> None:
        self.settings = settings
        self.address = address or settings.frontend_address
        self.out = out
        self.timeout = timeout
        self.channel = open_channel(self.address, None, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, aio=False)
        self.stub = pb_grpc.EmbeddingServiceStub(self.channel)
        self.supervisor = Supervisor(settings.supervisor_socket)

    def close(self) -> None:
        self.channel.close()

    def embed(self, texts: list[str], dimensions: int = 0, **kw) -> pb.EmbedResponse:
        return self.stub.Embed(pb.EmbedRequest(inputs=texts, dimensions=dimensions, **kw), timeout=self.timeout)

    # --- phase 0 ---

    def phase0(self) -> PhaseResult:
        result = PhaseResult(0)
        info = self.stub.GetInfo(pb.GetInfoRequest(), timeout=self.timeout)
        if info.allowed_widths:
            widths = list(info.allowed_widths)
        else:
            widths = sorted({w for w in SAMPLE_WIDTHS if info.min_width <= w <= info.native_width}
                            | {info.min_width, info.native_width})
        self.out(f"  model {info.model_id} native width {info.native_width}, widths checked {widths} "
                 f"(default {info.default_width})")
        texts = sample_sentences(3, uuid.uuid4().hex[:8])
        for width in [0, *widths]:
            reply = self.embed(texts, width)
            expected = width or info.default_width
            got = [len(e.values) for e in reply.embeddings]
            norms = [float(np.linalg.norm(np.asarray(e.values, dtype=np.float64))) for e in reply.embeddings]
            ok = got == [expected] * len(texts) and reply.dimensions == expected and \
                all(abs(n - 1.0) < 1e-3 for n in norms)
            result.check(f"width {width or 'default'} -> {expected}", ok,
                         f"lengths {got}, norms {[round(n, 5) for n in norms]}")
        packed = self.embed(texts, widths[0], encoding=pb.ENCODING_PACKED)
        matrix = np.frombuffer(packed.packed, dtype="<f4").reshape(len(texts), -1)
        result.check(f"packed width {widths[0]}", matrix.shape[1] == widths[0] and
                     np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-3), f"shape {matrix.shape}")
        bad = info.native_width + 1
        try:
            self.embed(texts[:1], bad)
            result.check(f"width {bad} refused", False, "accepted")
        except grpc.RpcError as exc:
            result.check(f"width {bad} refused", exc.code() == grpc.StatusCode.INVALID_ARGUMENT,
                         f"{exc.code().name}: {exc.details()}")
        return result

    # --- phase 1 ---

    def run_rounds(self, texts: list[str], rounds: int, batch: int = 8) -> dict[str, int]:
        totals = {"l1_hits": 0, "l2_hits": 0, "computed": 0, "inputs": 0}
        rng = random.Random(0)
        for _ in range(rounds):
            order = texts[:]
            rng.shuffle(order)
            for start in range(0, len(order), batch):
                usage = self.embed(order[start:start + batch]).usage
                totals["l1_hits"] += usage.l1_hits
                totals["l2_hits"] += usage.l2_hits
                totals["computed"] += usage.computed
                totals["inputs"] += len(order[start:start + batch])
        return totals

    def shard_stores(self) -> int:
        with open_channel(self.settings.shard_address, self.settings.client_tls("operator"),
                          max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                          aio=False) as channel:
            stats = cache_grpc.CacheShardServiceStub(channel).GetStats(cache_pb.GetStatsRequest(), timeout=5)
        return stats.stores

    def restart(self, name: str, port: int) -> None:
        self.supervisor.restart(name)
        deadline = time.monotonic() + self.settings.wait_seconds
        tls = None if port == self.settings.frontend_port else self.settings.client_tls("operator")
        while probe.grpc_health(self.settings.address(port), tls=tls) != "SERVING":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not SERVING after restart")
            time.sleep(0.1)

    def phase1(self, unique: int = 24, rounds: int = 4) -> PhaseResult:
        result = PhaseResult(1)
        texts = sample_sentences(unique, uuid.uuid4().hex[:8])
        stores_before = self.shard_stores()
        totals = self.run_rounds(texts, rounds)
        l1_rate = totals["l1_hits"] / totals["inputs"]
        expected = (rounds - 1) / rounds
        self.out(f"  {rounds} rounds over {unique} new texts: computed {totals['computed']}, "
                 f"L1 hits {totals['l1_hits']} (hit rate {l1_rate:.0%}, expected {expected:.0%})")
        result.check("first sight computed once", totals["computed"] == unique, str(totals))
        result.check("L1 hit rate", totals["l1_hits"] == (rounds - 1) * unique, f"{l1_rate:.2%}")
        stats = self.stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=self.timeout)
        self.out(f"  frontend GetCacheStats: L1 hit rate {stats.l1.hit_rate:.0%} ({stats.l1.entries} entries), "
                 f"L2 hit rate {stats.l2.hit_rate:.0%}, computed {stats.computed}")
        if not self.supervisor.reachable():
            result.check("shard restart keeps L2 entries", False,
                         f"needs the local stack's supervisord ({self.settings.supervisor_socket})")
            return result
        # Write-backs are asynchronous: wait until the shard has stored them.
        deadline = time.monotonic() + 30
        while self.shard_stores() - stores_before < unique and time.monotonic() < deadline:
            time.sleep(0.1)
        stored = self.shard_stores() - stores_before
        result.check("write-backs reached the shard", stored >= unique, f"{stored} stored")
        self.out("  restarting the cache shard, then the frontend (empties L1)")
        self.restart("cacheshard", self.settings.shard_port)
        self.restart("embedding", self.settings.frontend_port)
        again = self.run_rounds(texts, 1)
        self.out(f"  after restarts: L2 hits {again['l2_hits']}/{unique}, computed {again['computed']}")
        result.check("L2 hits after shard restart", again["l2_hits"] == unique and again["computed"] == 0,
                     str(again))
        warm = self.run_rounds(texts, 1)
        result.check("L1 refilled from L2", warm["l1_hits"] == unique, str(warm))
        return result

    # --- phase 2 ---

    def phase2(self, max_requests: int = 400) -> PhaseResult:
        result = PhaseResult(2)
        sock = self.settings.haproxy_socket
        try:
            views = runtime.servers(sock)
        except OSError as exc:
            result.check("HAProxy runtime API", False, f"{sock}: {exc}")
            return result
        self.out("  " + ", ".join(f"{v.name} {v.status}" for v in views))
        result.check(f"{self.settings.replicas} replicas listed", len(views) == self.settings.replicas,
                     str(len(views)))
        result.check("all replicas UP", bool(views) and all(v.up for v in views),
                     str([(v.name, v.status) for v in views]))
        # A replica has answered an Embed call once it has sent back at least
        # one full-width float32 vector (health checks are not counted).
        info = self.stub.GetInfo(pb.GetInfoRequest(), timeout=self.timeout)
        one_vector = 4 * info.native_width
        sent, reached = until_every_replica_answers(self.embed, lambda: runtime.servers(sock), views,
                                                    one_vector, max_requests)
        self.out(f"  {sent} cold requests; bytes each replica sent back: {reached}")
        result.check("requests reach every replica",
                     bool(reached) and all(d >= one_vector for d in reached.values()), str(reached))
        return result

    def run(self, phases: list[int]) -> bool:
        ok = True
        for phase in phases:
            self.out(f"phase {phase}:")
            try:
                res = getattr(self, f"phase{phase}")()
            except (grpc.RpcError, OSError, TimeoutError) as exc:
                res = PhaseResult(phase)
                detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
                res.check("ran to the end", False, detail)
            for name, passed, detail in res.checks:
                self.out(f"  [{'PASS' if passed else 'FAIL'}] {name}" + (f"  ({detail})" if detail and not passed else ""))
            self.out(f"phase {phase}: {'PASS' if res.passed else 'FAIL'}")
            ok &= res.passed
        return ok


def validate(settings: StackSettings, phases: list[int], address: str | None = None, out: Printer = print) -> int:
    validator = Validator(settings, address, out)
    try:
        return 0 if validator.run(phases) else 1
    finally:
        validator.close()


__all__ = ["validate", "Validator", "ROOT"]

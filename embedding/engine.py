"""The frontend's core: validate → de-duplicate → L1 → L2 → single-flight →
batch to ML-base → fill L1 → write back to L2.

Transports (gRPC, the HTTP API, the admin HTTP server) stay thin and call
`FrontendEngine.embed` and `FrontendEngine.cache_stats`. The engine works on
full-width vectors throughout; the requested Matryoshka width is produced once,
on the way out, with the shared `common.matryoshka.reduce`, so one cache entry
serves every width and a cached vector reduces exactly like a freshly computed
one.

Truncation is remembered with the vector: L1 entries carry a flag, and L2
values carry it in their codec header, so one write stores both. A value
written before the flag existed (codec version 1) cannot say, so it is used
only for texts that cannot exceed the model window at all (no more UTF-8
bytes than window tokens, a bound that holds for WordPiece, BPE and
SentencePiece tokenizers) and is a miss for the others.

Texts that miss both levels go to `InFlight`, which owns every computation;
this module only waits on the waiters it hands out, or cancels them.

The model can change under a running frontend (a rollout): `configure` is
called again with the new fingerprint's GetInfo (embedding/fingerprints.py
states when). Each fingerprint gets its own in-flight table, so a batch never
mixes keys of two models; the old table is retired with FingerprintChanged,
and a request that meets it starts again from the top under the new model,
so one response never mixes models either.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from common import codec, tracing
from common.cache_key import cache_key
from common.errors import DeadlineExceeded, InvalidInput, Overloaded, Unavailable
from common.limits import check_texts
from common.matryoshka import WidthPolicy, reduce
from embedding.fingerprints import FingerprintChanged
from embedding.generations import Generations
from embedding.inflight import Compute, InFlight
from embedding.l1 import LRUCache
from embedding.l2_client import L2Client
from embedding.mlbase_pool import ReplicaInfo
from embedding.recent import RecentTexts
from embedding.settings import FrontendSettings
from embedding.stats import Stats
from embedding.writeback import WriteBack

log = logging.getLogger(__name__)

# Weight of the latest L2 lookup in the moving share of misses L2 answers (about the last 10 lookups).
_SHARE_WEIGHT = 0.1
_SPECIAL_TOKENS = 3  # [CLS]/[SEP] or <s>/</s>, plus a SentencePiece word-start piece
# A request restarts at most this often when the model switches under it (one switch per rollout).
_MODEL_SWITCH_RESTARTS = 3
# Characters the recently-used texts may hold in all (beside their count).
_RECENT_CHARS = 16_000_000


# How much of an unknown model name an error repeats: a caller's name can be megabytes long.
_NAME_ECHO = 64


def unknown_model(name: str, served: list[str]) -> InvalidInput:
    """The one error for a `model` this frontend does not serve (gRPC and HTTP alike)."""
    shown = name if len(name) <= _NAME_ECHO else f"{name[:_NAME_ECHO]}... ({len(name)} characters)"
    return InvalidInput(f"`model` {shown!r} is not served here; models: "
                        f"{', '.join(repr(n) for n in served)} (empty means the default)")


@dataclass
class Usage:
    l1_hits: int = 0
    l2_hits: int = 0
    computed: int = 0
    truncated: int = 0
    duplicates: int = 0


@dataclass
class EmbedReply:
    """What one Embed call answers: the vectors at the requested width, and how they were found."""

    vectors: np.ndarray  # (n, width) float32, unit rows
    width: int
    model: str
    usage: Usage
    truncated_indices: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ModelConfig:
    """The replica's description combined with this frontend's overrides."""

    info: ReplicaInfo
    policy: WidthPolicy
    max_inputs: int
    max_chars: int
    max_batch: int
    # Tenants with their own width policy (--tenants-file); others use `policy`.
    tenant_policies: dict[str, WidthPolicy] = field(default_factory=dict)

    def policy_for(self, tenant: str) -> WidthPolicy:
        return self.tenant_policies.get(tenant, self.policy)

    @classmethod
    def build(cls, info: ReplicaInfo, settings: FrontendSettings) -> "ModelConfig":
        policy = WidthPolicy(
            native_width=info.native_width,
            min_width=max(1, min(info.min_width or 1, info.native_width)),
            default_width=settings.default_width or info.default_width or info.native_width,
            allowed=settings.allowed_widths or info.allowed_widths,
        )
        max_chars = min(settings.max_chars, info.max_chars) if info.max_chars else settings.max_chars
        max_batch = min(settings.max_batch, info.max_inputs) if info.max_inputs else settings.max_batch
        tenants = {t.name: t.policy(policy) for t in settings.access.tenants}
        return cls(info, policy, settings.max_inputs, max_chars, max_batch, tenants)

    def might_truncate(self, text: str) -> bool:
        window = self.info.max_seq_length
        return window <= 0 or len(text.encode("utf-8", "surrogatepass")) + _SPECIAL_TOKENS > window


class FrontendEngine:
    """The frontend's call path (caches, single-flight, write-back) behind every transport."""

    def __init__(self, settings: FrontendSettings, stats: Stats, compute: Compute,
                 l2: L2Client | None = None) -> None:
        self.settings = settings
        self.stats = stats
        self.l1 = LRUCache(settings.l1_entries, stats.l1) if settings.l1_enabled else None
        self.l2 = l2 if settings.l2_enabled else None
        self.writeback = (WriteBack(l2, stats, capacity=settings.writeback_queue, batch=settings.writeback_batch,
                                    linger_s=settings.writeback_linger_ms / 1000.0)
                          if self.l2 is not None else None)
        # compute(texts, timeout, fingerprint=...): the batch must be answered under that fingerprint.
        self._compute = compute
        # The fingerprint in keys carries its cache generation (InvalidateCache of a whole fingerprint).
        self.generations = Generations(self.l2)
        # Recently used texts, for PrewarmCache (embedding/cache_admin.py).
        self.recent = RecentTexts(settings.recent_texts, max_chars=_RECENT_CHARS)
        self.inflight: InFlight | None = None
        self.model: ModelConfig | None = None
        # Moving share of L1 misses that L2 answered (per lookup), which gates speculation.
        self._l2_answer_share = 0.0
        self._retiring: set[asyncio.Task] = set()

    # -- life cycle -------------------------------------------------------------------------
    def configure(self, info: ReplicaInfo) -> ModelConfig:
        """Adopt the replica's model: a fresh in-flight table for its fingerprint; the first call
        also starts the write-back worker. Called again at each fingerprint switch: the previous
        table is retired, its waiters fail with FingerprintChanged and their requests restart."""
        old, old_fp = self.inflight, self.model.info.fingerprint if self.model is not None else None
        self.model = ModelConfig.build(info, self.settings)
        self.inflight = InFlight(
            functools.partial(self._compute, fingerprint=info.fingerprint), self._on_computed,
            max_batch=self.model.max_batch,
            window_s=self.settings.batch_window_ms / 1000.0, concurrency=self.settings.mlbase_concurrency,
            default_timeout_s=self.settings.mlbase_timeout_s, max_pending=self.settings.max_pending,
        )
        if old is None:
            if self.writeback is not None:
                self.writeback.start()
        else:
            task = asyncio.get_running_loop().create_task(
                old.close(FingerprintChanged(old_fp or "", info.fingerprint)), name="retire-inflight")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        log.info("model %s fingerprint %s backend %s %s native width %d default %d widths %s layer_norm=%s",
                 info.model_id, info.fingerprint, info.backend, info.precision, info.native_width,
                 self.model.policy.default_width, self.model.policy.describe(), info.layer_norm)
        return self.model

    async def close(self, flush_s: float) -> None:
        if self.inflight is not None:
            await self.inflight.close()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.writeback is not None:
            await self.writeback.close(flush_s)

    @property
    def pending(self) -> int:
        return self.inflight.pending if self.inflight is not None else 0

    # -- the call path ----------------------------------------------------------------------
    def _validate(self, m: ModelConfig, texts: list[str]) -> None:
        check_texts(texts, field="inputs", max_inputs=m.max_inputs, max_chars=m.max_chars)

    async def embed(self, texts: list[str], dimensions: int = 0, *, reject_truncation: bool = False,
                    deadline: float | None = None, tenant: str = "", model: str = "") -> EmbedReply:
        """Vectors for `texts` at `dimensions` (0 = the tenant's default); `deadline` is absolute
        time.monotonic(). With tenant isolation the tenant is part of every key, so L1, L2 and the
        single-flight table never hand one tenant's entry (or its timing) to another. A model switch
        under the request starts it again, whole, under the new model."""
        texts = list(texts)
        for attempt in range(_MODEL_SWITCH_RESTARTS + 1):
            m, inflight = self.model, self.inflight
            if m is None or inflight is None:
                raise Unavailable("the frontend is starting: ML-base has not described its model yet")
            if model and model != m.info.model_id:
                raise unknown_model(model, [m.info.model_id])
            try:
                return await self._embed_once(m, inflight, texts, dimensions, reject_truncation, deadline, tenant)
            except FingerprintChanged as exc:
                if attempt == _MODEL_SWITCH_RESTARTS:
                    raise
                self.stats.model_restarts += 1
                if self.model is m:  # the pool switched but this engine has not heard yet
                    await asyncio.sleep(0)
                log.debug("request restarted under the new model (%s)", exc)
        raise AssertionError("unreachable")

    async def _embed_once(self, m: ModelConfig, inflight: InFlight, texts: list[str], dimensions: int,
                          reject_truncation: bool, deadline: float | None, tenant: str) -> EmbedReply:
        self._validate(m, texts)
        width = m.policy_for(tenant).resolve(dimensions)
        fp = self.generations.key_fingerprint(m.info.fingerprint)
        namespace = tenant if self.settings.access.isolate else ""

        index_of: dict[str, int] = {}
        uniq: list[str] = []
        positions = np.empty(len(texts), dtype=np.intp)
        for i, text in enumerate(texts):
            j = index_of.get(text)
            if j is None:
                j = index_of[text] = len(uniq)
                uniq.append(text)
            positions[i] = j
        keys = [cache_key(fp, t, namespace) for t in uniq]
        self.recent.touch(namespace, uniq)
        full = np.empty((len(uniq), m.info.native_width), dtype=np.float32)
        truncated = np.zeros(len(uniq), dtype=bool)
        usage = Usage(duplicates=len(texts) - len(uniq))

        with tracing.span("l1.lookup", attributes={"sutra.keys": len(uniq)}) as span:
            missing = self._from_l1(keys, full, truncated, usage, range(len(uniq)))
            span.set_attribute("sutra.hits", len(uniq) - len(missing))
        waiting: list[tuple[int, asyncio.Future]] = []
        try:
            to_l2: list[int] = []
            for j in missing:  # a computation already in flight answers without asking L2
                waiter = inflight.join(keys[j], deadline)
                if waiter is not None:
                    waiting.append((j, waiter))
                    self.stats.coalesced += 1
                else:
                    to_l2.append(j)
            coalesced = len(waiting)
            speculated: set[int] = set()
            if to_l2 and self._speculate(inflight):
                # ML-base is idle and L2 has rarely been answering: compute during the L2 round trip.
                with tracing.span("inflight.speculate", attributes={"sutra.texts": len(to_l2)}):
                    waiters, joined = inflight.request([keys[j] for j in to_l2], [uniq[j] for j in to_l2],
                                                       deadline)
                waiting.extend(zip(to_l2, waiters))
                speculated.update(to_l2)
                self.stats.speculated += len(to_l2)
                self.stats.coalesced += joined
                coalesced += joined
            to_compute = await self._from_l2(m, uniq, keys, full, truncated, usage, to_l2)
            if self.inflight is not inflight:  # the model switched while L2 answered
                raise FingerprintChanged(m.info.fingerprint, self.model.info.fingerprint)
            if speculated:
                waiting = self._drop_answered(waiting, speculated.difference(to_compute))
                to_compute = [j for j in to_compute if j not in speculated]
            if to_compute:
                # Another request may have filled L1 while we waited on L2.
                to_compute = self._from_l1(keys, full, truncated, usage, to_compute, recheck=True)
            # The single-flight wait: on computations other requests started, and on our own.
            with tracing.span("inflight.wait") if to_compute or waiting else tracing.NO_SPAN as span:
                if to_compute:
                    try:
                        waiters, joined = inflight.request([keys[j] for j in to_compute],
                                                           [uniq[j] for j in to_compute], deadline)
                    except Overloaded:
                        self.stats.rejected_overloaded += 1
                        raise
                    self.stats.coalesced += joined
                    coalesced += joined
                    waiting.extend(zip(to_compute, waiters))
                usage.computed = len(waiting)
                span.set_attributes({"sutra.texts": len(waiting), "sutra.coalesced": coalesced})
                results = await _wait([w for _, w in waiting], deadline)
        finally:
            # Detach from whatever is still unsettled (an error, a deadline, our own cancellation);
            # settled waiters ignore it. The owner also settles every waiter when its batch ends.
            for _, waiter in waiting:
                waiter.cancel()
        for (j, _), (vec, was_truncated) in zip(waiting, results):
            full[j] = vec
            truncated[j] = was_truncated

        trunc_rows = truncated[positions]
        truncated_indices = np.flatnonzero(trunc_rows).tolist()
        if reject_truncation and truncated_indices:
            raise InvalidInput(
                f"`inputs[{truncated_indices[0]}]` is longer than the model window ({m.info.max_seq_length} "
                f"tokens) and `truncation` is TRUNCATION_REJECT ({len(truncated_indices)} input(s) too long)")
        reduced = reduce(full, width, m.info.layer_norm)
        vectors = reduced if usage.duplicates == 0 else reduced[positions]
        usage.truncated = len(truncated_indices)
        self.stats.requests += 1
        self.stats.inputs += len(texts)
        self.stats.duplicates += usage.duplicates
        self.stats.truncated += usage.truncated
        return EmbedReply(vectors, width, m.info.model_id, usage, truncated_indices)

    def _speculate(self, inflight: InFlight) -> bool:
        """Whether this request's misses should start computing before L2 answers: only with nothing
        queued or running (no other request's batch is delayed by it) and while L2 has been
        answering few misses (each L2 hit makes the computation a waste, on an idle pipeline)."""
        return (self.l2 is not None and inflight.idle
                and self._l2_answer_share < self.settings.speculate_below_l2_hit_rate)

    def _drop_answered(self, waiting: list[tuple[int, asyncio.Future]],
                       answered: set[int]) -> list[tuple[int, asyncio.Future]]:
        """Detach from the speculative computations of texts L2 answered after all."""
        if not answered:
            return waiting
        self.stats.speculated_l2_hits += len(answered)
        kept = []
        for j, waiter in waiting:
            if j in answered:
                waiter.cancel()
            else:
                kept.append((j, waiter))
        return kept

    def _from_l1(self, keys, full, truncated, usage: Usage, which, recheck: bool = False) -> list[int]:
        if self.l1 is None:
            return list(which)
        started = time.perf_counter()
        missing = []
        hits = 0
        for j in which:
            item = self.l1.get(keys[j])
            if item is None:
                missing.append(j)
            else:
                full[j] = item.vector
                truncated[j] = item.truncated
                hits += 1
        usage.l1_hits += hits
        self.stats.l1.hits += hits
        if not recheck:
            self.stats.l1.misses += len(missing)
            self.stats.l1.latency.record(time.perf_counter() - started)
        return missing

    async def _from_l2(self, m: ModelConfig, uniq, keys, full, truncated, usage: Usage, which: list[int]) -> list[int]:
        if self.l2 is None or not which:
            return which
        with tracing.span("l2.lookup", attributes={"sutra.keys": len(which)}) as span:
            results = await self.l2.lookup([keys[j] for j in which])
            if span.is_recording():
                span.set_attribute("sutra.found", sum(value is not None for value in results))
        missing = []
        for j, value in zip(which, results):
            if value is None:
                missing.append(j)
                continue
            try:
                vec, was_truncated = codec.decode_entry(value, width=m.info.native_width)
            except codec.CorruptValue as exc:
                self.stats.l2.errors += 1
                log.warning("unreadable L2 value (treated as a miss): %s", exc)
                missing.append(j)
                continue
            if was_truncated is None:  # written before values carried the flag
                if m.might_truncate(uniq[j]):
                    missing.append(j)
                    continue
                was_truncated = False
            full[j] = vec
            truncated[j] = was_truncated
            if self.l1 is not None:
                self.l1.put(keys[j], vec, was_truncated)
        hits = len(which) - len(missing)
        self._l2_answer_share += _SHARE_WEIGHT * (hits / len(which) - self._l2_answer_share)
        usage.l2_hits += hits
        self.stats.l2.hits += hits
        self.stats.l2.misses += len(missing)
        return missing

    def _on_computed(self, keys: list[bytes], full: np.ndarray, truncated: set[int]) -> None:
        """Batch finished: fill L1 and queue the write-back to L2 (never blocks). The truncation
        flag is inside each value, so a dropped write loses the entry, never only its flag."""
        if self.l1 is not None:
            for i, key in enumerate(keys):
                self.l1.put(key, full[i], i in truncated)
        if self.writeback is not None:
            values = codec.encode_many(full, self.settings.cache_dtype, truncated)
            for key, value in zip(keys, values):
                self.writeback.offer(key, value)

    # -- stats ------------------------------------------------------------------------------
    async def refresh_l2_stats(self) -> int:
        """Ask the shards for their counts: their evictions become `stats.l2.evictions` (read by
        GetCacheStats and /metrics alike, as L1's are counted straight into `stats.l1`); returns
        their entries. Shards that do not answer count 0."""
        if self.l2 is None:
            return 0
        entries, self.stats.l2.evictions = await self.l2.entries_and_evictions()
        return entries

    async def cache_stats(self) -> dict:
        """GetCacheStats content, as a dict with the proto's field names."""
        s = self.stats
        l2_entries = await self.refresh_l2_stats()

        def level(c, entries: int) -> dict:
            return {"hits": c.hits, "misses": c.misses, "hit_rate": c.hit_rate, "entries": entries,
                    "evictions": c.evictions, "errors": c.errors,
                    "lookup_p50_ms": c.latency.percentile_ms(50), "lookup_p99_ms": c.latency.percentile_ms(99)}

        return {
            "l1": level(s.l1, len(self.l1) if self.l1 is not None else 0),
            "l2": level(s.l2, l2_entries),
            "computed": s.computed,
            "coalesced": s.coalesced,
            "mlbase_p50_ms": s.mlbase_latency.percentile_ms(50),
            "mlbase_p99_ms": s.mlbase_latency.percentile_ms(99),
            "l2_writes_dropped": s.l2_writes_dropped,
            "mlbase_retries": s.mlbase_retries,
            "l2_second_copy_hits": s.l2_second_copy_hits,
            "l2_shard_set_changes": s.l2_shard_set_changes,
        }


async def _wait(waiters: list[asyncio.Future], deadline: float | None) -> list:
    """The waiters' results in order; the first failure as it is; DeadlineExceeded when
    `deadline` passes first.

    `asyncio.wait` leaves the waiters alone, so nothing is left behind with an
    unread exception (a `gather` under a cancelled `wait_for` would log one per
    impatient caller). The caller's `finally` cancels what is still unsettled,
    each waiter's done-callback then detaches it, and the owner settles any
    waiter left over when its batch ends."""
    if not waiters:
        return []
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    done, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
    for waiter in done:
        if not waiter.cancelled() and waiter.exception() is not None:
            raise waiter.exception()
    if pending:
        raise DeadlineExceeded(f"deadline exceeded with {len(pending)} text(s) still being computed")
    return [waiter.result() for waiter in waiters]

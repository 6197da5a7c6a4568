"""Cache management behind the admin RPCs (and `sutra cache`): invalidate, export, import, pre-warm.

- Invalidate by texts: their keys under the active fingerprint (and its
  current generation) are dropped from L1 and deleted on their shards.
- Invalidate a whole fingerprint: a new cache generation
  (embedding/generations.py): every old entry reads as a miss at once.
- Export: every shard's entries, paged with the shard's Scan (with
  --l2-copies an entry comes once per copy). Import: entries (checked by the
  value codec) stored on the shards each key belongs to, so a cache moves
  between stacks with the same shard count or not.
- Pre-warm: the most recently used texts (embedding/recent.py) are embedded
  by replicas of a rollout's *new* fingerprint, before the frontend switches
  to it, and stored in L2 under the new fingerprint's keys; texts already
  stored there are skipped. When the switch comes, those texts are L2 hits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from common import codec
from common.cache_key import cache_key
from common.errors import InvalidInput, Unavailable
from embedding.engine import FrontendEngine
from embedding.mlbase_pool import MLBasePool

log = logging.getLogger(__name__)

SHARD_TIMEOUT_S = 10.0
SCAN_PAGE = 256
STORE_BATCH = 256


@dataclass(frozen=True)
class PrewarmReport:
    fingerprint: str
    texts: int  # recent texts considered
    already: int  # found in L2 under the new fingerprint already
    computed: int  # embedded by the new model's replicas and stored
    seconds: float


class CacheAdmin:
    def __init__(self, engine: FrontendEngine, pool: MLBasePool) -> None:
        self._engine = engine
        self._pool = pool

    def _l2(self):
        if self._engine.l2 is None:
            raise InvalidInput("this frontend has no L2 cache (--cache-shard) to manage")
        return self._engine.l2

    def _active(self) -> str:
        m = self._engine.model
        if m is None:
            raise Unavailable("the frontend is starting: ML-base has not described its model yet")
        return m.info.fingerprint

    async def _by_shard(self, keys: Sequence[bytes], call) -> None:
        """`call(shard, keys)` once per shard with the keys it holds: every copy (--l2-copies)."""
        l2 = self._l2()
        groups: dict[int, tuple[object, list[bytes]]] = {}
        for key in keys:
            for shard in l2.owners(key):
                groups.setdefault(id(shard), (shard, []))[1].append(key)
        await asyncio.gather(*(call(shard, group) for shard, group in groups.values()))

    # -- invalidation ---------------------------------------------------------------------------
    async def invalidate_texts(self, texts: Sequence[str], namespace: str = "") -> tuple[int, int]:
        """Drop `texts` under the active fingerprint from L1 and L2; (L1 entries dropped, L2 keys deleted)."""
        if not texts:
            raise InvalidInput("`inputs` cannot be empty (or set `all_entries`)")
        fp = self._engine.generations.key_fingerprint(self._active())
        keys = list({cache_key(fp, text, namespace): None for text in texts})
        l1 = self._engine.l1
        dropped = sum(l1.delete(k) for k in keys) if l1 is not None else 0
        deleted = 0
        if self._engine.l2 is not None:
            async def delete(shard, group: list[bytes]) -> None:
                nonlocal deleted
                for i in range(0, len(group), STORE_BATCH):
                    deleted += await shard.delete(group[i:i + STORE_BATCH], SHARD_TIMEOUT_S)

            await self._by_shard(keys, delete)
        log.warning("cache: invalidated %d text(s) under %s (L1 %d, L2 %d)", len(keys), fp[:12], dropped, deleted)
        return dropped, deleted

    async def invalidate_fingerprint(self, fingerprint: str = "") -> tuple[str, int]:
        """A new cache generation for `fingerprint` (empty: the active one); (fingerprint, generation)."""
        fingerprint = fingerprint or self._active()
        generation = await self._engine.generations.bump(fingerprint)
        if self._engine.l1 is not None:
            self._engine.l1.clear()
        log.warning("cache: every entry of %s invalidated (generation %d)", fingerprint[:12], generation)
        return fingerprint, generation

    # -- export and import ----------------------------------------------------------------------
    async def export(self) -> AsyncIterator[list[tuple[bytes, bytes]]]:
        """Every shard's entries, a page at a time."""
        for shard in self._l2().shards:
            after = b""
            while True:
                page = await shard.scan(after, SCAN_PAGE, SHARD_TIMEOUT_S)
                entries = [(e.key, e.value) for e in page.entries]
                if entries:
                    yield entries
                    after = entries[-1][0]
                if page.done or not entries:
                    break

    async def import_entries(self, entries: Sequence[tuple[bytes, bytes]]) -> int:
        """Store `entries` on their shards; InvalidInput names the first entry that is not a cache entry."""
        for i, (key, value) in enumerate(entries):
            if len(key) != len(cache_key("", "")) or not codec.is_valid(value):
                raise InvalidInput(f"`entries[{i}]` is not a cache entry (16-byte key, codec value)")
        values = dict(entries)
        stored = 0

        async def store(shard, group: list[bytes]) -> None:
            nonlocal stored
            for i in range(0, len(group), STORE_BATCH):
                part = group[i:i + STORE_BATCH]
                stored += await shard.store([(k, values[k]) for k in part], SHARD_TIMEOUT_S)

        await self._by_shard(list(values), store)
        return stored

    # -- pre-warming ----------------------------------------------------------------------------
    async def prewarm(self, count: int, fingerprint: str = "", timeout_s: float = 60.0) -> PrewarmReport:
        """Embed the `count` most recently used texts with replicas of `fingerprint` (empty: the
        fingerprint a rollout is moving to) and store them in L2 under its keys."""
        started = time.monotonic()
        l2 = self._l2()
        active = self._active()
        if fingerprint == active:
            raise InvalidInput("`fingerprint` is the active one: its recent texts are in the cache already")
        target, conns, opened = await self._pool.reaching(fingerprint)
        if not conns:
            raise Unavailable("no replica of " + (f"fingerprint {fingerprint[:12]}" if fingerprint else
                                                  "another fingerprint than the active one") +
                              " is reachable: start the rollout's first replica, then pre-warm")
        try:
            generations = self._engine.generations
            await generations.refresh(target)
            key_fp = generations.key_fingerprint(target)
            recent = self._engine.recent.latest(count)
            keys = [cache_key(key_fp, text, ns) for ns, text in recent]
            present = await l2.lookup(keys) if keys else []
            todo = [(k, text) for k, (_, text), value in zip(keys, recent, present) if value is None]
            batch = self._engine.model.max_batch if self._engine.model else 64
            batches = [todo[i:i + batch] for i in range(0, len(todo), batch)]
            queue: asyncio.Queue = asyncio.Queue()
            for b in batches:
                queue.put_nowait(b)
            computed = 0

            async def worker(conn) -> None:
                nonlocal computed
                while not queue.empty():
                    part = queue.get_nowait()
                    full, truncated = await self._pool.embed_on(conn, [t for _, t in part], target, timeout_s)
                    values = codec.encode_many(full, self._engine.settings.cache_dtype, truncated)
                    entries = dict(zip([k for k, _ in part], values))
                    await self._by_shard(list(entries), lambda shard, group: shard.store(
                        [(k, entries[k]) for k in group], SHARD_TIMEOUT_S))
                    computed += len(part)

            await asyncio.gather(*(worker(c) for c in conns))
        finally:
            await self._pool.close_extra(opened)
        report = PrewarmReport(target, len(recent), len(recent) - len(todo), computed,
                               round(time.monotonic() - started, 3))
        log.warning("cache: pre-warmed %s with %d recent text(s) (%d already there) in %.1fs",
                    target[:12], report.computed, report.already, report.seconds)
        return report

"""L1: the in-process LRU of full-width float32 vectors.

Entries are the model's full-width output (plus whether the text was cut to
the model window), so one entry serves every Matryoshka width. An
OrderedDict gives O(1) get/put/evict; the event loop is the only user, so no
lock is needed. Capacity 0 means a cache that never holds anything.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from embedding.stats import LevelCounters


class Cached(NamedTuple):
    vector: np.ndarray  # (native_width,) float32, read-only
    truncated: bool


class LRUCache:
    def __init__(self, capacity: int, counters: LevelCounters | None = None) -> None:
        """`counters`: where evictions are counted (the frontend passes `Stats.l1`, which
        GetCacheStats and /metrics both read); a private one when None."""
        self.capacity = capacity
        self._items: OrderedDict[bytes, Cached] = OrderedDict()
        self.counters = counters if counters is not None else LevelCounters()

    @property
    def evictions(self) -> int:
        return self.counters.evictions

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> Cached | None:
        """The entry, marked most recently used; None on a miss."""
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: bytes, vector: np.ndarray, truncated: bool) -> None:
        if self.capacity <= 0:
            return
        vec = np.array(vector, dtype=np.float32, copy=True).reshape(-1)
        vec.setflags(write=False)
        self._items[key] = Cached(vec, truncated)
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
            self.counters.evictions += 1

    def delete(self, key: bytes) -> bool:
        """Drop `key` (cache invalidation); whether it was there."""
        return self._items.pop(key, None) is not None

    def clear(self) -> None:
        self._items.clear()

"""The shard's in-memory tier: a bounded map of recently stored or read values.

Why it exists: rocksdict holds the GIL for a whole multi-get and costs about
0.8 us per key even when RocksDB answers from its row cache (two copies per
value plus the binding's per-key work), i.e. ~200 us for a 256-key batch,
while a dict lookup costs ~40 ns per key. Serving repeated keys from here
is what lets a Python shard keep pace with Redis; RocksDB stays the
durable, bounded store behind it and answers everything this tier does not
hold (for example after a restart, when the tier starts empty).

Rules: only values that passed the codec check enter (Store validates them;
reads from RocksDB are screened first), so a hit here is always a valid
value. Eviction is insertion order (oldest first), like the FIFO-compacted
store behind it; a hit does not move an entry. Values are deterministic per
key (the key hashes model fingerprint and text), so a value that outlives
its RocksDB copy here is still the right answer. Used only from the event
loop thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class MemoryTier:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, keys: Iterable[bytes]) -> list[bytes | None]:
        get = self._entries.get
        return [get(k) for k in keys]

    def get_all(self, keys: Iterable[bytes]) -> list[bytes] | None:
        """Every key's value, or None when any key is absent.

        The all-hit fast path: `map` over the dict's `__getitem__` runs in C
        with no per-key bytecode and no later scan for misses (comparing 256
        values to None costs a rich comparison each)."""
        try:
            return list(map(self._entries.__getitem__, keys))
        except KeyError:
            return None

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        if self.capacity <= 0:
            return
        entries = self._entries
        entries.update(zip(keys, values))
        excess = len(entries) - self.capacity
        if excess > 0:
            pop = entries.popitem
            for _ in range(excess):
                pop(last=False)

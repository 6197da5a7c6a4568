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
value. Two bounds hold after every `put_many`: entries and value bytes. The
byte bound is what keeps wide values (a caller may store up to --max-width)
from growing the process; the entry bound covers the per-entry overhead
that value bytes do not count. Eviction is insertion order (oldest first),
like the FIFO-compacted store behind it; a hit does not move an entry. Values are deterministic per
key (the key hashes model fingerprint and text), so a value that outlives
its RocksDB copy here is still the right answer. Used only from the event
loop thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class MemoryTier:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # value bytes held
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

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
        if not self.enabled:
            return
        entries = self._entries
        before = len(entries)
        if not any(map(entries.__contains__, keys)):
            # All new (the common case): the dict update and the byte sum run in C.
            entries.update(zip(keys, values))
            if len(entries) - before == len(keys):
                self.bytes += sum(map(len, values))
            else:  # a key repeated within the batch: count the value kept
                self.bytes += sum(map(len, map(entries.__getitem__, set(keys))))
        else:
            pop = entries.pop
            for key, value in zip(keys, values):
                old = pop(key, None)  # a rewritten key becomes the newest, as in RocksDB's files
                if old is not None:
                    self.bytes -= len(old)
                entries[key] = value
                self.bytes += len(value)
        self._evict()

    def delete_many(self, keys: Iterable[bytes]) -> None:
        pop = self._entries.pop
        for key in keys:
            old = pop(key, None)
            if old is not None:
                self.bytes -= len(old)

    def _evict(self) -> None:
        """Drop the oldest entries until both bounds hold."""
        entries = self._entries
        pop = entries.popitem
        count, size, max_entries, max_bytes = len(entries), self.bytes, self.max_entries, self.max_bytes
        while count > max_entries or size > max_bytes:  # locals: this runs once per entry put when full
            size -= len(pop(last=False)[1])
            count -= 1
        self.bytes = size

"""--memory-budget: one figure that bounds the shard's resident memory, split
between RocksDB's memtables, its block cache and the in-memory tier.

Why one figure: the three caches compete for the same RAM, and an operator
knows how much RAM a shard may have, not how a lookup uses each cache. The
split follows what measurements on this code showed (bench/shard_scale.py,
README "Cache at scale"):

- The in-memory tier is by far the cheapest place to answer from: a tier
  hit costs ~0.3 us per key, a RocksDB multi-get 2-8 us per key even when
  its blocks are cached (rocksdict holds the GIL and copies each value). So
  it gets everything the other two do not need.
- The block cache must hold every SST's index and filter blocks (pinned: a
  lookup that has to read a filter from disk costs far more than the value
  read itself): measured at 5.4 bytes per entry (bloom 10 bits/key over the
  key and its 8-byte prefix, and a 4 KiB-block index), budgeted at
  METADATA_BYTES_PER_ENTRY of a full shard, or BLOCK_CACHE_SHARE of the
  budget if that is larger, so recently read data blocks stay too.
- Memtables: two (the active one and the one being flushed), each
  MEMTABLE_SHARE of the budget, at most 64 MiB (larger memtables make fewer
  SST files, but intra-L0 compaction already merges them; store.py).
- The process itself: BASE_BYTES, what Python, gRPC and RocksDB take before
  any entry is held (measured idle RSS 64 MiB), the free heap glibc keeps
  instead of returning it (MALLOC_KEEP_BYTES, set by the shard's main; it
  spares every message page faults, common/malloc_tuning.py), and messages
  being parsed and answered, and RocksDB's flush and compaction buffers.

The tier's bound is two numbers (entries and value bytes, see memory.py); a
tier entry costs its value plus ENTRY_OVERHEAD bytes (measured 137 bytes
once the record ring has gone round: the value's bytes object header, two
places in the ring, two index slots; see memory.py), so both are set for values of the default
model's width: with smaller values the entry bound holds the tier within
its share, with wider ones the byte bound does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIB = 1024 * 1024
MALLOC_KEEP_BYTES = 32 * MIB
# Idle process + kept free heap + messages in flight and RocksDB's flush and compaction buffers: the
# last share was 32 MiB until the 10M-entry run peaked 94 MB over a 2 GiB budget (bench/shard_scale.py).
BASE_BYTES = 64 * MIB + MALLOC_KEEP_BYTES + 128 * MIB
ENTRY_OVERHEAD = 144
TYPICAL_VALUE_BYTES = 774  # 384-wide float16 + the codec's 6-byte header
METADATA_BYTES_PER_ENTRY = 8
BLOCK_CACHE_SHARE = 8  # at least budget / 8 for the block cache
MEMTABLE_SHARE = 16  # each memtable: budget / 16, capped by the caller
MIN_BLOCK_CACHE = 8 * MIB
MIN_TIER_BYTES = 16 * MIB
MIN_BUDGET = 320 * MIB

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": MIB,
          "g": 10**9, "gb": 10**9, "gib": 1024 * MIB, "t": 10**12, "tb": 10**12, "tib": 1024**4}


def parse_bytes(text: str | int) -> int:
    """'2GiB' -> 2147483648, '512M' -> 512000000, '1000' -> 1000; '0' -> 0."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in _UNITS:
        raise ValueError(f"expected a size such as 2GiB, 512MiB or 1000000, got {text!r}")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def show_bytes(n: int) -> str:
    """The inverse for round figures: 2147483648 -> '2GiB' (else plain bytes)."""
    for unit, size in (("GiB", 1024 * MIB), ("MiB", MIB)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    memtable_bytes: int  # each; at most two exist
    block_cache_bytes: int
    tier_entries: int
    tier_value_bytes: int

    @property
    def tier_bytes(self) -> int:
        """What the tier may occupy when full of default-width values (the tier's share)."""
        return self.tier_entries * ENTRY_OVERHEAD + self.tier_value_bytes


def plan(budget: int, max_entries: int, memtable_cap: int, memtables: int) -> MemoryPlan:
    """Split `budget` bytes; raises ValueError (one line) when it cannot hold the fixed parts."""
    if budget < MIN_BUDGET:
        raise ValueError(f"--memory-budget must be at least {MIN_BUDGET // MIB} MiB")
    rest = budget - BASE_BYTES
    memtable = max(64 * 1024, min(memtable_cap, rest // MEMTABLE_SHARE))
    block_cache = max(MIN_BLOCK_CACHE, rest // BLOCK_CACHE_SHARE, METADATA_BYTES_PER_ENTRY * max_entries)
    tier = rest - memtables * memtable - block_cache
    if tier < MIN_TIER_BYTES:
        raise ValueError(f"--memory-budget {show_bytes(budget)} is too small for --max-entries {max_entries}: the "
                         f"block cache needs {block_cache // MIB} MiB for index and filter blocks, the memtables "
                         f"{memtables * memtable // MIB} MiB, the process {BASE_BYTES // MIB} MiB, and the memory "
                         f"tier at least {MIN_TIER_BYTES // MIB} MiB")
    entries = tier // (TYPICAL_VALUE_BYTES + ENTRY_OVERHEAD)
    return MemoryPlan(budget, memtable, block_cache, entries, entries * TYPICAL_VALUE_BYTES)

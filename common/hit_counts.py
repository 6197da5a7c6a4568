"""What every cache level counts, whichever process it lives in.

The frontend's L1 and L2 views (embedding/stats.py) and the cache shard's own counters
(cacheshard/shard.py) all answer "how many lookups hit, missed, or failed"; one class holds that,
with the hit rate defined once, and each level adds what only it counts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HitCounts:
    """Since process start; only touched from the event loop thread."""

    hits: int = 0
    misses: int = 0
    errors: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

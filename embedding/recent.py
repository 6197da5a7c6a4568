"""The most recently used texts, for pre-warming a new model (PrewarmCache).

The caches hold keys and vectors, not texts, so a new model cannot be warmed
from them. This keeps the last `capacity` distinct (namespace, text) pairs a
request asked for, most recent last, bounded also by their total characters
so a few huge texts cannot hold much memory. Touching is O(1) per text.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class RecentTexts:
    def __init__(self, capacity: int, max_chars: int) -> None:
        self.capacity = capacity
        self.max_chars = max_chars
        self.chars = 0
        self._items: OrderedDict[tuple[str, str], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def touch(self, namespace: str, texts: Iterable[str]) -> None:
        if self.capacity <= 0:
            return
        items = self._items
        for text in texts:
            item = (namespace, text)
            if item in items:
                items.move_to_end(item)
                continue
            items[item] = None
            self.chars += len(text)
        while items and (len(items) > self.capacity or self.chars > self.max_chars):
            (_, old), _ = items.popitem(last=False)
            self.chars -= len(old)

    def latest(self, count: int) -> list[tuple[str, str]]:
        """Up to `count` (namespace, text) pairs, most recent first."""
        found = []
        for item in reversed(self._items):
            if len(found) >= count:
                break
            found.append(item)
        return found

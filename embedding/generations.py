"""Cache generations: invalidate every entry of a model fingerprint at once.

Keys are hashes of (fingerprint, tenant, text), so the shard cannot find a
fingerprint's entries to range-delete them. Instead the fingerprint that
enters the keys carries a generation: `fp` for generation 0, `fp#g<N>`
after N invalidations. Bumping the generation makes every old entry a miss
at once; the old entries then age out of the shard's FIFO bound like any
other.

The generation of a fingerprint lives in the cache itself, as one entry
under a reserved key (`record_key`) holding a one-wide codec value, so
every frontend of a stack reads the same number, and a frontend that
restarts finds it again. A frontend reads it when it adopts a fingerprint,
at once after its own bump, and then every `REFRESH_S` (a one-entry Scan
of its shard, which no hit figure counts): another frontend of the stack
sees a bump within that time. The frontend that bumped it writes it
back as often, so the FIFO bound never evicts it before the entries it
hides (they are all older). With L2 off the generation is this process's
alone.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from common import codec
from common.cache_key import cache_key

log = logging.getLogger(__name__)

_RECORD = "sutra.cache-generation.v1"
# Seconds between reads of a fingerprint's generation (and re-writes of one this frontend bumped).
REFRESH_S = 30.0


def effective(fingerprint: str, generation: int) -> str:
    """The fingerprint string that enters cache keys."""
    return fingerprint if generation <= 0 else f"{fingerprint}#g{generation}"


def record_key(fingerprint: str) -> bytes:
    """Where the generation of `fingerprint` is stored (never a text's key: its fingerprint part differs)."""
    return cache_key(_RECORD, fingerprint)


def encode(generation: int) -> bytes:
    return codec.encode(np.array([float(generation)], dtype=np.float32), "float32")


def decode(value: bytes) -> int:
    return int(codec.decode(value, width=1)[0])


class Generations:
    """The known generation of each fingerprint, kept in step with the cache (see the module doc)."""

    def __init__(self, l2=None, timeout_s: float = 2.0, refresh_s: float = REFRESH_S) -> None:
        self._l2 = l2  # embedding.l2_client.L2Client or None
        self._timeout_s = timeout_s
        self._refresh_s = refresh_s
        self.known: dict[str, int] = {}
        self._read_at: dict[str, float] = {}
        self._bumped: set[str] = set()  # fingerprints this frontend invalidated: it keeps their records young

    def key_fingerprint(self, fingerprint: str) -> str:
        return effective(fingerprint, self.known.get(fingerprint, 0))

    async def refresh(self, fingerprint: str | None, force: bool = False) -> int:
        """Read the stored generation, at most every `refresh_s` unless `force` (it never goes back:
        a shard that lost the record or does not answer leaves the known one); keeps a record this
        frontend wrote young."""
        if fingerprint is None:
            return 0
        now = time.monotonic()
        due = force or now - self._read_at.get(fingerprint, -self._refresh_s) >= self._refresh_s
        if self._l2 is not None and due:
            self._read_at[fingerprint] = now
            value = await self._read(fingerprint)
            if value is not None:
                try:
                    stored = decode(value)
                except codec.CorruptValue:
                    stored = 0
                if stored > self.known.get(fingerprint, 0):
                    log.warning("cache generation of %s is now %d (invalidated by another frontend)",
                                fingerprint[:12], stored)
                    self.known[fingerprint] = stored
            if fingerprint in self._bumped:
                await self._write(fingerprint)
        return self.known.get(fingerprint, 0)

    async def bump(self, fingerprint: str) -> int:
        """Start a new generation: every entry of `fingerprint` reads as a miss from now on."""
        await self.refresh(fingerprint, force=True)
        self.known[fingerprint] = self.known.get(fingerprint, 0) + 1
        self._bumped.add(fingerprint)
        await self._write(fingerprint)
        return self.known[fingerprint]

    async def _read(self, fingerprint: str) -> bytes | None:
        """The stored record, read with the shard's Scan (one entry from just before its key) rather
        than a Lookup, so it never counts in anyone's cache hit figures; None if absent or unreadable."""
        key = record_key(fingerprint)
        before = (int.from_bytes(key, "big") - 1).to_bytes(len(key), "big")
        found = None
        for shard in self._l2.owners(key):  # every copy: the highest generation wins
            try:
                page = await shard.scan(before, 1, self._timeout_s)
            except Exception as exc:  # noqa: BLE001 - the known generation stays; the next round tries again
                log.debug("could not read the cache generation of %s: %r", fingerprint[:12], exc)
                continue
            if page.entries and page.entries[0].key == key and (found is None or _newer(page.entries[0].value, found)):
                found = page.entries[0].value
        return found

    async def _write(self, fingerprint: str) -> None:
        if self._l2 is None:
            return
        key = record_key(fingerprint)
        for shard in self._l2.owners(key):
            try:
                await shard.store([(key, encode(self.known[fingerprint]))], self._timeout_s)
            except Exception as exc:  # noqa: BLE001 - kept here; the next round writes it again
                log.warning("could not store the cache generation of %s on %s: %r", fingerprint[:12],
                            shard.address, exc)


def _newer(value: bytes, than: bytes) -> bool:
    try:
        return decode(value) > decode(than)
    except codec.CorruptValue:
        return False

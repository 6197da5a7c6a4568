"""The shard's in-memory tier: a bounded map of recently stored or read values.

Why it exists: rocksdict holds the GIL for a whole multi-get and costs about
0.8 us per key even when RocksDB answers from its row cache, while a lookup
here costs well under 1 us per key whatever the tier holds. Serving repeated
keys from here is what lets a Python shard keep pace with Redis; RocksDB
stays the durable, bounded store behind it and answers everything this tier
does not hold (for example after a restart, when the tier starts empty).

Why not a dict: a dict hit walks four objects scattered over the heap (the
index, the entry, the key, the value), one interpreter step after another,
so the CPU cannot overlap the cache misses. Measured with 774-byte values:
0.3-0.4 us a key at 20k entries, 1.1-1.2 us at 1M and beyond (issue 18's
goal is a lookup rate that does not fall with size). Here a batch is looked
up as arrays: every key's bucket is gathered at once, so the misses of 256
keys overlap, and the cost per key stays flat from 20k to 10M entries.

Layout. Keys are cache keys: 16 uniformly hashed bytes, read as two
64-bit halves.
- Records: a ring of RING_SHARE x `max_entries` places in insertion order,
  holding each entry's key, value length, index slot and value (a bytes
  object, so an answer hands protobuf the object itself and copies nothing
  here). Eviction is oldest first (FIFO, like the FIFO-compacted store
  behind it); a hit does not move an entry. A rewritten or deleted key
  leaves a dead record that eviction skips; the ring has room for as many
  dead records as live ones, so rewrites do not cost live capacity.
- Index: buckets of SLOTS 64-bit slots, each the key's tag above its record
  + 1 (0 = empty); at most LOAD live entries per slot, so a bucket is rarely
  full (at LOAD 0.5, ~0.8% of buckets of 16). The home bucket and the tag
  are two multiply-add hashes of both halves with secret random salts, so
  keys cannot be chosen to share a bucket or a tag, and a tag is odd, so it
  never reads as an empty slot. When the home bucket is full a key goes to
  the next one with a free slot. Each bucket counts the held keys that
  passed it that way (`_passing`), and a lookup moves on to the next bucket
  only from a bucket whose count is not 0. So deleting is just clearing a
  slot and uncounting the passes (no tombstones, no rebuild), and a miss is
  answered by one bucket almost always.
- The record named by the first slot with the key's tag is confirmed by its
  stored key (all 16 bytes). A key whose bucket holds its tag twice (chance
  about 2^-27 per lookup) or that a full bucket passed on takes a
  one-key-at-a-time path, so the answer is always exact.

Rules: only values that passed the codec check enter (Store validates them;
reads from RocksDB are screened first), so a hit here is always a valid
value. Two bounds hold after every `put_many`: entries and value bytes. The
byte bound is what keeps wide values (a caller may store up to --max-width)
from growing the process; the entry bound covers the per-entry overhead
(ENTRY_OVERHEAD in budget.py) that value bytes do not count. Values are
deterministic per key (the key hashes model fingerprint and text), so a
value that outlives its RocksDB copy here is still the right answer. Used
only from the event loop thread. Callers pass keys of KEY_BYTES each (the
shard checks them before anything reaches the tier).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

from common.cache_key import KEY_BYTES

SLOTS = 16  # slots per bucket: 128 bytes, two cache lines
LOAD = 0.5  # live entries per slot when the tier is full
MAX_ENTRIES = 2**32 - 2  # a slot holds its record + 1 in 32 bits
RING_SHARE = 2  # ring places per entry: rewritten and deleted keys leave dead records behind
SMALL = 8  # batches up to this size are looked up one key at a time in Python: numpy's fixed cost per call
# (~1 us, some 25 calls a batch) is more than the whole Python path for a few keys
_M64 = (1 << 64) - 1
_LOW = np.uint64(0xFFFFFFFF)
_HIGH = np.uint64(32)
_ONE = np.uint64(1)


def _check(keys: Sequence[bytes]) -> None:
    if keys and set(map(len, keys)) != {KEY_BYTES}:
        raise ValueError(f"memory tier keys have {KEY_BYTES} bytes each")


def _halves(keys: Sequence[bytes]) -> np.ndarray:
    """Keys (checked) -> an (n, 2) array of their 64-bit halves."""
    return np.frombuffer(b"".join(keys), np.uint64).reshape(-1, 2)


class MemoryTier:
    def __init__(self, max_entries: int, max_bytes: int, *, buckets: int | None = None) -> None:
        """`buckets` overrides the index size (tests use a tiny one to force overflow chains)."""
        if max_entries > MAX_ENTRIES:
            raise ValueError(f"the memory tier holds at most {MAX_ENTRIES} entries")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # value bytes held
        self._live = 0
        cap = max_entries if self.enabled else 0
        self._cap = cap
        ring = RING_SHARE * cap
        self._ring = ring
        # Never fewer slots than records, so a free slot always exists.
        nb = max(buckets or -(-cap // int(SLOTS * LOAD)), -(-cap // SLOTS), 1)
        self._nb = nb
        self._salt_ints = tuple(secrets.randbits(64) | 1 for _ in range(4))
        self._salts = np.array(self._salt_ints, np.uint64)
        # A slot: the key's tag above its record + 1; 0 = empty.
        self._slots = np.zeros((nb, SLOTS), np.uint64)
        self._slots_flat = self._slots.reshape(-1)
        # How many held keys live past this bucket although their chain starts at or before it: a
        # lookup goes on to the next bucket only from a bucket where this is not 0.
        self._passing = np.zeros(nb, np.int64)
        # The record ring; record r holds sequence numbers r, r + ring, r + 2 ring, ...
        self._rec_key = np.zeros((ring, 2), np.uint64)
        self._rec_len = np.zeros(ring, np.int32)  # 0 once dead (a value is at most --max-request-bytes)
        self._rec_slot = np.zeros(ring, np.int32 if nb * SLOTS < 2**31 - 1 else np.int64)  # slot + 1; 0 = dead
        self._values: list[bytes | None] = [None] * ring
        self._head = 0  # sequence number of the next record
        self._tail = 0  # sequence number of the oldest record still in the ring

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return self._live

    # --- reads ---------------------------------------------------------------

    def _hashes(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys' home buckets and tags: two salted multiply-add hashes of both halves, so keys that
        share a half (or any chosen pattern) still spread, and the top bits pick the bucket. A tag is
        odd, so it never reads as an empty slot."""
        k0, k1 = q[:, 0], q[:, 1]
        s = self._salts
        home = (((k0 * s[0] + k1 * s[1]) >> _HIGH) * np.uint64(self._nb)) >> _HIGH
        return home.astype(np.int64), ((k0 * s[2] + k1 * s[3]) >> _HIGH) | _ONE

    def _find(self, q: np.ndarray) -> np.ndarray:
        """Each key's record (rows of `q` are key halves), -1 where the tier does not hold it.

        One gather of every key's home bucket answers almost every key: the
        first slot with the key's tag names a record, whose stored key
        confirms it (a slot without the tag names some other record, which
        does not confirm). Only keys with two tag matches in their bucket, or
        whose bucket other keys passed, take the one-key path."""
        n = len(q)
        b, tag = self._hashes(q)
        slots = self._slots[b]
        tagged = (slots >> _HIGH) == tag[:, None]
        j = tagged.argmax(1)
        rec = (slots[np.arange(n), j] & _LOW).astype(np.int64) - 1
        same = (self._rec_key[rec] == q).all(1) & (rec >= 0)  # rec -1 reads the last record: not confirmed
        if same.all():
            return rec
        rec[~same] = -1
        again = np.flatnonzero(~same & ((tagged.sum(1) > 1) | (self._passing[b] > 0)))
        if again.size:
            rec[again] = self._find_small([q[i].tobytes() for i in again.tolist()])
        return rec

    def _find_small(self, keys: Sequence[bytes]) -> list[int]:
        """`_find` for a few keys, with Python ints: the same hashes (numpy's uint64 arithmetic
        wraps at 64 bits, as the masks do here), the same buckets and chains, every slot of a
        bucket compared (so also the path for keys whose bucket holds their tag twice)."""
        s0, s1, s2, s3 = self._salt_ints
        nb, slots, passing, rec_key = self._nb, self._slots, self._passing, self._rec_key
        out = []
        for key in keys:
            k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
            b = ((((k0 * s0 + k1 * s1) & _M64) >> 32) * nb) >> 32
            tag = (((k0 * s2 + k1 * s3) & _M64) >> 32) | 1
            found = -1
            for _ in range(nb):  # each bucket at most once
                for slot in slots[b].tolist():
                    if slot >> 32 == tag and rec_key[(slot & 0xFFFFFFFF) - 1].tobytes() == key:
                        found = (slot & 0xFFFFFFFF) - 1
                        break
                if found >= 0 or not passing[b]:
                    break
                b = (b + 1) % nb
            out.append(found)
        return out

    def lookup(self, keys: Sequence[bytes]) -> tuple[list[bytes | None], list[int]]:
        """Each key's value (None where the tier lacks it), and the positions of those misses."""
        _check(keys)
        rec = self._records(keys)
        get = self._values.__getitem__
        if rec.min(initial=0) >= 0:
            return list(map(get, rec.tolist())), []
        return [get(r) if r >= 0 else None for r in rec.tolist()], np.flatnonzero(rec < 0).tolist()

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return self.lookup(keys)[0]

    # --- writes --------------------------------------------------------------

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Hold these entries as the newest; within a batch the last copy of a key wins."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        if not self.enabled or not keys:
            return
        _check(keys)
        q = _halves(keys)
        m = len(keys)
        last = dict(zip(keys, range(m)))
        if len(last) != m:  # a key repeated within the batch
            keep = np.array(sorted(last.values()))
            q, keys, values = q[keep], [keys[i] for i in keep.tolist()], [values[i] for i in keep.tolist()]
        lengths = np.fromiter(map(len, values), np.int64, len(values))
        rewritten = self._records(keys, q)
        self._drop(rewritten[rewritten >= 0])  # a rewritten key becomes the newest, as in RocksDB's files
        small = lengths <= self.max_bytes
        if not small.all():  # a value wider than the whole tier is not held (and evicts nothing)
            q, lengths = q[small], lengths[small]
            values = [v for v, ok in zip(values, small.tolist()) if ok]
        # What fits at all: the newest entries within both bounds.
        fit = min(len(lengths), self._cap, int(np.searchsorted(np.cumsum(lengths[::-1]), self.max_bytes, "right")))
        if fit < len(lengths):  # the batch alone fills the tier: everything older goes too
            start = len(lengths) - fit
            q, lengths, values = q[start:], lengths[start:], values[start:]
            self._make_room(self._cap, self.max_bytes)
        if not fit:
            return
        size = int(lengths.sum())
        self._make_room(fit, size)
        recs = (self._head + np.arange(fit)) % self._ring
        self._rec_key[recs], self._rec_len[recs] = q, lengths
        held = self._values
        for r, value in zip(recs.tolist(), values):
            held[r] = value
        self._head += fit
        self._live += fit
        self.bytes += size
        self._rec_slot[recs] = self._place(q, recs) + 1

    def delete_many(self, keys: Sequence[bytes]) -> None:
        if not self._live or not keys:
            return
        _check(keys)
        rec = self._records(keys)
        self._drop(np.unique(rec[rec >= 0]))

    def _records(self, keys: Sequence[bytes], q: np.ndarray | None = None) -> np.ndarray:
        """The (checked) keys' records, -1 where not held, by whichever path is cheaper for their
        number; `q` is their halves when the caller has them already."""
        if not self._live:
            return np.full(len(keys), -1, np.int64)
        if len(keys) <= SMALL:
            return np.array(self._find_small(keys), np.int64)
        return self._find(_halves(keys) if q is None else q)

    def _drop(self, recs: np.ndarray) -> None:
        """Forget live records `recs` (distinct): clear their index slots; their ring places stay until evicted."""
        if not recs.size:
            return
        slot = self._rec_slot[recs] - 1
        home = self._hashes(self._rec_key[recs])[0]
        moved = np.flatnonzero(slot // SLOTS != home)
        for i in moved.tolist():  # rare: a key stored past its home bucket no longer passes those between
            b, end = int(home[i]), int(slot[i]) // SLOTS
            while b != end:
                self._passing[b] -= 1
                b = (b + 1) % self._nb
        self._slots_flat[slot] = 0
        self._rec_slot[recs] = 0
        self.bytes -= int(self._rec_len[recs].sum())
        self._rec_len[recs] = 0
        self._live -= recs.size
        held = self._values
        for r in recs.tolist():
            held[r] = None

    def _make_room(self, count: int, size: int) -> None:
        """Evict the oldest records until `count` more entries of `size` more bytes fit: in the ring,
        within --memory-entries live entries and within --memory-bytes."""
        held = self._head - self._tail
        evict = max(0, held + count - self._ring)
        live_over = self._live + count - self.max_entries
        bytes_over = self.bytes + size - self.max_bytes
        if live_over > 0 or bytes_over > 0:  # the fewest oldest records that cover both excesses
            window = max(evict, 64)
            while True:
                window = min(window, held)
                recs = (self._tail + np.arange(window)) % self._ring
                at = -1
                if live_over > 0:
                    at = int(np.searchsorted(np.cumsum(self._rec_slot[recs] > 0), live_over))
                if bytes_over > 0:
                    at = max(at, int(np.searchsorted(np.cumsum(self._rec_len[recs], dtype=np.int64), bytes_over)))
                if at < window or window == held:
                    evict = max(evict, min(at + 1, held))
                    break
                window *= 4
        if evict:
            recs = (self._tail + np.arange(evict)) % self._ring
            self._drop(recs[self._rec_slot[recs] > 0])
            self._tail += evict

    def _place(self, q: np.ndarray, recs: np.ndarray) -> np.ndarray:
        """Put records `recs` (keys not in the index) into free slots; returns their slots.

        Keys that share a bucket in one round take its free slots in turn
        (their rank among them); those beyond its free slots move on to the
        next bucket, and each bucket they pass counts them in `_passing`."""
        out = np.empty(len(q), np.int64)
        home, tag = self._hashes(q)
        packed = (tag << _HIGH) | (recs.astype(np.uint64) + _ONE)
        todo = np.arange(len(q))
        while todo.size:
            order = np.argsort(home[todo], kind="stable")
            todo = todo[order]
            b = home[todo]
            rank = np.arange(todo.size) - np.searchsorted(b, b, "left")
            taken = np.cumsum(self._slots[b] == 0, axis=1)
            fits = taken[:, -1] > rank
            j = (taken <= rank[:, None]).sum(1)  # where the (rank+1)-th free slot is
            placed, at = todo[fits], b[fits] * SLOTS + j[fits]
            self._slots_flat[at] = packed[placed]
            out[placed] = at
            spill = ~fits
            if spill.any():
                np.add.at(self._passing, b[spill], 1)
                home[todo[spill]] = (b[spill] + 1) % self._nb
            todo = todo[spill]
        return out

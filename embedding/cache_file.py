"""The cache export file: what ExportCache streams, written to disk by `sutra cache export`
and read back by `sutra cache import`, so a cache moves between stacks.

Layout: the magic line b"SUTRA-CACHE 1\n", then one record per entry:
key length (u16, little-endian), value length (u32), key, value. Values
stay in the cache codec, and keys are the stack's cache keys (fingerprint,
generation, tenant and text hashed), so entries only hit in a stack that
serves the same model fingerprint; others simply never read them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

MAGIC = b"SUTRA-CACHE 1\n"
_RECORD = struct.Struct("<HI")


class BadCacheFile(ValueError):
    """Not an export file, or cut short."""


def write(out: BinaryIO, entries: Iterable[tuple[bytes, bytes]]) -> int:
    out.write(MAGIC)
    n = 0
    for key, value in entries:
        out.write(_RECORD.pack(len(key), len(value)))
        out.write(key)
        out.write(value)
        n += 1
    return n


def read(source: BinaryIO) -> Iterator[tuple[bytes, bytes]]:
    if source.read(len(MAGIC)) != MAGIC:
        raise BadCacheFile("not a sutra cache export (bad magic line)")
    while True:
        head = source.read(_RECORD.size)
        if not head:
            return
        if len(head) != _RECORD.size:
            raise BadCacheFile("file cut short inside a record header")
        key_len, value_len = _RECORD.unpack(head)
        key, value = source.read(key_len), source.read(value_len)
        if len(key) != key_len or len(value) != value_len:
            raise BadCacheFile("file cut short inside a record")
        yield key, value

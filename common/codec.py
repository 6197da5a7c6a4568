"""The cache value codec: a small versioned header, then the full-width vector.

Layout (little-endian): magic b"SV" | version u8 | dtype u8 | width u16 | data.
float16 is the default: half the bytes of float32, and the cosine error it
adds is measured by bench/quality.py. A value that does not parse is a
`CorruptValue`, which every reader turns into a cache miss.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = b"SV"
VERSION = 1
_HEADER = struct.Struct("<2sBBH")
HEADER_SIZE = _HEADER.size

DTYPES: dict[str, tuple[int, np.dtype]] = {
    "float16": (1, np.dtype("<f2")),
    "float32": (2, np.dtype("<f4")),
}
_BY_CODE = {code: dt for code, dt in DTYPES.values()}


class CorruptValue(ValueError):
    """The bytes are not a value this codec version can read."""


def encode(vector: np.ndarray, dtype: str = "float16") -> bytes:
    code, dt = DTYPES[dtype]
    vec = np.asarray(vector).reshape(-1)
    return _HEADER.pack(MAGIC, VERSION, code, vec.shape[0]) + vec.astype(dt, copy=False).tobytes()


def encode_many(vectors: np.ndarray, dtype: str = "float16") -> list[bytes]:
    """Encode each row of a (n, D) array; one header per row."""
    code, dt = DTYPES[dtype]
    rows = np.ascontiguousarray(np.asarray(vectors), dtype=dt)
    header = _HEADER.pack(MAGIC, VERSION, code, rows.shape[1])
    return [header + row.tobytes() for row in rows]


def decode(value: bytes, width: int | None = None) -> np.ndarray:
    """bytes -> float32 vector; raises CorruptValue (and checks `width` if given)."""
    if len(value) < HEADER_SIZE:
        raise CorruptValue("value shorter than its header")
    magic, version, code, n = _HEADER.unpack_from(value)
    if magic != MAGIC or version != VERSION:
        raise CorruptValue(f"unknown value format (magic={magic!r}, version={version})")
    dt = _BY_CODE.get(code)
    if dt is None:
        raise CorruptValue(f"unknown dtype code {code}")
    if len(value) != HEADER_SIZE + n * dt.itemsize:
        raise CorruptValue("value length does not match its header")
    if width is not None and n != width:
        raise CorruptValue(f"value width {n} != expected {width}")
    return np.frombuffer(value, dtype=dt, offset=HEADER_SIZE).astype(np.float32)


def is_valid(value: bytes) -> bool:
    try:
        decode(value)
    except CorruptValue:
        return False
    return True

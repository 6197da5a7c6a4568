"""The cache value codec: a small versioned header, then the full-width vector.

Layout (little-endian): magic b"SV" | version u8 | kind u8 | width u16 | data.
In version 2, `kind`'s low four bits name the dtype and bit 7 says that the
text was cut to the model window: the flag travels inside the value, so a
vector and its truncation marker are one write and can never be split by a
dropped or failed write. Version 1 values (no flag) still decode; their
truncation is unknown (None), and a reader that cares treats them as misses.

float16 is the default: half the bytes of float32, and the cosine error it
adds is measured by bench/quality.py. A value that does not parse is a
`CorruptValue`, which every reader turns into a cache miss.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

import numpy as np

MAGIC = b"SV"
VERSION = 2
_UNFLAGGED_VERSION = 1
_TRUNCATED = 0x80
_DTYPE_BITS = 0x0F
_HEADER = struct.Struct("<2sBBH")
HEADER_SIZE = _HEADER.size

DTYPES: dict[str, tuple[int, np.dtype]] = {
    "float16": (1, np.dtype("<f2")),
    "float32": (2, np.dtype("<f4")),
}
_BY_CODE = {code: dt for code, dt in DTYPES.values()}


class CorruptValue(ValueError):
    """The bytes are not a value this codec version can read."""


def encode(vector: np.ndarray, dtype: str = "float16", truncated: bool = False) -> bytes:
    code, dt = DTYPES[dtype]
    vec = np.asarray(vector).reshape(-1)
    kind = code | (_TRUNCATED if truncated else 0)
    return _HEADER.pack(MAGIC, VERSION, kind, vec.shape[0]) + vec.astype(dt, copy=False).tobytes()


def encode_many(vectors: np.ndarray, dtype: str = "float16", truncated: Collection[int] = ()) -> list[bytes]:
    """Encode each row of a (n, D) array; one header per row, flagged for the rows in `truncated`."""
    code, dt = DTYPES[dtype]
    rows = np.ascontiguousarray(np.asarray(vectors), dtype=dt)
    header = _HEADER.pack(MAGIC, VERSION, code, rows.shape[1])
    if not truncated:
        return [header + row.tobytes() for row in rows]
    flagged = _HEADER.pack(MAGIC, VERSION, code | _TRUNCATED, rows.shape[1])
    return [(flagged if i in truncated else header) + row.tobytes() for i, row in enumerate(rows)]


def decode_entry(value: bytes, width: int | None = None) -> tuple[np.ndarray, bool | None]:
    """bytes -> (float32 vector, truncated); truncated is None for a version 1 value, which
    cannot say. Raises CorruptValue (and checks `width` if given)."""
    if len(value) < HEADER_SIZE:
        raise CorruptValue("value shorter than its header")
    magic, version, kind, n = _HEADER.unpack_from(value)
    if magic != MAGIC or version not in (VERSION, _UNFLAGGED_VERSION):
        raise CorruptValue(f"unknown value format (magic={magic!r}, version={version})")
    if version == _UNFLAGGED_VERSION:
        code, truncated = kind, None
    else:
        if kind & ~(_DTYPE_BITS | _TRUNCATED):
            raise CorruptValue(f"unknown flags in kind byte {kind:#04x}")
        code, truncated = kind & _DTYPE_BITS, bool(kind & _TRUNCATED)
    dt = _BY_CODE.get(code)
    if dt is None:
        raise CorruptValue(f"unknown dtype code {code}")
    if len(value) != HEADER_SIZE + n * dt.itemsize:
        raise CorruptValue("value length does not match its header")
    if width is not None and n != width:
        raise CorruptValue(f"value width {n} != expected {width}")
    return np.frombuffer(value, dtype=dt, offset=HEADER_SIZE).astype(np.float32), truncated


def decode(value: bytes, width: int | None = None) -> np.ndarray:
    """bytes -> float32 vector; raises CorruptValue (and checks `width` if given)."""
    return decode_entry(value, width)[0]


def is_valid(value: bytes) -> bool:
    try:
        decode(value)
    except CorruptValue:
        return False
    return True

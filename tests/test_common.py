"""Unit tests for the shared pieces: Matryoshka transform, width policy, key, codec."""

import numpy as np
import pytest

from common import codec
from common.cache_key import cache_key
from common.errors import InvalidInput
from common.matryoshka import WidthPolicy, parse_widths, reduce


def test_reduce_truncates_and_normalises():
    rng = np.random.default_rng(0)
    full = rng.normal(size=(5, 384)).astype(np.float32)
    out = reduce(full, 64, layer_norm=False)
    assert out.shape == (5, 64) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_reduce_with_layer_norm_differs_and_is_unit():
    rng = np.random.default_rng(1)
    full = rng.normal(loc=0.5, size=(3, 384)).astype(np.float32)
    plain = reduce(full, 128, layer_norm=False)
    ln = reduce(full, 128, layer_norm=True)
    assert not np.allclose(plain, ln)
    np.testing.assert_allclose(np.linalg.norm(ln, axis=1), 1.0, rtol=1e-5)


def test_width_policy_resolves_and_rejects():
    policy = WidthPolicy(native_width=384, min_width=32, default_width=256)
    assert policy.resolve(0) == 256
    assert policy.resolve(100) == 100
    with pytest.raises(InvalidInput, match="32 to 384"):
        policy.resolve(385)
    restricted = WidthPolicy(native_width=384, default_width=128, allowed=(64, 128, 384))
    with pytest.raises(InvalidInput, match="one of 64, 128, 384"):
        restricted.resolve(100)
    with pytest.raises(ValueError):
        WidthPolicy(native_width=384, default_width=100, allowed=(64, 128))
    assert parse_widths("256, 64,128") == (64, 128, 256)


def test_cache_key_separates_fields():
    assert len(cache_key("fp", "text")) == 16
    assert cache_key("fp", "text") == cache_key("fp", "text")
    assert cache_key("fp1", "text") != cache_key("fp2", "text")
    assert cache_key("fp", "text", tenant="a") != cache_key("fp", "text", tenant="b")
    assert cache_key("fp", "ab", tenant="") != cache_key("fp", "b", tenant="a")


def test_codec_round_trip_and_corruption():
    vec = np.linspace(-1, 1, 384, dtype=np.float32)
    for dtype in ("float16", "float32"):
        value = codec.encode(vec, dtype)
        back = codec.decode(value, width=384)
        np.testing.assert_allclose(back, vec, atol=1e-3 if dtype == "float16" else 0)
    assert len(codec.encode(vec)) == codec.HEADER_SIZE + 384 * 2
    rows = codec.encode_many(np.stack([vec, -vec]))
    assert codec.decode(rows[1])[0] == pytest.approx(1.0, abs=1e-3)
    good = codec.encode(vec)
    for bad in (b"", b"xx", b"XX" + good[2:], good[:-1], good[:2] + b"\x09" + good[3:]):
        with pytest.raises(codec.CorruptValue):
            codec.decode(bad)
    with pytest.raises(codec.CorruptValue):
        codec.decode(good, width=256)


def test_codec_carries_the_truncation_flag_in_the_value():
    """A vector and its 'truncated' flag are one value: no separate write can be lost."""
    vec = np.linspace(-1, 1, 8, dtype=np.float32)
    for dtype in codec.DTYPES:
        assert codec.decode_entry(codec.encode(vec, dtype))[1] is False
        flagged, truncated = codec.decode_entry(codec.encode(vec, dtype, truncated=True), width=8)
        assert truncated is True
        np.testing.assert_allclose(flagged, vec, atol=1e-3)
    rows = codec.encode_many(np.stack([vec, -vec, vec]), truncated={1})
    assert [codec.decode_entry(r)[1] for r in rows] == [False, True, False]
    assert len(rows[1]) == len(rows[0]) == codec.HEADER_SIZE + 8 * 2
    # A version 1 value (written before the flag existed) decodes; its truncation is unknown.
    v1 = rows[0][:2] + b"\x01" + rows[0][3:]
    vector, truncated = codec.decode_entry(v1)
    assert truncated is None and vector[0] == pytest.approx(-1.0, abs=1e-3)
    # Version 1 never had flag bits; unknown bits in version 2 are corrupt, not ignored.
    with pytest.raises(codec.CorruptValue):
        codec.decode(rows[1][:2] + b"\x01" + rows[1][3:])
    with pytest.raises(codec.CorruptValue):
        codec.decode(rows[0][:3] + bytes([rows[0][3] | 0x40]) + rows[0][4:])

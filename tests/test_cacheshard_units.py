"""In-process tests of the shard's pieces: the value check, the memory tier,
settings, and the RocksDB store (a real database in a temporary directory)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rocksdict
from hypothesis import given, settings as hsettings, strategies as st

from cacheshard.memory import MemoryTier
from cacheshard.settings import TRANSIENT_MARGIN, ShardSettings, load_settings
from cacheshard.store import FORMAT, MARKER, ShardStore, StartupError
from cacheshard.values import ValueChecker
from common import codec
from common.grpc_server import ServerOptions


def vectors(n: int, width: int = 384, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def shard_settings(path, **kw) -> ShardSettings:
    return ShardSettings(server=ServerOptions(), path=path, **kw)


# --- ValueChecker ---------------------------------------------------------

@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_checker_agrees_with_codec_on_arbitrary_bytes(raw):
    checker = ValueChecker()
    good = codec.encode(vectors(1, 8)[0])
    checker.is_valid(good)  # seed the memo so the fast path is exercised
    for value in (raw, good[:6] + raw, good[:len(raw) % len(good)]):
        assert checker.is_valid(value) == codec.is_valid(value)


def test_checker_screen_separates_hits_misses_and_corrupt():
    checker = ValueChecker()
    v16 = codec.encode_many(vectors(3), "float16")
    v32 = codec.encode(vectors(1, 64)[0], "float32")
    wrong_version = v16[0][:2] + bytes([codec.VERSION + 1]) + v16[0][3:]
    values = [v16[0], None, wrong_version, v16[1], v16[2][:-1], v32, b"", None]
    found, out, hits, corrupt = checker.screen(values)
    assert found == [True, False, False, True, False, True, False, False]
    assert out == [v16[0], b"", b"", v16[1], b"", v32, b"", b""]
    assert (hits, corrupt) == (3, 3)
    # Second pass goes through the memo and must give the same answer.
    assert checker.screen(values) == (found, out, hits, corrupt)


def test_checker_error_names_the_problem():
    checker = ValueChecker()
    assert checker.error(codec.encode(vectors(1)[0])) is None
    assert "header" in checker.error(b"xy")
    assert "unknown value format" in checker.error(b"XX" + b"\x01\x01\x00\x01" + b"\x00\x00")


# --- MemoryTier -----------------------------------------------------------

def test_memory_tier_evicts_oldest_first_and_stays_bounded():
    tier = MemoryTier(3)
    tier.put_many([b"a", b"b", b"c"], [b"1", b"2", b"3"])
    assert tier.get_many([b"a", b"x"]) == [b"1", None]
    tier.put_many([b"d", b"e"], [b"4", b"5"])
    assert len(tier) == 3
    assert tier.get_many([b"a", b"b", b"c", b"d", b"e"]) == [None, None, b"3", b"4", b"5"]


def test_memory_tier_off_holds_nothing():
    tier = MemoryTier(0)
    tier.put_many([b"a"], [b"1"])
    assert len(tier) == 0 and tier.get_many([b"a"]) == [None]


# --- settings -------------------------------------------------------------

def test_settings_from_flags_and_environment(tmp_path):
    env = {"SUTRA_CACHE_SHARD_PORT": "50999", "SUTRA_CACHE_SHARD_PATH": str(tmp_path / "env-db"),
           "SUTRA_CACHE_SHARD_SYNC": "1", "SUTRA_CACHE_SHARD_MAX_ENTRIES": "5000"}
    s = load_settings([], env)
    assert (s.server.port, s.path, s.sync, s.max_entries) == (50999, tmp_path / "env-db", True, 5000)
    s = load_settings(["--port", "1", "--max-entries", "7000"], env)
    assert (s.server.port, s.max_entries) == (1, 7000)


def test_budget_split_keeps_memtables_inside_the_budget(tmp_path):
    s = shard_settings(tmp_path, max_entries=100_000)
    assert s.sst_limit_bytes + 2 * s.memtable_bytes == s.budget_bytes
    assert 2 * s.memtable_bytes <= TRANSIENT_MARGIN * s.budget_bytes
    with pytest.raises(ValueError, match="at least"):
        shard_settings(tmp_path, max_entries=10)
    with pytest.raises(ValueError, match="max-batch"):
        shard_settings(tmp_path, max_batch=0)


# --- ShardStore on a real database ---------------------------------------

def test_store_roundtrip_marker_and_reopen(tmp_path):
    path = tmp_path / "db"
    keys = [bytes([i]) * 16 for i in range(50)]
    values = codec.encode_many(vectors(50))
    store = ShardStore(shard_settings(path))
    store.write(keys, values)
    assert store.multi_get(keys + [b"absent"]) == values + [None]
    store.close()
    assert json.loads((path / MARKER).read_text())["format"] == FORMAT
    store = ShardStore(shard_settings(path))
    assert store.multi_get(keys) == values
    assert store.entries() == 50
    store.close()


def test_store_refuses_foreign_or_future_directories(tmp_path):
    foreign = tmp_path / "foreign"
    db = rocksdict.Rdict(str(foreign))  # someone else's (pickle-mode) database
    db["k"] = 1
    db.close()
    with pytest.raises(StartupError, match="not a cache shard"):
        ShardStore(shard_settings(foreign))

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(StartupError, match="not empty"):
        ShardStore(shard_settings(junk))

    future = tmp_path / "future"
    ShardStore(shard_settings(future)).close()
    (future / MARKER).write_text(json.dumps({"format": FORMAT + 1}))
    with pytest.raises(StartupError, match=f"format {FORMAT + 1}"):
        ShardStore(shard_settings(future))

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StartupError, match="cannot create database directory"):
        ShardStore(shard_settings(blocker / "db"))


def test_checkpoint_is_complete_and_openable(tmp_path):
    store = ShardStore(shard_settings(tmp_path / "db"))
    keys = [bytes([i]) * 16 for i in range(20)]
    values = codec.encode_many(vectors(20))
    store.write(keys, values)
    dest = store.checkpoint(tmp_path / "copy")
    store.write([b"later" * 4], codec.encode_many(vectors(1)))
    with pytest.raises(FileExistsError):
        store.checkpoint(tmp_path / "copy")
    store.close()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    copy = ShardStore(shard_settings(dest))
    assert copy.multi_get(keys) == values
    assert copy.multi_get([b"later" * 4]) == [None]
    copy.close()

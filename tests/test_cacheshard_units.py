"""In-process tests of the shard's pieces: the value check, the memory tier,
settings, and the RocksDB store (a real database in a temporary directory)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import rocksdict
from hypothesis import given, settings as hsettings, strategies as st

from cacheshard.memory import MemoryTier
from cacheshard.settings import TRANSIENT_MARGIN, ShardSettings, load_settings
from cacheshard.shard import CHECKPOINT_NAME
from cacheshard.store import FORMAT, MARKER, ShardStore, StartupError, list_checkpoints
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


def test_checker_refuses_values_wider_than_its_bound_on_store_and_on_read():
    checker = ValueChecker(max_width=64)
    narrow, wide = codec.encode(vectors(1, 64)[0]), codec.encode(vectors(1, 65)[0])
    assert checker.error(narrow) is None and checker.is_valid(narrow)
    assert "width 65" in checker.error(wide) and "--max-width 64" in checker.error(wide)
    assert not checker.is_valid(wide)  # and not remembered as valid: the second answer is the same
    assert checker.screen([wide, narrow]) == ([False, True], [b"", narrow], 1, 1)


# --- MemoryTier -----------------------------------------------------------

def test_memory_tier_evicts_oldest_first_and_stays_bounded():
    tier = MemoryTier(3, 1 << 20)
    tier.put_many([b"a", b"b", b"c"], [b"1", b"2", b"3"])
    assert tier.get_many([b"a", b"x"]) == [b"1", None]
    tier.put_many([b"d", b"e"], [b"4", b"5"])
    assert len(tier) == 3 and tier.bytes == 3
    assert tier.get_many([b"a", b"b", b"c", b"d", b"e"]) == [None, None, b"3", b"4", b"5"]


def test_memory_tier_byte_bound_holds_for_wide_values():
    tier = MemoryTier(1000, 1000)
    tier.put_many([b"a", b"b"], [b"x" * 400, b"y" * 400])
    assert (len(tier), tier.bytes) == (2, 800)
    tier.put_many([b"c"], [b"z" * 300])  # 1100 bytes: the oldest goes
    assert (len(tier), tier.bytes) == (2, 700) and tier.get_many([b"a", b"b", b"c"])[0] is None
    tier.put_many([b"big"], [b"w" * 5000])  # wider than the whole budget: nothing of it stays
    assert (len(tier), tier.bytes) == (0, 0)
    for i in range(100):  # many wide values, in batches
        tier.put_many([b"k%d-%d" % (i, j) for j in range(10)], [b"v" * (50 + i)] * 10)
        assert tier.bytes <= 1000 and tier.bytes == sum(map(len, tier.get_many(tier._entries)))


def test_memory_tier_counts_rewritten_and_repeated_keys_once():
    tier = MemoryTier(10, 1000)
    tier.put_many([b"a", b"a", b"b"], [b"1" * 10, b"2" * 20, b"3" * 30])  # repeated within a batch
    assert (len(tier), tier.bytes) == (2, 50) and tier.get_many([b"a"]) == [b"2" * 20]
    tier.put_many([b"b", b"c"], [b"4" * 5, b"5" * 5])  # b rewritten: replaces its bytes, becomes newest
    assert (len(tier), tier.bytes) == (3, 30)
    tier.max_entries = 2
    tier.put_many([b"d"], [b"6"])
    assert tier.get_many([b"a", b"b", b"c", b"d"]) == [None, None, b"5" * 5, b"6"]


@pytest.mark.parametrize("entries, size", [(0, 100), (100, 0)])
def test_memory_tier_off_holds_nothing(entries, size):
    tier = MemoryTier(entries, size)
    tier.put_many([b"a"], [b"1"])
    assert not tier.enabled and len(tier) == 0 and tier.bytes == 0 and tier.get_many([b"a"]) == [None]


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


def test_backup_dir_defaults_beside_the_database_and_must_be_outside_it(tmp_path):
    s = load_settings(["--path", str(tmp_path / "db")], {})
    assert s.backups == tmp_path / "db-backups" and (s.keep, s.max_width, s.memory_bytes) == (3, 4096, 64 << 20)
    assert s.max_request_bytes == 4 << 20
    env = {"SUTRA_CACHE_SHARD_BACKUP_DIR": str(tmp_path / "b"), "SUTRA_CACHE_SHARD_KEEP": "0"}
    assert (load_settings(["--path", str(tmp_path / "db")], env).backups, load_settings([], env).keep) == \
        (tmp_path / "b", 0)
    for inside in (tmp_path / "db", tmp_path / "db" / "backups", tmp_path):
        with pytest.raises(ValueError, match="--backup-dir must be outside --path"):
            shard_settings(tmp_path / "db", backup_dir=inside)


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "/etc", "../x", "a\\b", "x" * 129, "a b",
                                  "a\n", "é", "a\x00"])
def test_checkpoint_names_are_single_plain_components(name):
    assert not CHECKPOINT_NAME.fullmatch(name)


@pytest.mark.parametrize("name", ["nightly", "2024-06-01T00.00", "a", "x" * 128, "_a-b.c", "-x"])
def test_checkpoint_names_allowed(name):
    assert CHECKPOINT_NAME.fullmatch(name)


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


def test_backup_prunes_the_oldest_beyond_keep_and_leaves_other_files_alone(tmp_path):
    backups = tmp_path / "backups"
    store = ShardStore(shard_settings(tmp_path / "db"))
    store.write([b"k" * 16], codec.encode_many(vectors(1)))
    assert list_checkpoints(backups) == []  # not created until the first checkpoint
    (backups / "notes").mkdir(parents=True)  # an operator's directory: no marker, never a checkpoint
    (backups / ".half.partial-1").mkdir()  # an interrupted checkpoint: hidden
    made = []
    for i, name in enumerate(["first", "second", "third", "fourth"]):
        done, pruned = store.backup(backups, name, keep=2)
        assert done == backups / name and (done / MARKER).exists()
        os.utime(done / MARKER, ns=(time.time_ns(), 1_000_000_000 * (i + 1)))  # creation order, whatever the clock
        made.append(name)
        assert pruned == ([] if i < 2 else [made[i - 2]])
    listed = list_checkpoints(backups)
    assert [c.name for c in listed] == ["third", "fourth"] and all(c.bytes > 0 for c in listed)
    assert listed[0].created_ns < listed[1].created_ns
    assert sorted(p.name for p in backups.iterdir()) == [".half.partial-1", "fourth", "notes", "third"]
    with pytest.raises(FileExistsError):
        store.backup(backups, "third", keep=2)
    assert store.backup(backups, "fifth", keep=0)[1] == []  # keep 0: nothing deleted
    assert len(list_checkpoints(backups)) == 3
    store.close()

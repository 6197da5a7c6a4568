"""In-process tests of the shard's pieces: the value check, the memory tier,
settings, and the RocksDB store (a real database in a temporary directory)."""

from __future__ import annotations

import hashlib
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
from common.cache_key import KEY_BYTES
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

def k(name: bytes | str | int) -> bytes:
    """The key named `name`: a uniform hash of KEY_BYTES, as cache keys are (so tags and buckets
    vary as they do in use; padded names would all share one tag and take the one-key path)."""
    name = str(name).encode() if not isinstance(name, bytes) else name
    return hashlib.blake2b(name, digest_size=KEY_BYTES).digest()


def ks(*names) -> list[bytes]:
    return [k(n) for n in names]


def held(tier: MemoryTier, names) -> dict:
    """What the tier answers for `names`: name -> value, absent names left out."""
    return {n: v for n, v in zip(names, tier.get_many(ks(*names))) if v is not None}


def test_memory_tier_evicts_oldest_first_and_stays_bounded():
    tier = MemoryTier(3, 1 << 20)
    tier.put_many(ks("a", "b", "c"), [b"1", b"2", b"3"])
    assert tier.get_many(ks("a", "x")) == [b"1", None]
    tier.put_many(ks("d", "e"), [b"4", b"5"])
    assert len(tier) == 3 and tier.bytes == 3
    assert tier.get_many(ks("a", "b", "c", "d", "e")) == [None, None, b"3", b"4", b"5"]
    assert tier.lookup(ks("a", "c", "x")) == ([None, b"3", None], [0, 2])


def test_memory_tier_byte_bound_holds_for_wide_values():
    tier = MemoryTier(1000, 1000)
    tier.put_many(ks("a", "b"), [b"x" * 400, b"y" * 400])
    assert (len(tier), tier.bytes) == (2, 800)
    tier.put_many(ks("c"), [b"z" * 300])  # 1100 bytes: the oldest goes
    assert (len(tier), tier.bytes) == (2, 700) and tier.get_many(ks("a", "b", "c"))[0] is None
    tier.put_many(ks("big"), [b"w" * 5000])  # wider than the whole budget: not held, and evicts nothing
    assert (len(tier), tier.bytes) == (2, 700) and tier.get_many(ks("big")) == [None]
    names = ["b", "c"]
    for i in range(100):  # many wide values, in batches
        batch = [f"k{i}-{j}" for j in range(10)]
        names += batch
        tier.put_many(ks(*batch), [b"v" * (50 + i)] * 10)
        values = held(tier, names)
        assert tier.bytes <= 1000 and tier.bytes == sum(map(len, values.values())) and len(tier) == len(values)


def test_memory_tier_counts_rewritten_and_repeated_keys_once():
    tier = MemoryTier(10, 1000)
    tier.put_many(ks("a", "a", "b"), [b"1" * 10, b"2" * 20, b"3" * 30])  # repeated within a batch
    assert (len(tier), tier.bytes) == (2, 50) and tier.get_many(ks("a")) == [b"2" * 20]
    tier.put_many(ks("b", "c"), [b"4" * 5, b"5" * 5])  # b rewritten: replaces its bytes, becomes newest
    assert (len(tier), tier.bytes) == (3, 30)
    assert held(tier, "abc") == {"a": b"2" * 20, "b": b"4" * 5, "c": b"5" * 5}


def test_memory_tier_keeps_the_newest_of_a_batch_larger_than_itself():
    tier = MemoryTier(4, 1 << 20)
    tier.put_many(ks(*range(10)), [b"%d" % i for i in range(10)])
    assert held(tier, range(10)) == {i: b"%d" % i for i in range(6, 10)}


def test_memory_tier_tells_apart_keys_that_share_their_first_half():
    """Two keys with the same first 8 bytes: the first-half index finds both, the second half decides."""
    twins = [b"A" * 8 + b"B" * 8, b"A" * 8 + b"C" * 8, b"A" * 8 + b"D" * 8]
    tier = MemoryTier(100, 1 << 20)
    tier.put_many(twins[:2], [b"b", b"c"])
    assert tier.get_many(twins) == [b"b", b"c", None]
    tier.delete_many(twins[:1])
    assert tier.get_many(twins) == [None, b"c", None] and len(tier) == 1
    tier.put_many(twins[::-1], [b"d", b"c2", b"b2"])
    assert tier.get_many(twins) == [b"b2", b"c2", b"d"] and (len(tier), tier.bytes) == (3, 5)


@pytest.mark.parametrize("keys", [[b"short"], [b"a" * 15, b"b" * 17]])  # the second pair adds up to 32 bytes
def test_memory_tier_refuses_keys_of_another_length(keys):
    tier = MemoryTier(10, 100)
    with pytest.raises(ValueError, match="16 bytes"):
        tier.put_many(keys, [b"1"] * len(keys))
    with pytest.raises(ValueError, match="16 bytes"):
        tier.lookup(keys)


def test_memory_tier_keeps_its_capacity_when_keys_are_stored_again():
    """A rewrite leaves a dead record in the ring; the tier still holds --memory-entries live entries."""
    names = list(range(1000))
    tier = MemoryTier(1000, 1 << 30)
    tier.put_many(ks(*names), [b"v%d" % n for n in names])
    for _ in range(9):  # the newest 100 stored again and again (several frontends, racing fills)
        tier.put_many(ks(*names[-100:]), [b"v%d" % n for n in names[-100:]])
    assert len(tier) == 1000 and held(tier, names) == {n: b"v%d" % n for n in names}
    tier.delete_many(ks(*names[:10]))
    tier.put_many(ks(*range(1000, 1010)), [b"new"] * 10)
    assert len(tier) == 1000 and held(tier, names[10:]) == {n: b"v%d" % n for n in names[10:]}


def test_memory_tier_spreads_keys_chosen_to_collide():
    """Keys that share their first 8 bytes, or whose first halves differ only in high bits, still
    spread over the buckets and carry different tags (both hashes mix both halves with secret salts),
    so a caller cannot pile them into one bucket's chain; and no tag reads as an empty slot."""
    tier = MemoryTier(8 * 1024, 1 << 30)  # 1,024 buckets: a power of two
    shared_first = [b"A" * 8 + i.to_bytes(8, "little") for i in range(4096)]
    high_bits = [(i << 54).to_bytes(8, "little") + b"B" * 8 for i in range(1024)]
    for keys in (shared_first, high_bits):
        home, tag = tier._hashes(np.frombuffer(b"".join(keys), np.uint64).reshape(-1, 2))
        assert len(set(home.tolist())) > tier._nb / 2 and len(set(tag.tolist())) == len(keys)
        assert (tag & np.uint64(1)).all()
    tier.put_many(shared_first, [b"v"] * len(shared_first))
    assert tier.get_many(shared_first) == [b"v"] * len(shared_first)
    assert tier._passing.sum() < len(shared_first) / 20


def run_against_model(tier: MemoryTier, ops, capacity: int, max_bytes: int) -> None:
    """Against a model of what a FIFO cache may hold, after every operation: a value answered is
    always the newest one stored and not deleted since, the tier holds a suffix of the store order
    (whatever it holds, it holds everything stored after it that fits at all), every bound holds,
    the newest entry that fits is held, every bucket's pass count is right, and a key looked up alone
    (the Python path for small batches) gets what it gets in a batch (the array path)."""
    latest: dict[int, tuple[bytes, int, bool]] = {}  # key -> (value, when it was stored, fits at all)
    clock = 0
    for op, names, width in ops:
        if op == "put":
            values = [b"%d:%d:" % (n, clock) + b"v" * width for n in names]
            tier.put_many(ks(*names), values)
            for n, v in zip(names, values):
                clock += 1
                latest[n] = (v, clock, len(v) <= max_bytes)  # a value wider than the tier is never held
            newest, value = names[-1], values[-1]
            if len(value) <= max_bytes:
                assert tier.get_many(ks(newest)) == [value]
        elif op == "delete":
            tier.delete_many(ks(*names))
            for n in names:
                latest.pop(n, None)
        answers = held(tier, range(KEY_SPACE))  # one batch: the array path
        one_by_one = [tier.get_many(ks(n))[0] for n in range(KEY_SPACE)]  # the path for a few keys
        assert one_by_one == [answers.get(n) for n in range(KEY_SPACE)]
        for n, v in answers.items():
            assert latest[n][0] == v  # never a stale or deleted value
        oldest_held = min((latest[n][1] for n in answers), default=clock + 1)
        assert all(n in answers for n, (_, t, fits) in latest.items() if t > oldest_held and fits)
        assert len(tier) == len(answers) <= capacity
        assert tier.bytes == sum(map(len, answers.values())) <= max_bytes
        assert (tier._passing == passes_recounted(tier)).all()


KEY_SPACE = 91


@hsettings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "put", "put", "delete", "get"]),
                              st.lists(st.integers(0, KEY_SPACE - 1), min_size=1, max_size=24),
                              st.integers(1, 40)), max_size=40),
       capacity=st.integers(1, 60), max_bytes=st.integers(1, 2000))
def test_memory_tier_agrees_with_a_plain_model(ops, capacity, max_bytes):
    run_against_model(MemoryTier(capacity, max_bytes), ops, capacity, max_bytes)


@pytest.mark.parametrize("seed", range(4))
def test_memory_tier_agrees_with_the_model_when_its_index_is_crowded(seed):
    """One slot per entry: buckets fill, keys are stored past their home bucket, and deletes and
    evictions must uncount their passes (random operations from a fixed seed, many of them)."""
    rng = np.random.default_rng(seed)
    capacity, max_bytes = 48, 48 * 30
    ops = [(str(rng.choice(["put", "put", "put", "delete"])),
            [int(x) for x in rng.integers(0, KEY_SPACE, int(rng.integers(1, 25)))], int(rng.integers(1, 20)))
           for _ in range(300)]
    tier = MemoryTier(capacity, max_bytes, buckets=3)
    run_against_model(tier, ops, capacity, max_bytes)


def passes_recounted(tier: MemoryTier) -> np.ndarray:
    """What each bucket's pass count must be: the held keys stored past it, counted from scratch."""
    expected = np.zeros(tier._nb, np.int64)
    for r in np.flatnonzero(tier._rec_slot > 0).tolist():
        b, end = int(tier._hashes(tier._rec_key[r:r + 1])[0][0]), int(tier._rec_slot[r] - 1) // 16
        while b != end:
            expected[b] += 1
            b = (b + 1) % tier._nb
    return expected


def test_memory_tier_chains_past_full_buckets_and_uncounts_the_passes_of_keys_that_go():
    tier = MemoryTier(64, 1 << 20, buckets=4)  # one slot per entry: buckets fill, keys move on
    chained = 0
    for round_ in range(40):
        names = [f"{round_}-{i}" for i in range(16)]
        tier.put_many(ks(*names), [n.encode() for n in names])
        chained = max(chained, int(tier._passing.sum()))
        assert (tier._passing == passes_recounted(tier)).all()
    assert chained > 0  # some keys were stored past their home bucket
    names = [f"{r}-{i}" for r in range(36, 40) for i in range(16)]
    assert held(tier, names) == {n: n.encode() for n in names} and len(tier) == 64
    assert tier.get_many(ks("absent", "0-0")) == [None, None]  # misses end, even with every bucket full
    tier.delete_many(ks(*names))
    assert len(tier) == 0 and tier.bytes == 0 and not tier._passing.any()


@pytest.mark.parametrize("entries, size", [(0, 100), (100, 0)])
def test_memory_tier_off_holds_nothing(entries, size):
    tier = MemoryTier(entries, size)
    tier.put_many(ks("a"), [b"1"])
    assert not tier.enabled and len(tier) == 0 and tier.bytes == 0 and tier.get_many(ks("a")) == [None]


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

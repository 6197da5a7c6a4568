"""A hostile caller on the cache shard's port, against a real `python -m cacheshard` process.

Whoever reaches the shard must not be able to poison the cache with values the frontend would
serve (wrong key length, values the codec rejects or wider than --max-width, oversized
requests), grow its memory past --memory-bytes, create directories outside the shard's backup
directory through Checkpoint, learn from its messages what exists on the machine, or grow the
disk with checkpoints past --keep. Every refusal writes nothing, and after every attack the shard
still serves a normal Store and Lookup.
"""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest

from cacheshard.shard import BAD_NAME
from common import codec
from common.cache_key import KEY_BYTES
from harness.procs import SERVING, health_status
from sutra.cache.v1 import cache_shard_service_pb2 as pb
from tests.test_cacheshard import Client, make_entries, start_shard

MEMORY_BYTES = 1 << 20
# Below the transport's message limit, so the shard's own check is what refuses (a message over
# --max-message-bytes is refused by grpc before it is parsed: RESOURCE_EXHAUSTED).
REQUEST_BYTES = 1 << 20
KEEP = 2
_seeds = itertools.count(1000)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """One shard with the default key and width bounds, small request and memory-tier bounds, its
    own backup directory, --keep 2, and next to it a directory no caller may write into."""
    tmp = tmp_path_factory.mktemp("shard-input")
    dirs = {"tmp": tmp, "db": tmp / "db", "backups": tmp / "backups", "outside": tmp / "outside"}
    dirs["outside"].mkdir()
    proc = start_shard(tmp, dirs["db"], backup_dir=dirs["backups"], keep=KEEP, memory_bytes=MEMORY_BYTES,
                       max_request_bytes=REQUEST_BYTES).wait_serving(60)
    client = Client(proc.address)
    yield proc, client, dirs
    client.close()
    assert proc.stop() == 0, proc.log()[-3000:]


def refused(call, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    """`call`'s error details, after checking its status code."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value
    return err.value.details()


def still_serving(proc, client) -> None:
    """A normal Store then Lookup works, and health says SERVING."""
    keys, values = make_entries(8, seed=next(_seeds))
    assert client.store(keys, values) == 8
    assert client.lookup(keys) == ([True] * 8, values)
    assert health_status(proc.address) == SERVING


def vector_value(width: int, dtype: str = "float16") -> bytes:
    return codec.encode(np.random.default_rng(width).standard_normal(width).astype(np.float32), dtype)


# --- Store -------------------------------------------------------------------

def _store_cases():
    good_keys, good_values = make_entries(2, seed=1)
    good = good_values[0]
    width_4096 = vector_value(4096, "float32")  # 16 KiB + header: the widest value allowed
    return {
        "short key": ([b"k" * (KEY_BYTES - 1)], [good], "`entries[0].key` has 15 bytes"),
        "long key": ([b"k" * (KEY_BYTES + 1)], [good], "`entries[0].key` has 17 bytes"),
        "empty key": ([b""], [good], "`entries[0].key` has 0 bytes"),
        "one bad key among good ones": ([good_keys[0], b"x" * 32, good_keys[1]], [good] * 3,
                                        "`entries[1].key` has 32 bytes"),
        "not a codec value": ([good_keys[0]], [b"not a vector"], "`entries[0].value` is not a cache value"),
        "value cut short": ([good_keys[0]], [good[:-2]], "`entries[0].value` is not a cache value"),
        "unknown codec version": ([good_keys[0]], [good[:2] + bytes([codec.VERSION + 1]) + good[3:]],
                                  "`entries[0].value` is not a cache value"),
        "too wide": (good_keys, [good, vector_value(4097)], "`entries[1].value` is not a cache value: width 4097"),
        "over --max-request-bytes": ([b"%016d" % i for i in range(64)], [width_4096] * 64,
                                     f"`entries` hold {64 * (16 + len(width_4096))} bytes of keys and values; "
                                     f"the limit is {REQUEST_BYTES}"),
    }


@pytest.mark.parametrize("case", list(_store_cases()))
def test_store_refuses_bad_input_and_writes_nothing(shard, case):
    proc, client, _ = shard
    keys, values, message = _store_cases()[case]
    before = client.stats()
    details = refused(lambda: client.store(keys, values))
    assert message in details, details
    after = client.stats()
    assert (after.stores, after.entries, after.memory_entries) == (before.stores, before.entries,
                                                                    before.memory_entries)
    looked_up = [k for k in keys if len(k) == KEY_BYTES]
    assert client.lookup(looked_up)[0] == [False] * len(looked_up)
    still_serving(proc, client)


def test_values_up_to_the_bounds_are_stored(shard):
    proc, client, _ = shard
    keys = [b"wide-value-%05d" % i for i in range(2)]
    values = [vector_value(4096, "float32"), vector_value(1)]
    assert client.store(keys, values) == 2
    assert client.lookup(keys) == ([True, True], values)


@pytest.mark.parametrize("key", [b"", b"k" * (KEY_BYTES - 1), b"k" * (KEY_BYTES + 1), b"k" * 4096])
def test_lookup_refuses_keys_of_the_wrong_length(shard, key):
    proc, client, _ = shard
    good, _ = make_entries(3, seed=2)
    details = refused(lambda: client.lookup([*good, key]))
    assert f"`keys[3]` has {len(key)} bytes" in details
    still_serving(proc, client)


def test_memory_tier_stays_within_memory_bytes_under_wide_values(shard):
    proc, client, _ = shard
    wide = vector_value(4096, "float32")
    batches = [[b"mem-%02d-%09d" % (b, i) for i in range(40)] for b in range(12)]
    for keys in batches:  # 12 x 40 x 16 KiB = 7.5 MiB, seven times the tier's budget
        assert client.store(keys, [wide] * 40) == 40
        stats = client.stats()
        assert stats.memory_capacity_bytes == MEMORY_BYTES
        assert 0 < stats.memory_bytes <= MEMORY_BYTES, stats
    assert stats.memory_bytes > MEMORY_BYTES - len(wide)  # full: the oldest went, nothing was refused
    # The newest are answered from memory; RocksDB still has what the tier dropped, and reading it
    # back into the tier keeps the bound too.
    for keys, from_memory in ((batches[-1], 40), (batches[0], 0)):
        before = client.stats().memory_hits
        assert client.lookup(keys) == ([True] * 40, [wide] * 40)
        assert client.stats().memory_hits - before == from_memory
    assert client.stats().memory_bytes <= MEMORY_BYTES
    still_serving(proc, client)


# --- Checkpoint ----------------------------------------------------------------

def _everything_under(directory) -> set:
    return {p.relative_to(directory) for p in directory.rglob("*")}


def test_checkpoint_refuses_paths_with_one_message_and_creates_nothing(shard):
    proc, client, dirs = shard
    tmp, outside = dirs["tmp"], dirs["outside"]
    (outside / "exists").mkdir(exist_ok=True)
    dirs["backups"].mkdir(exist_ok=True)
    before = {d: _everything_under(d) for d in (outside, dirs["backups"])}
    before_top = {p.name for p in tmp.iterdir()}
    names = [
        str(outside / "exists"), str(outside / "missing"),  # absolute paths: existing and not
        str(outside / "exists" / "new"), str(outside / "missing" / "new"),
        "/", "/etc", "/nonexistent-dir/x", "..", ".", "../outside", "../outside/x", "a/b", "a/../b", "",
        ".hidden", "x" * 129, "bad name", "nightly\n", "nul\x00", "ümlaut", "C:\\windows",
    ]
    messages = set()
    for name in names:
        details = refused(lambda: client.stub.Checkpoint(pb.CheckpointRequest(name=name), timeout=30))
        messages.add(details)
        assert str(outside) not in details and str(tmp) not in details
    assert messages == {BAD_NAME}  # the same whatever exists on disk
    assert {d: _everything_under(d) for d in before} == before
    assert {p.name for p in tmp.iterdir()} == before_top
    still_serving(proc, client)


def test_named_checkpoints_go_under_the_backup_dir_and_keep_prunes(shard):
    proc, client, dirs = shard
    backups = dirs["backups"]
    replies = []
    for name in ["first", "second", "third"]:
        reply = client.stub.Checkpoint(pb.CheckpointRequest(name=name), timeout=120)
        assert (reply.name, reply.directory) == (name, str(backups / name))
        replies.append(reply)
    assert [list(r.pruned) for r in replies] == [[], [], ["first"]]
    assert sorted(p.name for p in backups.iterdir()) == ["second", "third"]
    listed = client.stub.ListCheckpoints(pb.ListCheckpointsRequest(), timeout=30)
    assert listed.directory == str(backups)
    assert [c.name for c in listed.checkpoints] == ["second", "third"]
    assert all(c.bytes > 0 for c in listed.checkpoints)
    times = [c.create_time.ToNanoseconds() for c in listed.checkpoints]
    assert 0 < times[0] <= times[1]
    # An existing name: refused, naming only the name (which is inside the shard's own directory).
    details = refused(lambda: client.stub.Checkpoint(pb.CheckpointRequest(name="third"), timeout=30),
                      grpc.StatusCode.ALREADY_EXISTS)
    assert "'third'" in details and str(backups) not in details
    assert sorted(p.name for p in backups.iterdir()) == ["second", "third"]
    still_serving(proc, client)


def test_a_checkpoint_opened_by_a_running_shard_is_never_pruned(shard):
    proc, client, dirs = shard
    backups = dirs["backups"]
    client.stub.Checkpoint(pb.CheckpointRequest(name="in-use"), timeout=120)
    # Someone restores in place: a second shard runs on the checkpoint inside the backup directory.
    other = start_shard(dirs["tmp"], backups / "in-use", name="in-place", backup_dir=dirs["tmp"] / "other-backups")
    other.wait_serving(60)
    try:
        for name in ["later-1", "later-2", "later-3"]:
            client.stub.Checkpoint(pb.CheckpointRequest(name=name), timeout=120)
        assert (backups / "in-use").is_dir()
        assert health_status(other.address) == SERVING
        listed = [c.name for c in client.stub.ListCheckpoints(pb.ListCheckpointsRequest(), timeout=30).checkpoints]
        assert "in-use" in listed and listed[-2:] == ["later-2", "later-3"]
    finally:
        assert other.stop() == 0
    client.stub.Checkpoint(pb.CheckpointRequest(name="later-4"), timeout=120)  # no longer open: pruned now
    assert sorted(p.name for p in backups.iterdir()) == ["later-3", "later-4"]
    still_serving(proc, client)

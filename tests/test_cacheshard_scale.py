"""The shard at scale, in process: --memory-budget's split, and FIFO's intra-L0 merges that
keep the SST file count (which every point lookup pays for) from growing with the data.
A real RocksDB database (rocksdict) in a temporary directory."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cacheshard import budget
from cacheshard.settings import ShardSettings, load_settings
from cacheshard.shard import Shard
from cacheshard.store import ShardStore
from common import codec
from common.grpc_server import ServerOptions
from tests.support import aio

MIB = 1024 * 1024


def test_parse_bytes_units_and_round_trip():
    assert budget.parse_bytes("2GiB") == 2 << 30
    assert budget.parse_bytes("512MiB") == 512 << 20
    assert budget.parse_bytes("1.5G") == 1_500_000_000
    assert budget.parse_bytes("1000") == 1000
    for bad in ("", "2 parsecs", "-1G", "GiB"):
        with pytest.raises(ValueError):
            budget.parse_bytes(bad)
    assert budget.show_bytes(2 << 30) == "2GiB" and budget.show_bytes(384 << 20) == "384MiB"
    assert budget.show_bytes(1000) == "1000"


@pytest.mark.parametrize("total,max_entries", [(384 * MIB, 200_000), (2 << 30, 12_000_000), (8 << 30, 50_000_000)])
def test_memory_budget_split_adds_up_and_holds_every_index_and_filter(total, max_entries):
    plan = budget.plan(total, max_entries, 64 * MIB, 2)
    fixed = budget.BASE_BYTES + 2 * plan.memtable_bytes + plan.block_cache_bytes
    assert fixed + plan.tier_bytes <= total
    assert total - (fixed + plan.tier_bytes) < budget.TYPICAL_VALUE_BYTES + budget.ENTRY_OVERHEAD  # nothing idle
    assert plan.block_cache_bytes >= budget.METADATA_BYTES_PER_ENTRY * max_entries
    assert plan.memtable_bytes <= 64 * MIB
    assert plan.tier_value_bytes == plan.tier_entries * budget.TYPICAL_VALUE_BYTES


def test_memory_budget_replaces_the_three_cache_flags_and_refuses_what_cannot_fit(tmp_path):
    s = load_settings(["--path", str(tmp_path / "db"), "--memory-budget", "1GiB", "--max-entries", "2000000",
                       "--memory-entries", "5", "--block-cache-mb", "1"])
    plan = s.memory_plan
    assert (s.tier_entries, s.tier_value_bytes, s.block_cache_bytes) == (
        plan.tier_entries, plan.tier_value_bytes, plan.block_cache_bytes)
    assert s.memtable_bytes == plan.memtable_bytes
    assert s.to_argv(["memory_budget"]) == ["--memory-budget", "1GiB"]
    off = load_settings(["--path", str(tmp_path / "db"), "--memory-entries", "5", "--block-cache-mb", "3"])
    assert off.memory_plan is None and (off.tier_entries, off.block_cache_bytes) == (5, 3 * MIB)
    with pytest.raises(SystemExit):
        load_settings(["--path", str(tmp_path / "db"), "--memory-budget", "400MiB", "--max-entries", "40000000"])
    with pytest.raises(SystemExit):
        load_settings(["--path", str(tmp_path / "db"), "--memory-budget", "100MiB"])


@aio
async def test_shard_memory_tier_takes_its_bounds_from_the_budget(tmp_path):
    s = ShardSettings(server=ServerOptions(), path=tmp_path / "db", memory_budget=384 * MIB, max_entries=100_000)
    shard = Shard(ShardStore(s), s)
    try:
        assert (shard.memory.max_entries, shard.memory.max_bytes) == (s.tier_entries, s.tier_value_bytes)
        assert shard.memory.max_entries > 50_000
    finally:
        await shard.close()


@pytest.mark.parametrize("tier_entries", [1000, 0])
@aio
async def test_small_reads_run_on_the_event_loop_and_larger_ones_on_the_workers(tmp_path, tier_entries):
    """--inline-read-keys: a lookup with at most that many keys the memory tier lacks reads RocksDB on
    the event loop (no worker thread runs), a larger one on the workers, and both answer alike."""
    s = ShardSettings(server=ServerOptions(), path=tmp_path / "db", inline_read_keys=4, memory_entries=tier_entries)
    shard = Shard(ShardStore(s), s)
    readers: list[str] = []
    read = shard._read_blocking

    def spying(keys):
        readers.append(threading.current_thread().name)
        return read(keys)

    shard._read_blocking = spying
    try:
        rng = np.random.default_rng(3)
        keys = [rng.bytes(16) for _ in range(12)]
        values = codec.encode_many(rng.standard_normal((6, 384)).astype(np.float32))
        await shard.put(keys[:6], values)  # fills the tier too (when it is on)
        if tier_entries:
            shard.memory.delete_many(keys[:6])  # so RocksDB answers them
        loop_thread = threading.current_thread().name
        small = await shard.lookup([keys[0], keys[7], keys[1], keys[8]])  # 4 keys: on the loop
        assert small == ([True, False, True, False], [values[0], b"", values[1], b""])
        assert readers == [loop_thread]
        large = await shard.lookup(keys[2:12])  # 10 keys the tier lacks: on a worker
        assert large == ([True] * 4 + [False] * 6, [*values[2:6], *[b""] * 6])
        assert len(readers) == 2 and readers[1].startswith("rocksdb")
    finally:
        await shard.close()

    off = ShardSettings(server=ServerOptions(), path=tmp_path / "db2", inline_read_keys=0)
    shard = Shard(ShardStore(off), off)
    readers.clear()
    read = shard._read_blocking
    shard._read_blocking = spying
    try:
        assert await shard.lookup([keys[0]]) == ([False], [b""])
        assert len(readers) == 1 and readers[0].startswith("rocksdb")
    finally:
        await shard.close()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        time.sleep(0.05)
    return value


def test_fifo_merges_flushed_files_and_every_entry_stays_readable(tmp_path):
    # Small memtables (from the budget) under a large SST limit: each flush is one small file, and
    # without intra-L0 merges the file count would grow by one per flush.
    s = ShardSettings(server=ServerOptions(), path=tmp_path / "db", memory_budget=320 * MIB, max_entries=600_000)
    store = ShardStore(s)
    try:
        rng = np.random.default_rng(0)
        n = 100_000
        keys = [rng.bytes(16) for _ in range(n)]
        values = codec.encode_many(rng.standard_normal((64, 384)).astype(np.float32))
        for i in range(0, n, 2000):
            store.write(keys[i:i + 2000], [values[j % 64] for j in range(i, min(n, i + 2000))])
        store._db.flush(True)  # the last memtable too
        flushed_bytes = store.sst_bytes()
        flushes = flushed_bytes // s.memtable_bytes  # files a flush-per-file store would hold, at least
        assert flushes >= 10
        def merged() -> bool:
            p = store.figures(["rocksdb.num-files-at-level0", "rocksdb.num-running-compactions"]).properties
            return p["rocksdb.num-files-at-level0"] <= flushes // 2 and not p["rocksdb.num-running-compactions"]

        wait_for(merged, 120, f"at most {flushes // 2} files after {flushes} flushes")
        got = store.multi_get(keys)
        assert got == [values[j % 64] for j in range(n)]
    finally:
        store.close()


def test_scale_bench_pairs_every_larger_size_with_a_baseline_shard(tmp_path):
    """bench.shard_scale with real shards at small sizes: each larger size's keys/s rounds alternate
    with a second shard that holds the smallest size, the goals are judged by those paired ratios,
    and both shards answered every checked key with its stored value (the bench's own check)."""
    import json

    from bench import shard_scale

    out = tmp_path / "scale.json"
    assert shard_scale.main(["--quick", "--sizes", "2000,6000", "--dir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    small, large = result["rows"]
    assert (small["entries"], large["entries"]) == (2000, 6000)
    for kind in ("uniform", "zipf"):
        assert "paired_base" not in small[kind]
        paired = large[kind]
        assert paired["paired_base"]["entries"] == 2000
        assert len(paired["keys_per_s_rounds"]) == len(paired["paired_base"]["keys_per_s_rounds"]) == shard_scale.ROUNDS
        ratios = [a / b for a, b in zip(paired["keys_per_s_rounds"], paired["paired_base"]["keys_per_s_rounds"])]
        assert paired["ratio_to_paired_base"] == pytest.approx(float(np.median(ratios)))
    assert [g["goal"] for g in result["goals"]] == ["shard RSS within --memory-budget 384MiB"]  # no 20k or 1M row
    assert not list(tmp_path.glob("shard-scale-*"))  # both shards' databases deleted

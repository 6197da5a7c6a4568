"""Several shards: copies, losing a shard, changing the shard set while running.

Real cache shard processes (`python -m cacheshard`, RocksDB through
rocksdict) on loopback ports chosen at run time, stopped by PID; the client
is the frontend's own L2Client.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np

from common import codec
from embedding.l2_client import L2Client, ranked
from embedding.shard_source import dns_source, file_source, parse_shard_list
from embedding.stats import Stats
from harness.procs import free_port
from harness.stack import ShardClient, service
from tests.support import aio
from tests.test_l2_breaker import until

N_KEYS = 600


def entries(n: int = N_KEYS, seed: int = 3) -> tuple[list[bytes], list[bytes]]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(16) for _ in range(n)], codec.encode_many(rng.standard_normal((n, 384)).astype(np.float32))


@contextlib.contextmanager
def shard_processes(tmp_path, n: int):
    procs = [service("cacheshard", tmp_path / f"shard{i}.log", {"path": tmp_path / f"db{i}"}).start()
             for i in range(n)]
    try:
        for p in procs:
            p.wait_serving(120)
        yield procs
    finally:
        for p in procs:
            p.stop()


def client(addresses, copies: int = 1, stats: Stats | None = None) -> L2Client:
    return L2Client(tuple(addresses), stats or Stats(), timeout_s=5.0, max_message_bytes=8 << 20,
                    reconnect_max_s=1.0, copies=copies)


def test_two_copies_land_on_the_two_highest_ranked_shards_and_survive_losing_one(tmp_path):
    keys, values = entries()
    with shard_processes(tmp_path, 3) as procs:
        addresses = [p.address for p in procs]

        @aio
        async def store_and_read_with_one_shard_killed():
            stats = Stats()
            two, one = client(addresses, copies=2, stats=stats), client(addresses, copies=1)
            try:
                assert await two.store(list(zip(keys, values)), 30.0) == (N_KEYS, 0)
                # Each key is on exactly its two owners.
                ids = [a.encode() for a in addresses]
                for i, proc in enumerate(procs):
                    with ShardClient(proc.address) as sc:
                        held = sc.lookup(keys)
                    for key, value, got in zip(keys, values, held):
                        assert (got == value) if i in ranked(key, ids, 2) else (got is None)
                assert await two.lookup(keys) == values and stats.l2_second_copy_hits == 0  # first copies
                procs[1].kill()
                lost = sum(1 for key in keys if ranked(key, ids, 1) == [1])
                assert 0 < lost < N_KEYS
                got_two = await two.lookup(keys)
                assert got_two == values  # every entry from its other copy
                assert stats.l2_second_copy_hits == lost  # exactly the keys whose first shard is gone
                got_one = await one.lookup(keys)  # one copy: what the killed shard held is gone
                assert sum(v is not None for v in got_one) == N_KEYS - lost
                assert [v for v in got_one if v is not None] == [
                    value for key, value in zip(keys, values) if ranked(key, ids, 1) != [1]]
                assert two.waiting == one.waiting == 0
            finally:
                await two.close()
                await one.close()

        store_and_read_with_one_shard_killed()


def test_adding_a_shard_moves_about_a_quarter_of_the_keys_and_copies_keep_them_hitting(tmp_path):
    keys, values = entries()
    with shard_processes(tmp_path, 4) as procs:
        addresses = [p.address for p in procs]

        @aio
        async def grow():
            stats = Stats()
            one, two = client(addresses[:3], stats=stats), client(addresses[:3], copies=2)
            try:
                assert (await one.store(list(zip(keys, values)), 30.0))[0] == N_KEYS
                kept = {a: s for a, s in zip(addresses, one.shards)}
                before = [one.shard_for(k) for k in keys]
                assert stats.l2_shard_set_changes == 0  # the set it started with is no change
                assert one.set_shards(addresses) and not one.set_shards(addresses)
                assert stats.l2_shard_set_changes == 1
                assert all(kept[a] is s for a, s in zip(addresses[:3], one.shards))  # connections kept
                after = [one.shard_for(k) for k in keys]
                moved = [i for i in range(N_KEYS) if one.shards[after[i]].address != addresses[before[i]]]
                assert all(after[i] == 3 for i in moved)  # only to the new shard
                assert 0.15 < len(moved) / N_KEYS < 0.35  # about 1/4
                got = await one.lookup(keys)
                # Right after adding a shard, with one copy: the moved keys miss (until computed again).
                assert [i for i, v in enumerate(got) if v is None] == moved

                await two.store(list(zip(keys, values)), 30.0)
                two.set_shards(addresses)
                # With two copies, a key's old first shard is still one of its two: no miss at all.
                assert await two.lookup(keys) == values
            finally:
                await one.close()
                await two.close()

        grow()


@aio
async def test_removing_a_shard_closes_its_connection_and_lookups_go_on():
    ports = [free_port() for _ in range(3)]
    addresses = [f"127.0.0.1:{p}" for p in ports]  # nothing listens: every lookup fails open
    stats = Stats()
    l2 = client(addresses, stats=stats)
    try:
        dropped = l2.shards[2]
        assert l2.set_shards(addresses[:2])
        await until(lambda: dropped.closed, what="dropped shard closed")
        assert [s.address for s in l2.shards] == addresses[:2]
        assert await l2.lookup([b"k" * 16, b"j" * 16]) == [None, None]
        assert l2.set_shards(()) and await l2.lookup([b"k" * 16]) == [None]
        assert stats.l2_shard_set_changes == 2 and stats.l2_second_copy_hits == 0
    finally:
        await l2.close()


def test_shard_list_files_parse_and_an_unreadable_one_keeps_the_set(tmp_path):
    assert parse_shard_list("b:2, a:1\n# comment\n\nc:3 # trailing\na:1\n") == ("a:1", "b:2", "c:3")
    assert parse_shard_list("") == ()
    missing = file_source(tmp_path / "nope.txt")
    assert asyncio.run(missing()) is None


def test_dns_source_resolves_a_name_to_its_addresses():
    found = asyncio.run(dns_source("localhost:50052")())
    assert found and "127.0.0.1:50052" in found
    assert asyncio.run(dns_source("no-such-host.invalid:50052")()) is None


@aio
async def test_the_client_follows_a_shard_list_file(tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text("127.0.0.1:1\n")
    stats = Stats()
    l2 = client([], stats=stats)
    try:
        following = l2.follow(file_source(listing), 0.01)
        await until(lambda: [s.address for s in l2.shards] == ["127.0.0.1:1"], what="first read")
        listing.write_text("127.0.0.1:1\n127.0.0.1:2\n")
        await until(lambda: len(l2.shards) == 2, what="shard added")
        listing.write_text("127.0.0.1:2\n")
        await until(lambda: [s.address for s in l2.shards] == ["127.0.0.1:2"], what="shard removed")
        # From none, one added, one removed; re-reads of the same set are no change (a read racing a
        # rewrite of the file may see it empty: one more change each time).
        assert stats.l2_shard_set_changes >= 3
    finally:
        await l2.close()
    assert following.done()

"""A cache shard that hangs without closing its socket: the real shard
process, SIGSTOPped, under the frontend's real L2 client (in this process).

Nothing fails on such a connection: no RST, no error, answers just never
come. What is promised (embedding/l2_client.py):

- the hung shard costs about one L2 timeout per backoff period, not one per
  lookup; every other lookup is a miss at once;
- no more than `max_waiting` lookups ever wait on it, and none are left
  waiting once traffic stops;
- once it runs again (SIGCONT), lookups hit again without restarting anything;
- with keepalive on, the dead connection is found with no traffic at all,
  and the shard accepts those pings (no GOAWAY "too_many_pings") while healthy.

Counts are asserted, not durations: a lookup "waited" when it took at least
most of the L2 timeout, and the allowance grows with the time that passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from common import codec
from embedding.l2_client import FIRST_BACKOFF_S, L2Client
from embedding.stats import Stats
from harness.stack import ShardClient, shard
from tests.support import aio

TIMEOUT_S = 0.25
MAX_WAITING = 64
WAITED = 0.8 * TIMEOUT_S  # a fast failure takes microseconds; a waited one the whole timeout


@pytest.fixture
def running_shard(tmp_path):
    proc = shard(tmp_path, tmp_path / "db").start()
    try:
        proc.wait_serving(60)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc._log.close()


@pytest.fixture
def stored(running_shard):
    """Keys and values the shard holds, stored straight into it."""
    rng = np.random.default_rng(11)
    keys = [rng.bytes(16) for _ in range(50)]
    values = codec.encode_many(rng.standard_normal((50, 384)).astype(np.float32))
    with ShardClient(running_shard.address) as client:
        assert client.store(keys, values) == 50
    return keys, values


@contextlib.asynccontextmanager
async def client(address: str, keepalive_ms: int = 0) -> AsyncIterator[L2Client]:
    """An L2 client of the one shard, closed when the block ends."""
    l2 = L2Client((address,), Stats(), timeout_s=TIMEOUT_S, max_message_bytes=1 << 20, reconnect_max_s=2.0,
                  max_waiting=MAX_WAITING, keepalive_ms=keepalive_ms)
    try:
        yield l2
    finally:
        await l2.close()


@contextlib.asynccontextmanager
async def keepalive_client(address: str, key: bytes, value: bytes) -> AsyncIterator[L2Client]:
    """A client pinging every second, its stream to the shard open: a first lookup of `key` hit."""
    async with client(address, keepalive_ms=1000) as l2:
        assert (await timed_lookup(l2, key))[0] == value
        yield l2


async def timed_lookup(l2: L2Client, key: bytes) -> tuple[bytes | None, float]:
    started = time.monotonic()
    return (await l2.lookup([key]))[0], time.monotonic() - started


async def hits_again(l2: L2Client, key: bytes, value: bytes, retries: int = 600) -> int:
    """Poll one lookup until it hits; the number of tries it took."""
    for attempt in range(1, retries + 1):
        if (await timed_lookup(l2, key))[0] == value:
            return attempt
        await asyncio.sleep(0.05)
    raise AssertionError(f"no hit after {retries} lookups (breaker {l2.shards[0].state})")


class PeakWaiting:
    """Samples `l2.waiting` on every few loop turns; the highest value seen."""

    def __init__(self, l2: L2Client) -> None:
        self.peak = 0
        self._task = asyncio.create_task(self._run(l2))

    async def _run(self, l2: L2Client) -> None:
        while True:
            self.peak = max(self.peak, l2.waiting)
            await asyncio.sleep(0.001)

    async def stop(self) -> int:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.peak


@aio
async def test_a_stopped_shard_costs_a_timeout_per_backoff_period_not_per_lookup(running_shard, stored):
    keys, values = stored
    async with client(running_shard.address) as l2:
        conn = l2.shards[0]
        assert await l2.lookup(keys) == values
        running_shard.signal(signal.SIGSTOP)
        sampler = PeakWaiting(l2)

        # A burst while the breaker is still closed: MAX_WAITING wait, the rest are misses at once,
        # and the first timeout fails those waiting. Counted from the connection (how many wait at
        # the peak, that the breaker opened), not from durations: on a starved machine a lookup
        # that failed fast can take as long to be scheduled as one that waited.
        trips_before = conn.trips
        burst = await asyncio.gather(*(timed_lookup(l2, keys[i % 50]) for i in range(200)))
        assert all(value is None for value, _ in burst)
        assert 0 < sampler.peak <= MAX_WAITING, sampler.peak
        assert conn.trips > trips_before
        assert l2.waiting == 0 and conn.state != "closed"

        # Steady traffic while it stays stopped: 4 callers, 50 lookups each.
        async def caller(offset: int) -> list[float]:
            took = []
            for i in range(50):
                value, seconds = await timed_lookup(l2, keys[(offset + i) % 50])
                assert value is None
                took.append(seconds)
                await asyncio.sleep(0.03)
            return took

        trips_before = conn.trips
        started = time.monotonic()
        durations = [t for part in await asyncio.gather(*(caller(o) for o in range(4))) for t in part]
        elapsed = time.monotonic() - started
        waited = sum(t >= WAITED for t in durations)
        # Only a probe waits, and probes are at least a backoff plus a timeout apart: each probe that
        # times out trips the breaker once more. Counted from the breaker, not from durations: on a
        # starved machine a lookup that failed fast can still take a while to be scheduled.
        probes = conn.trips - trips_before
        allowed = 1 + elapsed / (FIRST_BACKOFF_S + TIMEOUT_S)
        print(f"stopped shard: {probes} probes timed out, {waited} of {len(durations)} lookups took at least "
              f"{WAITED * 1000:.0f} ms, in {elapsed:.1f}s (allowed {allowed:.0f}); "
              f"burst: {sum(t >= WAITED for _, t in burst)} of 200 waited")
        assert probes <= allowed, f"{probes} probes timed out in {elapsed:.1f}s"
        assert await sampler.stop() <= MAX_WAITING
        assert l2.waiting == 0

        running_shard.signal(signal.SIGCONT)
        await hits_again(l2, keys[0], values[0])
        assert await l2.lookup(keys) == values
        assert conn.state == "closed" and l2.waiting == 0


@aio
async def test_keepalive_finds_a_stopped_shard_with_no_traffic(running_shard, stored):
    keys, values = stored
    async with keepalive_client(running_shard.address, keys[0], values[0]) as l2:
        conn = l2.shards[0]
        assert conn.connected and conn.trips == 0
        running_shard.signal(signal.SIGSTOP)
        # No lookups from here: only the keepalive ping can notice (after ~1 s + 1 s).
        deadline = time.monotonic() + 30
        while conn.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not conn.connected, "the stream to the stopped shard still looks alive"
        assert conn.trips == 1 and "UNAVAILABLE" in conn.last_failure, conn.last_failure
        assert l2.waiting == 0
        running_shard.signal(signal.SIGCONT)
        await hits_again(l2, keys[0], values[0])


@aio
async def test_the_shard_accepts_keepalive_pings_every_second_on_an_idle_stream(running_shard, stored):
    keys, values = stored
    async with keepalive_client(running_shard.address, keys[0], values[0]) as l2:
        conn = l2.shards[0]
        # An observation window, not a wait for readiness: ~10 pings with no data in between.
        # A shard with grpc's default ping policy sends GOAWAY "too_many_pings" within ~5 s.
        await asyncio.sleep(10)
        assert conn.trips == 0 and conn.connected, conn.last_failure
        assert (await timed_lookup(l2, keys[1]))[0] == values[1]
        assert conn.stream_opens == 1

"""Unit tests of the replica's batching engine (no model, no server).

The embed function here stands in for a backend's forward pass: it encodes
each text's identity into its output row and records every batch it sees,
so the tests can check batch bounds, length ordering and that each request
gets its own rows back in its own order.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from common.errors import Overloaded, Unavailable
from mlbase.backends.tokens import Encoded
from mlbase.batcher import BatchLimits, InferenceBatcher, _Item, plan_batches

WIDTH = 4


def enc(tag: int, length: int) -> Encoded:
    return Encoded({"input_ids": [tag] * length}, length, False)


def tag_of(e: Encoded) -> int:
    return e.features["input_ids"][0]


class RecordingEmbed:
    """Row = (tag, length, batch number, 1); remembers each batch's (tag, length) list."""

    def __init__(self, fail_tags: set[int] = frozenset(), gate: threading.Event | None = None) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.fail_tags = set(fail_tags)
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, batch):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append([(tag_of(e), e.length) for e in batch])
        if any(tag_of(e) in self.fail_tags for e in batch):
            raise RuntimeError("backend failed")
        return np.array([[tag_of(e), e.length, len(self.batches), 1] for e in batch], dtype=np.float32)


def items(lengths):
    return [_Item(enc(i, n), None, i) for i, n in enumerate(lengths)]


def plan_cost(batches, overhead):
    return sum(overhead + len(b) * max(it.encoded.length for it in b) for b in batches)


def greedy(items_, limits):
    """Cut the sorted run every max_batch_size texts (or at the token bound)."""
    ordered = sorted(items_, key=lambda it: -it.encoded.length)
    out, i = [], 0
    while i < len(ordered):
        j = i + 1
        while (j < len(ordered) and j - i < limits.max_batch_size
               and (j - i + 1) * ordered[i].encoded.length <= limits.max_batch_tokens):
            j += 1
        out.append(ordered[i:j])
        i = j
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_plan_respects_bounds_sorts_longest_first_and_beats_fixed_size_cuts(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=400).tolist()
    limits = BatchLimits(max_batch_size=16, max_batch_tokens=1024, overhead_tokens=32)
    batches = plan_batches(items(lengths), limits)
    flat = [it.encoded.length for b in batches for it in b]
    assert sorted(flat, reverse=True) == flat  # globally longest first
    assert sorted(it.row for b in batches for it in b) == list(range(400))  # every text exactly once
    for b in batches:
        assert 1 <= len(b) <= 16
        assert len(b) * max(it.encoded.length for it in b) <= 1024 or len(b) == 1
    assert plan_cost(batches, 32) <= plan_cost(greedy(items(lengths), limits), 32)


def test_plan_splits_off_long_texts_and_keeps_equal_lengths_together():
    limits = BatchLimits(max_batch_size=64, max_batch_tokens=100_000, overhead_tokens=32)
    # One 100-token text padding twenty 10-token ones would cost 32 + 21 * 100.
    batches = plan_batches(items([10] * 10 + [100] + [10] * 10), limits)
    assert [[it.encoded.length for it in b] for b in batches] == [[100], [10] * 20]
    assert [it.row for it in batches[1]] == list(range(10)) + list(range(11, 21))  # arrival order kept
    # Equal lengths: one batch up to the size bound.
    assert sorted(len(b) for b in plan_batches(items([7] * 150), limits)) == [22, 64, 64]
    # No overhead: every distinct length gets its own batch (zero padding).
    flat_limits = BatchLimits(max_batch_size=64, max_batch_tokens=100_000, overhead_tokens=0)
    assert [[it.encoded.length for it in b] for b in plan_batches(items([3, 9, 3, 9, 5]), flat_limits)] == [
        [9, 9], [5], [3, 3]]


def test_plan_isolates_a_text_over_the_token_budget():
    limits = BatchLimits(max_batch_size=8, max_batch_tokens=100)
    batches = plan_batches(items([5, 5, 500, 5, 5]), limits)
    assert [[it.row for it in b] for b in batches] == [[2], [0, 1, 3, 4]]


def test_limits_are_validated():
    with pytest.raises(ValueError):
        BatchLimits(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchLimits(wait_ms=-1)
    with pytest.raises(ValueError):
        BatchLimits(overhead_tokens=-1)
    with pytest.raises(ValueError):
        BatchLimits(inline_tokens=-1)
    with pytest.raises(ValueError):
        BatchLimits(inline_idle_ms=-1)


async def _with_batcher(embed, limits, body):
    batcher = InferenceBatcher(embed, WIDTH, limits)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.close()


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    embed = RecordingEmbed()
    limits = BatchLimits(max_batch_size=64, max_batch_tokens=10_000, wait_ms=300, inline_tokens=0)
    requests = [[enc(100 * r + i, (7 * r + 3 * i) % 20 + 1) for i in range(5)] for r in range(6)]

    async def body(batcher):
        results = await asyncio.gather(*(batcher.submit(req) for req in requests))
        return results, batcher.stats

    results, stats = asyncio.run(_with_batcher(embed, limits, body))
    # All 30 texts arrived inside the wait window: one generation, sorted across requests.
    assert stats.generations == 1 and stats.texts == 30
    lengths = [n for batch in embed.batches for _, n in batch]
    assert lengths == sorted(lengths, reverse=True)
    assert max(len({tag // 100 for tag, _ in batch}) for batch in embed.batches) > 1  # requests share batches
    for req, out in zip(requests, results):
        assert out.shape == (5, WIDTH) and out.dtype == np.float32
        assert out[:, 0].tolist() == [tag_of(e) for e in req]
        assert out[:, 1].tolist() == [e.length for e in req]


def test_token_budget_splits_one_request_and_rows_come_back_in_request_order():
    embed = RecordingEmbed()
    limits = BatchLimits(max_batch_size=4, max_batch_tokens=40, wait_ms=0, inline_tokens=0)
    req = [enc(i, n) for i, n in enumerate([3, 30, 9, 12, 1, 30, 2, 8, 8, 20])]

    async def body(batcher):
        return await batcher.submit(req)

    out = asyncio.run(_with_batcher(embed, limits, body))
    assert out[:, 0].tolist() == list(range(10))
    for batch in embed.batches:
        assert len(batch) <= 4 and (len(batch) * max(n for _, n in batch) <= 40 or len(batch) == 1)
    seen = [n for batch in embed.batches for _, n in batch]
    assert seen == sorted(seen, reverse=True)


def test_reserve_refuses_at_once_when_the_queue_is_full():
    batcher = InferenceBatcher(RecordingEmbed(), WIDTH, BatchLimits(max_queue=10))
    with batcher.reserve(6):
        assert batcher.admitted == 6
        with pytest.raises(Overloaded, match="--max-queue 10"):
            with batcher.reserve(5):
                pass
        with batcher.reserve(4):
            assert batcher.admitted == 10
    assert batcher.admitted == 0
    with pytest.raises(Overloaded):
        with batcher.reserve(11):
            pass


def test_a_failed_batch_fails_only_its_requests_and_the_worker_goes_on():
    embed = RecordingEmbed(fail_tags={666})
    limits = BatchLimits(max_batch_size=2, max_batch_tokens=1000, wait_ms=0, inline_tokens=0)

    async def body(batcher):
        with pytest.raises(RuntimeError, match="backend failed"):
            await batcher.submit([enc(666, 5), enc(1, 5), enc(2, 5)])
        return await batcher.submit([enc(3, 4), enc(4, 6)])

    out = asyncio.run(_with_batcher(embed, limits, body))
    assert out[:, 0].tolist() == [3, 4]


def test_cancelled_request_is_skipped_and_close_finishes_queued_work():
    gate = threading.Event()
    embed = RecordingEmbed(gate=gate)
    limits = BatchLimits(max_batch_size=1, max_batch_tokens=1000, wait_ms=0, inline_tokens=0)

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit([enc(1, 3)]))
        await asyncio.to_thread(embed.entered.wait, 10)  # the worker is now blocked on `first`
        doomed = asyncio.ensure_future(batcher.submit([enc(2, 3), enc(3, 3)]))
        kept = asyncio.ensure_future(batcher.submit([enc(4, 3)]))
        await asyncio.sleep(0)
        doomed.cancel()
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            await batcher.submit([enc(5, 3)])
        gate.set()
        results = await asyncio.gather(first, kept)
        await closing
        return results

    batcher = InferenceBatcher(embed, WIDTH, limits)
    batcher.start()
    first, kept = asyncio.run(body(batcher))
    assert first[0, 0] == 1 and kept[0, 0] == 4
    tags = [t for batch in embed.batches for t, _ in batch]
    assert 2 not in tags and 3 not in tags and 5 not in tags


# --- small requests on an idle replica: computed on the caller's event loop ------------------------


class ThreadRecordingEmbed(RecordingEmbed):
    """Also records which thread ran each pass, and how many passes ever ran at once."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.threads: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, batch):
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            self.threads.append(threading.current_thread().name)
            return super().__call__(batch)
        finally:
            with self._lock:
                self.running -= 1


def test_a_small_request_on_an_idle_replica_runs_on_the_event_loop_and_a_large_one_on_the_thread():
    embed = ThreadRecordingEmbed()
    limits = BatchLimits(max_batch_size=64, max_batch_tokens=10_000, wait_ms=0, inline_tokens=18, inline_idle_ms=0)

    async def body(batcher):
        small = await batcher.submit([enc(1, 9), enc(2, 7)])  # 2 x 9 = 18 padded tokens: inline
        large = await batcher.submit([enc(3, 9), enc(4, 1)])  # 2 x 9 = 18 as well: inline
        padded = await batcher.submit([enc(5, 10), enc(6, 1)])  # 11 tokens, but 2 x 10 = 20 padded: the thread
        return small, large, padded, threading.current_thread().name, batcher.stats

    small, large, padded, loop_thread, stats = asyncio.run(_with_batcher(embed, limits, body))
    assert embed.threads == [loop_thread, loop_thread, "mlbase-inference"]
    assert small[:, 0].tolist() == [1, 2] and small[:, 1].tolist() == [9, 7]
    assert large[:, 0].tolist() == [3, 4] and padded[:, 0].tolist() == [5, 6]
    assert stats.inline_batches == 2 and stats.batches == 3 and stats.texts == 6


def test_a_request_right_after_a_pass_goes_to_the_thread_and_one_after_an_idle_gap_runs_inline():
    """Within inline_idle_ms of the last pass the replica counts as busy (a caller that waited behind
    it); the first request ever, and one after a long enough pause, run inline."""
    embed = ThreadRecordingEmbed()
    limits = BatchLimits(max_batch_size=64, max_batch_tokens=10_000, wait_ms=0, inline_tokens=64,
                         inline_idle_ms=1000)

    async def body(batcher):
        for tag in (1, 2, 3):  # back to back: only the first finds the replica idle long enough
            await batcher.submit([enc(tag, 3)])
        await asyncio.sleep(1.1)
        await batcher.submit([enc(4, 3)])
        return threading.current_thread().name, batcher.stats

    loop_thread, stats = asyncio.run(_with_batcher(embed, limits, body))
    assert embed.threads == [loop_thread, "mlbase-inference", "mlbase-inference", loop_thread]
    assert stats.inline_batches == 2


def test_a_small_request_waits_its_turn_while_a_pass_runs_and_passes_never_overlap():
    """A pass runs on the thread (held at a gate): a small request from the event loop is queued,
    not inlined. Then an inline pass held at a gate on one event loop: a request from another
    loop queues, and the inference thread does not start it until the inline pass is over."""
    gate = threading.Event()
    embed = ThreadRecordingEmbed(gate=gate)
    limits = BatchLimits(max_batch_size=64, max_batch_tokens=10_000, wait_ms=0, inline_tokens=64, inline_idle_ms=0)
    batcher = InferenceBatcher(embed, WIDTH, limits)
    batcher.start()
    try:
        async def behind_a_running_pass():
            first = asyncio.ensure_future(batcher.submit([enc(1, 100)]))  # too large to inline
            await asyncio.to_thread(embed.entered.wait, 10)
            second = asyncio.ensure_future(batcher.submit([enc(2, 3)]))  # small, but a pass runs
            await asyncio.sleep(0.05)
            assert not second.done() and batcher.stats.inline_batches == 0
            gate.set()
            return await asyncio.gather(first, second)

        first, second = asyncio.run(behind_a_running_pass())
        assert first[0, 0] == 1 and second[0, 0] == 2
        assert embed.threads == ["mlbase-inference", "mlbase-inference"]

        gate.clear()
        embed.entered.clear()
        other: dict = {}

        def from_another_loop():
            async def go():
                await asyncio.to_thread(embed.entered.wait, 10)  # the inline pass has started
                queued = asyncio.ensure_future(batcher.submit([enc(4, 3)]))
                while not batcher._pending:  # it queued behind the inline pass: now let that pass end
                    await asyncio.sleep(0.001)
                gate.set()
                other["out"] = await queued
            asyncio.run(go())

        helper = threading.Thread(target=from_another_loop)
        helper.start()
        third = asyncio.run(batcher.submit([enc(3, 3)]))  # inline, held at the gate until the helper queued
        helper.join(10)
        assert third[0, 0] == 3 and other["out"][0, 0] == 4
        assert embed.threads[2] == "MainThread" and embed.threads[3] == "mlbase-inference"
        assert embed.most_at_once == 1 and batcher.stats.inline_batches == 1
    finally:
        gate.set()
        asyncio.run(batcher.close())


def test_an_inline_pass_that_fails_raises_to_its_caller_and_the_replica_keeps_serving():
    embed = ThreadRecordingEmbed(fail_tags={666})
    limits = BatchLimits(max_batch_size=64, max_batch_tokens=10_000, wait_ms=0, inline_tokens=64, inline_idle_ms=0)

    async def body(batcher):
        with pytest.raises(RuntimeError, match="backend failed"):
            await batcher.submit([enc(666, 3)])
        after = await batcher.submit([enc(7, 3)])  # inline again: the claim was released
        queued = await batcher.submit([enc(8, 100)])  # and the thread still serves
        return after, queued, batcher.stats

    after, queued, stats = asyncio.run(_with_batcher(embed, limits, body))
    assert after[0, 0] == 7 and queued[0, 0] == 8
    assert stats.failed_batches == 1 and stats.inline_batches == 1  # completed passes only
    assert embed.threads[-2:] == ["MainThread", "mlbase-inference"]

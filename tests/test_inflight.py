"""The in-flight owner under the callers we fear: cancelled before their first
step, cancelled at random moments, followers and leaders leaving in every
order, a compute that hangs. After each storm nothing may be pending or
leaked, and a new request must still be computed.

The compute function stands in for the network hop to ML-base (an async
function with a controllable delay); the owner itself is the real one."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from common.errors import DeadlineExceeded, Overloaded, Unavailable
from embedding.inflight import InFlight
from tests.support import aio

WIDTH = 4


class Compute:
    """Counts batches, cancellations and completions; `delay` or `hang` as a test needs."""

    def __init__(self, delay: float = 0.0, hang: bool = False) -> None:
        self.delay = delay
        self.hang = hang
        self.batches: list[list[str]] = []
        self.cancelled = 0
        self.finished = 0

    async def __call__(self, texts: list[str], timeout: float):
        self.batches.append(list(texts))
        try:
            if self.hang:
                await asyncio.Event().wait()  # a peer that neither answers nor fails
            if self.delay:
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return np.full((len(texts), WIDTH), float(len(texts)), np.float32), set()


def owner(compute: Compute, **overrides) -> tuple[InFlight, list]:
    done: list = []
    args = dict(max_batch=64, window_s=0.0, concurrency=1, default_timeout_s=5.0, max_pending=10_000)
    args.update(overrides)
    return InFlight(compute, lambda keys, full, trunc: done.append(keys), **args), done


async def caller(inflight: InFlight, text: str, deadline: float | None = None):
    waiters, _ = inflight.request([text.encode()], [text], deadline)
    try:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        return await asyncio.wait_for(asyncio.gather(*waiters), timeout)
    finally:
        for w in waiters:
            w.cancel()


async def settle_until_idle(inflight: InFlight, tries: int = 3000) -> None:
    for _ in range(tries):
        if inflight.idle:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"not idle: pending={inflight.pending} queued={inflight.queued} "
                         f"running={inflight.running} problems={inflight.check()}")


@aio
async def test_batch_cancelled_before_its_first_step_frees_its_slot():
    """Issue 10's repro: the only caller is cancelled while its batch task has not run a step.
    Before, the task's `finally` never ran, its slot leaked, and the next request hung."""
    compute = Compute()
    inflight, _ = owner(compute, concurrency=1)
    first = asyncio.create_task(caller(inflight, "a"))
    await asyncio.sleep(0)  # `first` has queued its flight and launched the batch task
    assert inflight.running == 1 and not compute.batches  # ... which has not started yet
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await settle_until_idle(inflight)
    assert inflight.free_slots == 1
    second = asyncio.create_task(caller(inflight, "b"))
    done, _ = await asyncio.wait({second}, timeout=5)
    assert done, "second request done: False (a slot leaked)"
    assert second.result()[0][0].shape == (WIDTH,)
    await settle_until_idle(inflight)
    assert inflight.check() == []


@aio
async def test_random_cancellation_storm_leaves_nothing_behind():
    """Hundreds of callers, shared texts, deadlines of 0-20 ms, cancellations at random moments
    (before the first step, while queued, while computing); then a fresh text still computes."""
    rng = random.Random(1234)
    compute = Compute(delay=0.004)
    inflight, _ = owner(compute, concurrency=3, max_batch=8, window_s=0.001)
    tasks = []
    for i in range(600):
        text = f"t{rng.randrange(40)}"  # shared texts: leaders and followers
        deadline = time.monotonic() + rng.uniform(0, 0.02) if rng.random() < 0.5 else None
        tasks.append(asyncio.create_task(caller(inflight, text, deadline)))
        if rng.random() < 0.4:
            victim = rng.choice(tasks)
            if rng.random() < 0.5:
                victim.cancel()
            else:
                asyncio.get_running_loop().call_later(rng.uniform(0, 0.01), victim.cancel)
        if rng.random() < 0.3:
            await asyncio.sleep(rng.uniform(0, 0.002))
        assert inflight.check() == []
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert any(isinstance(r, list) for r in results), "some callers must have been answered"
    assert any(isinstance(r, asyncio.CancelledError) for r in results)
    await settle_until_idle(inflight)
    assert inflight.free_slots == 3 and inflight.check() == []
    answer = await asyncio.wait_for(caller(inflight, "brand new"), 5)
    assert answer[0][0].shape == (WIDTH,)


@aio
async def test_follower_keeps_work_alive_when_the_leader_leaves_and_the_reverse():
    compute = Compute(delay=0.05)
    inflight, done = owner(compute)
    leader = asyncio.create_task(caller(inflight, "shared"))
    follower = asyncio.create_task(caller(inflight, "shared"))
    await asyncio.sleep(0.01)
    leader.cancel()
    (vector, truncated), = await follower
    assert vector.shape == (WIDTH,) and truncated is False
    assert compute.cancelled == 0 and len(compute.batches) == 1 and done == [[b"shared"]]
    # The reverse: the follower leaves, the leader is answered.
    leader = asyncio.create_task(caller(inflight, "other"))
    follower = asyncio.create_task(caller(inflight, "other"))
    await asyncio.sleep(0.01)
    follower.cancel()
    assert (await leader)[0][0].shape == (WIDTH,)
    # Both leave: the batch is cancelled, and a newcomer starts a fresh computation.
    a = asyncio.create_task(caller(inflight, "gone"))
    b = asyncio.create_task(caller(inflight, "gone"))
    await asyncio.sleep(0.01)
    a.cancel()
    b.cancel()
    await asyncio.gather(a, b, return_exceptions=True)
    await settle_until_idle(inflight)
    assert compute.cancelled == 1
    assert (await caller(inflight, "gone"))[0][0].shape == (WIDTH,)
    await settle_until_idle(inflight)


@aio
async def test_a_hanging_compute_holds_its_slot_only_until_the_batch_timeout():
    compute = Compute(hang=True)
    inflight, _ = owner(compute, concurrency=1, default_timeout_s=0.05)
    with pytest.raises(Unavailable, match="past the deadline"):
        await caller(inflight, "stuck")
    await settle_until_idle(inflight)
    assert inflight.free_slots == 1 and compute.cancelled == 1
    compute.hang = False
    assert (await caller(inflight, "after"))[0][0].shape == (WIDTH,)


@aio
async def test_stall_is_measured_from_the_last_batch_that_ended():
    compute = Compute(hang=True)
    inflight, _ = owner(compute, default_timeout_s=30.0)
    assert inflight.stalled_for() == 0.0
    task = asyncio.create_task(caller(inflight, "stuck"))
    await asyncio.sleep(0.05)
    assert inflight.stalled_for() >= 0.04 and inflight.pending == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await settle_until_idle(inflight)
    assert inflight.stalled_for() == 0.0


@aio
async def test_pending_bound_and_close_fail_waiters_with_clear_errors():
    compute = Compute(hang=True)
    inflight, _ = owner(compute, max_pending=2, concurrency=1)
    held = asyncio.create_task(caller(inflight, "one"))
    queued = asyncio.create_task(caller(inflight, "two"))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match="limit 2"):
        inflight.request([b"three"], ["three"], None)
    assert inflight.pending == 2  # the refused request joined nothing
    await inflight.close()
    for task in (held, queued):
        with pytest.raises(Unavailable, match="shutting down"):
            await task
    assert inflight.idle
    with pytest.raises(Unavailable, match="shutting down"):
        inflight.request([b"late"], ["late"], None)


@aio
async def test_a_patient_follower_is_not_cut_off_by_an_impatient_leaders_batch():
    """A batch gives up at its waiters' latest deadline, fixed at launch. A caller without a
    deadline (or a later one) that arrives while it runs gets a computation of its own instead of
    inheriting the leader's cut-off (the search backend with 10 ms deadlines beside a bulk client)."""

    class DeadlineBound(Compute):
        async def __call__(self, texts, timeout):
            self.batches.append(list(texts))
            if timeout < self.delay:  # what MLBasePool does when the replica is slower than the deadline
                await asyncio.sleep(max(0.0, timeout))
                raise DeadlineExceeded("deadline exceeded while the model replica was computing")
            await asyncio.sleep(self.delay)
            return np.ones((len(texts), WIDTH), np.float32), set()

    # Margins wide enough for a starved machine: the leader's batch gives up after 0.6 s (closer than
    # JOIN_MARGIN_S, so a later caller must not inherit it), the computation takes 1.5 s.
    compute = DeadlineBound(delay=1.5)
    inflight, _ = owner(compute, concurrency=3)
    leader = asyncio.create_task(caller(inflight, "shared", time.monotonic() + 0.6))
    await asyncio.sleep(0.002)  # the leader's batch is running, due to give up at 0.6 s
    assert inflight.running == 1
    assert inflight.join(b"shared", None) is None  # joining would inherit the 0.6 s cut-off
    follower = asyncio.create_task(caller(inflight, "shared", None))
    assert inflight.join(b"shared", time.monotonic() + 0.005) is not None  # an earlier deadline may join
    # A batch far from its cut-off is shared whatever the deadlines (the 20 identical requests case).
    roomy = asyncio.create_task(caller(inflight, "roomy", time.monotonic() + 30))
    await asyncio.sleep(0.002)
    assert inflight.running == 3  # "roomy" is running too, with 30 s left
    assert inflight.join(b"roomy", time.monotonic() + 31).cancel() and inflight.join(b"roomy", None).cancel()
    with pytest.raises((DeadlineExceeded, asyncio.TimeoutError)):
        await leader
    (vector, _), = await asyncio.wait_for(follower, 5)
    assert vector.shape == (WIDTH,)
    await roomy
    assert sorted(map(tuple, compute.batches)) == [("roomy",), ("shared",), ("shared",)]
    await settle_until_idle(inflight)
    assert inflight.check() == []


@aio
async def test_adaptive_batching_a_lone_text_goes_at_once_and_waits_only_behind_a_running_batch():
    """With nothing in flight a text starts its batch at once, whatever the window; while a batch
    runs, texts that arrive wait for the window (or a full batch) and go together."""
    compute = Compute(delay=0.05)
    inflight, _ = owner(compute, concurrency=2, max_batch=3, window_s=0.03)
    first = asyncio.create_task(caller(inflight, "alone"))
    await asyncio.sleep(0)
    assert inflight.running == 1 and inflight.queued == 0  # launched without waiting for the window
    followers = [asyncio.create_task(caller(inflight, f"f{i}")) for i in range(2)]
    await asyncio.sleep(0)
    assert inflight.queued == 2 and inflight.running == 1  # a batch runs: they wait for company
    third = asyncio.create_task(caller(inflight, "f2"))
    await asyncio.sleep(0)
    assert inflight.queued == 0 and inflight.running == 2  # a full batch goes without the window
    await asyncio.gather(first, third, *followers)
    assert [len(b) for b in compute.batches] == [1, 3]
    await settle_until_idle(inflight)
    assert inflight.check() == []

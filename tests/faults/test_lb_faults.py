"""HAProxy killed and started again on the same port under steady load.

Every connection from the frontend to the replicas goes through HAProxy,
so killing it cuts them all at once. The frontend's pool reconnects on its
own (reconnect backoff 200 ms to 2 s) and retries failed batches within the
caller's deadline; no process is restarted but HAProxy itself. Reported:
failed calls, the longest time without a successful call, and the time
from the kill until calls sent after it succeed again.
"""

from __future__ import annotations

import time

import pytest

from harness.load import Load, measure
from harness.procs import wait_until
from harness.stack import cache_stats
from lb import runtime


@pytest.mark.parametrize("down_s", [0.0, 1.0], ids=["immediate", "down-1s"])
def test_haproxy_restart_under_load_recovers_without_restarting_clients(healthy, down_s):
    """`down_s`: how long HAProxy stays dead before it starts again (a
    supervisor restarting a crashed balancer takes about a second)."""
    stack = healthy
    retries_before = cache_stats(stack.frontend.address).mlbase_retries
    with Load(stack.frontend.address, threads=4) as load:
        load.wait_for(10)
        killed = time.monotonic()
        stack.lb.kill()
        time.sleep(down_s)  # the outage itself, not a wait for readiness
        stack.lb.start()
        restarted = time.monotonic()
        runtime.wait_all_up(stack.lb.sock, count=stack.replica_count, timeout=30, poll=0.02)
        wait_until(lambda: any(c.ok and c.start >= killed for c in load.calls), 60,
                   "a successful call sent after the kill", poll=0.01)
        recovered = min(c.end for c in load.calls if c.ok and c.start >= killed)
        load.wait_for(20)
    retries = cache_stats(stack.frontend.address).mlbase_retries - retries_before
    failed = load.failures()
    row = measure(f"HAProxy restart ({'immediate' if not down_s else f'down {down_s:.0f} s'})", load.calls, killed, recovered, recovery_s=recovered - killed,
                  recovery_means="kill -> first success of a call sent after it",
                  haproxy_down_s=round(restarted - killed, 3), frontend_batch_retries=retries)
    # The frontend's retries span the restart: no caller sees it.
    assert failed == [], load.details[:5]
    # After recovery everything succeeds, with no restart of the frontend or the clients.
    assert all(c.ok for c in load.calls if c.start >= recovered)
    assert row["requests_during_fault"] > 0

"""Model replicas failing under steady client load.

The clients talk to the frontend; the frontend reaches two replicas through
HAProxy. What is promised (README, "Guarantees"):

- kill -9 of one replica: no client call fails (the frontend retries the
  batch on another connection; HAProxy marks the replica DOWN in ~1 s);
- SIGTERM of a replica: no client call fails, the work it already accepted
  is finished and answered, and it exits 0;
- every replica down: calls end with UNAVAILABLE well inside their
  deadline (no hang), and succeed again once one replica is back.
"""

from __future__ import annotations

import math
import signal
import socket
import threading
import time

import grpc

from harness.load import Load, measure
from harness.procs import NOT_SERVING, health_status, wait_until
from harness.stack import DRAIN_SECONDS, cache_stats
from lb import runtime
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from sutra.mlbase.v1 import mlbase_service_pb2 as mpb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as mpb_grpc

DEADLINE = 30.0
# A text well over the model window (256 tokens): every one costs a full window.
LONG_TEXT = " ".join(f"w{j}" for j in range(400))


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_kill_9_of_one_replica_fails_no_call(healthy):
    stack, victim = healthy, "mlbase2"
    retries_before = cache_stats(stack.frontend.address).mlbase_retries
    with Load(stack.frontend.address, threads=4) as load:
        stack.wait_traffic(victim, load)
        load.wait_for(8)
        killed = time.monotonic()
        stack.replicas[victim].kill()
        runtime.wait_status(stack.lb.sock, victim, "DOWN", timeout=15, poll=0.02)
        down = time.monotonic()
        load.wait_for(20)
    retries = cache_stats(stack.frontend.address).mlbase_retries - retries_before
    row = measure("replica kill -9", load.calls, killed, down, recovery_s=down - killed,
                  recovery_means="kill -> HAProxy marks the replica DOWN", frontend_batch_retries=retries)
    assert load.failures() == [], load.details[:5]
    assert row["requests_during_fault"] > 0
    # The health check (L4...) or `observe layer4` on live traffic (HANA) saw the dead port first.
    assert stack.lb.views()[victim].check_status.startswith(("L4", "HANA"))


def test_sigterm_drains_a_replica_under_load(healthy):
    stack, victim = healthy, "mlbase1"
    proc = stack.replicas[victim]
    channel = grpc.insecure_channel(proc.address)
    direct = mpb_grpc.MLBaseServiceStub(channel)
    # Size a batch sent straight to the victim so it is still being computed
    # when the drain ends and the listener closes: about 3 drains' worth.
    # It is sent once HAProxy has marked the victim DOWN, so the frontend's
    # batches never queue behind it.
    started = time.monotonic()
    direct.Embed(mpb.EmbedRequest(texts=[LONG_TEXT] * 4, full_width=True), timeout=60)
    per_text = (time.monotonic() - started) / 4
    count = max(4, min(256, math.ceil(3 * DRAIN_SECONDS / per_text)))
    texts = [f"{i} {LONG_TEXT}" for i in range(count)]
    outcome: dict = {}

    def in_flight() -> None:
        try:
            reply = direct.Embed(mpb.EmbedRequest(texts=texts, full_width=True), timeout=120)
            outcome["count"] = reply.count
        except grpc.RpcError as exc:
            outcome["error"] = f"{exc.code().name}: {exc.details()}"
        outcome["end"] = time.monotonic()

    with Load(stack.frontend.address, threads=4) as load:
        stack.wait_traffic(victim, load)
        load.wait_for(8)
        signalled = time.monotonic()
        proc.signal(signal.SIGTERM)
        wait_until(lambda: health_status(proc.address) == NOT_SERVING, 10, "NOT_SERVING after SIGTERM")
        runtime.wait_status(stack.lb.sock, victim, "DOWN", timeout=15, poll=0.02)
        down = time.monotonic()
        # Out of the balancer but still draining: work that arrives now (on a
        # connection opened before) must be finished, not dropped.
        worker = threading.Thread(target=in_flight)
        worker.start()
        wait_until(lambda: not listening(proc.port), 30, "listener closed after the drain", poll=0.02)
        closed = time.monotonic()
        busy_at_close = worker.is_alive()
        worker.join(150)
        code = proc.popen.wait(60)
        exited = time.monotonic()
        load.wait_for(8)
    channel.close()
    row = measure("replica SIGTERM (drain)", load.calls, signalled, exited, recovery_s=down - signalled,
                  recovery_means="SIGTERM -> HAProxy marks the draining replica DOWN (no new work reaches it)",
                  exited_s=round(exited - signalled, 3), listener_closed_s=round(closed - signalled, 3),
                  in_flight_texts=count, in_flight_answered_s=round(outcome.get("end", exited) - signalled, 3))
    assert load.failures() == [], load.details[:5]
    assert busy_at_close, "the direct batch ended before the drain did; it proves nothing about in-flight work"
    assert outcome.get("count") == count, outcome
    assert code == 0, proc.log()[-3000:]
    assert row["requests_during_fault"] > 0


def test_every_replica_down_is_unavailable_quickly_and_service_resumes(healthy):
    stack = healthy
    with Load(stack.frontend.address, threads=2, timeout=DEADLINE) as load:
        load.wait_for(4)
        fault = time.monotonic()
        for proc in stack.replicas.values():
            proc.kill()
        for name in stack.replicas:
            runtime.wait_status(stack.lb.sock, name, "DOWN", timeout=15, poll=0.02)
        # Callers that arrive now, one at a time, with the full deadline.
        probes = []
        with grpc.insecure_channel(stack.frontend.address) as ch:
            stub = pb_grpc.EmbeddingServiceStub(ch)
            for i in range(3):
                t0 = time.monotonic()
                try:
                    stub.Embed(pb.EmbedRequest(inputs=[f"nobody home {i} {t0}"]), timeout=DEADLINE)
                    probes.append(("OK", time.monotonic() - t0))
                except grpc.RpcError as exc:
                    probes.append((exc.code().name, time.monotonic() - t0))
        returned = time.monotonic()
        back = stack.restart_replica("mlbase1")
        back.wait_serving(240)
        serving = time.monotonic()
        runtime.wait_status(stack.lb.sock, "mlbase1", "UP", timeout=30, poll=0.02)
        marked_up = time.monotonic()
        wait_until(lambda: any(c.ok and c.start >= serving for c in load.calls), 60,
                   "a successful call after a replica returned", poll=0.02)
        resumed = min(c.end for c in load.calls if c.ok and c.start >= serving)
        load.wait_for(4)
    failed = load.failures()
    row = measure("every replica down", load.calls, fault, serving, recovery_s=resumed - serving,
                  recovery_means="returned replica SERVING -> first successful call",
                  outage_s=round(serving - fault, 3), replica_restart_s=round(serving - returned, 3),
                  marked_up_after_serving_s=round(marked_up - serving, 3),
                  time_to_unavailable_max_ms=round(max((c.latency for c in failed), default=0) * 1000, 1),
                  probe_ms=[round(t * 1000, 1) for _, t in probes])
    print(f"probes: {probes}")
    assert failed, "calls made while no replica was up should have failed"
    assert {c.code for c in failed} == {"UNAVAILABLE"}, load.details[:5]
    assert all(code == "UNAVAILABLE" for code, _ in probes), probes
    # "Quickly": well inside the caller's deadline, not a hang until it.
    assert all(c.latency < DEADLINE / 2 for c in failed), max(c.latency for c in failed)
    assert all(t < DEADLINE / 2 for _, t in probes), probes
    # Once calls succeed again they keep succeeding.
    assert all(c.ok for c in load.calls if c.start >= resumed), "calls failed after service resumed"
    assert row["recovery_s"] is not None

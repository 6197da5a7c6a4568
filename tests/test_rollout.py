"""Rolling upgrades: the written policy (embedding/fingerprints.py) on its own, and
`sutra rollout --backend torch` on a default two-replica stack under steady load of new
texts: no failed request, no frontend restart, GetInfo and /metrics report the new
backend and fingerprint, and no entry of the old model answers for the new one."""

from __future__ import annotations

import json
import re
import urllib.request

import grpc
import pytest

from deploy.supervisor import Supervisor
from embedding.fingerprints import LiveFingerprints
from harness.deployed import deployed, sutra
from harness.load import Load
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc


# -- the policy ---------------------------------------------------------------------------------
def live(active: str | None, seen: dict[int, str], infos=("A", "B", "C")) -> LiveFingerprints:
    state = LiveFingerprints()
    for fp in infos:
        state.infos[fp] = object()
    for conn, fp in seen.items():
        state.observe(conn, fp)
    if active is not None:
        state.adopt(active)
    return state


def test_the_old_fingerprint_stays_while_any_connection_reaches_it():
    state = live("A", {0: "B", 1: "B", 2: "B", 3: "A"})
    assert state.decide() is None
    # Batches for A go only where A is (or where nobody knows yet).
    assert [c for c in range(5) if state.usable(c, "A")] == [3, 4]


def test_it_switches_once_no_connection_reaches_it():
    state = live("A", {0: "B", 1: "B"})
    assert state.decide() == "B"
    state.adopt("B")
    assert state.switches == 1 and state.decide() is None


def test_nothing_changes_while_every_replica_is_restarting():
    state = live("A", {})
    assert state.decide() is None
    state.forget(0)
    assert state.decide() is None


def test_the_most_reached_fingerprint_wins_and_ties_go_to_the_first_seen():
    assert live("A", {0: "C", 1: "B", 2: "B"}).decide() == "B"
    assert live("A", {0: "C", 1: "B"}).decide() == "C"


def test_a_fingerprint_without_its_getinfo_is_never_adopted():
    """Its width and window are unknown until a replica of it answers GetInfo (rule 4)."""
    assert live("A", {0: "D"}).decide() is None
    assert live(None, {0: "D", 1: "B"}).decide() == "B"  # start-up picks among described ones


# -- the rollout, end to end ----------------------------------------------------------------------
def info(stub) -> pb.GetInfoResponse:
    return stub.GetInfo(pb.GetInfoRequest(), timeout=10)


def metrics(settings) -> str:
    with urllib.request.urlopen(settings.metrics_url("embedding"), timeout=10) as reply:
        return reply.read().decode()


def gauge(text: str, name: str) -> float:
    return float(re.search(rf"^sutra_embedding_{name} (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with deployed(tmp_path_factory.mktemp("rollout") / "run", 2) as found:
        yield found[0]


def test_rollout_to_torch_under_load_fails_no_request(stack):
    settings = stack
    sup = Supervisor(settings.supervisor_socket)
    frontend_pid = sup.info("embedding")["pid"]
    channel = grpc.insecure_channel(settings.frontend_address)
    stub = pb_grpc.EmbeddingServiceStub(channel)
    before = info(stub)
    # The stack runs the tuner's choice for this CPU (--backend auto): roll out to torch fp32, or to
    # onnx fp32 where the tuner chose torch fp32 itself, so that the model really changes.
    target = "onnx" if (before.backend, before.precision.split("+", 1)[0]) == ("torch", "fp32") else "torch"
    assert [(f.fingerprint, f.active) for f in before.live_fingerprints] == [(before.fingerprint, True)]
    probe_text = ["a text embedded before the rollout and again after it"]
    assert stub.Embed(pb.EmbedRequest(inputs=probe_text), timeout=30).usage.computed == 1
    assert stub.Embed(pb.EmbedRequest(inputs=probe_text), timeout=30).usage.l1_hits == 1

    with Load(settings.frontend_address, threads=2, texts=2) as load:
        load.wait_for(10)
        done = sutra("rollout", "--run-dir", str(settings.run_dir), "--backend", target, "--precision", "fp32")
        assert done.returncode == 0, done.stdout + done.stderr
        load.wait_for(10)  # new texts keep being computed, now by torch
    assert load.failures() == [], load.details[:5]
    assert load.ok >= 20

    after = info(stub)
    assert after.backend == target and after.precision == "fp32" and after.fingerprint != before.fingerprint
    assert [(f.fingerprint, f.active) for f in after.live_fingerprints] == [(after.fingerprint, True)]
    assert f"serves all-MiniLM-L6-v2 {target}" in done.stdout
    assert sup.info("embedding")["pid"] == frontend_pid  # nobody restarted the frontend
    # The old model's entry is not the new model's: computed again, then cached under the new key.
    assert stub.Embed(pb.EmbedRequest(inputs=probe_text), timeout=30).usage.computed == 1
    assert stub.Embed(pb.EmbedRequest(inputs=probe_text), timeout=30).usage.l1_hits == 1

    text = metrics(settings)
    assert f'sutra_embedding_live_fingerprint_connections{{active="1",fingerprint="{after.fingerprint}"}}' in text
    assert before.fingerprint not in text
    assert gauge(text, "model_switches_total") == 1
    for name in ("pending_flights", "queued_flights", "batches_inflight", "mlbase_inflight"):
        assert gauge(text, name) == 0, name
    channel.close()


def test_a_prewarmed_rollout_starts_warm(stack):
    """`sutra rollout --prewarm N`: the recently used texts are embedded by the first new replica
    before the frontend switches, so right after the switch they are L2 hits, not computations."""
    settings = stack
    working_set = [f"a text users keep asking for, number {i}" for i in range(40)]
    with grpc.insecure_channel(settings.frontend_address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        stub.Embed(pb.EmbedRequest(inputs=working_set), timeout=60)
        before = info(stub)
        with Load(settings.frontend_address, threads=1, texts=2) as load:
            load.wait_for(5)
            done = sutra("rollout", "--run-dir", str(settings.run_dir), "--prewarm", "100000",
                         "--backend", "torch", "--max-seq-length", "128")
            assert done.returncode == 0, done.stdout + done.stderr
            load.wait_for(5)
        assert load.failures() == [], load.details[:5]
        after = info(stub)
        assert after.fingerprint != before.fingerprint and after.max_seq_length == 128
        assert "pre-warmed" in done.stdout, done.stdout
        warm = stub.Embed(pb.EmbedRequest(inputs=working_set), timeout=60)
        assert (warm.usage.l2_hits, warm.usage.computed) == (len(working_set), 0)
    status = sutra("status", "--run-dir", str(settings.run_dir), "--json")
    model = json.loads(status.stdout)["model"]
    assert model["fingerprint"] == after.fingerprint and model["backend"] == "torch"
    assert model["live_fingerprints"] == [{"fingerprint": after.fingerprint, "connections": model[
        "live_fingerprints"][0]["connections"], "active": True}]

"""The one-command stack, end to end: `sutra up` with two replicas on free
ports in a temporary run directory, `status`, `validate --phases 0,1,2`,
supervisord restarting a crashed process, and `sutra down` leaving no
process behind (checked by PID)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import openai
import psutil
import pytest

from deploy import probe
from deploy.scrape import fetch
from deploy.settings import StackSettings
from deploy.supervisor import Supervisor
from embedding.client import Client
from harness.deployed import deployed, sutra
from lb import runtime
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from sutra.mlbase.v1 import mlbase_service_pb2 as mpb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as mpb_grpc


def stack_pids(settings: StackSettings) -> dict[str, int]:
    sup = Supervisor(settings.supervisor_socket)
    pids = {p["name"]: p["pid"] for p in sup.processes()}
    pids["supervisord"] = sup.pid()
    return pids


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with deployed(tmp_path_factory.mktemp("stack") / "run", 2) as found:
        yield found


def test_up_starts_everything_healthy(stack):
    settings, out = stack
    assert "stack is up" in out and "grpcurl -plaintext" in out
    assert probe.grpc_health(settings.frontend_address) == "SERVING"
    # The OpenAI-compatible HTTP API is on its own port, ready, and `up` says where.
    http = f"http://{settings.address(settings.http_port)}"
    assert f"{http}/v1/embeddings" in out and settings.ports()["http"] == settings.http_port
    with urllib.request.urlopen(f"{http}/ready", timeout=10) as ready:
        assert ready.status == 200
    # The internal ports speak mutual TLS: the operator's certificate gets an answer.
    for address in (settings.shard_address, *settings.replica_addresses()):
        assert probe.grpc_health(address, tls=settings.client_tls()) == "SERVING", address
    views = runtime.servers(settings.haproxy_socket)
    assert [v.name for v in views] == ["mlbase1", "mlbase2"] and all(v.up for v in views)
    # PID files name live processes.
    for name in ("supervisord", "cacheshard", "mlbase1", "mlbase2", "haproxy", "embedding"):
        pid = int((settings.pid_dir / f"{name}.pid").read_text())
        assert psutil.pid_exists(pid), name
    # Logs land in the run directory.
    assert (settings.log_dir / "mlbase1.log").stat().st_size > 0


def test_the_default_stack_runs_the_tuners_choice_for_this_cpu(stack):
    """`up` defaults to --backend auto: it made sure a record for this CPU exists (tuning when
    there was none) and every replica serves that record's backend and precision, named in GetInfo."""
    from mlbase import tuned
    from mlbase.settings import load_settings

    settings, out = stack
    assert settings.backend == "auto" and "--backend auto ->" in out
    record, why = tuned.lookup(Path(settings.tuned), tuned.cpu_identity(),
                               tuned.model_digest(load_settings([], {}).model_path))
    assert record is not None, why
    choice = tuned.Choice.from_json(record["choice"])
    assert f"--backend auto -> {choice.backend} {choice.precision}" in out
    for address in settings.replica_addresses():
        with grpc.secure_channel(address, settings.client_tls("embedding").credentials()) as ch:
            info = mpb_grpc.MLBaseServiceStub(ch).GetInfo(mpb.GetInfoRequest(), timeout=30)
        assert (info.backend, info.precision.split("+", 1)[0]) == (choice.backend, choice.precision), address


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_the_openai_client_gets_grpcs_vectors_from_the_default_stack(stack, encoding_format):
    """The done-criterion of the HTTP API, on the stack `make up` starts: the official client's
    embeddings.create(dimensions=256) answers exactly what gRPC's Embed does."""
    settings, _ = stack
    texts = ["the default stack speaks OpenAI", "and gRPC, with one cache"]
    client = openai.OpenAI(base_url=f"http://{settings.address(settings.http_port)}/v1", api_key="unused",
                           max_retries=0)
    reply = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, dimensions=256,
                                     encoding_format=encoding_format)
    with Client(settings.frontend_address) as grpc_client:
        expected = grpc_client.embed(texts, 256)
    if encoding_format == "base64":
        got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in reply.data])
    else:
        got = np.asarray([d.embedding for d in reply.data], dtype=np.float32)
    assert got.shape == (2, 256) and np.array_equal(got, expected)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=[], dimensions=256)
    error = err.value.response.json()["error"]
    assert err.value.status_code == 400 and error["message"] and error["type"]


def test_status_shows_health_and_haproxy_view(stack):
    settings, _ = stack
    result = sutra("status", "--run-dir", str(settings.run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in ("cacheshard", "mlbase1", "mlbase2", "embedding"):
        assert any(line.startswith(name) and "RUNNING" in line and "SERVING" in line for line in lines), name
    assert sum(1 for line in lines if line.strip().startswith("mlbase") and " UP " in line) == 2


def test_status_json_lists_every_process_with_its_metrics(stack):
    settings, _ = stack
    result = sutra("status", "--json", "--run-dir", str(settings.run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout)
    processes = {p["name"]: p for p in found["processes"]}
    assert {name: p["role"] for name, p in processes.items()} == {
        "cacheshard": "cacheshard", "mlbase1": "mlbase", "mlbase2": "mlbase", "haproxy": "haproxy",
        "embedding": "frontend"}
    for name, p in processes.items():
        assert {"name", "role", "address", "metrics_url", "health", "state", "pid"} <= p.keys()
        assert p["state"] == "RUNNING" and p["health"] in ("SERVING", "RUNNING"), p
        assert p["metrics_url"] == settings.metrics_url(name)
        page = fetch(p["metrics_url"])
        assert len(page.families) >= 8, (name, sorted(page.families))
    assert processes["haproxy"]["metrics_url"] == f"http://{settings.address(settings.stats_port)}/metrics"
    assert [r["status"] for r in found["replicas"]] == ["UP", "UP"] and found["healthy"] is True


def test_top_once_reads_every_endpoint(stack):
    settings, _ = stack
    with grpc.insecure_channel(settings.frontend_address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for i in range(5):
            stub.Embed(pb.EmbedRequest(inputs=[f"top {i}", "top"], dimensions=64), timeout=60)
    result = sutra("top", "--once", "--interval", "0.5", "--run-dir", str(settings.run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for words in ("frontend embedding", "requests/s", "L1 hits", "request p99", "cache shard cacheshard",
                  "keys looked up/s", "replicas", "mlbase1", "mlbase2", "inference p99"):
        assert words in out, (words, out)
    assert "unreachable" not in out
    # HAProxy's exporter says both replicas are UP.
    assert sum(1 for line in out.splitlines() if re.search(r"mlbase\d .*\bUP\b", line)) == 2, out


def test_validate_phases_0_1_2(stack):
    settings, _ = stack
    result = sutra("validate", "--run-dir", str(settings.run_dir), "--phases", "0,1,2")
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    for phase in (0, 1, 2):
        assert f"phase {phase}: PASS" in result.stdout
    assert "FAIL" not in result.stdout


def test_supervisor_restarts_a_crashed_process(stack):
    settings, _ = stack
    sup = Supervisor(settings.supervisor_socket)
    old = sup.info("cacheshard")["pid"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = sup.info("cacheshard")
        if info["pid"] not in (0, old) and probe.grpc_health(settings.shard_address, tls=settings.client_tls()) == "SERVING":
            break
        time.sleep(0.1)
    info = sup.info("cacheshard")
    assert info["pid"] not in (0, old) and info["statename"] in ("STARTING", "RUNNING")
    assert probe.grpc_health(settings.shard_address, tls=settings.client_tls()) == "SERVING"


def test_up_again_is_a_no_op_while_running(stack):
    settings, _ = stack
    before = stack_pids(settings)
    result = sutra("up", "--run-dir", str(settings.run_dir))
    assert "already running" in result.stdout
    assert stack_pids(settings) == before


def test_down_leaves_no_process_behind(stack):
    settings, _ = stack
    pids = stack_pids(settings)
    children = []
    for pid in pids.values():
        try:
            children += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    result = sutra("down", "--run-dir", str(settings.run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    alive = [pid for pid in [*pids.values(), *children]
             if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], (pids, alive)
    for port in settings.ports().values():
        assert probe.port_free(settings.host, port), port
    assert not settings.supervisor_socket.exists()
    assert not list(settings.pid_dir.glob("*.pid"))
    assert sutra("status", "--run-dir", str(settings.run_dir)).returncode == 3

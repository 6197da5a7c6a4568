"""The one-command stack, end to end: `sutra up` with two replicas on free
ports in a temporary run directory, `status`, `validate --phases 0,1,2`,
supervisord restarting a crashed process, and `sutra down` leaving no
process behind (checked by PID)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from deploy import probe
from deploy.settings import StackSettings
from deploy.supervisor import Supervisor
from harness.deployed import deployed, sutra
from lb import runtime


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


def test_status_shows_health_and_haproxy_view(stack):
    settings, _ = stack
    result = sutra("status", "--run-dir", str(settings.run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in ("cacheshard", "mlbase1", "mlbase2", "embedding"):
        assert any(line.startswith(name) and "RUNNING" in line and "SERVING" in line for line in lines), name
    assert sum(1 for line in lines if line.strip().startswith("mlbase") and " UP " in line) == 2


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

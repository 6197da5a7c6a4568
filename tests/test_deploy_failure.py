"""`sutra up` when a process cannot start: it says which one and why, and
stops everything it had started (no model is loaded: the replica's model
path is wrong, so this is cheap)."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from deploy import probe
from deploy.settings import ROOT, StackSettings
from harness.procs import free_port


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in part for part in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except psutil.Error:
            continue
    return found


def test_up_reports_a_failing_replica_and_leaves_nothing_running(tmp_path):
    run_dir = tmp_path / "run"
    base = free_port()
    args = ["--run-dir", str(run_dir), "--replicas", "1", "--frontend-port", str(free_port()),
            "--shard-port", str(free_port()), "--lb-port", str(free_port()), "--stats-port", str(free_port()),
            "--admin-port", "0", "--replica-base-port", str(base), "--shard-metrics-port", str(free_port()),
            "--replica-metrics-base-port", str(free_port())]
    env = dict(os.environ, SUTRA_MLBASE_MODEL=str(tmp_path / "no-such-model"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "deploy", "up", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "mlbase1 is FATAL" in result.stderr and "no-such-model" in result.stderr
    assert "start failed: stopping what was started" in result.stdout
    settings = StackSettings.load(run_dir)
    assert processes_mentioning(str(run_dir)) == []
    for name, port in settings.ports().items():
        assert probe.port_free(settings.host, port), name
    assert not settings.supervisor_socket.exists()

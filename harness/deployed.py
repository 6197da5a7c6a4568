"""`sutra up` as a test or benchmark starts it: on free ports, in a run directory of its own.

The stack is the one a user gets from `make up` (same code, same defaults, mutual TLS on the
internal hops included); only the ports and the run directory differ, so it can run beside
another stack and leaves nothing in the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy import probe
from deploy.settings import ROOT, StackSettings
from deploy.supervisor import Supervisor
from harness.procs import free_port


def sutra(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m deploy ARGS` from the checkout, offline, its output captured."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_run(count: int, avoid: set[int]) -> int:
    """The first of `count` consecutive free ports, none of them in `avoid`."""
    while True:
        base = free_port()
        run = range(base, base + count)
        if avoid.isdisjoint(run) and all(probe.port_free("127.0.0.1", port) for port in run[1:]):
            return base


def up_args(run_dir: Path, replicas: int) -> list[str]:
    """`up` flags for `replicas` replicas on free ports (each replica's gRPC and metrics ports are
    consecutive, as `up` numbers them)."""
    ports = [free_port() for _ in range(7)]
    base = free_run(replicas, set(ports))
    metrics_base = free_run(replicas, {*ports, *range(base, base + replicas)})
    return ["--run-dir", str(run_dir), "--replicas", str(replicas), "--frontend-port", str(ports[0]),
            "--shard-port", str(ports[1]), "--lb-port", str(ports[2]), "--stats-port", str(ports[3]),
            "--admin-port", str(ports[4]), "--shard-metrics-port", str(ports[5]), "--replica-base-port", str(base),
            "--replica-metrics-base-port", str(metrics_base), "--http-port", str(ports[6])]


@contextmanager
def deployed(run_dir: Path, replicas: int = 1, *extra: str) -> Iterator[tuple[StackSettings, str]]:
    """A running stack and `up`'s output; `down` afterwards, whatever happened."""
    up = sutra("up", *up_args(run_dir, replicas), *extra)
    settings = StackSettings.load(run_dir)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield settings, up.stdout
    finally:
        if settings is not None and Supervisor(settings.supervisor_socket).reachable():
            sutra("down", "--run-dir", str(run_dir))

"""One compose project of deploy/compose.yaml, driven from the host.

Why a wrapper: `make compose-check` must run beside other stacks on the same host
(a `make up`, another check), so each run gets its own project name and free host
ports, and must leave nothing behind: `down` removes the project's containers,
network and volumes and then verifies, by the compose project label, that none is
left. Works with `docker compose` (v2) and Debian's docker-compose 1.29 alike: only
subcommands and flags both have are used, and container state comes from
`docker inspect`, not from either's `ps` output format.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
# Published ports: the compose file's variable -> the container port it maps.
PORT_VARIABLES = {"SUTRA_GRPC_PORT": 50051, "SUTRA_HTTP_PORT": 8080, "SUTRA_STATS_PORT": 9999,
                  "SUTRA_ADMIN_PORT": 9100}


def compose_services() -> dict[str, dict]:
    """The compose file's services, as written (anchors merged)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def services_running(module: str) -> list[str]:
    """The services whose command is `python -m <module>`, sorted: e.g. every cache shard."""
    return sorted(name for name, svc in compose_services().items()
                  if svc.get("command", [])[:3] == ["python", "-m", module])


def command_flag(service: str, name: str) -> str:
    """The value of `name` in a service's command line."""
    command = compose_services()[service]["command"]
    return command[command.index(name) + 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def docker(*args: str, check: bool = True, timeout: float | None = 120) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


@dataclass
class ComposeStack:
    project: str
    compose: list[str]  # e.g. ["docker-compose"] or ["docker", "compose"]
    image_tag: str
    ports: dict[str, int] = field(default_factory=lambda: {name: free_port() for name in PORT_VARIABLES})

    def env(self) -> dict[str, str]:
        return {**os.environ, "SUTRA_IMAGE_TAG": self.image_tag, **{k: str(v) for k, v in self.ports.items()}}

    def run(self, *args: str, timeout: float = 600) -> str:
        command = [*self.compose, "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        result = subprocess.run(command, capture_output=True, text=True, env=self.env(), timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout + result.stderr

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.ports['SUTRA_GRPC_PORT']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['SUTRA_HTTP_PORT']}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['SUTRA_STATS_PORT']}/stats"

    def up(self) -> None:
        self.run("up", "-d", "--no-build")

    def containers(self, service: str | None = None, all_states: bool = False) -> list[dict]:
        """`docker inspect` of the project's containers (of one service), by label."""
        filters = ["--filter", f"label={PROJECT_LABEL}={self.project}"]
        if service:
            filters += ["--filter", f"label={SERVICE_LABEL}={service}"]
        ids = docker("ps", "-q", *(["-a"] if all_states else []), *filters).split()
        return json.loads(docker("inspect", *ids)) if ids else []

    def wait_healthy(self, services: dict[str, int], timeout: float) -> float:
        """Wait until each service has its count of running containers, all healthy where the
        image declares a health check; returns the seconds it took. A container that exits
        fails the wait at once, with its last log lines."""
        start = time.monotonic()
        while True:
            ready = True
            for service, count in services.items():
                found = self.containers(service, all_states=True)
                for c in found:
                    state = c["State"]
                    if state["Status"] in ("exited", "dead"):
                        logs = docker("logs", "--tail", "30", c["Id"], check=False)
                        raise RuntimeError(f"{c['Name']} exited ({state.get('ExitCode')}):\n{logs}")
                running = [c for c in found if c["State"]["Status"] == "running"]
                healthy = [c for c in running if c["State"].get("Health", {}).get("Status", "healthy") == "healthy"]
                ready &= len(healthy) >= count
            if ready:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"not healthy after {timeout:.0f} s: "
                                   + ", ".join(f"{c['Name']} {c['State']['Status']} "
                                               f"{c['State'].get('Health', {}).get('Status', '')}"
                                               for c in self.containers(all_states=True)))
            time.sleep(1)

    def restart(self, *services: str, timeout: float = 60) -> None:
        self.run("restart", "-t", str(int(timeout)), *services)

    def down(self) -> list[str]:
        """Remove everything of the project; returns what is still left (empty = clean)."""
        try:
            self.run("down", "-v", "--remove-orphans", "-t", "60")
        finally:
            left = []
            label = f"label={PROJECT_LABEL}={self.project}"
            left += [f"container {c}" for c in docker("ps", "-aq", "--filter", label, check=False).split()]
            left += [f"network {n}" for n in docker("network", "ls", "-q", "--filter", label, check=False).split()]
            left += [f"volume {v}" for v in docker("volume", "ls", "-q", "--filter", label, check=False).split()]
        return left

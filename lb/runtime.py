"""A client for HAProxy's runtime API (the admin unix socket).

Used by `sutra status`, `sutra validate` and the tests to read HAProxy's view
of each replica (`show stat`: state, check result, sessions, bytes) and to
wait until every replica is UP.
"""

from __future__ import annotations

import csv
import io
import socket
import time
from dataclasses import dataclass
from pathlib import Path


def command(socket_path: str | Path, line: str, timeout: float = 2.0) -> str:
    """Send one command and return HAProxy's whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(line.rstrip("\n").encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def parse_stat(text: str) -> list[dict[str, str]]:
    """HAProxy's stats CSV (the runtime API's `show stat`, or the stats page's `;csv`) as one dict
    per row, keyed by the header; ValueError when `text` is not that CSV."""
    if not text.startswith("# "):
        raise ValueError(f"not HAProxy stats CSV: {text[:200]!r}")
    return list(csv.DictReader(io.StringIO(text[2:])))


def show_stat(socket_path: str | Path) -> list[dict[str, str]]:
    """Every row of `show stat` as a dict keyed by the CSV header."""
    text = command(socket_path, "show stat")
    try:
        return parse_stat(text)
    except ValueError:
        raise RuntimeError(f"unexpected answer to 'show stat': {text[:200]!r}") from None


@dataclass(frozen=True)
class ServerView:
    """One replica as HAProxy sees it."""

    name: str
    address: str
    status: str  # UP, DOWN, "UP 1/2" (going down), "DOWN 1/2" (going up), MAINT, no check
    check_status: str  # L7OK, L7RSP, L4CON, L4TOUT, ...
    check_desc: str
    sessions_total: int  # connections ever sent to it
    sessions_current: int
    bytes_in: int  # bytes from clients to the replica
    bytes_out: int
    last_change_s: int  # seconds since the last state change
    checks_failed: int = 0  # failed health checks while it was up (HAProxy's chkfail)
    went_down: int = 0  # UP -> DOWN transitions (chkdown)

    @property
    def up(self) -> bool:
        return self.status == "UP"


def _int(row: dict[str, str], key: str) -> int:
    value = row.get(key) or "0"
    return int(value) if value.isdigit() else 0


def servers(socket_path: str | Path, backend: str = "mlbase") -> list[ServerView]:
    """The backend's servers, in configuration order."""
    return server_views(show_stat(socket_path), backend)


def server_views(rows: list[dict[str, str]], backend: str = "mlbase") -> list[ServerView]:
    """The backend's servers among stats rows, in configuration order."""
    found = []
    for row in rows:
        if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        found.append(ServerView(
            name=row["svname"],
            address=row.get("addr", ""),
            status=row.get("status", ""),
            check_status=row.get("check_status", ""),
            check_desc=row.get("last_chk", ""),
            sessions_total=_int(row, "stot"),
            sessions_current=_int(row, "scur"),
            bytes_in=_int(row, "bin"),
            bytes_out=_int(row, "bout"),
            last_change_s=_int(row, "lastchg"),
            checks_failed=_int(row, "chkfail"),
            went_down=_int(row, "chkdown"),
        ))
    return found


def wait_all_up(socket_path: str | Path, backend: str = "mlbase", count: int | None = None,
                timeout: float = 60.0, poll: float = 0.1) -> list[ServerView]:
    """Poll `show stat` until every server (and at least `count`) is UP."""
    deadline = time.monotonic() + timeout
    last: list[ServerView] | str = "socket not answering"
    while time.monotonic() < deadline:
        try:
            last = servers(socket_path, backend)
        except OSError as exc:
            last = f"runtime socket: {exc}"
        else:
            if last and all(s.up for s in last) and (count is None or len(last) >= count):
                return last
        time.sleep(poll)
    raise TimeoutError(f"HAProxy replicas not all UP after {timeout}s: {last}")


def wait_status(socket_path: str | Path, name: str, wanted: str, backend: str = "mlbase",
                timeout: float = 30.0, poll: float = 0.05) -> ServerView:
    """Poll until server `name` reports status `wanted` (e.g. "DOWN")."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for server in servers(socket_path, backend):
            if server.name == name:
                last = server
                if server.status == wanted:
                    return server
        time.sleep(poll)
    raise TimeoutError(f"{name} not {wanted} after {timeout}s: {last}")

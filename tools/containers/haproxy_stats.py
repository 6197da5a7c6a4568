"""HAProxy's view of the replicas, read from its stats page over HTTP.

The local stack reads `show stat` from HAProxy's runtime socket (lb/runtime.py); a
containerised HAProxy keeps that socket inside its container, but its stats page
(`/stats;csv`, published on 127.0.0.1) serves the same CSV. Slots of the DNS
server-template that resolve to no replica are in maintenance ("MAINT (resolution)")
and are left out: they are spare capacity, not replicas.
"""

from __future__ import annotations

import csv
import io
import urllib.request

from lb.runtime import ServerView


def parse(text: str, backend: str = "mlbase") -> list[ServerView]:
    """The backend's resolved servers from HAProxy's stats CSV, in configuration order."""
    if not text.startswith("# "):
        raise ValueError(f"not HAProxy stats CSV: {text[:200]!r}")
    found = []
    for row in csv.DictReader(io.StringIO(text[2:])):
        if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        if not row.get("addr") or "resolution" in row.get("status", ""):
            continue

        def number(key: str) -> int:
            value = row.get(key) or "0"
            return int(value) if value.isdigit() else 0

        found.append(ServerView(
            name=row["svname"], address=row["addr"], status=row.get("status", ""),
            check_status=row.get("check_status", ""), check_desc=row.get("last_chk", ""),
            sessions_total=number("stot"), sessions_current=number("scur"),
            bytes_in=number("bin"), bytes_out=number("bout"), last_change_s=number("lastchg"),
        ))
    return found


def servers(stats_url: str, backend: str = "mlbase", timeout: float = 3.0) -> list[ServerView]:
    """GET `<stats_url>;csv` (e.g. http://127.0.0.1:9999/stats) and parse it."""
    with urllib.request.urlopen(f"{stats_url};csv", timeout=timeout) as reply:
        return parse(reply.read().decode(errors="replace"), backend)

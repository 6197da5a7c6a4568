"""HAProxy's view of the replicas, read from its stats page over HTTP.

The local stack reads `show stat` from HAProxy's runtime socket (lb/runtime.py); a
containerised HAProxy keeps that socket inside its container, but its stats page
(`/stats;csv`, published on 127.0.0.1) serves the same CSV. Slots of the DNS
server-template that resolve to no replica are in maintenance ("MAINT (resolution)")
and are left out: they are spare capacity, not replicas.
"""

from __future__ import annotations

import urllib.request

from lb.runtime import ServerView, parse_stat, server_views


def parse(text: str, backend: str = "mlbase") -> list[ServerView]:
    """The backend's resolved servers from HAProxy's stats CSV, in configuration order."""
    return [view for view in server_views(parse_stat(text), backend)
            if view.address and "resolution" not in view.status]


def servers(stats_url: str, backend: str = "mlbase", timeout: float = 3.0) -> list[ServerView]:
    """GET `<stats_url>;csv` (e.g. http://127.0.0.1:9999/stats) and parse it."""
    with urllib.request.urlopen(f"{stats_url};csv", timeout=timeout) as reply:
        return parse(reply.read().decode(errors="replace"), backend)

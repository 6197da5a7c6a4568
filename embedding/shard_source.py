"""Where the L2 shard set comes from when it may change while the frontend runs.

Two sources, each read again every --cache-shards-refresh seconds by
`L2Client.follow`:

- a file (--cache-shards-file): HOST:PORT entries, one a line or
  comma-separated, `#` starts a comment. `sutra up --shards N` writes one,
  and a Kubernetes ConfigMap mounted as a file works the same way. A file
  that cannot be read keeps the current set (a half-written edit must not
  drop every shard); an empty file means no shards.
- DNS (--cache-shards-dns NAME:PORT): every address NAME resolves to is a
  shard, which is what a headless Service in front of a StatefulSet gives.
  Rendezvous hashing ranks shards by their address text, and a pod's IP
  changes when it restarts, so an address whose reverse name is one label
  under NAME (StatefulSet pods: `shard-0.shards.ns.svc.cluster.local` for
  the service `shards` or `shards.ns.svc.cluster.local`) is used by that
  stable name instead: a restarted pod gets its keys back. A failed or empty resolution keeps the
  current set.

Both return the addresses sorted, so the same set always reads the same.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

from common.flags import split_csv

log = logging.getLogger(__name__)


def parse_shard_list(text: str) -> tuple[str, ...]:
    """'a:1, b:2\\n# comment\\nc:3' -> ('a:1', 'b:2', 'c:3'), sorted, duplicates dropped."""
    found: dict[str, None] = {}
    for line in text.splitlines():
        for address in split_csv(line.split("#", 1)[0]):
            found[address] = None
    return tuple(sorted(found))


def file_source(path: str | Path):
    """An async callable: the shards listed in `path`, or None when it cannot be read."""
    path = Path(path)

    async def read() -> tuple[str, ...] | None:
        try:
            text = await asyncio.to_thread(path.read_text)
        except OSError as exc:
            log.warning("cannot read the shard list %s (%s); keeping the current shards", path, exc)
            return None
        return parse_shard_list(text)

    return read


def _stable_name(ip: str, domain: str) -> str | None:
    """The reverse name of `ip` when it is a pod name under `domain` (blocking: a thread runs it)."""
    try:
        name = socket.gethostbyaddr(ip)[0].rstrip(".")
    except OSError:
        return None
    return name if f".{domain}." in f"{name}." else None


def dns_source(target: str):
    """An async callable: the shards behind NAME:PORT, or None when NAME does not resolve."""
    host, _, port = target.rpartition(":")
    # StatefulSet pods are named <pod>.<service>.<namespace>.svc...: one label under the service.
    domain = host.rstrip(".")

    async def read() -> tuple[str, ...] | None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve %s (%s); keeping the current shards", host, exc)
            return None
        ips = sorted({info[4][0] for info in infos})
        if not ips:
            return None
        names = await asyncio.gather(*(asyncio.to_thread(_stable_name, ip, domain) for ip in ips))
        return tuple(sorted(f"{name}:{port}" if name else (f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
                            for ip, name in zip(ips, names)))

    return read


def from_settings(settings):
    """The source the frontend's settings name (--cache-shards-file or --cache-shards-dns), or None
    when the shard set is the fixed --cache-shard list."""
    if settings.cache_shards_file:
        return file_source(settings.cache_shards_file)
    if settings.cache_shards_dns:
        return dns_source(settings.cache_shards_dns)
    return None

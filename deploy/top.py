"""`sutra top`: a live view of the running stack, read only from the processes' /metrics.

It finds the endpoints as `sutra status --json` does (`deploy.stack.processes`), scrapes every
one each `--interval` seconds, and shows what changed in between: requests and texts per
second, hit rates per cache level, p50 and p99 latencies (from the histograms' buckets, as
PromQL's histogram_quantile computes them), the frontend's and each replica's queues, and each
replica's state as HAProxy's exporter reports it. `--once` prints one frame (two scrapes an
interval apart) and exits: 0 when every endpoint answered, 1 when one did not, 3 when the stack
is not running.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from common.settings import item
from deploy import scrape, stack
from deploy.scrape import Page, delta_buckets, quantile, rate
from deploy.settings import StackSettings
from deploy.supervisor import Supervisor
from embedding.settings import FrontendSettings

TOKEN_ENV = item(FrontendSettings, "auth_tokens").env
# --once output is meant for logs and scripts: wide enough that no table wraps.
ONCE_WIDTH = 160


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between scrapes; rates and quantiles cover the last interval "
                             "(default %(default)s)")
    parser.add_argument("--once", action="store_true",
                        help="print one frame (two scrapes --interval apart) and exit, for scripts and tests")
    parser.add_argument("--token", default=None,
                        help=f"bearer token for the frontend's admin /metrics when it requires one (env {TOKEN_ENV}, "
                             "the variable the frontend reads its token from)")


@dataclass(frozen=True)
class Target:
    name: str
    role: str
    url: str


@dataclass
class Scrape:
    """One round: each target's page, or why it could not be read."""

    at: float
    pages: dict[str, Page]
    errors: dict[str, str]


def targets(settings: StackSettings) -> list[Target]:
    return [Target(v.name, v.role, v.metrics_url) for v in stack.processes(settings) if v.metrics_url]


def scrape_all(found: list[Target], token: str | None, timeout: float) -> Scrape:
    def one(t: Target) -> Page | str:
        try:
            return scrape.fetch(t.url, timeout=timeout, token=token if t.role == "frontend" else None)
        except Exception as exc:  # noqa: BLE001 - shown in the frame, the others still are
            return f"{type(exc).__name__}: {exc}"

    at = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, len(found))) as pool:
        results = dict(zip((t.name for t in found), pool.map(one, found)))
    return Scrape(at, {n: r for n, r in results.items() if isinstance(r, Page)},
                  {n: r for n, r in results.items() if isinstance(r, str)})


# -- formatting ---------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def _pct(part: float | None, whole: float | None) -> str:
    return "-" if not whole or part is None else f"{100 * part / whole:.1f}%"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Frame:
    """What changed between two scrapes, laid out as rich tables."""

    def __init__(self, found: list[Target], before: Scrape | None, now: Scrape) -> None:
        self.found = found
        self.before = before
        self.now = now
        self.seconds = now.at - before.at if before is not None else 0.0

    def _pages(self, name: str) -> tuple[Page | None, Page | None]:
        before = self.before.pages.get(name) if self.before is not None else None
        return before, self.now.pages.get(name)

    def _rate(self, name: str, metric: str, **labels: str) -> float | None:
        before, now = self._pages(name)
        return None if now is None else rate(before, now, self.seconds, metric, **labels)

    def _quantiles(self, name: str, metric: str, **labels: str) -> tuple[float | None, float | None]:
        before, now = self._pages(name)
        if now is None:
            return None, None
        buckets = delta_buckets(before, now, metric, **labels)
        return quantile(0.5, buckets), quantile(0.99, buckets)

    def _hit_rate(self, name: str, metric: str, **labels: str) -> str:
        hits = self._rate(name, metric, result="hit", **labels)
        misses = self._rate(name, metric, result="miss", **labels)
        return _pct(hits, (hits or 0) + (misses or 0))

    def render(self, title: str) -> Group:
        parts: list = [Text(title, style="bold")]
        for t in self.found:
            if t.name in self.now.errors:
                parts.append(Text(f"{t.name}: {t.url} unreachable: {self.now.errors[t.name]}", style="red"))
        by_role = {}
        for t in self.found:
            by_role.setdefault(t.role, []).append(t)
        for t in by_role.get("frontend", []):
            if t.name in self.now.pages:
                parts.append(self.frontend(t))
        for t in by_role.get("cacheshard", []):
            if t.name in self.now.pages:
                parts.append(self.shard(t))
        parts.append(self.replicas(by_role.get("mlbase", []), by_role.get("haproxy", [])))
        return Group(*parts)

    def _grid(self, title: str, rows: list[tuple[str, str]]) -> Table:
        table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
        for _ in range(4):
            table.add_column(justify="left")
        cells = [f"{k} [bold]{v}[/bold]" for k, v in rows]
        for i in range(0, len(cells), 4):
            table.add_row(*cells[i:i + 4])
        return table

    def frontend(self, t: Target) -> Table:
        n, p = t.name, self.now.pages[t.name]
        p50, p99 = self._quantiles(n, "sutra_embedding_request_duration_seconds")
        m50, m99 = self._quantiles(n, "sutra_embedding_mlbase_batch_duration_seconds")
        gauge = p.value
        return self._grid(f"frontend {n}  {t.url}", [
            ("requests/s", _num(self._rate(n, "sutra_embedding_requests_total"))),
            ("texts/s", _num(self._rate(n, "sutra_embedding_inputs_total"))),
            ("computed/s", _num(self._rate(n, "sutra_embedding_computed_total"))),
            ("coalesced/s", _num(self._rate(n, "sutra_embedding_coalesced_total"))),
            ("L1 hits", self._hit_rate(n, "sutra_embedding_cache_lookups_total", level="l1")),
            ("L2 hits", self._hit_rate(n, "sutra_embedding_cache_lookups_total", level="l2")),
            ("request p50", _ms(p50)), ("request p99", _ms(p99)),
            ("ML-base p50", _ms(m50)), ("ML-base p99", _ms(m99)),
            ("L1 entries", _num(gauge("sutra_embedding_l1_entries"), 0)),
            ("pending flights", _num(gauge("sutra_embedding_pending_flights"), 0)),
            ("batches in flight", _num(gauge("sutra_embedding_batches_inflight"), 0)),
            ("write-back queued", _num(gauge("sutra_embedding_writeback_queued"), 0)),
            ("L2 waiting", _num(gauge("sutra_embedding_l2_waiting_lookups"), 0)),
            ("open streams", _num(gauge("sutra_embedding_open_streams"), 0)),
        ])

    def shard(self, t: Target) -> Table:
        n, p = t.name, self.now.pages[t.name]
        p50, p99 = self._quantiles(n, "sutra_cacheshard_lookup_duration_seconds")
        s50, s99 = self._quantiles(n, "sutra_cacheshard_store_duration_seconds")
        return self._grid(f"cache shard {n}  {t.url}", [
            ("keys looked up/s", _num(self._rate(n, "sutra_cacheshard_lookups_total"))),
            ("hits", self._hit_rate(n, "sutra_cacheshard_lookups_total")),
            ("stored/s", _num(self._rate(n, "sutra_cacheshard_stores_total"))),
            ("entries", _num(p.value("sutra_cacheshard_entries"), 0)),
            ("lookup p50", _ms(p50)), ("lookup p99", _ms(p99)),
            ("store p50", _ms(s50)), ("store p99", _ms(s99)),
            ("disk", _bytes(p.value("sutra_cacheshard_disk_bytes"))),
            ("memtables", _bytes(p.value("sutra_cacheshard_rocksdb_memtable_bytes"))),
            ("compactions", f"{p.value('sutra_cacheshard_rocksdb_compactions_running'):.0f} running, "
                            f"{p.value('sutra_cacheshard_rocksdb_compactions_pending'):.0f} pending"),
            ("write stalls", _num(p.value("sutra_cacheshard_rocksdb_write_stalls_total"), 0)),
        ])

    def replicas(self, replicas: list[Target], lbs: list[Target]) -> Table:
        lb = next((self.now.pages[t.name] for t in lbs if t.name in self.now.pages), None)
        table = Table(title="replicas", title_justify="left")
        for column in ("replica", "HAProxy", "conns", "queue", "batches/s", "texts/s", "texts/batch", "padding",
                       "inference p50", "inference p99", "wait p99", "refused/s"):
            table.add_column(column, justify="left" if column in ("replica", "HAProxy") else "right")
        for t in replicas:
            state, conns = haproxy_view(lb, t.name)
            p = self.now.pages.get(t.name)
            if p is None:
                table.add_row(t.name, state, conns, *["-"] * 9)
                continue
            n = t.name
            batches, texts = self._rate(n, "sutra_mlbase_batches_total"), self._rate(n, "sutra_mlbase_texts_total")
            tokens = self._rate(n, "sutra_mlbase_tokens_total")
            padding = self._rate(n, "sutra_mlbase_padding_tokens_total")
            i50, i99 = self._quantiles(n, "sutra_mlbase_inference_duration_seconds")
            _, w99 = self._quantiles(n, "sutra_mlbase_queue_wait_seconds")
            table.add_row(n, state, conns, _num(p.value("sutra_mlbase_queue_texts"), 0), _num(batches), _num(texts),
                          _num(texts / batches if batches and texts is not None else None),
                          _pct(padding, (tokens or 0) + (padding or 0)), _ms(i50), _ms(i99), _ms(w99),
                          _num(self._rate(n, "sutra_mlbase_rejected_total")))
        return table


def haproxy_view(page: Page | None, server: str) -> tuple[str, str]:
    """(state, current connections) of replica `server` from HAProxy's exporter."""
    if page is None:
        return "?", "-"
    states = page.series("haproxy_server_status", proxy="mlbase", server=server)
    state = next((labels["state"] for labels, value in states if value == 1 and "state" in labels), None)
    if state is None:  # an exporter without the state label: 1 = UP
        state = "UP" if any(value == 1 for _, value in states) else ("DOWN" if states else "?")
    conns = page.series("haproxy_server_current_sessions", proxy="mlbase", server=server)
    return state, _num(sum(v for _, v in conns), 0) if conns else "-"


def main(settings: StackSettings, args: argparse.Namespace) -> int:
    if not Supervisor(settings.supervisor_socket).reachable():
        print(f"stack not running (no supervisord at {settings.supervisor_socket})", file=sys.stderr)
        return 3
    if args.interval <= 0:
        print("sutra top: --interval must be positive", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV) or None
    found = targets(settings)
    timeout = max(0.5, min(args.interval, 3.0))

    def title() -> str:
        return f"sutra top  {settings.run_dir}  every {args.interval:g} s  {time.strftime('%H:%M:%S')}"

    before = scrape_all(found, token, timeout)
    if args.once:
        time.sleep(args.interval)
        now = scrape_all(found, token, timeout)
        console = Console(width=max(ONCE_WIDTH, Console().width), soft_wrap=False)
        console.print(Frame(found, before, now).render(title()))
        return 1 if now.errors else 0
    console = Console()
    try:
        with Live(Frame(found, None, before).render(title()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                now = scrape_all(found, token, timeout)
                live.update(Frame(found, before, now).render(title()), refresh=True)
                before = now
    except KeyboardInterrupt:
        return 0

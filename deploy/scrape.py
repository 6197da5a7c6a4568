"""Reading /metrics pages: fetch one, look samples up by name and labels, and turn two scrapes
into rates and histogram quantiles (what `sutra top` shows, as PromQL's `rate` and
`histogram_quantile` would over the same interval)."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Page:
    """One scrape: every sample as (name, labels, value), and the families' names."""

    samples: tuple[tuple[str, Mapping[str, str], float], ...]
    families: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Page:
        families = list(text_string_to_metric_families(text))
        return cls(tuple((s.name, s.labels, s.value) for f in families for s in f.samples),
                   frozenset(f.name for f in families))

    def series(self, name: str, **labels: str) -> list[tuple[Mapping[str, str], float]]:
        """(labels, value) of every sample called `name` whose labels include `labels`."""
        return [(have, value) for sample, have, value in self.samples
                if sample == name and all(have.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The sum over matching series (0 when there is none)."""
        return sum(value for _, value in self.series(name, **labels))

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """Histogram `name`'s cumulative buckets (upper bound, count), summed over matching series."""
        found: dict[float, float] = {}
        for have, value in self.series(name + "_bucket", **labels):
            bound = float(have["le"])
            found[bound] = found.get(bound, 0.0) + value
        return sorted(found.items())


def fetch(url: str, timeout: float = 2.0, token: str | None = None) -> Page:
    """GET `url` (a Prometheus text page), with a bearer token when given."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return Page.parse(reply.read().decode())


def rate(before: Page | None, now: Page, seconds: float, name: str, **labels: str) -> float | None:
    """Per-second increase of counter `name` between two scrapes; None without an earlier one. A
    restarted process (the counter went down) counts from zero, as PromQL's rate does."""
    if before is None or seconds <= 0:
        return None
    old, new = before.value(name, **labels), now.value(name, **labels)
    return (new - old if new >= old else new) / seconds


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile over cumulative (upper bound, count) buckets: linear within the
    bucket holding rank q * total; None when there are no observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower  # the highest finite bound, as PromQL answers
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def delta_buckets(before: Page | None, now: Page, name: str, **labels: str) -> list[tuple[float, float]]:
    """The observations of histogram `name` made between two scrapes (all of them without an
    earlier scrape, or after a restart)."""
    new = now.buckets(name, **labels)
    if before is None:
        return new
    old = dict(before.buckets(name, **labels))
    diff = [(bound, count - old.get(bound, 0.0)) for bound, count in new]
    return new if any(d < 0 for _, d in diff) else diff

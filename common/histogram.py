"""Prometheus histograms kept inside a process's own counters, and their rendering.

Every process keeps its figures in plain objects that its RPCs read (the frontend's `Stats`, the
shard's `Counters`, a replica's `BatchStats`) and renders them for /metrics with a custom
collector at scrape time, so GetStats, GetCacheStats and /metrics read one set of numbers and
can never disagree. A latency or size distribution is one more such figure: `Histogram` counts
observations into fixed buckets as a Prometheus histogram does, and `family` renders any number
of them (one per label set) as one metric family.

One writer at a time (the event loop, or a replica's inference thread); a scrape from another
thread reads a copy. Each bucket increment is atomic under the GIL, and the count is derived from
the buckets, so a scrape always sees `_count` equal to the `+Inf` bucket.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# Seconds: from an L1 lookup (tens of microseconds) to a slow batch of long texts.
LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Texts in one batch.
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Tokens in one forward pass.
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Histogram:
    """Observations counted into buckets with upper bounds `bounds` (and +Inf), plus their sum."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("histogram bounds must increase")
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are `le`: a value equal to a bound belongs to that bound's bucket.
        self._counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(`le` label, observations at or under it) per bucket, +Inf last: the exposition's shape."""
        counts = list(self._counts)
        total, out = 0, []
        for bound, n in zip((*self.bounds, math.inf), counts):
            total += n
            out.append((floatToGoString(bound), total))
        return out


def family(name: str, documentation: str, labels: Sequence[str] = (),
           series: Iterable[tuple[Sequence[str], Histogram]] = ()) -> HistogramMetricFamily:
    """One histogram family, `name` without the `_bucket`/`_sum`/`_count` suffixes; one series per
    (label values, Histogram)."""
    found = HistogramMetricFamily(name, documentation, labels=list(labels))
    for values, histogram in series:
        found.add_metric(list(values), histogram.cumulative(), histogram.sum)
    return found

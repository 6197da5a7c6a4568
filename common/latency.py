"""A bounded window of recent latencies with cheap percentiles for stats, and the same
observations as a Prometheus histogram (`histogram`) for /metrics."""

from __future__ import annotations

from collections import deque

import numpy as np

from common.histogram import Histogram


class LatencyWindow:
    """GetCacheStats' p50/p99 come from the recent window (what it has always reported); /metrics
    renders `histogram`, which counts every observation since start, so a scraper can compute any
    quantile over any interval from bucket rates."""

    def __init__(self, size: int = 4096) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self.histogram = Histogram()

    def record(self, seconds: float) -> None:
        self._samples.append(seconds)
        self.histogram.observe(seconds)

    def percentile_ms(self, q: float) -> float:
        if not self._samples:
            return 0.0
        return float(np.percentile(np.fromiter(self._samples, dtype=np.float64), q) * 1000.0)

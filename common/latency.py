"""A bounded window of recent latencies with cheap percentiles for stats."""

from __future__ import annotations

from collections import deque

import numpy as np


class LatencyWindow:
    def __init__(self, size: int = 4096) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def record(self, seconds: float) -> None:
        self._samples.append(seconds)

    def percentile_ms(self, q: float) -> float:
        if not self._samples:
            return 0.0
        return float(np.percentile(np.fromiter(self._samples, dtype=np.float64), q) * 1000.0)

"""The frontend's in-flight gauges, scraped from /metrics: their idle values, peaks and the wait for idle."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from deploy.scrape import fetch

# Gauges on the frontend's /metrics and their values once traffic has stopped;
# None = the frontend's --mlbase-concurrency (--expect-free-slots here).
IDLE_GAUGES: dict[str, int | None] = {
    "sutra_embedding_pending_flights": 0,
    "sutra_embedding_queued_flights": 0,
    "sutra_embedding_batches_inflight": 0,
    "sutra_embedding_free_batch_slots": None,
    "sutra_embedding_writeback_queued": 0,
    "sutra_embedding_open_streams": 0,
    "sutra_embedding_l2_waiting_lookups": 0,
    "sutra_embedding_mlbase_inflight": 0,
    "sutra_embedding_stalled": 0,
}


# -- metrics -----------------------------------------------------------------------------------

def scrape(url: str, timeout: float = 3.0) -> dict[str, float]:
    """Every sample on a Prometheus text page, summed over labels, by sample name."""
    out: dict[str, float] = defaultdict(float)
    for name, _labels, value in fetch(url, timeout=timeout).samples:
        out[name] += value
    return dict(out)


def gauge_view(sample: dict[str, float], free_slots: int) -> tuple[dict, bool]:
    """The idle gauges ({name: value or None if missing}) and whether all are at their idle value."""
    view = {}
    idle = True
    for name, want in IDLE_GAUGES.items():
        value = sample.get(name)
        view[name.removeprefix("sutra_embedding_")] = value
        if value is None or value != (free_slots if want is None else want):
            idle = False
    return view, idle


async def sample_metrics(url: str, free_slots: int, stop: asyncio.Event, every: float, peaks: dict) -> None:
    while not stop.is_set():
        try:
            view, _ = gauge_view(await asyncio.to_thread(scrape, url), free_slots)
            for name, value in view.items():
                if value is not None:
                    key = "min" if name == "free_batch_slots" else "max"
                    old = peaks.setdefault(name, value)
                    peaks[name] = min(old, value) if key == "min" else max(old, value)
        except Exception:  # noqa: BLE001 - a missed sample only loses a peak
            pass
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def poll_idle(url: str, free_slots: int, since: float, timeout: float) -> dict:
    """Scrape until every gauge is idle or `timeout` seconds after `since` (monotonic) have passed."""
    last, error = {}, None
    while True:
        try:
            last, idle = gauge_view(await asyncio.to_thread(scrape, url), free_slots)
            error = None
        except Exception as exc:  # noqa: BLE001 - reported; the poll goes on
            idle, error = False, f"{type(exc).__name__}: {exc}"
        waited = time.monotonic() - since
        if idle or waited >= timeout:
            return {"idle": idle, "idle_after_s": round(waited, 3) if idle else None, "gauges": last,
                    **({"scrape_error": error} if error else {})}
        await asyncio.sleep(0.25)

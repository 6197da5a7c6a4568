"""A replica's Prometheus view: queue, batches, padding, timings, refusals and the model.

Rendered at scrape time from what the engine and the batcher already count (`BatchStats`,
written by the inference thread; `ReplicaEngine.rejected`), so nothing is counted twice. Before
the model is loaded the batch figures are zeros and there is no model_info series.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from common import histogram
from common.metrics_http import process_registry
from mlbase.batcher import BatchStats
from mlbase.engine import ReplicaEngine

P = "sutra_mlbase_"


class ReplicaCollector(Collector):
    def __init__(self, engine: ReplicaEngine) -> None:
        self._engine = engine

    def collect(self):
        engine = self._engine
        batcher = engine.batcher
        s = batcher.stats if batcher is not None else BatchStats()
        yield GaugeMetricFamily(P + "ready", "1 once the model is loaded and warmed up", value=int(engine.ready))
        yield GaugeMetricFamily(P + "queue_texts", "Texts admitted: queued for or in a forward pass",
                                value=batcher.admitted if batcher is not None else 0)
        yield GaugeMetricFamily(P + "queue_limit_texts", "Texts admitted at most (--max-queue)",
                                value=engine.settings.max_queue)
        for name, doc, value in (
            ("batches", "Forward passes run", s.batches),
            ("texts", "Texts embedded (warm-up included)", s.texts),
            ("tokens", "Tokens of the texts embedded, without padding", s.tokens),
            ("padding_tokens", "Padding computed: padded tokens less real tokens", s.padded_tokens - s.tokens),
            ("generations", "Times the inference thread took everything pending", s.generations),
            ("failed_batches", "Forward passes the backend failed", s.failed_batches),
            ("inline_batches", "Forward passes completed on the event loop: a small request on an idle replica "
             "(--inline-tokens)", s.inline_batches),
            ("inference_cpu_seconds", "CPU time of the thread that ran each forward pass (the inference thread, "
             "or the event loop for inline passes; a backend's other threads, with --threads above 1, are not "
             "counted)", s.inference_cpu),
        ):
            yield CounterMetricFamily(P + name, doc, value=value)
        rejected = CounterMetricFamily(P + "rejected", "Embed calls refused, by reason", labels=["reason"])
        for reason, count in engine.rejected.items():
            rejected.add_metric([reason], count)
        yield rejected
        for name, doc, h in (
            ("batch_texts", "Texts per forward pass", s.batch_texts),
            ("batch_tokens", "Tokens per forward pass, padding included (texts x longest text)", s.batch_tokens),
            ("queue_wait_seconds", "Time a text waits from submission to the start of its forward pass",
             s.queue_wait),
            ("inference_duration_seconds", "Time of one forward pass", s.inference),
        ):
            yield histogram.family(P + name, doc, series=[((), h)])
        d = engine.description
        if d is not None:
            yield InfoMetricFamily(P + "model", "The model this replica serves", value={
                "model_id": d.model_id, "fingerprint": engine.fingerprint, "backend": d.backend,
                "precision": d.precision})


def make_registry(engine: ReplicaEngine) -> CollectorRegistry:
    return process_registry(ReplicaCollector(engine))

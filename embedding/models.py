"""Several models in one frontend: a name for each, and the engine that serves it.

The default model is the one behind `--mlbase`; each `--extra-model
NAME=HOST:PORT` adds another, with its own ML-base pool (its own replicas,
normally its own HAProxy backend) and its own FrontendEngine: its own
fingerprint in every cache key (so two models never read each other's
entries, in L1 or L2), width policy and limits from its replicas' GetInfo,
single-flight table and batching. The L2 shards and the counters are shared.
EmbedRequest.model picks one: empty (or the default model's id) means the
default.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import Unavailable
from embedding.engine import FrontendEngine, unknown_model
from embedding.mlbase_pool import MLBasePool


@dataclass
class ModelRoute:
    name: str  # "" for the default model (its model id names it once known)
    pool: MLBasePool
    engine: FrontendEngine

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        m = self.engine.model
        return m.info.model_id if m is not None else ""


def parse_extra(spec: str) -> tuple[str, str]:
    """"NAME=HOST:PORT" -> (name, address); settings have checked the shape."""
    name, _, address = spec.partition("=")
    return name.strip(), address.strip()


class Models:
    def __init__(self, default: ModelRoute, extra: list[ModelRoute] | None = None) -> None:
        self.default = default
        self.extra = list(extra or [])
        self._by_name = {r.name: r for r in self.extra}

    @property
    def routes(self) -> list[ModelRoute]:
        return [self.default, *self.extra]

    def names(self) -> list[str]:
        """GetInfo.models: the default first."""
        return [r.display_name for r in self.routes]

    def route(self, name: str) -> ModelRoute:
        if not name or name == self.default.display_name:
            return self.default
        found = self._by_name.get(name)
        if found is None:
            raise unknown_model(name, self.names())
        return found

    def engine(self, name: str) -> FrontendEngine:
        route = self.route(name)
        if route.engine.model is None:
            raise Unavailable(f"model {route.display_name or 'default'!r} is starting: its replicas have not "
                              "described it yet")
        return route.engine

"""`sutra up --models-file FILE`: more models in one stack, beside the default one.

    models:
      - name: minilm-cls            # what EmbedRequest.model says; letters, digits, . _ -
        path: /models/minilm-cls    # a local sentence-transformers folder
        replicas: 1                 # default 1, at most MAX_REPLICAS
        backend: onnx               # optional: the replicas' default otherwise

(YAML, or JSON by its .json suffix.) Each model gets its own replicas and its
own HAProxy (its own backend, health checks and stats page), and the
frontend serves it as `--extra-model NAME=HAPROXY` (embedding/models.py):
its own fingerprint in the cache keys, its own width policy, limits,
single-flight and batching. Model k (1-based, in file order) takes the block
of BLOCK ports from `--models-base-port` + BLOCK * (k - 1): its HAProxy,
then HAProxy's stats page, then its replicas' gRPC ports, then (from +10)
their metrics ports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

BLOCK = 20
MAX_REPLICAS = 9
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,40}$")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    replicas: int = 1
    backend: str = ""
    index: int = 1  # 1-based position in the file: which port block
    base_port: int = 0  # the stack's --models-base-port

    @property
    def lb_port(self) -> int:
        return self.base_port + BLOCK * (self.index - 1)

    @property
    def stats_port(self) -> int:
        return self.lb_port + 1

    def replica_port(self, i: int) -> int:
        return self.lb_port + 1 + i

    def metrics_port(self, i: int) -> int:
        return self.lb_port + 10 + i

    def replica_names(self) -> list[str]:
        return [f"{self.name}-mlbase{i}" for i in range(1, self.replicas + 1)]

    @property
    def haproxy_name(self) -> str:
        return f"haproxy-{self.name}"

    def ports(self) -> dict[str, int]:
        ports = {f"{self.name} lb": self.lb_port, f"{self.name} stats": self.stats_port}
        for i, name in enumerate(self.replica_names(), start=1):
            ports[name] = self.replica_port(i)
            ports[f"{name}_metrics"] = self.metrics_port(i)
        return ports


def read(path: str | Path, base_port: int) -> tuple[ModelSpec, ...]:
    """The models of `path`; ValueError names the entry that is wrong."""
    path = Path(path).expanduser()
    text = path.read_text()
    if path.suffix == ".json":
        doc = json.loads(text)
    else:
        import yaml
        doc = yaml.safe_load(text)
    entries = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected `models:` with a list of models")
    specs = []
    for k, entry in enumerate(entries, start=1):
        where = f"{path}: models[{k - 1}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "path", "replicas", "backend"}:
            raise ValueError(f"{where}: expected name, path, replicas, backend")
        name, model_path = str(entry.get("name", "")), str(entry.get("path", ""))
        if not _NAME.match(name) or name == "default":
            raise ValueError(f"{where}: `name` must be 1-40 of A-Z a-z 0-9 . _ - (and not `default`)")
        if not model_path or not Path(model_path).expanduser().is_dir():
            raise ValueError(f"{where}: `path` {model_path!r} is not a model folder")
        replicas = entry.get("replicas", 1)
        if not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"{where}: `replicas` must be 1 to {MAX_REPLICAS}")
        specs.append(ModelSpec(name, str(Path(model_path).expanduser().resolve()), replicas,
                               str(entry.get("backend", "") or ""), k, base_port))
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"{path}: model names repeat")
    return tuple(specs)

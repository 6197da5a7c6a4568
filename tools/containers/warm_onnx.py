"""Export the default replica's ONNX graphs at image build time.

A replica with the default flags (`--backend onnx`, fp32, fused) loads graphs from
SUTRA_ONNX_CACHE and exports them with torch when they are missing, which takes
tens of seconds per start. Loading the backend once here leaves them in the image,
so every replica container starts from a warm cache and never writes the graph
again. The settings are the replica's own (`mlbase.settings.load_settings`), read
from the same environment the containers get, so the cache key matches.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mlbase.backends import registry
from mlbase.settings import load_settings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings([])
    backend = registry.create(settings.backend_name, settings.backend)
    backend.load()
    graphs = sorted(Path(settings.onnx_cache_dir).expanduser().rglob("*.onnx"))
    if settings.backend_name == "onnx" and not graphs:
        print(f"no ONNX graph was written under {settings.onnx_cache_dir}", file=sys.stderr)
        return 1
    for graph in graphs:
        print(f"cached {graph} ({graph.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

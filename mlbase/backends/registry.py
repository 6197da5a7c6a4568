"""Backends by name, imported only when chosen.

Each entry maps a `--backend` name to "module:Class". Importing lazily keeps
a replica that runs one backend from importing the others' libraries (torch
alone takes seconds). To add a backend: write `mlbase/backends/<name>_backend.py`
with a `Backend` subclass and add one line here.
"""

from __future__ import annotations

import importlib

from mlbase.backends.base import Backend, BackendOptions

BACKENDS: dict[str, str] = {
    "torch": "mlbase.backends.torch_backend:TorchBackend",
    "onnx": "mlbase.backends.onnx_backend:OnnxBackend",
}


def names() -> list[str]:
    return sorted(BACKENDS)


def create(name: str, options: BackendOptions) -> Backend:
    """Build (not load) the backend called `name`."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(names())}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(options)

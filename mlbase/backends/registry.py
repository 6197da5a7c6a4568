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
    "openvino": "mlbase.backends.openvino_backend:OpenVinoBackend",
}
# The precisions each backend runs (--precision), the first its default; declared here so that
# settings can check them without importing torch or onnxruntime. No onnx bf16: onnxruntime's
# CPU provider has no bfloat16 MatMul (1.32: NOT_IMPLEMENTED), and its fp16 graph ran no faster
# than fp32 here.
PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16"),
    "onnx": ("fp32", "int8", "int8-static"),
    # OpenVINO's CPU plugin on the onnx backend's graphs; bf16 needs a CPU with native bfloat16.
    "openvino": ("fp32", "bf16", "int8-static"),
}


def names() -> list[str]:
    return sorted(BACKENDS)


def all_precisions() -> list[str]:
    """Every precision some backend runs, in first-seen order."""
    return list(dict.fromkeys(p for precisions in PRECISIONS.values() for p in precisions))


def backends_for(precision: str) -> list[str]:
    return [name for name in names() if precision in PRECISIONS[name]]


def create(name: str, options: BackendOptions) -> Backend:
    """Build (not load) the backend called `name`."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(names())}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(options)

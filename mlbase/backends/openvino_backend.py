"""OpenVINO backend: the ONNX backend's exported graphs, compiled by OpenVINO's CPU plugin.

Why a second runtime for the same graphs: OpenVINO compiles the whole
transformer into fused kernels (attention in one node, GELU and the bias in
the MatMul's epilogue) and, asked for bfloat16, runs its MatMuls on AMX or
AVX512-BF16 where the CPU has them. onnxruntime's CPU provider has no
bfloat16 MatMul at all, and spends much of a static-int8 batch in separate
element-wise nodes (BiasGelu, SkipLayerNormalization, the quantize steps).
Which runtime wins depends on the CPU, which is what `sutra tune` measures.

Precisions:
- "fp32": the plain fp32 graph with inference precision f32.
- "bf16": the same graph with inference precision bf16 (weights and MatMul
  inputs in bfloat16, accumulation in fp32). A CPU without native bfloat16
  would make OpenVINO fall back to f32 silently; the backend refuses to load
  there instead, so a "bf16" fingerprint always means bf16 arithmetic.
- "int8-static": the ONNX backend's calibrated QDQ graph (same calibration
  set and tag), executed by OpenVINO's int8 kernels.

Everything around the graph (tokenizer, padding, pooling, normalisation,
the graph cache and its build-time check) is the ONNX backend's, inherited.
The fingerprint's backend is "openvino", so its vectors never share a cache
with onnxruntime's, even for the same graph.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from mlbase.backends.base import BackendOptions
from mlbase.backends.onnx_export import OUTPUT_NAME
from mlbase.backends.onnx_backend import OnnxBackend

# Our precision name -> OpenVINO's inference precision hint.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8-static": "f32"}


class OpenVinoBackend(OnnxBackend):
    name = "openvino"

    def __init__(self, options: BackendOptions, fused: bool | None = None) -> None:
        # OpenVINO fuses the graph itself; onnxruntime's contrib fusions (Attention,
        # SkipLayerNormalization) would only hide the structure from it.
        if fused:
            raise ValueError("the openvino backend runs the plain graph only (it fuses the graph itself)")
        super().__init__(options, fused=False)

    def graph_precision(self) -> str:
        return "fp32" if self.precision == "bf16" else self.precision

    def precision_label(self) -> str:
        return "bf16" if self.precision == "bf16" else super().precision_label()

    def _session(self, graph: Path):
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[self.precision],
            "PERFORMANCE_HINT": "LATENCY",
            # Several replicas share a machine: pinning each one's threads would put them all on the
            # same cores.
            "ENABLE_CPU_PINNING": False,
        }
        if self.options.threads > 0:
            config["INFERENCE_NUM_THREADS"] = self.options.threads
        compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
        granted = compiled.get_property("INFERENCE_PRECISION_HINT")
        wanted = config["INFERENCE_PRECISION_HINT"]
        # OpenVINO also grants bf16 on AVX-512 CPUs without bfloat16 instructions, and emulates it
        # there; "bf16" is kept for CPUs that compute in bfloat16 natively.
        if wanted == "bf16" and not native_bf16():
            raise ValueError("this CPU has no native bfloat16 (avx512_bf16 or amx_bf16): "
                             f"--precision {self.precision} is not available here")
        if granted.get_type_name() != wanted:
            raise ValueError(f"openvino runs this graph in {granted.get_type_name()} on this CPU, not {wanted}: "
                             f"--precision {self.precision} is not available here")
        return _Compiled(compiled)

    def _inputs(self, session: "_Compiled") -> list[str]:
        return session.input_names

    def _run(self, session: "_Compiled", feeds: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(feeds)


def native_bf16() -> bool:
    from mlbase import tuned

    return any(flag in tuned.cpu_identity().flags for flag in ("avx512_bf16", "amx_bf16"))


class _Compiled:
    """One compiled model and its one infer request. A replica runs inference on one thread,
    so reusing the request saves allocating its tensors per batch; the lock keeps a second
    caller (an onnxruntime session may be shared between threads) from overwriting them."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in compiled.inputs]
        self.output = compiled.output(OUTPUT_NAME)
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self._lock:
            # infer() returns views of the request's own buffers, which the next call overwrites.
            return np.array(self.request.infer(feeds)[self.output], copy=True)

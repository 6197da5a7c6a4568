"""Build the ONNX graphs the onnx backend runs, once, into a shared cache.

Exporting a transformer with torch takes seconds and needs torch, the graph
optimiser and quantizer take a few more; a replica that starts on a warm
cache needs neither. So every graph is derived once per (weights digest,
recipe) and kept under the cache folder:

    <cache>/<weights digest>-<recipe hash>/
        fp32-plain.onnx    torch.onnx.export (TorchScript exporter, opset 17, eager attention)
        fp32-fused.onnx    + onnxruntime's transformer optimiser (Attention, EmbedLayerNorm,
                           SkipLayerNorm and BiasGelu fusion)
        int8-plain[-keep-<h>].onnx   dynamic per-channel QInt8 weights of fp32-plain's MatMuls
        int8-fused[-keep-<h>].onnx   + the transformer optimiser
        int8-static-plain-cal-<c>[-keep-<h>].onnx   static int8 (QDQ): per-channel QInt8 weights,
                           per-tensor QUInt8 activations with scales fixed by calibration set <c>
        *.json             how each graph was made and what its check measured

The recipe hash covers everything that could change a graph: this module's
RECIPE_VERSION, the opset, the attention implementation and the torch,
transformers and onnxruntime versions. Several replicas starting together
serialise on a file lock in the folder; each graph is written to a temporary
file, checked by the caller's `check` (so a wrong graph never lands in the
cache) and renamed into place, so a reader never sees half a file.

Eager attention is exported on purpose: the SDPA path exports to a graph
whose attention the optimiser does not recognise (0 Attention nodes fused),
while the eager path fuses into one Attention node per layer. Quantizing
comes before fusing because the quantizer's shape inference fails on the
fused graph's contrib ops, and only MatMul weights are quantized: the word
embedding table stays fp32 (quantizing its Gather lost more STS-B quality
than it saved time).

Static int8 exists because dynamic int8 scales each activation over the whole
batch at run time, so a text's vector depends on its batch mates (a cache
cannot allow that). quantize_static fixes every activation scale once, from
the min/max seen on calibration texts (`calibration.Calibration`, never STS-B
test sentences); the graph then computes each row on its own. The file name
carries the calibration set's tag (which also covers STATIC_INT8, the
recipe), so other texts give another file (and the backend puts the tag into
the fingerprint). Plain per-tensor static int8 lost 0.4-1.8% STS-B here
(BERT's activations have outlier channels, so one scale per tensor is
coarse); percentile and entropy clipping scored worse still (the outliers
carry meaning). SmoothQuant (`smooth`) first moves those outliers into the
per-channel weight scales, an exact fp32 rewrite; with it every MatMul is
int8 and STS-B stays within 0.25% of fp32 at every width (0.03-0.24%
depending on the calibration texts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from mlbase.filelock import TMP_PREFIX, locked, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/sutra-embed/onnx"
# Bump when the way a graph is exported, fused or quantized changes.
RECIPE_VERSION = 1
PRECISIONS = ("fp32", "int8", "int8-static")
# How int8-static is made (quantize_static_graph); part of every static graph's calibration tag,
# so changing any of it gives new files and fingerprints. alpha 0.7: of 0.3-0.8 measured on
# STS-B (all 36 MatMuls int8), the flattest (worst drop 0.03%; 0.5: 0.32%, 0.8: 0.09%).
STATIC_INT8 = {"format": "QDQ", "calibration": "MinMax", "activations": "QUInt8 per-tensor",
               "weights": "QInt8 per-channel", "matmul_output": "float", "smooth_alpha": 0.7}
OPSET = 17
ATTENTION = "eager"
OUTPUT_NAME = "last_hidden_state"


@dataclass(frozen=True)
class GraphSpec:
    """Which graph to run: precision, whether it is fused, which MatMuls int8 leaves in fp32,
    and (static int8) which calibration set fixed the activation scales."""

    precision: str = "fp32"  # one of PRECISIONS
    fused: bool = True
    # Module-name patterns (dotted, e.g. "attention.output.dense", "layer.0."); int8 precisions only.
    keep_fp32: tuple[str, ...] = ()
    # Calibration.tag() of the texts; int8-static only (and required there).
    calibration: str = ""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.keep_fp32 and self.precision == "fp32":
            raise ValueError("keep_fp32 only applies to the int8 precisions")
        if bool(self.calibration) != (self.precision == "int8-static"):
            raise ValueError("a calibration set is what int8-static needs, and only it")
        if self.precision == "int8-static" and self.fused:
            raise ValueError("int8-static has no fused graph (the optimiser does not fuse QDQ graphs)")

    def keep_tag(self) -> str:
        if not self.keep_fp32:
            return ""
        blob = json.dumps(sorted(set(self.keep_fp32))).encode()
        return "-keep-" + hashlib.sha256(blob).hexdigest()[:10]

    def file_name(self) -> str:
        calibration = f"-cal-{self.calibration}" if self.calibration else ""
        return f"{self.precision}-{'fused' if self.fused else 'plain'}{calibration}{self.keep_tag()}.onnx"

    def unfused(self) -> "GraphSpec":
        return GraphSpec(self.precision, False, self.keep_fp32, self.calibration)


@dataclass(frozen=True)
class ModelSource:
    """What the exporter needs to know about the model folder."""

    # The folder holding the Hugging Face transformer (modules.json's first module).
    transformer_dir: Path
    weights_digest: str
    # Model inputs in the order the graph takes them, e.g. input_ids, attention_mask, token_type_ids.
    input_names: tuple[str, ...]
    num_heads: int
    hidden_size: int


def package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def recipe() -> dict:
    """Everything besides the weights that decides what an exported graph contains."""
    return {
        "recipe_version": RECIPE_VERSION,
        "opset": OPSET,
        "attention": ATTENTION,
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "onnxruntime": package_version("onnxruntime"),
        "onnx": package_version("onnx"),
    }


def cache_folder(cache_root: str | Path, source: ModelSource) -> Path:
    """<cache_root>/<weights digest>-<recipe hash>: one folder per model and recipe."""
    blob = json.dumps({**recipe(), "inputs": list(source.input_names)}, sort_keys=True).encode()
    return Path(cache_root).expanduser() / f"{source.weights_digest[:24]}-{hashlib.sha256(blob).hexdigest()[:12]}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter, optimiser and quantizer log every node at INFO and generic advice at
    WARNING (on the root logger); silence both while they run (at most once per graph, at
    startup). Errors still show, and failures raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


class GraphCache:
    """Finds or builds the graphs of one model under one cache root.

    `check(path, spec)` is called on every freshly built graph before it is
    renamed into the cache; it raises to reject the graph and returns a dict
    of measurements recorded in the graph's manifest. `calibration()` gives
    the model inputs static int8 calibrates on (called only when such a graph
    is built).
    """

    def __init__(self, cache_root: str | Path, source: ModelSource,
                 check: Callable[[Path, GraphSpec], dict] | None = None,
                 calibration: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None) -> None:
        self.source = source
        self.folder = cache_folder(cache_root, source)
        self.check = check
        self.calibration = calibration
        # File names this instance built (empty when everything came from the cache).
        self.built: list[str] = []

    def path(self, spec: GraphSpec) -> Path:
        return self.folder / spec.file_name()

    def manifest(self, spec: GraphSpec) -> dict:
        path = self.path(spec).with_suffix(".json")
        return json.loads(path.read_text()) if path.is_file() else {}

    def ensure(self, spec: GraphSpec) -> Path:
        """The graph's path, building it (and what it derives from) if the cache lacks it."""
        target = self.path(spec)
        if target.is_file():
            return target
        with locked(self.folder / ".lock"):
            self._remove_stale_temporaries()
            return self._build(spec)

    def _remove_stale_temporaries(self) -> None:
        """Left by a builder that was killed; safe to delete while we hold the lock."""
        for stale in self.folder.glob(TMP_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    def _build(self, spec: GraphSpec) -> Path:
        target = self.path(spec)
        if target.is_file():  # another process built it while we waited for the lock
            return target
        if spec.precision == "fp32" and not spec.fused:
            source = None
        else:
            source = self._build(spec.unfused() if spec.fused else GraphSpec("fp32", False))
        tmp = target.with_name(f"{TMP_PREFIX}{os.getpid()}-{target.name}")
        started = time.monotonic()
        try:
            if source is None:
                details = export(self.source, tmp)
            elif spec.fused:
                details = optimize(source, tmp, self.source)
            elif spec.precision == "int8-static":
                if self.calibration is None:
                    raise ValueError("building an int8-static graph needs calibration inputs")
                details = quantize_static_graph(source, tmp, spec.keep_fp32, self.calibration())
            else:
                details = quantize(source, tmp, spec.keep_fp32)
            measured = self.check(tmp, spec) if self.check is not None else {}
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        seconds = time.monotonic() - started
        write_json_atomic(target.with_suffix(".json"), {
            "spec": asdict(spec), "recipe": recipe(), "weights_digest": self.source.weights_digest,
            "built_seconds": round(seconds, 2), "bytes": target.stat().st_size, **details, "check": measured,
        })
        self.built.append(target.name)
        log.info("built %s in %.1fs (%s)", target, seconds, details)
        return target


def export(source: ModelSource, out: Path) -> dict:
    """torch.onnx.export of the Hugging Face model: inputs by name, output last_hidden_state,
    batch and sequence axes dynamic."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(source.transformer_dir), attn_implementation=ATTENTION,
                                      local_files_only=True)
    model.eval()
    names = source.input_names

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, inputs)), return_dict=True).last_hidden_state

    # Two rows of different lengths, so the traced graph sees real padding.
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2460, 102, 0, 0, 0]], dtype=torch.long)
    ids = ids.clamp(max=model.config.vocab_size - 1)
    mask = (ids != 0).long()
    mask[0] = 1
    dummy = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    args = tuple(dummy.get(name, torch.zeros_like(ids)) for name in names)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*names, OUTPUT_NAME)}
    with _quiet(), torch.no_grad():
        torch.onnx.export(LastHiddenState(model), args, str(out), input_names=list(names),
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    return {"step": "export", "opset": OPSET, "attention": ATTENTION}


def optimize(source_graph: Path, out: Path, source: ModelSource) -> dict:
    """onnxruntime's transformer optimiser (python fusions after a basic ORT pass)."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        model = optimize_model(str(source_graph), model_type="bert", num_heads=source.num_heads,
                               hidden_size=source.hidden_size, opt_level=1, use_gpu=False)
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(out))
    return {"step": "optimize", "fused_operators": fused}


def matmul_names(graph: Path) -> list[str]:
    """Names of the MatMul nodes that multiply by a weight (an initializer)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)]


def _components_match(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether `pattern` stands as a contiguous run in `parts`, "*" standing for any one part."""
    n = len(pattern)
    return any(all(p in ("*", q) for p, q in zip(pattern, parts[i:i + n])) for i in range(len(parts) - n + 1))


def select_nodes(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Node names matching any dotted module-name pattern ("/enc/layer.0/x/MatMul" reads as
    "enc.layer.0.x.MatMul"). A pattern matches whole dotted parts in a row, "*" any one part:
    "layer.0." is layer 0 (not layer 05), "attention.output.dense" the attention output in
    every layer, "layer.*.output.dense" the feed-forward output (not the attention's). A
    pattern that matches nothing is an error (likely a typo)."""
    dotted = {name: name.strip("/").replace("/", ".").split(".") for name in names}
    chosen: list[str] = []
    for pattern in patterns:
        wanted = [part for part in pattern.strip(".").split(".")]
        hits = [name for name, parts in dotted.items() if _components_match(wanted, parts)]
        if not hits:
            raise ValueError(f"int8 keep-fp32 pattern {pattern!r} matches no weight MatMul "
                             f"(names look like {next(iter(dotted.values()), '?')!r})")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def quantize(source_graph: Path, out: Path, keep_fp32: Sequence[str]) -> dict:
    """Dynamic quantization: per-channel QInt8 weights for every weight MatMul not kept in fp32;
    activations are quantized at run time (uint8), so no calibration data is needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    all_matmuls = matmul_names(source_graph)
    excluded = select_nodes(all_matmuls, keep_fp32)
    with _quiet():
        quantize_dynamic(str(source_graph), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded)
    return {"step": "quantize", "quantized_matmuls": len(all_matmuls) - len(excluded),
            "fp32_matmuls": excluded}


def smooth(source_graph: Path, out: Path, feeds: Sequence[dict[str, np.ndarray]], alpha: float) -> int:
    """SmoothQuant (Xiao et al., 2023) as an exact fp32 rewrite: for every activation X that
    weight MatMuls read, per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
    (max|X_j| over the real tokens of `feeds`, max|W_j| over the rows j of every weight
    reading X); X is divided by s (one Mul) and the weights' rows multiplied by it. X.W is
    unchanged, but the outlier channels that make one per-tensor activation scale coarse are
    tamed, their range moved into the per-channel weight scales. Returns how many activations
    were smoothed."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(source_graph))
    weights = {init.name: init for init in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] not in weights:
            readers.setdefault(node.input[0], []).append(node)
    probe = onnx.load(str(source_graph))
    probe.graph.output.extend(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in readers)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    names = list(readers)
    x_max: dict[str, np.ndarray] = {}
    for feed in feeds:
        real = feed["attention_mask"].astype(bool)
        for name, value in zip(names, session.run(names, {k: feed[k] for k in inputs})):
            rows = value[real] if value.shape[:2] == real.shape else value.reshape(-1, value.shape[-1])
            peak = np.abs(rows).max(axis=0)
            x_max[name] = peak if name not in x_max else np.maximum(x_max[name], peak)
    for x, nodes in readers.items():
        matrices = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in matrices], axis=0)
        scale = (np.maximum(x_max[x], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)).astype(np.float32)
        inverse = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{x}/smooth_inverse")
        model.graph.initializer.append(inverse)
        first = min(list(model.graph.node).index(n) for n in nodes)
        model.graph.node.insert(first, helper.make_node("Mul", [x, inverse.name], [f"{x}/smoothed"],
                                                        name=f"{x}/smooth"))
        for node, w in zip(nodes, matrices):
            node.input[0] = f"{x}/smoothed"
            weights[node.input[1]].CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(np.float32),
                                                                    node.input[1]))
    onnx.save(model, str(out))
    return len(readers)


def quantize_static_graph(source_graph: Path, out: Path, keep_fp32: Sequence[str],
                          batches: Iterable[dict[str, np.ndarray]]) -> dict:
    """Static quantization (QDQ) of the SmoothQuant-ed graph (`smooth`): per-channel QInt8
    weights for every weight MatMul not kept in fp32, and per-tensor asymmetric QUInt8
    activations whose scale and zero point come from the min/max over `batches` (model inputs
    of calibration texts). Fixed scales make each row's result independent of the other rows;
    QUInt8 x QInt8 is the pair x86's VNNI/AMX int8 kernels take. MatMul outputs stay float
    (onnxruntime runs MatMulIntegerToFloat; quantizing them too made QLinearMatMul chains that
    were slower and lost ~0.3% more STS-B). Activation x activation MatMuls (attention
    scores) stay fp32."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    feeds = list(batches)
    smoothed = out.with_name(out.stem + "-smoothed.onnx")  # a temporary name, like `out`
    try:
        with _quiet():
            smoothed_activations = smooth(source_graph, smoothed, feeds, STATIC_INT8["smooth_alpha"])
        all_matmuls = matmul_names(smoothed)
        excluded = select_nodes(all_matmuls, keep_fp32)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.pending = iter(feeds)

            def get_next(self) -> dict | None:
                return next(self.pending, None)

        with _quiet():
            quantize_static(str(smoothed), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"],
                            nodes_to_quantize=[n for n in all_matmuls if n not in excluded],
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
    finally:
        smoothed.unlink(missing_ok=True)
    return {"step": "quantize_static", "recipe": STATIC_INT8, "smoothed_activations": smoothed_activations,
            "calibration_batches": len(feeds), "calibration_texts": sum(len(f["input_ids"]) for f in feeds),
            "quantized_matmuls": len(all_matmuls) - len(excluded), "fp32_matmuls": excluded}

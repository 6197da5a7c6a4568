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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/sutra-embed/onnx"
# Bump when the way a graph is exported, fused or quantized changes.
RECIPE_VERSION = 1
OPSET = 17
ATTENTION = "eager"
OUTPUT_NAME = "last_hidden_state"
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class GraphSpec:
    """Which graph to run: precision, whether it is fused, which MatMuls int8 leaves in fp32."""

    precision: str = "fp32"  # fp32 | int8
    fused: bool = True
    # Module-name patterns (dotted, e.g. "attention.output.dense", "layer.0."); int8 only.
    keep_fp32: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be fp32 or int8, not {self.precision!r}")
        if self.keep_fp32 and self.precision != "int8":
            raise ValueError("keep_fp32 only applies to int8")

    def keep_tag(self) -> str:
        if not self.keep_fp32:
            return ""
        blob = json.dumps(sorted(set(self.keep_fp32))).encode()
        return "-keep-" + hashlib.sha256(blob).hexdigest()[:10]

    def file_name(self) -> str:
        return f"{self.precision}-{'fused' if self.fused else 'plain'}{self.keep_tag()}.onnx"

    def unfused(self) -> "GraphSpec":
        return GraphSpec(self.precision, False, self.keep_fp32)


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


def _version(package: str) -> str:
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
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
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


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder, held while graphs are built (blocks other builders)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class GraphCache:
    """Finds or builds the graphs of one model under one cache root.

    `check(path, spec)` is called on every freshly built graph before it is
    renamed into the cache; it raises to reject the graph and returns a dict
    of measurements recorded in the graph's manifest.
    """

    def __init__(self, cache_root: str | Path, source: ModelSource,
                 check: Callable[[Path, GraphSpec], dict] | None = None) -> None:
        self.source = source
        self.folder = cache_folder(cache_root, source)
        self.check = check
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
        with _locked(self.folder):
            self._remove_stale_temporaries()
            return self._build(spec)

    def _remove_stale_temporaries(self) -> None:
        """Left by a builder that was killed; safe to delete while we hold the lock."""
        for stale in self.folder.glob(_TMP_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    def _build(self, spec: GraphSpec) -> Path:
        target = self.path(spec)
        if target.is_file():  # another process built it while we waited for the lock
            return target
        if spec.precision == "fp32" and not spec.fused:
            source = None
        else:
            source = self._build(spec.unfused() if spec.fused else GraphSpec("fp32", False))
        tmp = target.with_name(f"{_TMP_PREFIX}{os.getpid()}-{target.name}")
        started = time.monotonic()
        try:
            if source is None:
                details = export(self.source, tmp)
            elif spec.fused:
                details = optimize(source, tmp, self.source)
            else:
                details = quantize(source, tmp, spec.keep_fp32)
            measured = self.check(tmp, spec) if self.check is not None else {}
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        seconds = time.monotonic() - started
        _write_json_atomic(target.with_suffix(".json"), {
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


def select_nodes(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Node names matching any dotted module-name pattern ("/enc/layer.0/x/MatMul" reads as
    "enc.layer.0.x.MatMul"); a pattern that matches nothing is an error (likely a typo)."""
    dotted = {name: name.strip("/").replace("/", ".") for name in names}
    chosen: list[str] = []
    for pattern in patterns:
        hits = [name for name, d in dotted.items() if pattern in d]
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

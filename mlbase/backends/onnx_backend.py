"""ONNX Runtime backend: the model's transformer as an exported graph, pooled in numpy.

The transformer runs in onnxruntime (CPUExecutionProvider, `threads` intra-op
threads); the sentence-transformers head that follows it (Pooling, then
Normalize) is a few lines of numpy, read from the model's modules.json and
pooling config exactly as sentence-transformers reads them. Models with
other modules (Dense, prompts, lower-casing) are refused at load: use the
torch backend for those.

Graphs come from `onnx_export.GraphCache`: exported, fused and quantized once
per weights digest and recipe, then shared by every replica through the cache
folder (`--onnx-cache-dir`). A replica starting on a warm cache imports
neither sentence-transformers nor the exporter. Every graph is checked when
it is built, before it enters the cache, against `SentenceTransformer.encode`
on texts of several lengths in one padded batch and one by one: fp32 must
agree to cosine 0.9999; int8 and int8-static must stay above 0.95 (a floor
that catches a broken graph, not a quality bar: STS-B quality is judged by
mlbase.quality_gates, in the tuner and bench/quality.py).

Fingerprint: backend "onnx" and precision "fp32", "int8", "int8-static+cal:<tag>"
(the calibration set, see backends.calibration), each int8 one with
"+fp32:<patterns>" when --int8-keep-fp32 keeps layers in fp32, so caches
never mix vectors of different precisions or calibrations. Fused and plain
graphs of one precision compute the same function (they differ by float
rounding, ~1e-7, like different thread counts do) and share a fingerprint.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlbase.backends import calibration
from mlbase.backends.base import Backend, BackendOptions, ModelDescription
from mlbase.backends.calibration import Calibration
from mlbase.backends.digest import files_digest, torch_model_files
from mlbase.backends.onnx_export import DEFAULT_CACHE_DIR, OUTPUT_NAME, GraphCache, GraphSpec, ModelSource
from mlbase.backends.tokens import Encoded, TextTokenizer
from mlbase.quality_gates import cosines
from mlbase.backends.torch_backend import model_id_for

log = logging.getLogger(__name__)

# Whether each precision runs the fused graph by default. Measured by bench/backend_speed.py on
# this machine (README): the plain graphs are faster (fp32 ~15%, int8 ~13% less CPU per batch),
# because onnxruntime's own session-time fusions already cover the plain graph and its CPU
# Attention kernel is slower than the unfused MatMul/Softmax path for this small model.
# Static int8 (QDQ) has only a plain graph.
DEFAULT_FUSED = {"fp32": False, "int8": False, "int8-static": False}
CHECK_TEXTS = [
    "",
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Matryoshka embeddings keep the most useful information in the leading dimensions. " * 3,
    "a very long text that goes past the model window " * 80,
]
MIN_CHECK_COSINE = {"fp32": 0.9999, "int8": 0.95, "int8-static": 0.95}
# sentence-transformers' legacy pooling flags, in the order its Pooling concatenates modes.
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_SUPPORTED_POOLING = ("cls", "max", "mean", "mean_sqrt_len_tokens")


@dataclass(frozen=True)
class ModelLayout:
    """What modules.json and the module configs say the model computes."""

    transformer_dir: Path
    pooling_modes: tuple[str, ...]
    normalize: bool
    # From sentence_bert_config.json; 0 = not set there.
    max_seq_length: int


def _module_type(entry: dict) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def pooling_modes(config: dict) -> tuple[str, ...]:
    """A Pooling config (legacy boolean flags or the newer `pooling_mode`) -> modes in order."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(mode for key, mode in _LEGACY_POOLING.items() if config.get(key)) or ("mean",)
    unsupported = [m for m in modes if m not in _SUPPORTED_POOLING]
    if unsupported:
        raise ValueError(f"pooling mode {', '.join(unsupported)} is not supported by the onnx backend "
                         f"(supported: {', '.join(_SUPPORTED_POOLING)}); use --backend torch")
    return modes


def read_layout(path: Path) -> ModelLayout:
    """Transformer -> Pooling [-> Normalize], or a bare Hugging Face folder (mean pooling,
    as sentence-transformers does for one); anything else is refused."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a sentence-transformers or Hugging Face model folder")
        transformer_dir, modes, normalize = path, ("mean",), False
    else:
        modules = sorted(json.loads(modules_file.read_text()), key=lambda m: m.get("idx", 0))
        kinds = [_module_type(m) for m in modules]
        if len(kinds) < 2 or kinds[0] != "Transformer" or kinds[1] != "Pooling" or any(
                k != "Normalize" for k in kinds[2:]):
            raise ValueError(f"{path}: modules {kinds} are not Transformer -> Pooling [-> Normalize]; "
                             "the onnx backend runs only that chain (use --backend torch)")
        transformer_dir = path / modules[0].get("path", "")
        pooling_config = path / modules[1].get("path", "") / "config.json"
        modes = pooling_modes(json.loads(pooling_config.read_text()) if pooling_config.is_file() else {})
        normalize = "Normalize" in kinds[2:]
    st_config_file = transformer_dir / "sentence_bert_config.json"
    st_config = json.loads(st_config_file.read_text()) if st_config_file.is_file() else {}
    if st_config.get("do_lower_case"):
        raise ValueError(f"{path}: do_lower_case models are not supported by the onnx backend; use --backend torch")
    return ModelLayout(transformer_dir, modes, normalize, int(st_config.get("max_seq_length") or 0))


def pool(hidden: np.ndarray, mask: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """sentence-transformers' Pooling on (batch, seq, hidden) with a 0/1 mask -> (batch, hidden * len(modes))."""
    m = mask.astype(np.float32)
    out = []
    for mode in modes:
        if mode == "cls":  # first attended token
            out.append(hidden[np.arange(hidden.shape[0]), mask.argmax(axis=1)])
        elif mode == "max":
            out.append(np.where(m[:, :, None] > 0, hidden, -np.inf).max(axis=1))
        else:  # mean, mean_sqrt_len_tokens
            summed = np.matmul(m[:, None, :], hidden)[:, 0, :]
            count = np.maximum(m.sum(axis=1, keepdims=True), 1e-9)
            out.append(summed / (count if mode == "mean" else np.sqrt(count)))
    return out[0] if len(out) == 1 else np.concatenate(out, axis=1)


def precision_label(spec: GraphSpec) -> str:
    """The fingerprint's precision: names every choice that changes the vectors (calibration
    set, layers kept in fp32)."""
    label = spec.precision
    if spec.calibration:
        label += f"+cal:{spec.calibration}"
    if spec.keep_fp32:
        label += f"+fp32:{','.join(sorted(set(spec.keep_fp32)))}"
    return label


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, options: BackendOptions, fused: bool | None = None) -> None:
        """`fused` picks the optimised or the plain exported graph; None = DEFAULT_FUSED
        for the precision (benchmarks pass it explicitly to compare the two)."""
        super().__init__(options)
        if options.device != "cpu":
            raise ValueError(f"the onnx backend runs on the CPU only, not {options.device!r}")
        self.precision = options.precision or "fp32"
        self.fused = DEFAULT_FUSED.get(self.precision, True) if fused is None else fused
        self.spec: GraphSpec | None = None  # known after load (static int8 needs its calibration set)
        self.calibration: Calibration | None = None
        self.graphs: GraphCache | None = None
        self.graph_path: Path | None = None
        self._reference_vectors: np.ndarray | None = None

    def load(self) -> None:
        import onnxruntime as ort
        from transformers import AutoConfig, AutoTokenizer

        self._ort = ort
        path = Path(self.options.model_path).expanduser().resolve()
        self.path = path
        self.layout = read_layout(path)
        tokenizer = AutoTokenizer.from_pretrained(str(self.layout.transformer_dir), local_files_only=True)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{path}: no fast tokenizer; the onnx backend needs one")
        config = AutoConfig.from_pretrained(str(self.layout.transformer_dir), local_files_only=True)
        window = self.options.max_seq_length or self.layout.max_seq_length or min(
            int(tokenizer.model_max_length), int(getattr(config, "max_position_embeddings", 512)))
        self.tokenizer = TextTokenizer(tokenizer, window)
        # An encoder's output does not depend on which side is padded, and the fused graph's
        # attention reads the mask as per-row lengths, which needs right padding.
        self.tokenizer.left_padding = False
        input_names = tuple(tokenizer(["x"]).keys())
        source = ModelSource(
            transformer_dir=self.layout.transformer_dir,
            weights_digest=files_digest(path, torch_model_files(path)),
            input_names=input_names,
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
        )
        if self.precision == "int8-static":
            self.calibration = calibration.load(self.options.calibration_file,
                                                self.options.calibration_texts or calibration.DEFAULT_TEXTS)
        self.spec = GraphSpec(self.graph_precision(), self.fused, tuple(self.options.keep_fp32),
                              self.calibration.tag() if self.calibration else "")
        self.graphs = GraphCache(self.options.cache_dir or DEFAULT_CACHE_DIR, source, check=self._check,
                                 calibration=self._calibration_inputs)
        self.graph_path = self.graphs.ensure(self.spec)
        self.session = self._session(self.graph_path)
        self._input_names = self._inputs(self.session)
        self._description = ModelDescription(
            model_id=self.options.model_id or model_id_for(path),
            weights_digest=source.weights_digest,
            pooling=json.dumps([{"type": "Pooling", "config": {"pooling_mode": list(self.layout.pooling_modes)}}],
                               sort_keys=True),
            normalize=self.layout.normalize,
            max_seq_length=window,
            native_width=source.hidden_size * len(self.layout.pooling_modes),
            backend=self.name,
            precision=self.precision_label(),
        )
        log.info("loaded %s from %s: graph %s (%s), width %d, window %d tokens, %d threads",
                 self._description.model_id, path, self.graph_path,
                 "built now" if self.graphs.built else "from cache", self._description.native_width,
                 window, self.options.threads)

    def graph_precision(self) -> str:
        """The exported graph this backend runs (GraphSpec.precision)."""
        return self.precision

    def precision_label(self) -> str:
        return precision_label(self.spec)

    def _inputs(self, session) -> list[str]:
        return [i.name for i in session.get_inputs()]

    def _run(self, session, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The transformer's last hidden state for one padded batch."""
        return session.run([OUTPUT_NAME], feeds)[0]

    def _session(self, graph: Path):
        ort = self._ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(self.options.threads, 0)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])

    def _forward(self, session, input_names: Sequence[str], batch: Sequence[Encoded], run=None) -> np.ndarray:
        feeds = self.tokenizer.pad(batch)
        hidden = (run or self._run)(session, {name: feeds[name] for name in input_names})
        vectors = pool(hidden, feeds["attention_mask"], self.layout.pooling_modes)
        if self.layout.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _calibration_inputs(self):
        assert self.calibration is not None
        log.info("calibrating static int8 on %d texts of %s", len(self.calibration.texts), self.calibration.source)
        return self.calibration.batches(self.tokenizer)

    def _reference(self) -> np.ndarray:
        """SentenceTransformer.encode of CHECK_TEXTS (only when a graph is being built)."""
        if self._reference_vectors is None:
            import torch
            from sentence_transformers import SentenceTransformer

            if self.options.threads > 0:
                torch.set_num_threads(self.options.threads)
            model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
            model.max_seq_length = self.tokenizer.max_seq_length
            self._reference_vectors = model.encode(CHECK_TEXTS, convert_to_numpy=True,
                                                   show_progress_bar=False).astype(np.float32)
        return self._reference_vectors

    def _check(self, graph: Path, spec: GraphSpec) -> dict:
        """Reject a freshly built graph whose vectors differ from sentence-transformers'."""
        # Always onnxruntime: the graph enters a cache every backend shares, and its floor is
        # the graph's own precision, whatever runtime asked for it.
        session = OnnxBackend._session(self, graph)
        names = OnnxBackend._inputs(self, session)
        run = functools.partial(OnnxBackend._run, self)
        encoded = self.tokenizer.encode(CHECK_TEXTS)
        together = self._forward(session, names, encoded, run)
        alone = np.concatenate([self._forward(session, names, [e], run) for e in encoded])
        ref = self._reference()
        cosine = min(float(cosines(together, ref).min()), float(cosines(alone, ref).min()))
        floor = MIN_CHECK_COSINE[spec.precision]
        if cosine < floor:
            raise RuntimeError(f"exported graph {spec.file_name()} differs from SentenceTransformer.encode "
                               f"(min cosine {cosine:.6f} < {floor}); not caching it")
        return {"min_cosine_vs_sentence_transformers": round(cosine, 7), "texts": len(CHECK_TEXTS)}

    def describe(self) -> ModelDescription:
        return self._description

    def tokenize(self, texts: Sequence[str]) -> list[Encoded]:
        return self.tokenizer.encode(texts)

    def embed(self, batch: Sequence[Encoded]) -> np.ndarray:
        return self._forward(self.session, self._input_names, batch)


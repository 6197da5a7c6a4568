"""PyTorch backend: a local sentence-transformers model, run without `encode`.

`SentenceTransformer.encode` tokenizes, pads, runs the modules and reorders
per call. The batcher has already tokenized and length-sorted the texts, so
this backend pads the given micro-batch and calls the model's module chain
(Transformer -> Pooling -> Normalize ...) directly: the same forward that
`encode` runs, minus a second tokenization. At load it checks that this
path reproduces `encode` on a few texts (cosine > 0.9999) and refuses to
start otherwise, so a model with a configuration this path does not handle
(prompts, exotic modules) fails loudly instead of serving wrong vectors.

`--precision bf16` is mixed precision, set up after that check: the
transformer's Linear layers (weights, and their inputs under CPU autocast)
in bfloat16, where oneDNN uses AMX or AVX512-BF16 if the CPU has them; the
embeddings, LayerNorms and the residual stream stay float32, and so does the
head (pooling, normalisation), so vectors come back float32 and unit length.
Why not the whole transformer in bf16 (`model.to(bfloat16)`, ~5% faster):
rounding the residual stream to 8 bits made a text's vector move with its
batch mates (different GEMM blocking, so different roundings) to cosine
0.99988 on short texts, failing the 0.9999 batch gate; mixed precision gives
0.99996, and is closer to fp32 (0.99993 vs 0.99988). Without native bf16
(e.g. AVX2-only CPUs) it still runs, emulated and slow; the tuner measures
that rather than guessing. bf16 vectors are checked against the fp32 ones at
load with a "not broken" floor of 0.99; quality is judged by
mlbase.quality_gates.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlbase.backends.base import Backend, ModelDescription
from mlbase.backends.digest import files_digest, torch_model_files
from mlbase.backends.tokens import Encoded, TextTokenizer
from mlbase.quality_gates import cosines

log = logging.getLogger(__name__)

_PRECISIONS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# Precisions this backend runs its transformer in (--precision), by torch dtype name.
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# Lowest cosine of reduced-precision vectors vs this backend's fp32 ones at load: "not broken".
MIN_REDUCED_COSINE = 0.99
_SELF_CHECK_TEXTS = [
    "",
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Matryoshka embeddings keep the most useful information in the leading dimensions. " * 3,
    "a very long text that goes past the model window " * 80,
]
_SELF_CHECK_MIN_COSINE = 0.9999


def model_id_for(path: Path) -> str:
    """A display name: the model card's first heading, else the folder name
    (its parent's when the folder is just called 'model')."""
    card = path / "README.md"
    if card.is_file():
        text = card.read_text(errors="replace")
        text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)  # YAML front matter
        match = re.search(r"^# +(\S.*?)\s*$", text, flags=re.M)
        if match:
            return match.group(1)
    return path.parent.name if path.name == "model" else path.name


class TorchBackend(Backend):
    name = "torch"

    def load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self._torch = torch
        precision = self.options.precision or "fp32"
        if precision not in DTYPES:
            raise ValueError(f"the torch backend runs {', '.join(DTYPES)}, not {precision!r}")
        if self.options.threads > 0:
            torch.set_num_threads(self.options.threads)
        path = Path(self.options.model_path).expanduser().resolve()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a sentence-transformers model folder")
        model = SentenceTransformer(str(path), device=self.options.device, local_files_only=True)
        model.eval()
        if self.options.max_seq_length > 0:
            model.max_seq_length = self.options.max_seq_length
        tokenizer = getattr(model[0], "tokenizer", None)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{path}: first module has no fast tokenizer; the torch backend needs one")
        self.model = model
        self.tokenizer = TextTokenizer(tokenizer, int(model.max_seq_length))
        # Non-tensor entries sentence-transformers adds to the features (e.g. modality="text").
        self._extras = {k: v for k, v in model.preprocess(["x"]).items() if not isinstance(v, torch.Tensor)}
        self._autocast = None  # dtype the Linear layers compute in, when not float32
        fp32_vectors = self._self_check()
        if precision != "fp32":
            self._to_reduced(getattr(torch, DTYPES[precision]), fp32_vectors)
        self._description = self._describe(path)
        log.info("loaded %s (%s) from %s: width %d, window %d tokens, %d threads",
                 self._description.model_id, self._description.precision, path,
                 self._description.native_width, self._description.max_seq_length, torch.get_num_threads())

    def _describe(self, path: Path) -> ModelDescription:
        modules = list(self.model)
        head = []
        for module in modules[1:]:
            kind = type(module).__name__
            if kind == "Normalize":
                continue
            config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
            head.append({"type": kind, "config": config})
        width = (self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                 else self.model.get_sentence_embedding_dimension())
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return ModelDescription(
            model_id=self.options.model_id or model_id_for(path),
            weights_digest=files_digest(path, torch_model_files(path)),
            pooling=json.dumps(head, sort_keys=True, default=str),
            normalize=any(type(m).__name__ == "Normalize" for m in modules),
            max_seq_length=int(self.model.max_seq_length),
            native_width=int(width),
            backend=self.name,
            precision=self.options.precision if self._autocast else _PRECISIONS.get(dtype, dtype),
        )

    def _self_check(self) -> np.ndarray:
        """Our fp32 forward against SentenceTransformer.encode; returns our vectors."""
        ours = self._encode_checked()
        ref = self.model.encode(_SELF_CHECK_TEXTS, convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
        cos = cosines(ours, ref)
        if float(cos.min()) < _SELF_CHECK_MIN_COSINE:
            raise RuntimeError(f"pre-tokenized forward differs from SentenceTransformer.encode "
                               f"(min cosine {cos.min():.6f}); this model is not supported by the torch backend")
        return ours

    def _encode_checked(self) -> np.ndarray:
        encoded = self.tokenize(_SELF_CHECK_TEXTS)
        return np.concatenate([self.embed(encoded[:3]), self.embed(encoded[3:])])

    def _to_reduced(self, dtype, fp32_vectors: np.ndarray) -> None:
        """Run the transformer's Linear layers in `dtype` from now on (mixed precision, see the
        module doc); refuse if the vectors are far off fp32's."""
        for module in self.model[0].modules():
            if isinstance(module, self._torch.nn.Linear):
                module.to(dtype)
        self._autocast = dtype
        self._head = list(self.model)[1:]
        cos = cosines(self._encode_checked(), fp32_vectors)
        if float(cos.min()) < MIN_REDUCED_COSINE:
            raise RuntimeError(f"{dtype} forward differs from fp32 (min cosine {cos.min():.6f}); not serving it")

    def describe(self) -> ModelDescription:
        return self._description

    def tokenize(self, texts: Sequence[str]) -> list[Encoded]:
        return self.tokenizer.encode(texts)

    def embed(self, batch: Sequence[Encoded]) -> np.ndarray:
        torch = self._torch
        device = self.model.device
        features = {k: torch.from_numpy(v).to(device) for k, v in self.tokenizer.pad(batch).items()}
        features.update(self._extras)
        with torch.inference_mode():
            if self._autocast is not None:
                with torch.autocast("cpu", dtype=self._autocast):
                    features = self.model[0](features)
                features["token_embeddings"] = features["token_embeddings"].float()
                for module in self._head:
                    features = module(features)
                out = features["sentence_embedding"]
            else:
                out = self.model(features)["sentence_embedding"]
        return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)


"""The backend interface: what the engine needs from an inference engine.

A backend turns texts into token ids once (`tokenize`), runs one forward pass
over a micro-batch of already tokenized texts (`embed`), and says what it is
(`describe`) so the replica can compute its fingerprint. Splitting tokenizing
from the forward pass is what lets the batcher sort and bound micro-batches
by real token counts without tokenizing twice. `encode` is the plain
"texts in, vectors out" path built from the two, for warm-up and tools.

Backends live one per file in this package and register themselves by name
(see `mlbase.backends.registry`); `--backend` picks one.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mlbase.backends.tokens import Encoded


@dataclass(frozen=True)
class BackendOptions:
    """What every backend is told when it is built (from the replica's settings)."""

    model_path: str
    # Human-readable name for GetInfo; "" = derive it from the model folder.
    model_id: str = ""
    # torch intra-op threads (or the backend's equivalent); 0 = the library default.
    threads: int = 0
    # Longest input in tokens; 0 = the model's own setting.
    max_seq_length: int = 0
    device: str = "cpu"
    # Numeric precision of the forward pass: "fp32", or what the backend supports besides
    # (registry.PRECISIONS: "bf16", "int8", "int8-static").
    precision: str = "fp32"
    # Where a backend keeps files it derives from the model (e.g. exported ONNX graphs); "" = its default.
    cache_dir: str = ""
    # Layers a quantized precision keeps in fp32, as module-name patterns (e.g. "attention.output.dense").
    keep_fp32: tuple[str, ...] = ()
    # Static int8's calibration text file ("" = the default, see backends.calibration) and how many
    # of its lines to use (0 = the default).
    calibration_file: str = ""
    calibration_texts: int = 0


@dataclass(frozen=True)
class ModelDescription:
    """Everything that decides which vectors come out for a given text.

    `fingerprint()` hashes all of it except `model_id` (a display name: renaming
    a folder must not invalidate caches), so a cache keyed by the fingerprint
    never mixes vectors from two different models or configurations.
    """

    model_id: str
    # Hex digest of the weight and tokenizer files' bytes.
    weights_digest: str
    # Canonical JSON of the pooling (and any other head) module configuration.
    pooling: str
    # Whether the model L2-normalises its own output.
    normalize: bool
    max_seq_length: int
    native_width: int
    backend: str
    precision: str

    def fingerprint(self) -> str:
        parts = asdict(self)
        parts.pop("model_id")
        parts["fingerprint_version"] = 1
        blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


class Backend(abc.ABC):
    """One loaded model. Methods other than `describe` run off the event loop,
    on the engine's tokenizer thread (`tokenize`) or inference thread (`embed`)."""

    # Registry name, as given to --backend.
    name: str = ""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights and tokenizer; blocking; called once before anything else."""

    @abc.abstractmethod
    def describe(self) -> ModelDescription:
        """Fingerprint parts; valid after `load`."""

    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> list[Encoded]:
        """Token ids per text, cut to the model window, with lengths and truncation flags."""

    @abc.abstractmethod
    def embed(self, batch: Sequence[Encoded]) -> np.ndarray:
        """One forward pass: float32 (len(batch), native_width), rows in batch order."""

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, list[bool]]:
        """texts -> (float32 (n, native_width), truncated flags), batched by length."""
        encoded = self.tokenize(texts)
        order = sorted(range(len(encoded)), key=lambda i: -encoded[i].length)
        out = np.empty((len(encoded), self.describe().native_width), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self.embed([encoded[i] for i in rows])
        return out, [e.truncated for e in encoded]

"""The texts static int8 calibrates on: never STS-B test sentences, and named by content.

`quantize_static` fixes every activation's scale (and SmoothQuant its
per-channel smoothing) from the ranges the fp32 model shows on these texts,
so the graph (and every vector it computes) depends on them.
`Calibration.tag()` hashes the exact texts, the way they are batched and the
static int8 recipe; the tag goes into the graph's file name and the
fingerprint's precision, so a different set gives a different file and a different
fingerprint, and the same settings on another machine give the same ones.

Source: `--calibration-file`, else the STS-B *train* sentences (shared data),
else the Quora corpus (committed in bench/data, so a plain clone and the
image can calibrate). Every sentence of the STS-B test split, when that file
is present, is dropped: the STS-B gate must never score texts the graph was
calibrated on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlbase.backends.onnx_export import STATIC_INT8
from mlbase.backends.tokens import TextTokenizer
from mlbase.data_files import CORPUS_FILE, STS_TEST_FILE, STS_TRAIN_SENTENCES_FILE, distinct_lines, first_existing

# Texts per calibration forward pass (padded to the longest, as the replica pads its batches).
BATCH_SIZE = 16
DEFAULT_TEXTS = 256
# Each calibration text is 1 to this many consecutive lines, so the texts reach the model window:
# calibrated on single sentences only (~10 tokens), long inputs fell outside the fixed activation
# ranges (cosine to fp32 0.94 for a 256-token text, 0.986 with mixed lengths; STS-B the same).
LINES_PER_TEXT = 24


@dataclass(frozen=True)
class Calibration:
    texts: tuple[str, ...]
    # Where the texts came from (for manifests and logs; not part of the tag).
    source: str

    def tag(self) -> str:
        """Names the texts and how a graph is made from them (batching, the static int8 recipe)."""
        blob = json.dumps({"texts": list(self.texts), "batch_size": BATCH_SIZE, "recipe": STATIC_INT8},
                          ensure_ascii=False, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def batches(self, tokenizer: TextTokenizer) -> Iterator[dict[str, np.ndarray]]:
        """Model inputs, BATCH_SIZE texts at a time, in file order."""
        encoded = tokenizer.encode(self.texts)
        for start in range(0, len(encoded), BATCH_SIZE):
            yield tokenizer.pad(encoded[start:start + BATCH_SIZE])


def default_file() -> Path:
    return first_existing((STS_TRAIN_SENTENCES_FILE, CORPUS_FILE))


def sts_test_sentences() -> set[str]:
    """Every sentence of the STS-B test split, if the file is anywhere we look."""
    from mlbase.quality_gates import load_sts

    path = first_existing((STS_TEST_FILE,))
    if not path.is_file():
        return set()
    _, first, second = load_sts(path)
    return {t.strip() for t in (*first, *second)}


def load(path: str = "", count: int = DEFAULT_TEXTS) -> Calibration:
    """`count` texts of 1 to LINES_PER_TEXT consecutive distinct lines of `path` (default:
    `default_file()`), leaving out every STS-B test sentence."""
    from mlbase.quality_gates import mixed_length_texts

    source = Path(path).expanduser() if path else default_file()
    if not source.is_file():
        raise FileNotFoundError(f"calibration text {source} not found (set --calibration-file)")
    excluded = sts_test_sentences()
    lines = [t for t in distinct_lines(source) if t not in excluded]
    if not lines:
        raise ValueError(f"{source}: no calibration text left (empty, or only STS-B test sentences)")
    return Calibration(tuple(mixed_length_texts(lines, count, LINES_PER_TEXT)), str(source))


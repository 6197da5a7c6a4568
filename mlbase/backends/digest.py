"""Content digests of model files, for the fingerprint.

The fingerprint must change whenever the vectors could change, so it hashes
file contents, never paths or timestamps: two replicas loading copies of the
same model in different folders agree, and a model updated in place does not.
Hashing ~90 MB of safetensors takes a fraction of a second once per start,
so there is no cache to go stale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

# Files that decide token ids: a different vocabulary gives different vectors.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")
# Folders other backends keep their own exported weights in (hashed by those backends).
OTHER_BACKEND_DIRS = ("onnx", "openvino")


def files_digest(root: Path, files: Iterable[Path]) -> str:
    """sha256 over (relative path, size, bytes) of each file, in path order."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(4, "little") + rel)
        h.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def torch_model_files(root: Path) -> list[Path]:
    """The weights (safetensors, else PyTorch .bin) of every module folder, plus
    the tokenizer files. Configs (pooling, max length) enter the fingerprint as
    parsed values, not as bytes, so unrelated edits to them do not matter."""
    def keep(p: Path) -> bool:
        parts = p.relative_to(root).parts
        return p.is_file() and not any(part in OTHER_BACKEND_DIRS or part.startswith(".") for part in parts)

    weights = [p for p in root.rglob("*.safetensors") if keep(p)]
    if not weights:
        weights = [p for p in root.rglob("*.bin") if keep(p)]
    if not weights:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights under {root}")
    tokenizer = [p for p in root.rglob("*") if p.name in TOKENIZER_FILES and keep(p)]
    return weights + tokenizer

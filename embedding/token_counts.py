"""Token counts for the HTTP API's `usage`, from the replicas' own tokenizer, run here.

Why the frontend counts rather than the replica: a cache hit never reaches a replica,
and cache values carry no count, so only the frontend can count every input of every
request. It loads the same `tokenizer.json` as the replicas (by default the same model
folder: `--tokenizer` reads the replicas' model variable) with the `tokenizers` library
(40 ms to load, where transformers takes seconds to import), and counts what the model
reads: special tokens included, cut at the model window (GetInfo's max_seq_length), as
the replica's TextTokenizer (mlbase/backends/tokens.py) encodes; tests check the two
agree. A model folder whose display name differs from the replicas' model is warned
about at startup, since its counts would be another model's.

Counting costs about 25 us per short text, so the counts of texts up to CACHED_CHARS
characters are remembered (COUNT_CACHE of them), and a request of more than
INLINE_CHARS characters is counted on a worker thread, so a large request
does not stall the event loop (a 100,000-character text takes about 50 ms).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

log = logging.getLogger(__name__)

CACHED_CHARS = 512
COUNT_CACHE = 16_384
INLINE_CHARS = 16_384


class TokenCounter:
    """Counts tokens as the replicas' tokenizer makes them; `configure` once the window is known."""

    def __init__(self, tokenizer: Tokenizer, folder: Path) -> None:
        self._tokenizer = tokenizer
        self.folder = folder
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._short = functools.lru_cache(maxsize=COUNT_CACHE)(self._count_one)

    @classmethod
    def load(cls, folder: str) -> "TokenCounter":
        """The tokenizer of the model in `folder`; ValueError when it has none that loads."""
        path = Path(folder).expanduser()
        try:
            return cls(Tokenizer.from_file(str(path / "tokenizer.json")), path)
        except Exception as exc:  # noqa: BLE001 - any failure to load is a configuration error
            raise ValueError(f"--tokenizer {folder}: no usable tokenizer.json ({exc}); the HTTP API counts usage "
                             "tokens with the replicas' tokenizer: name their model folder") from None

    def configure(self, window: int, model_id: str) -> None:
        """Cut counts at `window` tokens (0: no limit), as the replicas do; warn when `model_id`
        (the replicas' model) does not look like the tokenizer's."""
        from mlbase.backends.torch_backend import model_id_for  # the replica's own naming rule

        if window > 0:
            self._tokenizer.enable_truncation(window)
        else:
            self._tokenizer.no_truncation()
        self._short.cache_clear()
        own = model_id_for(self.folder)
        if own != model_id:
            log.warning("HTTP usage counts tokens with the tokenizer of %s (%s) but the replicas serve %r: the counts "
                        "are only right if both use the same tokenizer (set --tokenizer to the replicas' model "
                        "folder; a renamed model (--model-id) is fine)", self.folder, own, model_id)

    def _count_one(self, text: str) -> int:
        return len(self._tokenizer.encode(text).ids)

    def count_now(self, texts: Sequence[str]) -> list[int]:
        """The count of each text, computed on this thread."""
        return [self._short(t) if len(t) <= CACHED_CHARS else self._count_one(t) for t in texts]

    async def count(self, texts: Sequence[str]) -> list[int]:
        """The count of each text; on a worker thread when there is much to count."""
        if sum(len(t) for t in texts) <= INLINE_CHARS:
            return self.count_now(texts)
        return await asyncio.to_thread(self.count_now, texts)

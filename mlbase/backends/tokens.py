"""Tokenize once, pad per micro-batch.

`Encoded` is one text's model inputs (token ids and companions, unpadded)
plus what the batcher and the reply need: its length in tokens and whether
it was cut to the model window. `TextTokenizer` wraps a Hugging Face fast
tokenizer so that every backend using one tokenizes the same way the
sentence-transformers `Transformer` module does (right truncation to
`max_seq_length`, special tokens added), and pads a micro-batch into numpy
arrays without a second pass through the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Encoded:
    """One tokenized text, ready to be padded into a batch."""

    # Model input name -> unpadded values, e.g. input_ids, attention_mask, token_type_ids.
    features: dict[str, list[int]]
    length: int
    truncated: bool


class TextTokenizer:
    """A fast Hugging Face tokenizer, used the way sentence-transformers uses it."""

    def __init__(self, tokenizer, max_seq_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.pad_values = {
            "input_ids": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            "attention_mask": 0,
            "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0,
        }
        self.left_padding = getattr(tokenizer, "padding_side", "right") == "left"

    def _call(self, texts: Sequence[str], max_length: int) -> dict[str, list[list[int]]]:
        return self.tokenizer(list(texts), truncation="longest_first", max_length=max_length,
                              padding=False, add_special_tokens=True)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Tokenize to max_seq_length + 1 so that one pass both tells which texts
        exceed the window and gives the final ids of all others; only the texts
        that do exceed it (rare) are tokenized again at the exact window, which
        keeps the tokenizer's own truncation rules (special tokens, strategy)."""
        limit = self.max_seq_length
        out = self._call(texts, limit + 1)
        names = list(out.keys())
        columns = [out[name] for name in names]
        encoded = [
            Encoded({name: col[i] for name, col in zip(names, columns)}, len(columns[0][i]), False)
            for i in range(len(texts))
        ]
        long_rows = [i for i, e in enumerate(encoded) if e.length > limit]
        if long_rows:
            again = self._call([texts[i] for i in long_rows], limit)
            for j, i in enumerate(long_rows):
                features = {name: again[name][j] for name in names}
                encoded[i] = Encoded(features, len(features[names[0]]), True)
        return encoded

    def pad(self, batch: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """Pad a micro-batch to its longest member: int64 arrays (len(batch), longest)."""
        longest = max(e.length for e in batch)
        arrays: dict[str, np.ndarray] = {}
        for name in batch[0].features:
            arr = np.full((len(batch), longest), self.pad_values.get(name, 0), dtype=np.int64)
            for row, e in enumerate(batch):
                values = e.features[name]
                if self.left_padding:
                    arr[row, longest - len(values):] = values
                else:
                    arr[row, :len(values)] = values
            arrays[name] = arr
        return arrays

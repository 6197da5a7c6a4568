"""The two gates a backend must pass before a replica may serve it, on every served width.

1. **STS-B** (`sts_gate`): Spearman between the gold scores of the STS-B test
   pairs and the cosine of the two sentences' vectors, after the Matryoshka
   transform to each width (common.matryoshka), must stay within 0.5%
   (relative) of torch fp32's at the same width. Reduced precision may cost a
   little ranking quality, not more than the service promises.
2. **Batch independence** (`batch_gate`): a text's vector must not depend on
   which texts share its forward pass. A cache hands out the vector computed
   the first time; a replica recomputing it inside another batch must give
   the same vector, or two clients asking for one text get two answers. The
   gate embeds each of a few hundred texts of mixed lengths alone and again
   inside shuffled batches of other texts (different lengths, so different
   padding), and requires a cosine of at least 0.9999 between the two at
   every width. fp32 gives ~0.9999999 (float rounding); dynamic int8 fails
   (~0.994: its activation scales come from the whole batch); bf16 and static
   int8 fix everything per text and pass.

Both the tuner (mlbase.tune) and the quality benchmark (bench.quality) use
these functions; the statistics are plain numpy so neither needs scipy.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import matryoshka

# The widths the service serves by default, full width first.
WIDTHS = (384, 256, 128, 64)
# "Within 0.5% of torch fp32": the largest relative Spearman drop allowed at any width.
STS_TOLERANCE = 0.005
# Smallest cosine allowed between a text's vector alone and inside a batch, at any width.
MIN_BATCH_COSINE = 0.9999
# Texts per shuffled batch in the batch gate (the batcher's micro-batches are about this size).
GATE_BATCH_SIZE = 16


# ---- data and statistics ---------------------------------------------------------------

@dataclass(frozen=True)
class StsPairs:
    """STS-B pairs as indices into one list of distinct sentences (each embedded once)."""

    gold: np.ndarray
    sentences: list[str]
    first: np.ndarray
    second: np.ndarray

    @classmethod
    def load(cls, path: Path, pairs: int = 0) -> "StsPairs":
        """The first `pairs` pairs of an STS-B tsv (0 = all)."""
        gold, first, second = load_sts(path)
        if pairs:
            gold, first, second = gold[:pairs], first[:pairs], second[:pairs]
        sentences = sorted(set(first) | set(second))
        position = {t: i for i, t in enumerate(sentences)}
        return cls(gold, sentences, np.array([position[t] for t in first]), np.array([position[t] for t in second]))


def load_sts(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """STS-B tsv: a header row naming the columns; fields split on tabs only (sentences
    contain quotes, so no CSV quoting rules). Returns (gold scores, sentence1s, sentence2s)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    i_score, i_s1, i_s2 = (header.index(name) for name in ("score", "sentence1", "sentence2"))
    gold, first, second = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < len(header):
            raise ValueError(f"{path}:{number}: {len(fields)} fields, expected {len(header)}")
        gold.append(float(fields[i_score]))
        first.append(fields[i_s1])
        second.append(fields[i_s2])
    return np.array(gold, dtype=np.float64), first, second


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the average of their ranks."""
    _, inverse, counts = np.unique(np.asarray(values), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average = (ends - counts + 1 + ends) / 2.0
    return average[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the (tie-averaged) ranks."""
    ra, rb = rankdata(np.asarray(a, dtype=np.float64)), rankdata(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(axis=1) / norms


def sts_spearman(full: np.ndarray, pairs: StsPairs, widths: Sequence[int] = WIDTHS,
                 layer_norm: bool = False) -> dict[int, float]:
    """Spearman per width for full-width vectors of `pairs.sentences`."""
    out = {}
    for width in widths:
        reduced = matryoshka.reduce(full, width, layer_norm)
        out[width] = spearman((reduced[pairs.first] * reduced[pairs.second]).sum(axis=1), pairs.gold)
    return out


# ---- the gates ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StsGate:
    spearman: dict[int, float]
    reference: dict[int, float]

    @property
    def drops(self) -> dict[int, float]:
        """Relative drop vs the reference per width (0.004 = 0.4% lower; negative = better)."""
        return {w: 1.0 - rho / self.reference[w] for w, rho in self.spearman.items()}

    @property
    def worst_drop(self) -> float:
        return max(self.drops.values())

    @property
    def passed(self) -> bool:
        return self.worst_drop <= STS_TOLERANCE


def sts_gate(spearman_by_width: dict[int, float], reference: dict[int, float]) -> StsGate:
    return StsGate(dict(spearman_by_width), dict(reference))


@dataclass(frozen=True)
class BatchGate:
    # Lowest cosine alone vs in a batch, per width, over all texts.
    min_cosine: dict[int, float]
    texts: int

    @property
    def worst(self) -> float:
        return min(self.min_cosine.values())

    @property
    def passed(self) -> bool:
        return self.worst >= MIN_BATCH_COSINE


def mixed_length_texts(lines: Sequence[str], count: int, longest: int = 12) -> list[str]:
    """`count` texts of 1 to `longest` consecutive lines each (cycling), so a batch of them
    mixes short and long texts and every member but the longest is padded."""
    if not lines:
        raise ValueError("no lines to build gate texts from")
    out, start = [], 0
    for i in range(count):
        size = 1 + (i * 5) % longest  # 1, 6, 11, 4, 9, ...: lengths spread, not sorted
        out.append(" ".join(lines[(start + j) % len(lines)] for j in range(size)))
        start += size
    return out


def batch_gate(backend, texts: Sequence[str], widths: Sequence[int] = WIDTHS, layer_norm: bool = False,
               batch_size: int = GATE_BATCH_SIZE, seed: int = 0) -> BatchGate:
    """Embed each text alone, then in shuffled batches of `batch_size`; the lowest cosine
    between the two vectors of a text, per width (`backend` is a loaded mlbase Backend)."""
    encoded = backend.tokenize(texts)
    alone = np.concatenate([backend.embed([e]) for e in encoded])
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    together = np.empty_like(alone)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        together[rows] = backend.embed([encoded[i] for i in rows])
    return BatchGate({w: float(cosines(matryoshka.reduce(alone, w, layer_norm),
                                       matryoshka.reduce(together, w, layer_norm)).min()) for w in widths},
                     len(texts))

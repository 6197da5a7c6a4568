"""The Matryoshka transform and the width policy, used by every service.

Caches store the model's full-width output; the requested width is produced
on the way out by `reduce`, so one cache entry serves every width. Keeping
the transform in one function is what makes "a reduced vector from the cache"
and "a reduced vector from the replica" bit-for-bit comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import InvalidInput

_LAYER_NORM_EPS = 1e-5
_NORM_EPS = 1e-12


def reduce(full: np.ndarray, width: int, layer_norm: bool) -> np.ndarray:
    """full vectors (n, D) -> [layer norm over D] -> first `width` -> L2-normalise.

    Layer norm has no learned affine part: it centres and scales each vector
    over its full width, which spreads information into the leading values
    for models not trained with a Matryoshka loss. Returns float32 (n, width).
    """
    x = np.asarray(full, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if layer_norm:
        mean = x.mean(axis=1, keepdims=True)
        var = x.var(axis=1, keepdims=True)
        x = (x - mean) / np.sqrt(var + _LAYER_NORM_EPS)
    x = x[:, :width]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, _NORM_EPS), dtype=np.float32)


@dataclass(frozen=True)
class WidthPolicy:
    """Which output widths a deployment accepts, and which one 0 means."""

    native_width: int
    min_width: int = 32
    default_width: int = 256
    allowed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.min_width <= self.native_width:
            raise ValueError(f"min width {self.min_width} must be in 1..{self.native_width}")
        for w in self.allowed:
            if not self.min_width <= w <= self.native_width:
                raise ValueError(f"allowed width {w} outside {self.min_width}..{self.native_width}")
        if not self.accepts(self.default_width):
            raise ValueError(f"default width {self.default_width} is not an allowed width ({self.describe()})")

    def accepts(self, width: int) -> bool:
        if self.allowed:
            return width in self.allowed
        return self.min_width <= width <= self.native_width

    def describe(self) -> str:
        if self.allowed:
            return "one of " + ", ".join(str(w) for w in sorted(self.allowed))
        return f"{self.min_width} to {self.native_width}"

    def resolve(self, requested: int) -> int:
        """0 -> default width; otherwise the width itself if allowed, else InvalidInput."""
        if requested == 0:
            return self.default_width
        if not self.accepts(requested):
            raise InvalidInput(f"`dimensions` is {requested}; allowed: {self.describe()} (0 = default {self.default_width})")
        return requested

    def widths(self) -> list[int]:
        """Every accepted width, for validation and GetInfo."""
        if self.allowed:
            return sorted(self.allowed)
        return list(range(self.min_width, self.native_width + 1))


def parse_widths(text: str) -> tuple[int, ...]:
    """'64,128,256' -> (64, 128, 256); '' -> () meaning any width in range."""
    text = text.strip()
    if not text:
        return ()
    return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))

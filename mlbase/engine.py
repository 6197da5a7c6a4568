"""The replica's core, apart from any transport: validate, tokenize, batch,
transform.

One Embed call: check the request against the limits (before anything is
queued), reserve room in the bounded queue (or refuse at once), tokenize (on
the tokenizer thread unless the request is small), refuse or count texts over the model window, wait for
the batcher's inference thread, then apply the shared Matryoshka transform
unless the caller wants the model's full-width output.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from common import matryoshka, tracing
from common.errors import InvalidInput, Overloaded, Unavailable
from common.limits import check_texts
from mlbase.backends.base import Backend, ModelDescription
from mlbase.batcher import InferenceBatcher
from mlbase.settings import MLBaseSettings

log = logging.getLogger(__name__)

# A request this small is tokenized on the event loop: tens of microseconds, less than the two thread
# hops it would otherwise take (the one-text query is the most frequent call); larger ones go to the
# tokenizer thread so they never hold up other calls.
INLINE_TOKENIZE_CHARS = 512
# Short and long texts, so warm-up touches more than one sequence length.
_WARMUP_TEXTS = ["warm up", "a replica warms up before it reports SERVING " * 4, ""] * 4
# Why an Embed call was refused, as /metrics labels it.
REJECTIONS = {Overloaded: "queue_full", Unavailable: "unavailable", InvalidInput: "invalid_input"}


@dataclass(frozen=True)
class ComputedVectors:
    """A replica's answer to one Embed call: the model's vectors (full width or reduced)."""

    vectors: np.ndarray  # float32 (n, width)
    width: int
    truncated: list[int]
    fingerprint: str


class ReplicaEngine:
    """The replica's core: owns the backend, the tokenizer thread and the inference batcher."""

    def __init__(self, backend: Backend, settings: MLBaseSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.description: ModelDescription | None = None
        self.fingerprint = ""
        self.policy: matryoshka.WidthPolicy | None = None
        self.batcher: InferenceBatcher | None = None
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlbase-tokenize")
        self.ready = False
        self.rejected = dict.fromkeys(REJECTIONS.values(), 0)  # Embed calls refused, by reason
        # New at every start: lets a client behind a TCP balancer tell its connections' replicas apart.
        self.replica_id = uuid.uuid4().hex[:16]

    async def start(self) -> None:
        """Load the model (off the loop), start the inference thread, warm up."""
        started = time.monotonic()
        await asyncio.to_thread(self.backend.load)
        self.description = self.backend.describe()
        self.fingerprint = self.description.fingerprint()
        s = self.settings
        try:
            self.policy = matryoshka.WidthPolicy(native_width=self.description.native_width, min_width=s.min_width,
                                                 default_width=s.default_width, allowed=s.allowed_widths)
        except ValueError as exc:
            raise ValueError(f"width settings do not fit this model ({self.description.native_width} wide): {exc}")
        self.batcher = InferenceBatcher(self.backend.embed, self.description.native_width, s.batch)
        self.batcher.start()
        await self._embed(_WARMUP_TEXTS, 0, True, False)
        self.ready = True
        log.info("model %s ready in %.1fs; fingerprint %s", self.description.model_id,
                 time.monotonic() - started, self.fingerprint)

    async def close(self) -> None:
        """Finish queued work, then stop both threads."""
        self.ready = False
        if self.batcher is not None:
            await self.batcher.close()
        await asyncio.to_thread(self._tokenizer_pool.shutdown, True)

    def _validate(self, texts: Sequence[str]) -> None:
        s = self.settings
        check_texts(texts, field="texts", max_inputs=s.max_inputs, max_chars=s.max_chars)

    async def embed(self, texts: Sequence[str], dimensions: int, full_width: bool,
                    reject_truncation: bool) -> ComputedVectors:
        try:
            if not self.ready:
                raise Unavailable("model is not loaded yet; retry on another replica")
            return await self._embed(texts, dimensions, full_width, reject_truncation)
        except tuple(REJECTIONS) as exc:
            self.rejected[next(why for kind, why in REJECTIONS.items() if isinstance(exc, kind))] += 1
            raise

    async def _embed(self, texts: Sequence[str], dimensions: int, full_width: bool,
                     reject_truncation: bool) -> ComputedVectors:
        assert self.policy is not None and self.batcher is not None and self.description is not None
        self._validate(texts)
        width = self.description.native_width if full_width else self.policy.resolve(dimensions)
        with self.batcher.reserve(len(texts)):
            loop = asyncio.get_running_loop()
            with tracing.span("replica.tokenize", attributes={"sutra.texts": len(texts)}):
                if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
                    encoded = self.backend.tokenize(texts)
                else:
                    encoded = await loop.run_in_executor(self._tokenizer_pool, self.backend.tokenize, texts)
            truncated = [i for i, e in enumerate(encoded) if e.truncated]
            if truncated and reject_truncation:
                raise InvalidInput(
                    f"`texts[{truncated[0]}]` is longer than the model window of "
                    f"{self.description.max_seq_length} tokens ({len(truncated)} such texts); "
                    "shorten them or allow truncation")
            full = await self.batcher.submit(encoded)
        if full_width:
            vectors = full
        else:
            vectors = matryoshka.reduce(full, width, self.settings.layer_norm)
        return ComputedVectors(vectors, width, truncated, self.fingerprint)

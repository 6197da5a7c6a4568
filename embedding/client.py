"""Client library for EmbeddingService: texts in, a numpy array out.

    from embedding.client import Client
    with Client("127.0.0.1:50051") as c:
        vectors = c.embed(["hello", "world"], dimensions=128)   # (2, 128) float32

It asks for the packed float32 encoding (no per-float protobuf cost), splits
inputs larger than the server's `max_inputs` into several calls, and retries
UNAVAILABLE / RESOURCE_EXHAUSTED with exponential backoff and jitter within
the call's timeout. `AsyncClient` has the same API for asyncio code and sends
the chunks of a large input concurrently.

Security options: `tls=TlsClientOptions(ca=..., cert=..., key=...)` for a
frontend serving TLS (cert/key when it requires client certificates),
`token=` for one that requires `authorization: Bearer <token>`, and
`tenant=` (the `x-sutra-tenant` header) for one without tokens that
isolates tenants. Messages are capped at `max_message_bytes` both ways.

Tracing: a call made while an OpenTelemetry span is current (the caller
traces with its own SDK) carries that span's W3C `traceparent`, so the
frontend's spans join the caller's trace.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from common.tls import DEFAULT_MAX_MESSAGE_BYTES, TlsClientOptions, open_channel
from common.tracing import outgoing
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass
class EmbedOutput:
    """Vectors plus what the server said about them (summed over chunks)."""

    vectors: np.ndarray
    model: str
    dimensions: int
    l1_hits: int = 0
    l2_hits: int = 0
    computed: int = 0
    truncated: int = 0
    duplicates: int = 0

    def add_usage(self, usage: pb.EmbedUsage) -> None:
        self.l1_hits += usage.l1_hits
        self.l2_hits += usage.l2_hits
        self.computed += usage.computed
        self.truncated += usage.truncated
        self.duplicates += usage.duplicates


def decode(response: pb.EmbedResponse, count: int) -> np.ndarray:
    """(count, dimensions) float32 from a packed or float-encoded response."""
    if response.packed or not response.embeddings:
        return np.frombuffer(response.packed, dtype="<f4").reshape(count, response.dimensions)
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


def _as_list(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def call_metadata(token: str | None, tenant: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: the bearer token and/or the tenant header."""
    metadata = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if tenant:
        metadata.append(("x-sutra-tenant", tenant))
    return tuple(metadata)


def _backoff(attempt: int, base: float) -> float:
    return base * (2 ** attempt) * (0.5 + random.random())


def _time_left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


class _ClientBase:
    """What Client and AsyncClient share: settings, call metadata, the retry policy, and how a
    large input is split into requests and the answers joined; each adds only the I/O."""

    def __init__(self, address: str, *, timeout: float, retries: int, backoff: float, batch_size: int | None,
                 token: str | None, tenant: str | None) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._batch_size = batch_size
        self._metadata = call_metadata(token, tenant)
        self._info: pb.GetInfoResponse | None = None

    def _retry_pause(self, exc: grpc.RpcError, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before attempt `attempt + 1` after `exc`; None: give up and raise it."""
        pause = _backoff(attempt, self.backoff)
        if exc.code() not in RETRYABLE or attempt >= self.retries or time.monotonic() + pause >= deadline:
            return None
        return pause

    def _batch_limit(self, info: pb.GetInfoResponse) -> int:
        limit = info.max_inputs or 2048
        return min(self._batch_size, limit) if self._batch_size else limit

    @staticmethod
    def _empty(info: pb.GetInfoResponse, dimensions: int) -> EmbedOutput:
        width = dimensions or info.default_width
        return EmbedOutput(np.zeros((0, width), dtype=np.float32), info.model_id, width)

    @staticmethod
    def _request(chunk: list[str], dimensions: int, truncation: int) -> pb.EmbedRequest:
        return pb.EmbedRequest(inputs=chunk, dimensions=dimensions, encoding=pb.ENCODING_PACKED,
                               truncation=truncation)

    @staticmethod
    def _join(chunks: list[list[str]], responses: Sequence[pb.EmbedResponse]) -> EmbedOutput:
        out = EmbedOutput(np.empty(0), responses[0].model, responses[0].dimensions)
        parts = []
        for chunk, response in zip(chunks, responses):
            out.add_usage(response.usage)
            parts.append(decode(response, len(chunk)))
        out.vectors = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out


class Client(_ClientBase):
    """Blocking client. Thread-safe (one gRPC channel)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.1, batch_size: int | None = None, tls: TlsClientOptions | None = None,
                 token: str | None = None, tenant: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(address, timeout=timeout, retries=retries, backoff=backoff, batch_size=batch_size,
                         token=token, tenant=tenant)
        self._channel = open_channel(address, tls, max_message_bytes=max_message_bytes, aio=False)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            try:
                return method(request, timeout=_time_left(deadline), metadata=outgoing(self._metadata))
            except grpc.RpcError as exc:
                pause = self._retry_pause(exc, attempt, deadline)
                if pause is None:
                    raise
                attempt += 1
                time.sleep(pause)

    def info(self) -> pb.GetInfoResponse:
        if self._info is None:
            self._info = self._call(self._stub.GetInfo, pb.GetInfoRequest())
        return self._info

    def cache_stats(self) -> pb.GetCacheStatsResponse:
        return self._call(self._stub.GetCacheStats, pb.GetCacheStatsRequest())

    def batch_size(self) -> int:
        return self._batch_limit(self.info())

    def embed(self, texts: str | Sequence[str], dimensions: int = 0) -> np.ndarray:
        """(len(texts), dimensions) float32, unit rows; dimensions=0 = the server's default."""
        return self.embed_detailed(texts, dimensions).vectors

    def embed_detailed(self, texts: str | Sequence[str], dimensions: int = 0,
                       truncation: int = pb.TRUNCATION_TRUNCATE) -> EmbedOutput:
        items = _as_list(texts)
        if not items:
            return self._empty(self.info(), dimensions)
        chunks = _chunks(items, self.batch_size() if len(items) > 1 else 1)
        return self._join(chunks, [self._call(self._stub.Embed, self._request(c, dimensions, truncation))
                                   for c in chunks])

    def stream(self, batches: Iterable[Sequence[str]], dimensions: int = 0) -> Iterator[tuple[np.ndarray, pb.EmbedResponse]]:
        """Bulk ingestion over EmbedStream: yields (vectors, response) per batch, in order.

        Not retried: a failed stream raises grpc.RpcError; callers that can
        resume (the CLI does) restart from the first unanswered batch.
        """
        sizes: list[int] = []

        def requests():
            for batch in batches:
                batch = list(batch)
                sizes.append(len(batch))
                yield pb.EmbedStreamRequest(inputs=batch, dimensions=dimensions, encoding=pb.ENCODING_PACKED)

        for i, reply in enumerate(self._stub.EmbedStream(requests(), metadata=outgoing(self._metadata))):
            yield decode(reply.result, sizes[i]), reply.result



class AsyncClient(_ClientBase):
    """asyncio client with the same API; chunks of a large input go out concurrently."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.1, batch_size: int | None = None, concurrency: int = 4,
                 tls: TlsClientOptions | None = None, token: str | None = None, tenant: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(address, timeout=timeout, retries=retries, backoff=backoff, batch_size=batch_size,
                         token=token, tenant=tenant)
        self._concurrency = concurrency
        self._channel = open_channel(address, tls, max_message_bytes=max_message_bytes)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request):
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            try:
                return await method(request, timeout=_time_left(deadline), metadata=outgoing(self._metadata))
            except grpc.aio.AioRpcError as exc:
                pause = self._retry_pause(exc, attempt, deadline)
                if pause is None:
                    raise
                attempt += 1
                await asyncio.sleep(pause)

    async def info(self) -> pb.GetInfoResponse:
        if self._info is None:
            self._info = await self._call(self._stub.GetInfo, pb.GetInfoRequest())
        return self._info

    async def cache_stats(self) -> pb.GetCacheStatsResponse:
        return await self._call(self._stub.GetCacheStats, pb.GetCacheStatsRequest())

    async def batch_size(self) -> int:
        return self._batch_limit(await self.info())

    async def embed(self, texts: str | Sequence[str], dimensions: int = 0) -> np.ndarray:
        return (await self.embed_detailed(texts, dimensions)).vectors

    async def embed_detailed(self, texts: str | Sequence[str], dimensions: int = 0,
                             truncation: int = pb.TRUNCATION_TRUNCATE) -> EmbedOutput:
        items = _as_list(texts)
        if not items:
            return self._empty(await self.info(), dimensions)
        chunks = _chunks(items, await self.batch_size() if len(items) > 1 else 1)
        slots = asyncio.Semaphore(self._concurrency)

        async def one(chunk: list[str]) -> pb.EmbedResponse:
            async with slots:
                return await self._call(self._stub.Embed, self._request(chunk, dimensions, truncation))

        return self._join(chunks, await asyncio.gather(*(one(c) for c in chunks)))

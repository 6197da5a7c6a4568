"""The gRPC transport for EmbeddingService: convert the request, call the
engine, convert the answer. Nothing here knows about caches or replicas.

EmbedStream answers in order but works ahead: up to `stream_window`
requests of one stream are processed at once, so a bulk client keeps the
replicas busy while it reads answers. A stream's helper tasks are cancelled
from the RPC's done-callback, which runs however the RPC ends. A stream that
sends nothing and has nothing outstanding for `stream_idle_s` (an abandoned
client) is ended by the server with DEADLINE_EXCEEDED, so streams cannot
pile up on a frontend. A client that stops *reading* while answers are
queued cannot be sent that status (grpc's send waits on the client's flow
control): its handler, tasks and `open_streams` count are still released at
the idle limit, but grpc keeps the HTTP/2 stream and the answers it
buffered, at most one flow-control window, until the client goes away.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from common.errors import DeadlineExceeded, InvalidInput, Unavailable, grpc_errors
from embedding.cache_admin import CacheAdmin
from embedding.engine import EmbedReply, FrontendEngine, unknown_model
from embedding.fingerprints import LiveFingerprints
from embedding.models import Models
from embedding.tenants import Gate
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


def deadline_of(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def to_response(result: EmbedReply, encoding: int) -> pb.EmbedResponse:
    u = result.usage
    response = pb.EmbedResponse(
        model=result.model, dimensions=result.width, truncated_indices=result.truncated_indices,
        usage=pb.EmbedUsage(l1_hits=u.l1_hits, l2_hits=u.l2_hits, computed=u.computed,
                            truncated=u.truncated, duplicates=u.duplicates),
    )
    if encoding == pb.ENCODING_PACKED:
        response.packed = np.ascontiguousarray(result.vectors, dtype="<f4").tobytes()
    else:
        response.embeddings.extend([pb.Embedding(values=row) for row in result.vectors.tolist()])
    return response


def cache_stats_proto(stats: dict) -> pb.GetCacheStatsResponse:
    return pb.GetCacheStatsResponse(
        l1=pb.CacheLevelStats(**stats["l1"]), l2=pb.CacheLevelStats(**stats["l2"]),
        **{k: v for k, v in stats.items() if k not in ("l1", "l2")},
    )


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, engine: FrontendEngine, stream_window: int, gate: Gate | None = None,
                 stream_idle_s: float = 0.0, live: LiveFingerprints | None = None,
                 cache_admins: dict[str, CacheAdmin] | None = None, models: Models | None = None) -> None:
        self._engine = engine
        # Cache management per served model, by route name ("" = the default model); None: not offered.
        self._admins = cache_admins
        # Several models (embedding/models.py); None: `engine` alone, and EmbedRequest.model is checked by it.
        self._models = models
        # What the ML-base pool's connections see (GetInfo.live_fingerprints); None: not reported.
        self._live = live
        self._window = stream_window
        self._gate = gate or Gate(engine.settings.access)
        self._stream_idle_s = stream_idle_s
        self.open_streams = 0

    async def _embed(self, request, deadline: float | None, tenant: str, method: str) -> pb.EmbedResponse:
        """One answer; its time, from here to the response message, is counted under `method`
        when it succeeds (so the histogram's count matches the engine's `requests`)."""
        started = time.perf_counter()
        engine, model = (self._engine, request.model) if self._models is None else \
            (self._models.engine(request.model), "")
        result = await engine.embed(
            request.inputs, request.dimensions,
            reject_truncation=request.truncation == pb.TRUNCATION_REJECT, deadline=deadline, tenant=tenant,
            model=model)
        response = to_response(result, request.encoding)
        self._engine.stats.request_latency[method].record(time.perf_counter() - started)
        return response

    @grpc_errors
    async def Embed(self, request, context):
        return await self._embed(request, deadline_of(context), self._gate.tenant(context.invocation_metadata()),
                                 "Embed")

    def _stream_ended(self, _context) -> None:
        self.open_streams -= 1

    @grpc_errors
    async def EmbedStream(self, request_iterator, context):
        self.open_streams += 1
        context.add_done_callback(self._stream_ended)
        deadline = deadline_of(context)
        tenant = self._gate.tenant(context.invocation_metadata())
        loop = asyncio.get_running_loop()
        ahead: asyncio.Queue = asyncio.Queue(maxsize=self._window)
        running: set[asyncio.Future] = set()
        done = object()
        last_activity = loop.time()
        idle = False

        async def read() -> None:
            nonlocal last_activity
            try:
                async for request in request_iterator:
                    last_activity = loop.time()
                    task = asyncio.ensure_future(self._embed(request, deadline, tenant, "EmbedStream"))
                    running.add(task)
                    task.add_done_callback(_settled_work)
                    await ahead.put(task)  # blocks while `stream_window` answers are outstanding
                await ahead.put(done)
            except Exception as exc:  # noqa: BLE001 - handed to the writer, which ends the stream
                await ahead.put(exc)

        def _settled_work(task: asyncio.Future) -> None:
            running.discard(task)
            if not task.cancelled():
                task.exception()  # read here too: a stream that ended early never awaits its later answers

        reader = asyncio.create_task(read(), name="embed-stream-reader")
        handler = asyncio.current_task()
        timer: asyncio.TimerHandle | None = None

        def check_idle() -> None:
            nonlocal timer, idle
            quiet = loop.time() - last_activity
            if quiet >= self._stream_idle_s and not running:
                idle = True
                handler.cancel()
            else:
                timer = loop.call_later(max(0.05, self._stream_idle_s - quiet), check_idle)

        def release(_context) -> None:
            if timer is not None:
                timer.cancel()
            reader.cancel()
            for task in list(running):
                task.cancel()

        context.add_done_callback(release)
        if self._stream_idle_s > 0:
            timer = loop.call_later(self._stream_idle_s, check_idle)
        try:
            while (item := await ahead.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield pb.EmbedStreamResponse(result=await item)
                last_activity = loop.time()
        except asyncio.CancelledError:
            if not idle:
                raise
            # Our own idle timer cancelled us: end the stream with a status, not a cancellation.
            raise DeadlineExceeded(
                f"EmbedStream idle for {self._stream_idle_s:g}s (no request, nothing outstanding); "
                "the server ended it: open a new stream") from None
        finally:
            release(context)
            await asyncio.gather(reader, *running, return_exceptions=True)

    @grpc_errors
    async def GetInfo(self, request, context):
        if self._models is not None:
            route = self._models.route(request.model)
            engine, live, names = route.engine, route.pool.live, self._models.names()
        else:
            engine, live, names = self._engine, self._live, None
        m = engine.model
        if m is None:
            raise Unavailable("the frontend is starting: ML-base has not described its model yet")
        info, settings = m.info, engine.settings
        if self._models is None and request.model and request.model != info.model_id:
            raise unknown_model(request.model, [info.model_id])
        policy = m.policy_for(self._gate.tenant(context.invocation_metadata()))
        return pb.GetInfoResponse(
            model_id=info.model_id, fingerprint=info.fingerprint, native_width=info.native_width,
            allowed_widths=list(policy.allowed), min_width=policy.min_width,
            default_width=policy.default_width, max_inputs=m.max_inputs, max_chars=m.max_chars,
            max_seq_length=info.max_seq_length, backend=info.backend,
            cache_enabled=settings.cache_enabled, layer_norm=info.layer_norm, precision=info.precision,
            live_fingerprints=[pb.LiveFingerprint(fingerprint=fp, connections=n, active=fp == info.fingerprint)
                               for fp, n in sorted((live.counts() if live else {}).items())],
            models=names or [info.model_id],
        )

    @grpc_errors
    async def GetCacheStats(self, request, context):
        return cache_stats_proto(await self._engine.cache_stats())

    # -- cache management (admin) ---------------------------------------------------------------
    def _cache_admin(self, context, model: str = "") -> CacheAdmin:
        """The named model's cache management (empty: the default model's), for admin callers only."""
        self._gate.admin(context.invocation_metadata())
        if not self._admins:
            raise Unavailable("cache management is not available on this frontend")
        if self._models is not None:
            return self._admins[self._models.route(model).name]
        if self._engine.model is None:
            if model:  # as Embed answers before the replicas have described the model
                raise Unavailable("the frontend is starting: ML-base has not described its model yet")
        elif model and model != self._engine.model.info.model_id:
            raise unknown_model(model, [self._engine.model.info.model_id])
        return self._admins[""]

    @grpc_errors
    async def InvalidateCache(self, request, context):
        admin = self._cache_admin(context, request.model)
        if request.all_entries:
            if request.inputs:
                raise InvalidInput("give `inputs` or `all_entries`, not both")
            fingerprint, generation = await admin.invalidate_fingerprint(request.fingerprint)
            return pb.InvalidateCacheResponse(fingerprint=fingerprint, generation=generation)
        dropped, deleted = await admin.invalidate_texts(list(request.inputs))
        return pb.InvalidateCacheResponse(l1_dropped=dropped, l2_deleted=deleted)

    @grpc_errors
    async def ExportCache(self, request, context):
        admin = self._cache_admin(context)
        async for entries in admin.export():
            yield pb.ExportCacheResponse(entries=[pb.CacheEntry(key=k, value=v) for k, v in entries])

    @grpc_errors
    async def ImportCache(self, request_iterator, context):
        admin = self._cache_admin(context)
        stored = 0
        async for request in request_iterator:
            stored += await admin.import_entries([(e.key, e.value) for e in request.entries])
        return pb.ImportCacheResponse(stored=stored)

    @grpc_errors
    async def PrewarmCache(self, request, context):
        admin = self._cache_admin(context, request.model)
        count = request.count or self._engine.settings.recent_texts
        report = await admin.prewarm(count, request.fingerprint)
        return pb.PrewarmCacheResponse(fingerprint=report.fingerprint, texts=report.texts, already=report.already,
                                       computed=report.computed, seconds=report.seconds)


def add_to_server(servicer: EmbeddingServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_EmbeddingServiceServicer_to_server(servicer, server)

"""gRPC transport for the shard: converts CacheShardService messages to
`Shard` calls and back, and nothing else.

Lookup streams are long-lived (one per frontend), so a plain
`server.stop(grace)` would wait the whole grace period for them. On SIGTERM
the server therefore first ends every stream that is waiting for its next
batch (UNAVAILABLE, "shutting down"; the frontend fails open and
reconnects elsewhere or later), and lets streams that are answering a batch
finish it first.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from cacheshard.shard import Shard
from common.errors import SutraError, grpc_errors
from common.grpc_server import ServerOptions, ServiceServer
from sutra.cache.v1 import cache_shard_service_pb2 as pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheShardService"].full_name
_SHUTTING_DOWN = "the cache shard is shutting down; reconnect later"


class CacheShardServicer(pb_grpc.CacheShardServiceServicer):
    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._closing = False
        self._waiting: set[asyncio.Task] = set()

    def close_idle_streams(self) -> None:
        """End streams that wait for a batch; busy ones end after their current batch."""
        self._closing = True
        for task in list(self._waiting):
            task.cancel()

    async def Lookup(self, request_iterator, context):
        task = asyncio.current_task()
        waiting = self._waiting
        lookup = self.shard.lookup
        Response = pb.LookupResponse
        try:
            while not self._closing:
                waiting.add(task)
                try:
                    request = await context.read()
                finally:
                    waiting.discard(task)
                if request is grpc.aio.EOF:
                    return
                found, values = await lookup(request.keys)
                await context.write(Response(batch_id=request.batch_id, found=found, values=values))
        except asyncio.CancelledError:
            if not self._closing:
                raise
        except SutraError as exc:
            await context.abort(exc.code, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error in Lookup")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the shard's log")
        await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)

    @grpc_errors
    async def Store(self, request, context):
        entries = request.entries
        stored = await self.shard.put([e.key for e in entries], [e.value for e in entries])
        return pb.StoreResponse(stored=stored)

    @grpc_errors
    async def GetStats(self, request, context):
        s = await self.shard.stats()
        return pb.GetStatsResponse(
            entries=s.entries, bytes_on_disk=s.bytes_on_disk, hits=s.hits, misses=s.misses,
            stores=s.stores, evictions=s.evictions, errors=s.errors, uptime_seconds=s.uptime_seconds,
            max_entries=s.max_entries, sync=s.sync, corrupt=s.corrupt,
            memory_entries=s.memory_entries, memory_hits=s.memory_hits, memory_capacity=s.memory_capacity,
        )

    @grpc_errors
    async def Checkpoint(self, request, context):
        return pb.CheckpointResponse(path=await self.shard.checkpoint(request.path))


class ShardServer(ServiceServer):
    """The common server life cycle, plus ending idle Lookup streams before the grace period."""

    def __init__(self, options: ServerOptions, shard: Shard) -> None:
        super().__init__(options, [SERVICE_NAME])
        self.servicer = CacheShardServicer(shard)
        pb_grpc.add_CacheShardServiceServicer_to_server(self.servicer, self.server)

    async def drain_and_stop(self) -> None:
        await self.set_serving(False)
        if self.options.drain_seconds > 0:
            await asyncio.sleep(self.options.drain_seconds)
        self.servicer.close_idle_streams()
        await self.server.stop(self.options.grace_seconds)

"""gRPC transport for the replica: convert the request, call the engine,
convert the answer. Errors map to status codes in `common.errors`."""

from __future__ import annotations

import logging

from common.errors import Unavailable, grpc_errors
from common.grpc_server import ServiceServer, run_until_signalled
from mlbase.backends import registry
from mlbase.engine import ReplicaEngine
from mlbase.metrics import make_registry
from mlbase.settings import MLBaseSettings
from sutra.mlbase.v1 import mlbase_service_pb2 as pb
from sutra.mlbase.v1 import mlbase_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MLBaseService"].full_name


class MLBaseServicer(pb_grpc.MLBaseServiceServicer):
    def __init__(self, engine: ReplicaEngine) -> None:
        self.engine = engine

    @grpc_errors
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        result = await self.engine.embed(
            request.texts,
            dimensions=request.dimensions,
            full_width=request.full_width,
            reject_truncation=request.truncation == pb.TRUNCATION_REJECT,
        )
        return pb.EmbedResponse(
            vectors=result.vectors.astype("<f4", copy=False).tobytes(),
            count=result.vectors.shape[0],
            width=result.width,
            truncated_indices=result.truncated,
            model_fingerprint=result.fingerprint,
            replica_id=self.engine.replica_id,
        )

    @grpc_errors
    async def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.GetInfoResponse:
        engine = self.engine
        if not engine.ready:
            raise Unavailable("model is not loaded yet; retry on another replica")
        d, policy, s = engine.description, engine.policy, engine.settings
        return pb.GetInfoResponse(
            model_id=d.model_id,
            fingerprint=engine.fingerprint,
            native_width=d.native_width,
            max_seq_length=d.max_seq_length,
            backend=d.backend,
            precision=d.precision,
            allowed_widths=list(policy.allowed),
            min_width=policy.min_width,
            default_width=policy.default_width,
            layer_norm=s.layer_norm,
            max_inputs=s.max_inputs,
            max_chars=s.max_chars,
            replica_id=engine.replica_id,
        )


async def serve(settings: MLBaseSettings) -> None:
    """Bind, load and warm the model while NOT_SERVING, serve until SIGTERM, drain."""
    engine = ReplicaEngine(registry.create(settings.backend_name, settings.backend), settings)
    server = ServiceServer(settings.server, [SERVICE_NAME], metrics=make_registry(engine))
    pb_grpc.add_MLBaseServiceServicer_to_server(MLBaseServicer(engine), server.server)
    log.info("listening on %s:%d; loading %s", settings.server.host, server.port, settings.backend.model_path)
    await run_until_signalled(server, ready=engine.start, cleanup=engine.close)

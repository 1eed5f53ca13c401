"""`pipecat-nemotron serve-riva`: the Riva-compatible gRPC server (grpc.aio, one shared engine, gRPC health)."""

from __future__ import annotations

import asyncio
import logging

import grpc
from riva.client.proto import health_pb2, health_pb2_grpc, riva_asr_pb2_grpc

from ...engine import Engine
from .service import RivaASRServicer

logger = logging.getLogger("pipecat_nemotron.riva")
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one audio_content message; larger ones get RESOURCE_EXHAUSTED from gRPC


class EngineHealth(health_pb2_grpc.HealthServicer):
    """`grpc.health.v1.Health`: SERVING while the engine is alive and has room for a stream."""

    def __init__(self, *, engine):
        self.engine = engine

    async def Check(self, request, context):
        serving = self.engine.alive and self.engine.has_capacity
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


async def start_riva_server(*, engine: Engine, host: str = "127.0.0.1", port: int = 50051,
                            model_name: str | None = None) -> tuple[grpc.aio.Server, int, RivaASRServicer]:
    """Start serving on host:port (0: any free port) with a loaded engine; returns (server, port, servicer)."""
    await engine.ready()
    servicer = RivaASRServicer(engine=engine, model_name=model_name or engine.model_name)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    riva_asr_pb2_grpc.add_RivaSpeechRecognitionServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(EngineHealth(engine=engine), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    logger.info("serve-riva: listening on %s:%d (%s, %d ms chunks)", host, bound, engine.model_name, engine.chunk_ms)
    return server, bound, servicer


async def serve_riva(*, host: str, port: int, model: str, chunk_ms: int, device: str, max_streams: int,
                     threads: int | None = None) -> None:
    """Load the model, warm it up, and serve until interrupted."""
    engine = Engine.shared(model=model, chunk_ms=chunk_ms, device=device, max_streams=max_streams,
                           **({"threads": threads} if threads else {}))
    await engine.ready()
    await engine.warm_up()
    server, _, _ = await start_riva_server(engine=engine, host=host, port=port)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(grace=5)


def run_riva_server(**options) -> None:
    try:
        asyncio.run(serve_riva(**options))
    except KeyboardInterrupt:
        pass

"""`pipecat-nemotron serve-riva`: the Riva-compatible gRPC server (grpc.aio, one shared engine, gRPC health)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from riva.client.proto import health_pb2, health_pb2_grpc, riva_asr_pb2_grpc

from ...engine import Engine
from ..drain import DEFAULT_DRAIN_TIMEOUT_S, Drain
from ..heap import freeze_startup_heap
from ..metrics import AdminServer, ServerMetrics
from .service import RivaASRServicer

logger = logging.getLogger("pipecat_nemotron.riva")
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one audio_content message; larger ones get RESOURCE_EXHAUSTED from gRPC


class EngineHealth(health_pb2_grpc.HealthServicer):
    """`grpc.health.v1.Health`: SERVING while the engine is alive, has room for a stream and the server is not
    draining."""

    def __init__(self, *, engine, drain=None):
        self.engine = engine
        self.drain = drain

    async def Check(self, request, context):
        draining = self.drain is not None and self.drain.draining
        serving = self.engine.alive and self.engine.has_capacity and not draining
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


async def start_riva_server(*, engine: Engine, host: str = "127.0.0.1", port: int = 50051,
                            model_name: str | None = None, drain=None, metrics=None,
                            tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, int, RivaASRServicer]:
    """Start serving on host:port (0: any free port) with a loaded engine; returns (server, port, servicer).

    `tls`: (PEM private key, PEM certificate chain) to serve over TLS instead of plaintext."""
    await engine.ready()
    servicer = RivaASRServicer(engine=engine, model_name=model_name or engine.model_name, drain=drain,
                               metrics=metrics)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    riva_asr_pb2_grpc.add_RivaSpeechRecognitionServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(EngineHealth(engine=engine, drain=drain), server)
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([tls]))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    logger.info("serve-riva: listening on %s:%d (%s, %s, %d ms chunks)", host, bound, "TLS" if tls else "plaintext",
                engine.model_name, engine.chunk_ms)
    return server, bound, servicer


async def serve_riva(*, host: str, port: int, model: str, chunk_ms: int, device: str, max_streams: int,
                     threads: int | None = None, precision: str = "fp32",
                     drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
                     metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                     tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Load the model, warm it up, and serve until SIGTERM (a graceful drain: new streams UNAVAILABLE, health
    NOT_SERVING, live streams go on up to `drain_timeout`, then each is finalized and ended OK) or SIGINT."""
    tls = read_tls(tls_cert, tls_key)  # before the load: a missing file is a setup error
    drain = Drain(timeout_s=drain_timeout)
    drain.install_signal_handlers()
    engine = Engine.shared(model=model, chunk_ms=chunk_ms, device=device, max_streams=max_streams,
                           precision=precision, **({"threads": threads} if threads else {}))
    metrics = ServerMetrics(drain=drain, engine=lambda: engine)
    admin = None
    if metrics_port is not None:
        admin = AdminServer(metrics=metrics, drain=drain, host=metrics_host, port=metrics_port)
        admin.start()
    try:
        await engine.ready()
        await engine.warm_up()
        freeze_startup_heap()  # serve_riva owns its process (signal handlers, run_riva_server)
        server, _, servicer = await start_riva_server(engine=engine, host=host, port=port, drain=drain,
                                                      metrics=metrics, tls=tls)
        metrics.status.listening = True
        serving = asyncio.ensure_future(server.wait_for_termination())
        requested = asyncio.ensure_future(drain.requested())
        await asyncio.wait([serving, requested], return_when=asyncio.FIRST_COMPLETED)
        if requested.done():
            logger.info("serve-riva: draining %d live stream(s)", servicer.live)
            if not await drain.wait_for(lambda: servicer.live == 0):
                logger.info("serve-riva: drain bound reached; ending %d stream(s) with their finals", servicer.live)
                await servicer.end_sessions()
                await drain.wait_until(lambda: servicer.live == 0, 10.0)
        metrics.status.listening = False
        await server.stop(grace=2)
        serving.cancel()
    finally:
        drain.remove_signal_handlers()
        if admin is not None:
            await asyncio.to_thread(admin.close)


def read_tls(cert: str | None, key: str | None) -> tuple[bytes, bytes] | None:
    """(key, certificate chain) PEM bytes for TLS, None for plaintext; both files or neither."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return Path(key).read_bytes(), Path(cert).read_bytes()


def run_riva_server(**options) -> None:
    try:
        asyncio.run(serve_riva(**options))
    except KeyboardInterrupt:
        pass

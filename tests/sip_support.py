"""What the SIP tests share: a running user-agent server, an on_call that records calls, and a plain
transport.input() → collector → transport.output() pipeline run for one call (no ASR model)."""

import asyncio
import contextlib
import os
import socket
from contextlib import asynccontextmanager

from pipecat.frames.frames import EndFrame, OutputAudioRawFrame, StartFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from pipecat_nemotron.transports.sip import SIPCallTransport, SIPConfig, SIPUserAgentServer
from pipecat_nemotron.transports.sip.rtp import RtpSession

HOST = "127.0.0.1"


async def start_server(on_call=None, *, port: int = 0, **config) -> SIPUserAgentServer:
    """A started server on HOST (``port`` 0: a free one); the caller stops it."""
    server = SIPUserAgentServer(config=SIPConfig(host=HOST, port=port, **config), on_call=on_call)
    await server.start()
    return server


async def rtp_session_and_peer() -> tuple[RtpSession, int, socket.socket]:
    """An open RtpSession on HOST, its port, and a non-blocking UDP socket on HOST to play the far end (the caller
    closes both)."""
    session = RtpSession()
    _, port = await session.open(host=HOST)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((HOST, 0))
    peer.setblocking(False)
    return session, port, peer


@asynccontextmanager
async def serving(on_call=None, *, port: int = 0, **config):
    """``async with serving(on_call, **config) as server``: started on entry, stopped on exit."""
    server = await start_server(on_call, port=port, **config)
    try:
        yield server
    finally:
        await server.stop()


def calls_recorder():
    """(calls, on_call): on_call appends each call to calls and holds it until it ends."""
    calls = []

    async def on_call(call):
        calls.append(call)
        await call.ended.wait()

    return calls, on_call


async def until(condition, timeout=3.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


class Collector(FrameProcessor):
    """A plain sink: keeps every frame that reaches the end of the pipeline."""

    def __init__(self):
        super().__init__()
        self.frames = []

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        self.frames.append(frame)
        await self.push_frame(frame, direction)

    def of(self, cls):
        return [f for f in self.frames if isinstance(f, cls)]


async def run_call_pipeline(call, collector, *, bot_audio: bytes = b"", bot_frames=(),
                            bot_hangs_up_after: float | None = None, timeout: float = 20):
    """Run transport.input() → collector → transport.output() for ``call`` as an application's on_call
    would, until the pipeline ends; returns the transport's call events. Once the pipeline has started the
    bot sends ``bot_audio`` and ``bot_frames``, and with ``bot_hangs_up_after`` an EndFrame that many seconds
    later."""
    transport = SIPCallTransport(call=call)
    events = []

    @transport.event_handler("on_call_started")
    async def started(_, c):
        events.append(("started", c.identity["caller"]))

    @transport.event_handler("on_call_ended")
    async def ended(_, c):
        events.append(("ended", c.outcome))

    worker = PipelineWorker(Pipeline([transport.input(), collector, transport.output()]),
                            params=PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000),
                            idle_timeout_secs=None, enable_rtvi=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.ensure_future(runner.run())
    if bot_audio or bot_frames or bot_hangs_up_after is not None:
        await until(lambda: collector.of(StartFrame), timeout=10)
    if bot_audio:
        await worker.queue_frame(OutputAudioRawFrame(audio=bot_audio, sample_rate=8000, num_channels=1))
    for frame in bot_frames:
        await worker.queue_frame(frame)
    if bot_hangs_up_after is not None:
        if bot_hangs_up_after:
            await asyncio.sleep(bot_hangs_up_after)
        await worker.queue_frame(EndFrame())
    await asyncio.wait_for(run, timeout)
    return events


CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """Bring `lo` up (a fresh network namespace has it down)."""
    import fcntl
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0))[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


@contextlib.contextmanager
def loopback_namespace():
    """A private network namespace with only lo up, for this thread and the processes it starts; yields where the
    test runs (the host's loopback when the sandbox does not allow a namespace)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    except OSError as exc:
        yield f"host loopback ({exc})"
        return
    if libc.unshare(CLONE_NEWNET) != 0:
        os.close(original)
        yield f"host loopback (unshare not permitted: {os.strerror(ctypes.get_errno())})"
        return
    try:
        loopback_up()
        yield "private network namespace, loopback only"
    finally:
        libc.setns(original, CLONE_NEWNET)
        os.close(original)


def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]

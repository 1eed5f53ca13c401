"""Phone transcriber: answer SIP calls directly and write one JSON line per final transcript.

    pipecat-nemotron serve-sip --port 5060 --model demo --output calls.jsonl
    pipecat-nemotron serve-sip --allow 10.0.0.0/8 --max-calls 8 --greeting hello.wav

Point a trunk or PBX at it (Asterisk: ``direct_media=no``, ``rtp_symmetric=yes``, ``dtmf_mode=rfc4733``;
FreeSWITCH / Kamailio: route to ``sip:transcriber@HOST:PORT``). Per call the pipeline is::

    transport.input() → VADProcessor(WebRTCVADAnalyzer) → NemotronSTTService → TranscriptWriter
                      → transport.output()

Every call shares one engine (loaded at start-up, so calls are batched into one model step). The JSON line has the
call id, caller, language, text and times; the server logs one line per call with its outcome. ``--greeting``
plays a short WAV to the caller when the call starts (no TTS needed).

SIGTERM (or ``POST /drain`` on ``--metrics-port``) drains the server (``drain.py``): new INVITEs get 503 +
Retry-After and OPTIONS 503, live calls go on for up to ``--drain-timeout`` seconds, the rest get a BYE with their
last finals still written, and the process exits 0. ``--metrics-port`` serves Prometheus ``/metrics`` and
``/healthz`` (``metrics.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import IO

from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import OutputAudioRawFrame, TranscriptionFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from ..transports.sip import SIPCall, SIPCallTransport, SIPConfig, SIPServer
from ..transports.sip.config import PRIVATE_NETWORKS, allowed_peers_for
from ..transports.sip.uas import SIPUserAgentServer
from . import register
from .drain import DEFAULT_DRAIN_TIMEOUT_S, Drain, DrainingAdmission
from .heap import freeze_startup_heap
from .metrics import REFUSAL_REASONS, AdminServer, ServerMetrics

OUTPUT_CHUNK_SAMPLES = 320  # pipecat's output sends whole 40 ms chunks at 8 kHz: pad the greeting to that

# --max-calls when not given. The demo model's figure is measured by benchmarks/sip_capacity.py: concurrent real
# SIP calls (PCMU in real time, held-out speech) on a 2-core CPU at 160 ms chunks, 3 runs each
# (benchmarks/results/sip_capacity_demo.md): 24 calls kept the worst audio lag at 0.08-0.11 s (final p95 84 ms);
# 32 passed on the median (0.21 s) but one run lagged 0.61 s and final p95 was 0.53 s; 48 lagged 1.7-2.6 s. So 24.
# Larger chunks cost less per audio-second, so it is a floor for them. The 0.6B model in fp32 steps 0.61 audio-s/s
# on that CPU (fast step, batch 1): not even one call keeps up, so it gets one call. In int8 serve-sip held 3 calls
# (worst lag 0.43 s, final p95 443 ms) and not 4 (0.62 s), in two runs of sip_capacity.py --geometry 0.6b
# --precision int8: the architecture with random weights (benchmarks/results/sip_capacity_0.6b_int8.md). On a GPU
# it is not measured (none was lent): the engine's default slot count, with the engine's lag-based admission (503
# while it lags > 2 s) as the guard. Pass --max-calls to override.
DEMO_CPU_MAX_CALLS = 24
UNMEASURED_GPU_MAX_CALLS = 64
INT8_CPU_MAX_CALLS = 3  # the 0.6B architecture, --precision int8, 160 ms, 2-core CPU (sip_capacity_0.6b_int8.md)


def default_max_calls(model: str, device: str, precision: str = "fp32") -> tuple[int, str]:
    """(calls, where the figure comes from) for serve-sip's --max-calls default."""
    from ..engine.loader import resolve_device

    on_gpu = resolve_device(device).startswith("cuda")
    if model == "demo":
        return DEMO_CPU_MAX_CALLS, "measured for the demo model on a 2-core CPU (benchmarks/sip_capacity.py)"
    if on_gpu:
        return (UNMEASURED_GPU_MAX_CALLS,
                "not measured on a GPU yet; run benchmarks/sip_capacity.py and pass --max-calls")
    if precision == "int8":
        return INT8_CPU_MAX_CALLS, ("measured for the 0.6B architecture in int8 on a 2-core CPU at 160 ms "
                                    "(benchmarks/sip_capacity.py --geometry 0.6b --precision int8); measure yours")
    return 1, "the 0.6B model in fp32 does not keep up with even one call on a small CPU; use --precision int8 or a GPU"


class TranscriptWriter(FrameProcessor):
    """Writes one JSON line per final ``TranscriptionFrame`` of a call, then passes every frame on.

    ``on_final(latency_s)`` is told of every final, empty ones too (the metrics' VAD stop → final histogram).
    """

    def __init__(self, *, call: SIPCall, out: IO[str], on_final: Callable[[float | None], None] | None = None):
        super().__init__()
        self._call = call
        self._out = out
        self._on_final = on_final
        self.lines = 0

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            if frame.text.strip():
                self._write(frame)
            if self._on_final is not None:
                self._on_final(getattr(frame.result, "latency_s", None))
        await self.push_frame(frame, direction)

    def _write(self, frame: TranscriptionFrame) -> None:
        result = frame.result
        record = {
            "call_id": self._call.call_id,
            "caller": self._call.caller_uri,
            "caller_name": self._call.caller_name or None,
            "remote": self._call.identity["remote_address"],
            "language": frame.language.value if frame.language else None,
            "text": frame.text,
            "start_s": _rounded(getattr(result, "start_s", None)),
            "end_s": _rounded(getattr(result, "end_s", None)),
            "latency_ms": _rounded(getattr(result, "latency_s", None), scale=1000),
            "time": frame.timestamp or datetime.now(timezone.utc).isoformat(),
        }
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()
        self.lines += 1


def _rounded(value, *, scale: float = 1.0):
    return None if value is None else round(value * scale, 3)


def load_greeting(path: str | Path) -> OutputAudioRawFrame:
    """A WAV file (any rate/encoding pipecat_nemotron reads) as one output frame, padded to whole chunks."""
    from pipecat_nemotron.wav import read_wav

    wav = read_wav(path)
    samples = wav.samples.astype("<i2")
    step = OUTPUT_CHUNK_SAMPLES * wav.sample_rate // 8000
    padding = (-len(samples)) % step
    audio = samples.tobytes() + bytes(2 * padding)
    return OutputAudioRawFrame(audio=audio, sample_rate=wav.sample_rate, num_channels=1)


async def run_call(call: SIPCall, *, stt: FrameProcessor, out: IO[str], greeting: OutputAudioRawFrame | None = None,
                   vad_stop_secs: float = 0.3, on_final: Callable[[float | None], None] | None = None
                   ) -> TranscriptWriter:
    """Run one call's pipeline until either side hangs up."""
    transport = SIPCallTransport(call=call)
    vad = VADProcessor(vad_analyzer=_vad_analyzer(vad_stop_secs), audio_idle_timeout=0)
    writer = TranscriptWriter(call=call, out=out, on_final=on_final)
    rate = transport.sample_rate  # the codec's: 8 kHz G.711, 16 kHz G.722, 48 kHz Opus (the STT resamples to 16 kHz)
    worker = PipelineWorker(Pipeline([transport.input(), vad, stt, writer, transport.output()]),
                            params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
                            idle_timeout_secs=None, enable_rtvi=False)

    @transport.event_handler("on_call_started")
    async def on_call_started(_transport, started: SIPCall):
        logger.info(f"call {started.call_id} from {started.caller_uri}: transcribing")
        if greeting is not None:
            await worker.queue_frame(greeting)

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    return writer


def _vad_analyzer(stop_secs: float):
    from ..vad import WebRTCVADAnalyzer

    return WebRTCVADAnalyzer(params=VADParams(stop_secs=stop_secs))


def make_stt(args: argparse.Namespace, *, engine=None, reservation=None):
    """One NemotronSTTService per call, on the engine stream the SIP server reserved before answering; they all
    share the engine preloaded at start-up."""
    from ..languages import locale_to_language
    from ..stt import NemotronSTTService

    language = None if args.language in (None, "auto") else locale_to_language(args.language)
    return NemotronSTTService(model=args.model, chunk_ms=args.chunk_ms, language=language, device=args.device,
                              engine=engine, reservation=reservation)


async def serve(args: argparse.Namespace, *, stt_factory=None, out: IO[str] | None = None,
                ready: asyncio.Event | None = None, drain: Drain | None = None, handle_signals: bool = False,
                freeze_heap: bool = False) -> None:
    """Load the model, then answer calls until cancelled or drained (``drain``, started by SIGTERM when
    ``handle_signals``, or by ``POST /drain`` on ``--metrics-port``); returns once drained. ``freeze_heap``: the
    process is ours, so freeze its start-up heap before listening (`heap.freeze_startup_heap`)."""
    drain = drain or Drain(timeout_s=getattr(args, "drain_timeout", DEFAULT_DRAIN_TIMEOUT_S))
    drain.bind()
    if handle_signals:  # before the load: a SIGTERM while loading drains a server with no calls, i.e. exits
        drain.install_signal_handlers()
    node = SimpleNamespace(engine=None, server=None)  # filled in as they come up
    metrics = ServerMetrics(drain=drain, engine=lambda: node.engine,
                            rate_limited=lambda: node.server.uas.wire.rate_limited if node.server else 0)
    admin = catch_up = None
    try:
        if getattr(args, "metrics_port", None) is not None:  # up during the load: /healthz 503 until SIP listens
            admin = AdminServer(metrics=metrics, drain=drain, host=args.metrics_host, port=args.metrics_port)
            admin.start()
            catch_up = asyncio.ensure_future(_catch_up(metrics))
        await _serve(args, stt_factory=stt_factory, out=out, ready=ready, drain=drain, metrics=metrics, node=node,
                     freeze_heap=freeze_heap)
    finally:
        if catch_up is not None:
            catch_up.cancel()
        if admin is not None:
            await asyncio.to_thread(admin.close)
        if handle_signals:
            drain.remove_signal_handlers()


async def _serve(args: argparse.Namespace, *, stt_factory, out: IO[str] | None, ready: asyncio.Event | None,
                 drain: Drain, metrics: ServerMetrics, node: SimpleNamespace, freeze_heap: bool) -> None:
    out = out or (sys.stdout if args.output == "-" else open(args.output, "a", encoding="utf-8"))
    if args.max_calls is None:
        args.max_calls, source = default_max_calls(args.model, args.device, args.precision)
        logger.info(f"--max-calls {args.max_calls}: {source}")
    engine = None
    if stt_factory is None:
        from ..stt import NemotronSTTService

        from rich.console import Console

        from .console import loading

        with loading(Console(stderr=True), f"{args.model} ({args.chunk_ms} ms chunks)"):
            engine = await NemotronSTTService.preload(model=args.model, chunk_ms=args.chunk_ms, device=args.device,
                                                      max_streams=max(args.max_calls, 1), threads=args.threads,
                                                      precision=args.precision)
        node.engine = engine
        # One capacity truth: the SIP server reserves an engine stream before it answers (503 + Retry-After
        # when none is free, OPTIONS 503 while full); the call's STT service runs on that reservation.
        stt_factory = lambda call: make_stt(args, engine=engine, reservation=call.reservation)  # noqa: E731
    # ... and refuses every new call while draining, through the same path (INVITE 503 + Retry-After, OPTIONS 503)
    admission = DrainingAdmission(drain=drain, engine=engine)
    greeting = load_greeting(args.greeting) if args.greeting else None
    calls = metrics.calls

    async def on_call(call: SIPCall):
        calls.answered()
        try:
            await run_call(call, stt=stt_factory(call), out=out, greeting=greeting, on_final=calls.final)
        finally:
            calls.ended(call.outcome or "application finished")

    def on_rejected(_invite, _source, reason: str) -> None:
        calls.refused(reason if reason in REFUSAL_REASONS else "capacity")

    allowed = await register.admit_registrar(args, allowed_peers_for(args.allow))
    if allowed == PRIVATE_NETWORKS:
        logger.info("no --allow: answering loopback and private networks only (10/8, 172.16/12, 192.168/16, "
                    "fc00::/7, link-local); others get 403. Pass --allow NETWORK (or --allow any)")
    elif not allowed:
        logger.warning("--allow any: answering calls from every address")
    config = SIPConfig(host=args.host, port=args.port, advertised_host=args.advertise, max_calls=args.max_calls,
                       allowed_peers=allowed, max_call_secs=args.max_call_secs or None,
                       admission=admission, retry_after_secs=args.retry_after,
                       udp_rate_per_source=args.sip_rate, udp_burst_per_source=max(1, int(2 * args.sip_rate)),
                       tcp_max_connections=args.tcp_max_connections, tcp_max_per_source=args.tcp_max_per_source,
                       tcp_idle_secs=args.tcp_idle_secs, tls_cert=args.tls_cert, tls_key=args.tls_key,
                       tls_port=args.tls_port, srtp=args.srtp)
    server = node.server = SIPServer(on_call=on_call, config=config)
    server.uas.on_rejected = on_rejected
    if freeze_heap:
        freeze_startup_heap()
    registration = None
    try:
        host, port = await server.start()
        registration = register.start(args, server.uas)
        metrics.status.listening = True
        tls = server.uas.wire.tls_address
        secure = f", sips:transcriber@{host}:{tls[1]} (SRTP {config.srtp or 'required'})" if tls else ""
        logger.info(f"phone transcriber on sip:transcriber@{host}:{port}{secure} (max {args.max_calls} calls)")
        if ready is not None:
            ready.set()
        await drain.requested()
        await drain_calls(server.uas, drain)
    finally:
        metrics.status.listening = False
        if registration is not None:
            await registration.stop()  # unregister (Expires: 0) while the socket is still open
        await server.stop()


async def _catch_up(metrics: ServerMetrics) -> None:
    """Feed every engine step into the step histograms (the engine keeps only a window of recent steps)."""
    while True:
        await asyncio.sleep(1.0)
        metrics.engine.catch_up()


async def drain_calls(uas: SIPUserAgentServer, drain: Drain) -> None:
    """Let the live calls finish (up to the drain timeout, or until a second SIGTERM), then hang up the rest with a
    BYE; their pipelines end gracefully, so their last finals are still written. Returns when every call's
    application has finished (at most `client_session.GRACEFUL_END_S` after the BYEs)."""
    from .client_session import GRACEFUL_END_S

    live = uas.active_calls
    logger.info(f"drain: {live} call(s) live" + (f"; waiting up to {drain.timeout_s:g} s for them" if live else ""))
    if not await drain.wait_for(lambda: uas.active_calls == 0):
        remaining = uas.dialogs.active
        logger.info(f"drain: hanging up {len(remaining)} call(s) still up (BYE); their last words are still "
                    "transcribed")
        for call in remaining:
            call.confirmed.set()  # no waiting for an outstanding ACK
            await uas.hangup(call, "drain timeout")
        if not await drain.wait_until(lambda: uas.active_calls == 0, GRACEFUL_END_S):
            logger.warning(f"drain: {uas.active_calls} call(s) still finishing after {GRACEFUL_END_S:g} s; stopping")
    logger.info("drain: done")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipecat-nemotron serve-sip", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=5060, help="SIP UDP port")
    parser.add_argument("--advertise", default=None, help="address for Contact/SDP (default: the routed one)")
    parser.add_argument("--model", default="nvidia/nemotron-3.5-asr-streaming-0.6b",
                        help="Hugging Face id, .nemo path, or 'demo'")
    parser.add_argument("--chunk-ms", type=int, default=160, help="80, 160, 320, 560 or 1120")
    parser.add_argument("--language", default="auto", help="a locale such as en-US, or 'auto' to detect")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                        help="fp32, or int8 on a CPU (the encoder's Linear layers quantised)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the model (default: one less than the CPUs, at least 1)")
    parser.add_argument("--max-calls", type=int, default=None,
                        help="concurrent calls, 503 + Retry-After beyond (default: the measured capacity for the "
                             f"model: {DEMO_CPU_MAX_CALLS} for the demo model on a 2-core CPU)")
    parser.add_argument("--allow", action="append", default=[], help="peer address or network that may call "
                        "(repeat); 'any' for everyone; default: loopback and private networks only")
    parser.add_argument("--max-call-secs", type=float, default=3600, help="hang up after this long (0: never)")
    parser.add_argument("--retry-after", type=int, default=5, help="Retry-After seconds of every 503")
    parser.add_argument("--sip-rate", type=float, default=200.0,
                        help="SIP messages per second per source IP (burst: twice that); beyond: dropped")
    parser.add_argument("--tcp-max-connections", type=int, default=256, help="open SIP TCP connections in all")
    parser.add_argument("--tcp-max-per-source", type=int, default=16, help="open SIP TCP connections per IP")
    parser.add_argument("--tcp-idle-secs", type=float, default=120.0, help="close an idle SIP TCP connection")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain: also accept SIP over TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert (if not in that file)")
    parser.add_argument("--tls-port", type=int, default=5061, help="SIP over TLS port (with --tls-cert)")
    parser.add_argument("--srtp", choices=["required", "optional", "off"], default=None,
                        help="SDES-SRTP policy (default: required over TLS, optional over UDP/TCP)")
    parser.add_argument("--greeting", default=None, help="a short WAV played when a call starts")
    parser.add_argument("--output", default="-", help="JSON-lines file to append to ('-': stdout)")
    parser.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                        help="on SIGTERM (or POST /drain): seconds live calls may go on before they get a BYE")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus /metrics, /healthz and POST /drain on this HTTP port (default: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address of the metrics port (POST /drain has no authentication)")
    register.add_arguments(parser)
    return parser.parse_args(argv)


def configure_logging() -> None:
    """The server's log: our INFO lines (one per call with its outcome), Pipecat's warnings and errors only."""
    logger.remove()
    logger.add(sys.stderr, level="INFO",
               filter=lambda record: not record["name"].startswith("pipecat.") or record["level"].no >= 30)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model loads (chunk size, device, language against the model's
    dictionary, --allow); raises `options.OptionError`/ValueError with what would work."""
    from . import options

    options.check_chunk_ms(args.chunk_ms)
    options.check_device(args.device)
    args.language = options.check_language(args.language or "auto", args.model)
    allowed_peers_for(args.allow)
    register.check(args)
    options.check_tls(args.tls_cert, args.tls_key, args.tls_port)
    if args.drain_timeout < 0:
        raise ValueError("--drain-timeout must be 0 or more seconds")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ValueError("--metrics-port must be a port number (0-65535)")


def main(argv: list[str] | None = None) -> None:
    from .console import quiet_third_party

    args = parse_args(argv)
    configure_logging()
    quiet_third_party()
    try:
        check_args(args)
    except ValueError as error:
        logger.error(f"serve-sip: {error}")
        raise SystemExit(2) from None
    try:
        asyncio.run(serve(args, handle_signals=True, freeze_heap=True))
    except KeyboardInterrupt:
        pass
    except OSError as error:  # a port in use, an address not on this machine
        logger.error(f"serve-sip: {error}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

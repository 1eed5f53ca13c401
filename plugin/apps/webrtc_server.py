"""Browser calls over WebRTC: a page where a person talks and sees live transcripts with their language.

`pipecat-nemotron serve-webrtc` runs this. One FastAPI app serves:

- `GET /`             the page (`plugin/static/index.html`: mic button, live interim line, final lines with
                      their language, and the bot's answers when an LLM is configured);
- `POST /api/offer`   the SDP offer/answer exchange, handled by Pipecat's `SmallWebRTCRequestHandler`
                      (`PATCH` for trickled candidates); every new peer connection gets its own pipeline;
- `GET /api/health`   whether the model is loaded, how many sessions are live, and whether it drains.

SIGTERM (or `POST /drain` on `--metrics-port`) drains the server (`drain.py`): new offers get HTTP 503 +
Retry-After, live sessions go on for up to `--drain-timeout` seconds, the rest are disconnected (their last
finals still delivered), then the process exits 0. `--metrics-port` serves Prometheus `/metrics` and `/healthz`
(`metrics.py`).

Each call is a Pipecat pipeline on `SmallWebRTCTransport` (aiortc, Opus in, decoded and resampled to 16 kHz):

    transport.input() -> VADProcessor(WebRTCVADAnalyzer) -> NemotronSTTService -> TranscriptRelay
        [-> user aggregator -> OpenAI-compatible LLM -> BotTextRelay] -> transport.output()

Transcripts reach the page over the WebRTC data channel the page opens, as JSON messages
`{"label": "pipecat-nemotron", "type": "transcript", "final": bool, "text": str, "language": "en-US"|null}`
(and `"type": "bot"` for LLM answers). No STUN/TURN: `iceServers` is empty on both sides, so this is for the
same machine or a LAN (put it behind a TURN server for anything else).

Optional LLM: set `NEMOTRON_LLM_BASE_URL` / `NEMOTRON_LLM_API_KEY` / `NEMOTRON_LLM_MODEL` (or the usual
`OPENAI_BASE_URL` / `OPENAI_API_KEY` / `OPENAI_MODEL`). With no key the bot only shows transcripts. The LLM's answer
is shown as text (there is no TTS stage here).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request  # module level: the routes' annotations are strings (PEP 563)
from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (CancelFrame, EndFrame, ErrorFrame, Frame, InterimTranscriptionFrame,
                                   LLMFullResponseEndFrame, LLMFullResponseStartFrame, LLMTextFrame,
                                   TranscriptionFrame)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transcriptions.language import Language

from ..engine import DEFAULT_MODEL, Engine
from .drain import DEFAULT_DRAIN_TIMEOUT_S, Drain, engine_refusal
from .heap import freeze_startup_heap
from .metrics import AdminServer, ServerMetrics

STATIC_DIR = Path(__file__).parent.parent / "static"
MESSAGE_LABEL = "pipecat-nemotron"
PIPELINE_RATE = 16000
RETRY_AFTER_S = 5  # a 503 for an offer beyond capacity says when to try again
DEFAULT_SYSTEM_PROMPT = ("You are a helpful voice assistant. The user's words come from speech recognition and may "
                         "contain errors. Answer briefly, in the language the user speaks.")


# ---- LLM configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LLMConfig:
    """An OpenAI-compatible chat endpoint."""

    api_key: str
    model: str
    base_url: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> LLMConfig | None:
        """`NEMOTRON_LLM_*` first, then `OPENAI_*`; None when no API key is set.

        A local server that needs no key (vLLM, Ollama, llama.cpp) works with any non-empty key.
        """
        env = dict(os.environ if env is None else env)

        def pick(name: str) -> str | None:
            return env.get(f"NEMOTRON_LLM_{name}") or env.get(f"OPENAI_{name}") or None

        api_key = pick("API_KEY")
        if not api_key:
            return None
        return cls(api_key=api_key, model=pick("MODEL") or "gpt-4.1-mini", base_url=pick("BASE_URL"),
                   system_prompt=env.get("NEMOTRON_LLM_SYSTEM_PROMPT") or DEFAULT_SYSTEM_PROMPT)


# ---- per-session records and relays -------------------------------------------------------------------
@dataclass
class SessionRecord:
    """What one browser session did (kept in `WebRTCServer.sessions`, logged when it ends)."""

    pc_id: str
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    finals: list[dict] = field(default_factory=list)
    interims: int = 0
    bot_replies: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    outcome: str = "running"

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def summary(self) -> str:
        languages = sorted({f["language"] or "?" for f in self.finals if f["text"]})
        spoken = sum(1 for f in self.finals if f["text"])
        return (f"webrtc session {self.pc_id}: {self.outcome} after {self.seconds:.1f} s; {spoken} utterance(s), "
                f"{self.interims} interim(s), languages {','.join(languages) or '-'}, {len(self.bot_replies)} "
                f"bot repl(ies), {len(self.errors)} error(s)" + (f" (last: {self.errors[-1]})" if self.errors else ""))


def transcript_message(text: str, *, final: bool, language: Language | str | None) -> dict:
    value = language.value if isinstance(language, Language) else language
    return {"label": MESSAGE_LABEL, "type": "transcript", "final": final, "text": text, "language": value}


class TranscriptRelay(FrameProcessor):
    """Sends interim and final transcripts to the page (`send`) and records them; passes every frame on.

    `on_final(latency_s)` is told of every final (the metrics' VAD stop → final histogram)."""

    def __init__(self, record: SessionRecord, send: Callable[[dict], Any],
                 on_final: Callable[[float | None], None] | None = None):
        super().__init__()
        self._record = record
        self._send = send
        self._on_final = on_final

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            language = frame.language.value if frame.language else None
            self._record.finals.append({"text": frame.text, "language": language})
            self._send(transcript_message(frame.text, final=True, language=language))
            if self._on_final is not None:
                self._on_final(getattr(frame.result, "latency_s", None))
        elif isinstance(frame, InterimTranscriptionFrame):
            self._record.interims += 1
            self._send(transcript_message(frame.text, final=False, language=frame.language))
        elif isinstance(frame, ErrorFrame):
            self._record.errors.append(str(frame.error))
            self._send({"label": MESSAGE_LABEL, "type": "error", "text": str(frame.error)})
        await self.push_frame(frame, direction)


class BotTextRelay(FrameProcessor):
    """Streams the LLM's answer to the page as it is generated."""

    def __init__(self, record: SessionRecord, send: Callable[[dict], Any]):
        super().__init__()
        self._record = record
        self._send = send
        self._text = ""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMFullResponseStartFrame):
            self._text = ""
        elif isinstance(frame, LLMTextFrame):
            self._text += frame.text
            self._send({"label": MESSAGE_LABEL, "type": "bot", "final": False, "text": self._text})
        elif isinstance(frame, LLMFullResponseEndFrame) and self._text:
            self._record.bot_replies.append(self._text)
            self._send({"label": MESSAGE_LABEL, "type": "bot", "final": True, "text": self._text})
            self._text = ""
        await self.push_frame(frame, direction)


# ---- the server -------------------------------------------------------------------------------------
class WebRTCServer:
    """The app, its shared engine and its live sessions. `serve_webrtc` is the simple entry point.

    Args (keyword-only):
        model, chunk_ms, device: the shared engine to create (ignored when `engine` is given).
        language: a Pipecat `Language` for every call, or None to detect per utterance.
        llm: an `LLMConfig`, or None for transcripts only.
        engine: an `Engine` to share (tests pass one built on a tiny model).
        vad_stop_secs: silence that ends an utterance.
        max_sessions: concurrent browser sessions (each holds one engine stream).
        drain: the server's `Drain` (offers are refused while it drains; `drain_sessions` ends the live ones).
        metrics: its `ServerMetrics` (calls answered/refused/ended, final latency, the engine's figures).
    """

    def __init__(self, *, model: str = DEFAULT_MODEL, chunk_ms: int = 160, language: Language | None = None,
                 device: str = "auto", llm: LLMConfig | None = None, engine: Engine | None = None,
                 vad_stop_secs: float = 0.4, max_sessions: int = 16, threads: int | None = None,
                 precision: str = "fp32", drain: Drain | None = None, metrics: ServerMetrics | None = None):
        from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequestHandler

        self.model = model
        self.chunk_ms = chunk_ms
        self.language = language
        self.device = device
        self.threads = threads
        self.precision = precision
        self.llm = llm
        self.engine = engine
        self.vad_stop_secs = vad_stop_secs
        self.max_sessions = max_sessions
        self.sessions: list[SessionRecord] = []
        self.drain = drain or Drain()
        self.metrics = metrics or ServerMetrics(drain=self.drain, engine=lambda: self.engine)
        self._connections: dict[str, Any] = {}  # pc_id -> connection of each live session
        self.handler = SmallWebRTCRequestHandler(ice_servers=[])
        self._tasks: set[asyncio.Task] = set()
        self.app = self._build_app()

    @property
    def live_sessions(self) -> int:
        return sum(1 for s in self.sessions if s.ended is None)

    async def start(self) -> Engine:
        """Load the model (once) before the first call."""
        if self.engine is None:
            self.engine = Engine.shared(model=self.model, chunk_ms=self.chunk_ms, device=self.device,
                                        max_streams=self.max_sessions, precision=self.precision,
                                        **({"threads": self.threads} if self.threads else {}))
        await self.engine.ready()
        if self.language is not None:
            from ..languages import language_to_locale
            locale = language_to_locale(self.language)
            if locale not in self.engine.languages:
                raise ValueError(f"{self.engine.model_name} has no prompt for {locale}; "
                                 f"it knows {sorted(self.engine.languages)}")
        return self.engine

    async def close(self) -> None:
        await self.handler.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- HTTP ---------------------------------------------------------------------------------------
    def _build_app(self):
        from contextlib import asynccontextmanager

        from fastapi import FastAPI, HTTPException
        from fastapi.responses import FileResponse, JSONResponse
        from pipecat.transports.smallwebrtc.request_handler import (IceCandidate, SmallWebRTCPatchRequest,
                                                                    SmallWebRTCRequest)

        @asynccontextmanager
        async def lifespan(app):
            await self.start()
            logger.info(f"serve-webrtc: {self.engine.model_name} ready ({self.chunk_ms} ms chunks, language "
                        f"{self.language.value if self.language else 'auto'}, LLM "
                        f"{self.llm.model if self.llm else 'off'})")
            yield
            await self.close()

        app = FastAPI(title="pipecat-nemotron WebRTC", lifespan=lifespan)

        @app.get("/")
        async def index():
            return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

        @app.get("/api/health")
        async def health():
            return {"ready": self.engine is not None and self.engine.model is not None,
                    "model": self.engine.model_name if self.engine else self.model,
                    "sessions": self.live_sessions, "llm": bool(self.llm), "draining": self.drain.draining}

        @app.post("/api/offer")
        async def offer(request: Request):
            body = await request.json()
            reservation = None
            if not body.get("pc_id"):  # a new call (not a renegotiation): reserve its engine stream first
                if self.drain.draining:
                    self.metrics.calls.refused("draining")
                    return JSONResponse({"error": "draining: this server takes no new sessions; try another or "
                                                  "again shortly"},
                                        status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
                reservation = self.engine.try_reserve() if self.live_sessions < self.max_sessions else None
                if reservation is None:
                    self.metrics.calls.refused("capacity" if self.live_sessions >= self.max_sessions
                                               else engine_refusal(self.engine))
                    return JSONResponse({"error": f"busy: no free transcription stream ({self.live_sessions} "
                                                  "sessions are live); try again shortly"},
                                        status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
            claimed = []

            async def on_connection(connection):
                claimed.append(reservation)
                await self._on_connection(connection, reservation)

            try:
                answer = await self.handler.handle_web_request(
                    SmallWebRTCRequest.from_dict({k: body.get(k) for k in ("sdp", "type", "pc_id", "restart_pc")
                                                  if k in body}),
                    on_connection)
            except HTTPException:
                raise
            except Exception as error:  # a malformed offer: say so instead of a bare 500
                return JSONResponse({"error": f"bad offer: {error}"}, status_code=400)
            finally:
                if reservation is not None and not claimed:  # no session took it: give it back at once
                    reservation.release()
            return answer

        @app.patch("/api/offer")
        async def patch(request: Request):
            body = await request.json()
            candidates = [IceCandidate(candidate=c.get("candidate", ""), sdp_mid=c.get("sdp_mid", c.get("sdpMid")),
                                       sdp_mline_index=c.get("sdp_mline_index", c.get("sdpMLineIndex")))
                          for c in body.get("candidates", [])]
            await self.handler.handle_patch_request(SmallWebRTCPatchRequest(pc_id=body["pc_id"],
                                                                            candidates=candidates))
            return {"status": "success"}

        return app

    async def _on_connection(self, connection, reservation=None) -> None:
        task = asyncio.get_running_loop().create_task(self.run_session(connection, reservation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- one call -----------------------------------------------------------------------------------
    async def run_session(self, connection, reservation=None) -> SessionRecord:
        """Run the pipeline for one peer connection until the browser leaves, on the engine stream reserved
        when its offer was answered (released when the session ends, however it ends)."""
        from pipecat.pipeline.worker import PipelineParams
        from pipecat.processors.audio.vad_processor import VADProcessor
        from pipecat.transports.base_transport import TransportParams
        from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

        from .client_session import run_until_client_leaves
        from ..stt import NemotronSTTService
        from ..vad import WebRTCVADAnalyzer

        record = SessionRecord(pc_id=connection.pc_id)
        self.sessions.append(record)
        self._connections[record.pc_id] = connection
        self.metrics.calls.answered()

        def send(message: dict) -> None:
            try:
                connection.send_app_message(message)
            except Exception as error:  # the page went away mid-send
                logger.debug(f"{record.pc_id}: could not send to the page: {error}")

        transport = SmallWebRTCTransport(webrtc_connection=connection, params=TransportParams(
            audio_in_enabled=True, audio_in_sample_rate=PIPELINE_RATE, audio_out_enabled=False))
        stt = NemotronSTTService(engine=self.engine, chunk_ms=self.chunk_ms, language=self.language,
                                 reservation=reservation)
        vad = VADProcessor(vad_analyzer=WebRTCVADAnalyzer(mode=2, params=VADParams(stop_secs=self.vad_stop_secs)))
        processors = [transport.input(), vad, stt, TranscriptRelay(record, send, on_final=self.metrics.calls.final)]
        if self.llm is not None:
            processors += self._llm_processors(record, send)
        processors.append(transport.output())
        if self.llm is not None:
            processors.append(self._assistant_aggregator)

        @transport.event_handler("on_client_connected")
        async def on_connected(transport, client):
            send({"label": MESSAGE_LABEL, "type": "ready", "model": self.engine.model_name,
                  "language": self.language.value if self.language else None, "llm": bool(self.llm)})

        try:
            await run_until_client_leaves(transport, processors, record, left="client left", name=record.pc_id,
                                          params=PipelineParams(audio_in_sample_rate=PIPELINE_RATE))
        finally:
            if record.errors and record.outcome in ("client left", "ended"):
                record.outcome += " with errors"
            logger.info(record.summary())
            self._connections.pop(record.pc_id, None)
            self.metrics.calls.ended(record.outcome)
            if reservation is not None:
                reservation.release()
            try:
                await connection.disconnect()
            except Exception:
                pass
        return record

    async def drain_sessions(self) -> None:
        """Let the live sessions go on up to the drain timeout (or a second SIGTERM), then disconnect the rest:
        their pipelines end gracefully, so their last finals still reach the page. Returns once every session
        has ended (at most `client_session.GRACEFUL_END_S` after the disconnects)."""
        from .client_session import GRACEFUL_END_S

        live = self.live_sessions
        logger.info(f"drain: {live} session(s) live" +
                    (f"; waiting up to {self.drain.timeout_s:g} s for them" if live else ""))
        if not await self.drain.wait_for(lambda: self.live_sessions == 0):
            remaining = [s for s in self.sessions if s.ended is None]
            logger.info(f"drain: ending {len(remaining)} session(s) still up; their last words are still transcribed")
            for record in remaining:
                if record.outcome == "running":
                    record.outcome = "drain timeout"
                connection = self._connections.get(record.pc_id)
                if connection is not None:
                    try:
                        await connection.disconnect()
                    except Exception as error:
                        logger.debug(f"{record.pc_id}: disconnect failed: {error}")
            if not await self.drain.wait_until(lambda: self.live_sessions == 0, GRACEFUL_END_S):
                logger.warning(f"drain: {self.live_sessions} session(s) still finishing after {GRACEFUL_END_S:g} s")
        logger.info("drain: done")

    def _llm_processors(self, record: SessionRecord, send) -> list:
        from pipecat.processors.aggregators.llm_context import LLMContext
        from pipecat.processors.aggregators.llm_response_universal import (LLMContextAggregatorPair,
                                                                           LLMUserAggregatorParams)
        from pipecat.services.openai.llm import OpenAILLMService
        from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
        from pipecat.turns.user_turn_strategies import UserTurnStrategies

        from ..turns import EmptyTranscriptUserTurnStopStrategy

        llm = OpenAILLMService(api_key=self.llm.api_key, base_url=self.llm.base_url,
                               settings=OpenAILLMService.Settings(model=self.llm.model))
        context = LLMContext([{"role": "system", "content": self.llm.system_prompt}])
        pair = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
            user_turn_strategies=UserTurnStrategies(stop=[SpeechTimeoutUserTurnStopStrategy(
                user_speech_timeout=0.6), EmptyTranscriptUserTurnStopStrategy()])))
        self._assistant_aggregator = pair.assistant()
        return [pair.user(), llm, BotTextRelay(record, send)]


def _uvicorn_without_signal_handlers():
    """uvicorn's Server class minus its own signal handlers: ours drain on SIGTERM and stop on SIGINT."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def allow_loopback_ice_candidates() -> None:
    """Let aiortc offer 127.0.0.1 as a host candidate (aioice skips it), for a browser on this machine.

    Without it a machine whose only interface is `lo` (a CI sandbox) cannot connect at all. The browser
    must then also gather loopback candidates (Chromium: `--allow-loopback-in-peer-connection`) or reach one
    of the machine's other addresses.
    """
    import aioice.ice

    original = aioice.ice.get_host_addresses
    if getattr(original, "_nemotron_loopback", False):
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addresses = original(use_ipv4, use_ipv6)
        if use_ipv4 and "127.0.0.1" not in addresses:
            addresses.append("127.0.0.1")
        return addresses

    get_host_addresses._nemotron_loopback = True
    aioice.ice.get_host_addresses = get_host_addresses


async def serve_webrtc(*, host: str = "127.0.0.1", port: int = 7860, model: str = DEFAULT_MODEL, chunk_ms: int = 160,
                       language: Language | str | None = None, device: str = "auto", llm: bool | None = None,
                       allow_remote: bool = False, threads: int | None = None, precision: str = "fp32",
                       drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S, metrics_port: int | None = None,
                       metrics_host: str = "127.0.0.1", handle_signals: bool = True,
                       freeze_heap: bool = False) -> None:
    """Serve the browser page and WebRTC calls until interrupted.

    Args (keyword-only):
        host, port: where to listen (open `http://host:port/`; browsers allow the microphone on localhost or HTTPS).
        model: Hugging Face id, `.nemo` path, or "demo".
        chunk_ms: 80, 160, 320, 560 or 1120.
        language: a Pipecat `Language` or locale string ("de-DE"), or None / "auto" to detect.
        device: "auto", "cpu" or "cuda".
        llm: None = answer with an LLM when `NEMOTRON_LLM_API_KEY`/`OPENAI_API_KEY` is set; False = never;
            True = require one (error when no key is set).
        threads: CPU threads of the model (default: one less than the CPUs, at least 1).
        precision: "fp32", or "int8" on a CPU (`Engine(precision=)`).
        allow_remote: required to listen on a non-loopback `host`: there is no authentication, so anyone who
            reaches the port could use the model and the LLM key (ValueError otherwise, before the model loads).
        drain_timeout: on SIGTERM (or `POST /drain`), how long live sessions may go on before they are ended.
        metrics_port, metrics_host: serve Prometheus `/metrics`, `/healthz` and `POST /drain` there (None: off).
        handle_signals: SIGTERM drains, SIGINT stops (uvicorn's own handlers are not installed).
        freeze_heap: the process is ours: freeze its start-up heap once the model is loaded
            (`heap.freeze_startup_heap`; `run_webrtc_server` does).
    """
    import uvicorn
    from rich.console import Console

    from .console import loading

    if not _loopback(host) and not allow_remote:
        raise ValueError(f"host {host!r} is not a loopback address and allow_remote is False: anyone who can "
                         "reach it could use the model (and the LLM key); pass allow_remote=True "
                         "(serve-webrtc --allow-remote) to do that on purpose")
    if not _loopback(host):
        logger.warning(f"serve-webrtc: listening on {host}, reachable by anyone who can reach this port; "
                       "there is no authentication")
    drain = Drain(timeout_s=drain_timeout)
    drain.bind()
    if handle_signals:  # before the load: a SIGTERM while loading ends a server with no sessions at once
        drain.install_signal_handlers()
    server = WebRTCServer(model=model, chunk_ms=chunk_ms, language=_language(language), device=device,
                          llm=_llm_config(llm), threads=threads, precision=precision, drain=drain)
    admin = catch_up = None
    try:
        if metrics_port is not None:
            admin = AdminServer(metrics=server.metrics, drain=drain, host=metrics_host, port=metrics_port)
            admin.start()
            catch_up = asyncio.ensure_future(_catch_up(server.metrics))
        if _loopback(host):
            allow_loopback_ice_candidates()
        with loading(Console(stderr=True), f"{model} ({chunk_ms} ms chunks)"):
            await server.start()  # model errors surface here, before the port opens
        if freeze_heap:
            freeze_startup_heap()
        logger.info(f"serve-webrtc: open http://{'localhost' if _loopback(host) else host}:{port}/")
        config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", lifespan="on")
        http = _uvicorn_without_signal_handlers()(config)
        if handle_signals:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, http.handle_exit, signal.SIGINT, None)
        serving = asyncio.ensure_future(http.serve())
        requested = asyncio.ensure_future(drain.requested())
        while not http.started and not serving.done():
            await asyncio.sleep(0.05)
        server.metrics.status.listening = http.started
        await asyncio.wait([serving, requested], return_when=asyncio.FIRST_COMPLETED)
        if requested.done() and not serving.done():
            await server.drain_sessions()
            http.should_exit = True
        requested.cancel()
        await serving
    finally:
        server.metrics.status.listening = False
        if handle_signals:
            drain.remove_signal_handlers()
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        if catch_up is not None:
            catch_up.cancel()
        if admin is not None:
            await asyncio.to_thread(admin.close)


async def _catch_up(metrics: ServerMetrics) -> None:
    """Feed every engine step into the step histograms (the engine keeps only a window of recent steps)."""
    while True:
        await asyncio.sleep(1.0)
        metrics.engine.catch_up()


def run_webrtc_server(*, host: str = "127.0.0.1", port: int = 7860, model: str = DEFAULT_MODEL, chunk_ms: int = 160,
                      language: Language | str | None = None, device: str = "auto", llm: bool | None = None,
                      allow_remote: bool = False, threads: int | None = None, precision: str = "fp32",
                      drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S, metrics_port: int | None = None,
                      metrics_host: str = "127.0.0.1") -> None:
    """Blocking wrapper of `serve_webrtc` (for the CLI and scripts); exits with status 2 on a setup error."""
    from ..engine import NemotronEngineError

    try:
        asyncio.run(serve_webrtc(host=host, port=port, model=model, chunk_ms=chunk_ms, language=language,
                                 device=device, llm=llm, allow_remote=allow_remote, threads=threads,
                                 precision=precision, drain_timeout=drain_timeout, metrics_port=metrics_port,
                                 metrics_host=metrics_host, freeze_heap=True))
    except KeyboardInterrupt:
        pass
    except (NemotronEngineError, ValueError) as error:
        logger.error(f"serve-webrtc: {error}")
        raise SystemExit(2) from None
    except OSError as error:  # a port in use (the page's or the metrics')
        logger.error(f"serve-webrtc: {error}")
        raise SystemExit(1) from None


def _language(language: Language | str | None) -> Language | None:
    if language is None or isinstance(language, Language):
        return language
    if language.strip().lower() in ("", "auto"):
        return None
    from ..languages import locale_to_language
    resolved = locale_to_language(language)
    if resolved is None:
        raise ValueError(f"unknown language {language!r}: use a locale such as en-US, or 'auto'")
    return resolved


def _llm_config(llm: bool | None) -> LLMConfig | None:
    if llm is False:
        return None
    config = LLMConfig.from_env()
    if llm is True and config is None:
        raise ValueError("llm=True but no NEMOTRON_LLM_API_KEY or OPENAI_API_KEY is set")
    return config

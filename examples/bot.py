"""A voice agent on Nemotron speech-to-text, run by Pipecat's development runner.

    NEMOTRON_MODEL=demo python examples/bot.py          # every transport; open http://localhost:7860/client/
    python examples/bot.py -t webrtc                     # browser only (the runner's prebuilt page)
    python examples/bot.py -t twilio -x abc.ngrok.app    # also -t telnyx / -t plivo (POST / answers the XML)
    python examples/bot.py -t daily                      # needs DAILY_API_KEY and pipecat-ai[daily]

`bot(runner_args)` is Pipecat's runner contract: the runner (`pipecat.runner.run.main()`) serves the transports,
creates one transport per session and calls `bot()`; `create_transport` picks the transport from the session
(SmallWebRTC, Twilio/Telnyx/Plivo/Exotel media websocket, Daily). Every session runs in this one process, so they
all share one Nemotron engine: their audio is batched into one model step. Per session the pipeline is::

    transport.input() -> VADProcessor(WebRTCVADAnalyzer) -> NemotronSTTService -> TranscriptLanguage
        [-> user aggregator -> OpenAI-compatible LLM [-> TTS]] -> transport.output() [-> assistant aggregator]

- Transcripts reach the client through Pipecat's RTVI (the runner's prebuilt page and any RTVI client): the
  standard `user-transcription` messages, plus a `server-message` `{"type": "transcript", "text", "language"}` per
  final, since RTVI's transcription message has no language field. Each final is also logged with its language.
- With no LLM configured the bot answers in text: it echoes each final as `[es-ES] ¿Cuál es mi saldo?`, which the
  prebuilt page shows as the bot's line (nothing is spoken).
- A session is admitted only when the engine has a free stream (`max_streams`); beyond it the session is closed at
  once instead of answered and left silent.

Environment:
    NEMOTRON_MODEL       Hugging Face id, .nemo path or "demo" (default nvidia/nemotron-3.5-asr-streaming-0.6b)
    NEMOTRON_CHUNK_MS    80, 160, 320, 560 or 1120 (default 160)
    NEMOTRON_LANGUAGE    a locale such as de-DE, or "auto" to detect per utterance (default)
    NEMOTRON_DEVICE      auto, cpu or cuda (default auto)
    NEMOTRON_MAX_SESSIONS  concurrent sessions, one engine stream each (default 16)
    NEMOTRON_LLM_API_KEY / _BASE_URL / _MODEL (or OPENAI_*)   an OpenAI-compatible LLM answers (optional)
    TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN / TELNYX_API_KEY / PLIVO_AUTH_ID, PLIVO_AUTH_TOKEN
                         the runner's serializers hang up through the provider's API and need these
    NEMOTRON_TTS_MODEL   with an LLM, speak its answers with OpenAI-compatible TTS (e.g. gpt-4o-mini-tts;
                         NEMOTRON_TTS_VOICE, NEMOTRON_TTS_BASE_URL, NEMOTRON_TTS_API_KEY default to the LLM's)
"""

from __future__ import annotations

import os

from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (Frame, LLMFullResponseEndFrame, LLMFullResponseStartFrame, LLMTextFrame,
                                   TranscriptionFrame)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.processors.frameworks.rtvi import RTVIServerMessageFrame
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from pipecat_nemotron import Engine, NemotronSTTService, WebRTCVADAnalyzer, locale_to_language

MODEL = os.getenv("NEMOTRON_MODEL", "nvidia/nemotron-3.5-asr-streaming-0.6b")
CHUNK_MS = int(os.getenv("NEMOTRON_CHUNK_MS", "160"))
LANGUAGE = os.getenv("NEMOTRON_LANGUAGE", "auto")
DEVICE = os.getenv("NEMOTRON_DEVICE", "auto")
MAX_SESSIONS = int(os.getenv("NEMOTRON_MAX_SESSIONS", "16"))
SYSTEM_PROMPT = ("You are a helpful voice assistant. The user's words come from speech recognition and may contain "
                 "errors. Answer briefly, in the language the user speaks.")


def shared_engine() -> Engine:
    """The process's one engine: every session's STT service runs on it, so their audio is batched together."""
    return Engine.shared(model=MODEL, chunk_ms=CHUNK_MS, device=DEVICE, max_streams=MAX_SESSIONS)


class TranscriptLanguage(FrameProcessor):
    """Logs each final with its language and sends it to the client as an RTVI server message; without an LLM it
    also answers with the transcript as the bot's text (`[es-ES] ...`)."""

    def __init__(self, *, session: str, echo: bool):
        super().__init__()
        self._session = session
        self._echo = echo

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if not isinstance(frame, TranscriptionFrame) or not frame.text.strip():
            return
        language = frame.language.value if frame.language else None
        logger.info(f"transcript {self._session} [{language or '?'}] {frame.text}")
        await self.push_frame(RTVIServerMessageFrame(data={"type": "transcript", "final": True, "text": frame.text,
                                                           "language": language}))
        if self._echo:
            for out in (LLMFullResponseStartFrame(), LLMTextFrame(f"[{language or '?'}] {frame.text}"),
                        LLMFullResponseEndFrame()):
                await self.push_frame(out)


def llm_stages() -> tuple[list, list]:
    """(processors after the STT, processors after the output) for an OpenAI-compatible LLM (and TTS), or two
    empty lists when no LLM key is set."""
    def env(name: str) -> str | None:
        return os.getenv(f"NEMOTRON_LLM_{name}") or os.getenv(f"OPENAI_{name}") or None

    api_key = env("API_KEY")
    if not api_key:
        return [], []
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (LLMContextAggregatorPair,
                                                                       LLMUserAggregatorParams)
    from pipecat.services.openai.llm import OpenAILLMService
    from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
    from pipecat.turns.user_turn_strategies import UserTurnStrategies

    from pipecat_nemotron import EmptyTranscriptUserTurnStopStrategy

    llm = OpenAILLMService(api_key=api_key, base_url=env("BASE_URL"),
                           settings=OpenAILLMService.Settings(model=env("MODEL") or "gpt-4.1-mini"))
    context = LLMContext([{"role": "system", "content": SYSTEM_PROMPT}])
    pair = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
        user_turn_strategies=UserTurnStrategies(stop=[SpeechTimeoutUserTurnStopStrategy(),
                                                      EmptyTranscriptUserTurnStopStrategy()])))
    stages = [pair.user(), llm]
    if os.getenv("NEMOTRON_TTS_MODEL"):
        from pipecat.services.openai.tts import OpenAITTSService

        stages.append(OpenAITTSService(
            api_key=os.getenv("NEMOTRON_TTS_API_KEY") or api_key,
            base_url=os.getenv("NEMOTRON_TTS_BASE_URL") or env("BASE_URL"),
            settings=OpenAITTSService.Settings(model=os.getenv("NEMOTRON_TTS_MODEL"),
                                               voice=os.getenv("NEMOTRON_TTS_VOICE", "alloy"))))
    return stages, [pair.assistant()]


async def bot(runner_args: RunnerArguments):
    """The runner's entry point: one call per session, on whichever transport the session came in."""
    from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams

    engine = shared_engine()
    await engine.ready()  # loaded at start-up by __main__; the first session of a test process waits here
    reservation = engine.try_reserve()
    if reservation is None:
        logger.warning(f"session {runner_args.session_id}: refused, every engine stream is busy ({MAX_SESSIONS})")
        websocket = getattr(runner_args, "websocket", None)
        connection = getattr(runner_args, "webrtc_connection", None)
        if websocket is not None:
            await websocket.close(code=1013)  # try again later
        elif connection is not None:
            await connection.disconnect()
        return

    def params(kind=TransportParams, **extra):
        return lambda: kind(audio_in_enabled=True, audio_out_enabled=True, **extra)

    transport_params = {"webrtc": params(), "twilio": params(FastAPIWebsocketParams),
                        "telnyx": params(FastAPIWebsocketParams), "plivo": params(FastAPIWebsocketParams),
                        "exotel": params(FastAPIWebsocketParams)}
    try:
        from pipecat.transports.daily.transport import DailyParams
        transport_params["daily"] = params(DailyParams)
    except ImportError:  # pipecat-ai[daily] not installed: -t daily is unavailable
        pass

    try:
        transport = await create_transport(runner_args, transport_params)
        language = None if LANGUAGE == "auto" else locale_to_language(LANGUAGE)
        stt = NemotronSTTService(engine=engine, reservation=reservation, language=language)
        after_stt, after_output = llm_stages()
        pipeline = Pipeline([
            transport.input(),
            VADProcessor(vad_analyzer=WebRTCVADAnalyzer(mode=2, params=VADParams(stop_secs=0.4))),
            stt,
            TranscriptLanguage(session=runner_args.session_id, echo=not after_stt),
            *after_stt,
            transport.output(),
            *after_output,
        ])
        worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True),
                                idle_timeout_secs=runner_args.pipeline_idle_timeout_secs)

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(transport, client):
            # End gracefully: the STT still delivers what the caller said just before leaving.
            logger.info(f"session {runner_args.session_id}: client left")
            await worker.stop_when_done()

        runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
        await runner.add_workers(worker)
        await runner.run()
    finally:
        reservation.release()


if __name__ == "__main__":
    from pipecat.runner.run import main

    logger.info(f"loading {MODEL} ({CHUNK_MS} ms chunks) before the first session…")
    shared_engine().wait_ready()  # the runner's sessions then start at once
    main()

"""Phone calls through Twilio Media Streams (or Telnyx / Plivo), transcribed live by Nemotron.

    python examples/twilio_agent.py --model demo --port 8765           # or the real model (the default)

The caller's audio arrives over a websocket as 8 kHz μ-law (`TwilioFrameSerializer` decodes it), goes through the
WebRTC VAD and `NemotronSTTService`, and every final transcript is logged with its language
(`+15551234567 [es-ES] ¿Dónde está mi pedido?`). Audio goes back to the caller: a short two-note chime after each
utterance, so the caller hears they were understood — replace `ChimeOnFinal` with an LLM and a TTS service for a
real agent (the pipeline is `transport.input() -> VAD -> STT -> ... -> transport.output()`).

Pointing a Twilio number at it
------------------------------
1. Expose the server over HTTPS/WSS, e.g. `ngrok http 8765` (gives `https://abc123.ngrok.app`), or run it behind
   your own TLS proxy. Start it with `--public-host abc123.ngrok.app` so the TwiML names the right websocket.
2. Twilio Console -> Phone Numbers -> your number -> Voice Configuration -> "A call comes in": Webhook,
   `https://abc123.ngrok.app/twiml` (HTTP POST). That endpoint answers with:

       <Response><Connect><Stream url="wss://abc123.ngrok.app/ws"/></Connect></Response>

   (You can also paste that TwiML into a TwiML Bin instead of using the webhook.) `<Connect><Stream>` makes the
   stream bidirectional, which the chime needs; `<Start><Stream>` would be listen-only.
3. Call the number and talk. Transcripts appear in the server log, one line per utterance, and one line per call
   when it ends.
4. Hanging up from the bot side (an `EndFrame`) needs `TWILIO_ACCOUNT_SID` and `TWILIO_AUTH_TOKEN` in the
   environment (the serializer calls Twilio's REST API); without them, or with `--no-hang-up`, the bot leaves
   the hang-up to the caller.

Telnyx
------
Same server, same `/ws` path: the provider is detected from the stream's `start` message. Point a TeXML
application at `https://abc123.ngrok.app/texml`, which answers
`<Response><Connect><Stream url="wss://abc123.ngrok.app/ws" bidirectionalMode="rtp"/></Connect></Response>`
(or start a stream with Call Control: `stream_url=wss://.../ws`, `stream_track=inbound_track`,
`stream_bidirectional_mode=rtp`). PCMU and PCMA are both handled. Hang-up from the bot needs `TELNYX_API_KEY`.

Plivo
-----
Point the number's Answer URL at `https://abc123.ngrok.app/plivo`, which answers
`<Response><Stream bidirectional="true" keepCallAlive="true" contentType="audio/x-mulaw;rate=8000">
wss://abc123.ngrok.app/ws</Stream></Response>`. Hang-up from the bot needs `PLIVO_AUTH_ID` / `PLIVO_AUTH_TOKEN`.

Notes
-----
- One engine serves every call of the process in one batch (`--max-calls` slots); a call beyond that is refused
  with a logged error before any model work.
- The model loads at start-up (the real model: 35-40 s on CPU), not on the first call.
- `create_app(...)` is importable for tests: `auto_hang_up=False` keeps it off the providers' REST APIs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import Frame, InterimTranscriptionFrame, OutputAudioRawFrame, TranscriptionFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transcriptions.language import Language

from pipecat_nemotron.apps.client_session import run_until_client_leaves
from pipecat_nemotron.engine import DEFAULT_MODEL, Engine
from pipecat_nemotron.stt import NemotronSTTService
from pipecat_nemotron.vad import WebRTCVADAnalyzer

PHONE_RATE = 8000


@dataclass
class CallRecord:
    """One phone call: who, which provider, what was said (kept in `app.state.calls`)."""

    provider: str
    call_id: str | None
    stream_id: str | None
    caller: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    finals: list[dict] = field(default_factory=list)
    interims: int = 0
    chimes: int = 0
    outcome: str = "running"

    def summary(self) -> str:
        spoken = [f for f in self.finals if f["text"]]
        languages = sorted({f["language"] or "?" for f in spoken})
        return (f"{self.provider} call {self.call_id} from {self.caller or '?'}: {self.outcome} after "
                f"{(self.ended or time.monotonic()) - self.started:.1f} s; {len(spoken)} utterance(s), "
                f"languages {','.join(languages) or '-'}")


def chime(rate: int = PHONE_RATE) -> bytes:
    """Two short notes (660 Hz then 880 Hz), 16-bit mono PCM."""
    t = np.arange(int(0.09 * rate)) / rate
    fade = np.minimum(1, np.minimum(t, t[::-1]) / 0.01)
    notes = [0.25 * np.sin(2 * np.pi * f * t) * fade for f in (660, 880)]
    return (np.concatenate(notes) * 32767).astype("<i2").tobytes()


class ChimeOnFinal(FrameProcessor):
    """Logs and records transcripts; after each non-empty final, sends a chime back to the caller."""

    def __init__(self, record: CallRecord, *, chime_audio: bytes | None = None):
        super().__init__()
        self._record = record
        self._chime = chime() if chime_audio is None else chime_audio

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            language = frame.language.value if frame.language else None
            self._record.finals.append({"text": frame.text, "language": language})
            if frame.text:
                logger.info(f"{self._record.caller or self._record.call_id} [{language or '?'}] {frame.text}")
                if self._chime:
                    self._record.chimes += 1
                    await self.push_frame(OutputAudioRawFrame(audio=self._chime, sample_rate=PHONE_RATE,
                                                              num_channels=1))
        elif isinstance(frame, InterimTranscriptionFrame):
            self._record.interims += 1


def make_serializer(provider: str, call_data, *, auto_hang_up: bool):
    """The provider's frame serializer; credentials for the bot-side hang-up come from the environment."""
    if provider == "twilio":
        from pipecat.serializers.twilio import TwilioFrameSerializer
        creds = {"account_sid": os.getenv("TWILIO_ACCOUNT_SID"), "auth_token": os.getenv("TWILIO_AUTH_TOKEN")}
        hang_up = auto_hang_up and all(creds.values())
        return TwilioFrameSerializer(stream_sid=call_data["stream_id"], call_sid=call_data["call_id"],
                                     **(creds if hang_up else {}),
                                     params=TwilioFrameSerializer.InputParams(auto_hang_up=hang_up))
    if provider == "telnyx":
        from pipecat.serializers.telnyx import TelnyxFrameSerializer
        api_key = os.getenv("TELNYX_API_KEY")
        encoding = call_data.get("outbound_encoding") or "PCMU"
        hang_up = auto_hang_up and bool(api_key)
        return TelnyxFrameSerializer(stream_id=call_data["stream_id"], call_control_id=call_data["call_id"],
                                     outbound_encoding=encoding, inbound_encoding=encoding,
                                     api_key=api_key if hang_up else None,
                                     params=TelnyxFrameSerializer.InputParams(auto_hang_up=hang_up))
    if provider == "plivo":
        from pipecat.serializers.plivo import PlivoFrameSerializer
        creds = {"auth_id": os.getenv("PLIVO_AUTH_ID"), "auth_token": os.getenv("PLIVO_AUTH_TOKEN")}
        hang_up = auto_hang_up and all(creds.values())
        return PlivoFrameSerializer(stream_id=call_data["stream_id"], call_id=call_data["call_id"],
                                    **(creds if hang_up else {}),
                                    params=PlivoFrameSerializer.InputParams(auto_hang_up=hang_up))
    raise ValueError(f"unsupported telephony provider {provider!r} (twilio, telnyx and plivo are handled)")


def create_app(*, model: str = DEFAULT_MODEL, chunk_ms: int = 160, language: Language | None = None,
               device: str = "auto", engine: Engine | None = None, auto_hang_up: bool = True,
               public_host: str | None = None, max_calls: int = 64, chime_back: bool = True,
               vad_stop_secs: float = 0.4) -> FastAPI:
    """The FastAPI app: `/twiml`, `/texml`, `/plivo` answer documents and the `/ws` media websocket."""
    from contextlib import asynccontextmanager

    state = {"engine": engine}

    @asynccontextmanager
    async def lifespan(app):
        if state["engine"] is None:
            state["engine"] = Engine.shared(model=model, chunk_ms=chunk_ms, device=device, max_streams=max_calls)
        await state["engine"].ready()
        logger.info(f"telephony agent: {state['engine'].model_name} ready; calls to /ws "
                    f"(language {language.value if language else 'auto'})")
        yield

    app = FastAPI(title="pipecat-nemotron telephony", lifespan=lifespan)
    app.state.calls = []

    def ws_url(request: Request) -> str:
        host = public_host or request.headers.get("x-forwarded-host") or request.headers.get("host", "localhost")
        return f"wss://{host}/ws"

    def xml(body: str) -> Response:
        return Response(f'<?xml version="1.0" encoding="UTF-8"?>\n<Response>{body}</Response>',
                        media_type="application/xml")

    def full() -> bool:
        engine = state.get("engine")
        return engine is None or not engine.has_capacity

    @app.api_route("/twiml", methods=["GET", "POST"])
    async def twiml(request: Request):
        if full():  # refuse before Twilio answers the call: the caller hears busy, not a dropped call
            return xml('<Reject reason="busy"/>')
        return xml(f'<Connect><Stream url="{escape(ws_url(request))}"/></Connect>')

    @app.api_route("/texml", methods=["GET", "POST"])
    async def texml(request: Request):
        return xml(f'<Connect><Stream url="{escape(ws_url(request))}" bidirectionalMode="rtp"/></Connect>')

    @app.api_route("/plivo", methods=["GET", "POST"])
    async def plivo(request: Request):
        return xml('<Stream bidirectional="true" keepCallAlive="true" contentType="audio/x-mulaw;rate=8000">'
                   f"{escape(ws_url(request))}</Stream>")

    @app.websocket("/ws")
    async def media(websocket: WebSocket):
        # One capacity truth: reserve the call's engine stream before the media stream is accepted; when
        # none is free the websocket is refused (HTTP 403 to the provider) instead of accepted and dropped.
        reservation = state["engine"].try_reserve() if state.get("engine") is not None else None
        if reservation is None:
            logger.warning("media stream refused: no free transcription stream")
            await websocket.close(code=1013)
            return
        try:
            await websocket.accept()
            await run_call(websocket, reservation)
        finally:
            reservation.release()

    async def run_call(websocket: WebSocket, reservation=None) -> CallRecord | None:
        from pipecat.runner.utils import parse_telephony_websocket
        from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport

        try:
            provider, call_data = await parse_telephony_websocket(websocket)
            serializer = make_serializer(provider, call_data, auto_hang_up=auto_hang_up)
        except Exception as error:
            logger.warning(f"telephony websocket refused: {error}")
            await websocket.close(code=1003)
            return None
        record = CallRecord(provider=provider, call_id=call_data.get("call_id"),
                            stream_id=call_data.get("stream_id"), caller=call_data.get("from"))
        app.state.calls.append(record)
        transport = FastAPIWebsocketTransport(websocket=websocket, params=FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer))
        stt = NemotronSTTService(engine=state["engine"], chunk_ms=chunk_ms, language=language, reservation=reservation)
        vad = VADProcessor(vad_analyzer=WebRTCVADAnalyzer(mode=2, params=VADParams(stop_secs=vad_stop_secs)))
        processors = [transport.input(), vad, stt, ChimeOnFinal(record, chime_audio=None if chime_back else b""),
                      transport.output()]
        try:
            await run_until_client_leaves(
                transport, processors, record, left="caller hung up", name=f"{provider} call {record.call_id}",
                params=PipelineParams(audio_in_sample_rate=PHONE_RATE, audio_out_sample_rate=PHONE_RATE))
        finally:
            logger.info(record.summary())
        return record

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face id, .nemo path, or 'demo'")
    parser.add_argument("--chunk-ms", type=int, default=160)
    parser.add_argument("--language", default="auto", help="a locale such as en-US, or 'auto' to detect")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--public-host", default=None, help="host name the provider reaches (for /twiml)")
    parser.add_argument("--max-calls", type=int, default=64)
    parser.add_argument("--no-hang-up", action="store_true", help="never hang up from the bot side")
    parser.add_argument("--no-chime", action="store_true", help="send no audio back")
    args = parser.parse_args()

    import uvicorn

    from pipecat_nemotron.languages import locale_to_language

    from pipecat_nemotron.engine import NemotronEngineError

    language = None if args.language == "auto" else locale_to_language(args.language)
    try:  # load before listening: a missing model is one clear error, not a traceback on the first call
        logger.info(f"loading {args.model} ({args.chunk_ms} ms chunks)…")
        engine = Engine.shared(model=args.model, chunk_ms=args.chunk_ms, device=args.device,
                               max_streams=args.max_calls).wait_ready()
    except NemotronEngineError as error:
        raise SystemExit(f"error: {error}") from None
    app = create_app(engine=engine, chunk_ms=args.chunk_ms, language=language, device=args.device,
                     auto_hang_up=not args.no_hang_up, public_host=args.public_host, max_calls=args.max_calls,
                     chime_back=not args.no_chime)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

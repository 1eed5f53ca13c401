"""`nvidia.riva.asr.RivaSpeechRecognition` on the shared engine: every client stream is one engine stream, so the
streams of many bot processes share each model step.

One stream: the first request carries only `streaming_config`; then `audio_content`. The server finds where each
utterance ends (`endpointing.py`), finalizes it on the engine (decoder reset, encoder context kept, the engine's
trailing context for the punctuation and tag) and sends `is_final` with the detected language in
`alternatives[0].language_code`; interim results when asked. A half-close ends the last utterance and the RPC ends
OK once its final is out. The server never ends a live stream by itself. A stream beyond the engine's capacity is
refused at once with RESOURCE_EXHAUSTED; bad settings get INVALID_ARGUMENT naming what is served.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from riva.client.proto import riva_asr_pb2, riva_asr_pb2_grpc

from ...engine import Final, NemotronEngineError, Partial
from ..drain import engine_refusal
from .audio import AudioConfigError, StreamAudio
from .endpointing import EndpointingSettings, Endpointer

logger = logging.getLogger("pipecat_nemotron.riva")

AUTO_CODES = {"", "auto", "multi"}
MAX_AHEAD_S = 2.0  # audio a stream may have waiting for the model before its reads pause (gRPC flow control)
_DONE = object()


class RequestError(Exception):
    """A client error inside the stream, with its gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class RivaASRServicer(riva_asr_pb2_grpc.RivaSpeechRecognitionServicer):
    """Riva's streaming ASR API on an `Engine` (see the module docstring).

    Args (keyword-only):
        engine: the loaded engine every stream runs on.
        model_name: the name `GetRivaSpeechRecognitionConfig` reports.
        drain: the server's `drain.Drain`: while it drains, new streams get UNAVAILABLE ("draining") at once.
        metrics: the server's `metrics.ServerMetrics` (streams counted as calls: answered, refused, ended, finals).
    """

    def __init__(self, *, engine, model_name: str, drain=None, metrics=None):
        self.engine = engine
        self.model_name = model_name
        self.drain = drain
        self.calls = metrics.calls if metrics is not None else None
        self.streams_opened = 0
        self.sessions: set[_Session] = set()

    async def StreamingRecognize(self, request_iterator, context):
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: send streaming_config first")
        if not first.HasField("streaming_config"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message must carry streaming_config (audio came before the config)")
        streaming = first.streaming_config
        try:
            language = self._locale(streaming.config.language_code)
            audio = StreamAudio(encoding=streaming.config.encoding, sample_rate=streaming.config.sample_rate_hertz)
        except (AudioConfigError, RequestError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if self.drain is not None and self.drain.draining:
            self._count("refused", "draining")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the ASR server is draining; retry on another server")
        reservation = self.engine.try_reserve()
        if reservation is None:
            self._count("refused", engine_refusal(self.engine))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "the ASR server is at capacity (or behind real time); retry on another server")
        try:
            stream = self.engine.open_stream(language=language, reservation=reservation)
        except NemotronEngineError as error:
            reservation.release()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        self.streams_opened += 1
        session = _Session(stream, audio, Endpointer(EndpointingSettings.from_config(streaming.config)),
                           interim=streaming.interim_results,
                           on_final=self.calls.final if self.calls is not None else None)
        self.sessions.add(session)
        self._count("answered")
        # A client that goes away while this generator waits at a `yield` never resumes it, so its `finally` would
        # only run at garbage collection: the RPC's end frees the engine stream instead (idempotent).
        context.add_done_callback(lambda _: asyncio.ensure_future(session.close()))
        outcome = "client left"
        try:
            async for response in session.run(requests):
                yield response
            outcome = "drain timeout: ended by the server" if session.ended_by_server else "ended"
        except RequestError as error:
            outcome = f"failed: {error.code.name}"
            await context.abort(error.code, str(error))
        finally:
            await session.close()
            if session in self.sessions:
                self.sessions.discard(session)
                self._count("ended", outcome)
            logger.info("stream %d %s: %s, %.1f s of audio, %d final(s), peer %s", stream.id, outcome, language,
                        session.audio_s, session.finals_sent, context.peer())

    @property
    def live(self) -> int:
        return len(self.sessions)

    async def end_sessions(self) -> None:
        """End every live stream from the server side: its last utterance is finalized and its final sent, then
        its RPC ends OK (a drain's bound)."""
        for session in list(self.sessions):
            await session.end_now()

    def _count(self, event: str, *args) -> None:
        if self.calls is not None:
            getattr(self.calls, event)(*args)

    async def Recognize(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "only StreamingRecognize is served")

    async def GetRivaSpeechRecognitionConfig(self, request, context):
        locales = sorted(self.engine.languages) or ["auto"]
        configs = [riva_asr_pb2.RivaSpeechRecognitionConfigResponse.Config(
            model_name=self.model_name,
            parameters={"type": "online", "language_code": locale, "streaming": "true",
                        "chunk_ms": str(self.engine.chunk_ms)}) for locale in locales if locale != "auto"]
        return riva_asr_pb2.RivaSpeechRecognitionConfigResponse(model_config=configs)

    def _locale(self, code: str) -> str:
        if code.strip().lower() in AUTO_CODES:
            return "auto"
        if not self.engine.languages:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{self.model_name} only detects languages itself: "
                                                                 "send language_code '' or 'auto'")
        if code not in self.engine.languages:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"language_code {code!r} is not served; use one of "
                               f"{sorted(self.engine.languages)} or '' for automatic detection")
        return code


class _Session:
    """One RPC's stream: reads audio into the engine, endpoints it, and yields the responses."""

    def __init__(self, stream, audio: StreamAudio, endpointer: Endpointer, *, interim: bool, on_final=None):
        self.stream = stream
        self.on_final = on_final
        self.ended_by_server = False
        self.audio = audio
        self.endpointer = endpointer
        self.interim = interim
        self.finals_pending = 0
        self.audio_since_final = False
        self.out: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.closed = False
        self.audio_s = 0.0
        self.finals_sent = 0

    async def run(self, requests):
        self.tasks = [asyncio.ensure_future(self._read(requests)), asyncio.ensure_future(self._results())]
        reading = True
        while reading or self.finals_pending:
            item = await self.out.get()
            if item is _DONE:
                reading = False
            elif isinstance(item, BaseException):
                raise item
            elif isinstance(item, Final):
                self.finals_pending -= 1
                if self.on_final is not None:
                    self.on_final(item.latency_s)
                if item.text:
                    self.finals_sent += 1
                    yield self._response(item, final=True)
            elif isinstance(item, Partial) and self.interim and item.text:
                yield self._response(item, final=False)

    async def end_now(self) -> None:
        """Stop reading the client's audio, finalize what it said, and let the RPC end once that final is out."""
        if self.closed or self.ended_by_server or not self.tasks:
            return
        self.ended_by_server = True
        reader = self.tasks[0]
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        if self.audio_since_final:
            await self._finalize()
        self.out.put_nowait(_DONE)

    async def close(self) -> None:
        """End the engine stream and release its reservation (once, whoever calls first)."""
        if self.closed:
            return
        self.closed = True
        self.stream.close()
        self.stream.reservation.release()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _read(self, requests) -> None:
        try:
            async for request in requests:
                if request.HasField("streaming_config"):
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "streaming_config may only come first")
                try:
                    pcm = await self.audio.convert(request.audio_content)
                except AudioConfigError as error:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
                await self._feed(pcm)
            if self.audio_since_final:  # half-close: the last utterance ends here
                await self._finalize()
            self.out.put_nowait(_DONE)
        except Exception as error:  # to the RPC's own task, which aborts with it
            self.out.put_nowait(error if isinstance(error, RequestError)
                                else RequestError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"))

    async def _feed(self, pcm: bytes) -> None:
        position = 0
        for event, end in self.endpointer.push(pcm):
            if event == "stop":
                self._put_audio(pcm[position:end])
                position = end
                await self._finalize()
        self._put_audio(pcm[position:])
        while self.stream.lag_s > MAX_AHEAD_S and not self.stream.closed:  # back-pressure to the client
            await asyncio.sleep(0.01)

    def _put_audio(self, pcm: bytes) -> None:
        if pcm:
            self.stream.feed(pcm)
            self.audio_s += len(pcm) / 32000
            self.audio_since_final = True

    async def _finalize(self) -> None:
        self._put_audio(await self.audio.flush())
        self.stream.finalize()
        self.finals_pending += 1
        self.audio_since_final = False

    async def _results(self) -> None:
        try:
            async for result in self.stream:
                self.out.put_nowait(result)
        except NemotronEngineError as error:
            self.out.put_nowait(RequestError(grpc.StatusCode.INTERNAL, f"the engine failed this stream: {error}"))

    @staticmethod
    def _response(result, *, final: bool):
        alternative = riva_asr_pb2.SpeechRecognitionAlternative(
            transcript=result.text, confidence=1.0 if final else 0.0,
            language_code=[result.language] if result.language else [])
        return riva_asr_pb2.StreamingRecognizeResponse(results=[riva_asr_pb2.StreamingRecognitionResult(
            alternatives=[alternative], is_final=final, stability=1.0 if final else 0.5, channel_tag=1,
            audio_processed=result.end_s)])

"""`NemotronSTTService`: Pipecat streaming STT on nemotron-3.5-asr-streaming, in process.

Audio frames are resampled once to 16 kHz and queued on the shared engine; the engine's
thread steps every live call of the process in one batch and hands results back to the
event loop, where they become `InterimTranscriptionFrame`s and, on
`VADUserStoppedSpeakingFrame`, a finalized `TranscriptionFrame` with its `Language`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from loguru import logger
from pipecat.frames.frames import (CancelFrame, EndFrame, ErrorFrame, Frame, InterimTranscriptionFrame, StartFrame,
                                   TranscriptionFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import STTSettings, is_given
from pipecat.services.stt_service import STTService
from pipecat.transcriptions.language import Language
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.time import time_now_iso8601
from pipecat.utils.tracing.service_decorators import traced_stt

from .engine import (DEFAULT_MODEL, AudioFormatError, BacklogError, Engine, Final, NemotronEngineError, Partial,
                     StreamReservation)
from .engine.loader import SAMPLE_RATE
from .languages import AUTO, language_to_locale, locale_to_language
from .resampler import DeterministicStreamResampler

# Pipecat's ttfs_p99_latency: p99 from the end of speech to the final, by chunk size = the VAD's stop_secs (0.2 s)
# + the p99 of VAD stop -> final measured by benchmarks/ttfs.py on a 2-core CPU, no GPU (benchmarks/results/):
# the 0.6B architecture, one stream caught up, on the default fast encoder step in fp32 and in int8
# (ttfs_0.6b_encoder.md), and the demo model with 16 live streams (ttfs_demo.md), all with the default trailing
# context of each Final (320 ms). On a GPU pass your own measurement. The service always finalizes on VAD stop,
# which ends Pipecat's wait early; this is its safety net.
VAD_STOP_SECS = 0.2
TTFS_P99_BY_CHUNK_MS = {80: VAD_STOP_SECS + 0.73, 160: VAD_STOP_SECS + 0.83, 320: VAD_STOP_SECS + 0.58,
                        560: VAD_STOP_SECS + 0.78, 1120: VAD_STOP_SECS + 1.02}
INT8_TTFS_P99_BY_CHUNK_MS = {80: VAD_STOP_SECS + 0.25, 160: VAD_STOP_SECS + 0.20, 320: VAD_STOP_SECS + 0.20,
                             560: VAD_STOP_SECS + 0.25, 1120: VAD_STOP_SECS + 0.42}
DEMO_TTFS_P99_BY_CHUNK_MS = {80: VAD_STOP_SECS + 0.06, 160: VAD_STOP_SECS + 0.04, 320: VAD_STOP_SECS + 0.03,
                             560: VAD_STOP_SECS + 0.03, 1120: VAD_STOP_SECS + 0.05}
# On EndFrame the finals still being computed are awaited for the time the engine's backlog needs
# (Stream.seconds_to_drain) times this safety factor plus a margin; while the stream still makes
# progress the wait is extended, up to END_FLUSH_MAX_S in all. What is left then is logged in seconds.
END_FLUSH_FACTOR = 2.0
END_FLUSH_MARGIN_S = 2.0
END_FLUSH_MAX_S = 120.0
# While the model is still loading (no `preload()`), this much of the caller's audio is kept and transcribed once
# it is ready; beyond it the oldest audio is dropped, and both are said once in the log.
LOADING_BUFFER_S = 20.0
# A failed engine stream is replaced at the next utterance this many times in a row; then the
# service gives up with a fatal error (a Final resets the count).
MAX_STREAM_RESTARTS = 3


@dataclass
class NemotronSTTSettings(STTSettings):
    """Runtime settings of `NemotronSTTService`.

    Parameters:
        model: the model source (fixed for the life of the service).
        language: model locale string, or None for automatic detection. Changing it with
            `STTUpdateSettingsFrame` takes effect from the next utterance.
    """


class NemotronSTTService(STTService):
    """Streaming speech-to-text with NVIDIA nemotron-3.5-asr-streaming, run in this process.

    Args (keyword-only):
        model: Hugging Face id (default `nvidia/nemotron-3.5-asr-streaming-0.6b`), a `.nemo` path,
            or `"demo"` for the bundled demo model.
        chunk_ms: 80, 160, 320, 560 or 1120: latency against cost per audio-second.
        language: a Pipecat `Language` to transcribe, or None to detect it (model's `auto`).
        device: "auto", "cpu" or "cuda[:N]".
        strip_language_tags: remove the model's `<xx-YY>` tags from the text.
        interim_results: push `InterimTranscriptionFrame`s while the user speaks.
        engine: share an `Engine` explicitly; by default every service of the process with the
            same (model, chunk_ms, device) shares one, so calls are batched together.
        reservation: the engine stream the transport reserved before it answered the call
            (`engine.try_reserve()`); the service runs its streams on it and releases it when the
            pipeline ends. Without one the service reserves at start and fails fatally when the
            engine is full.
        max_streams: slots of the shared engine, if this service is the one that creates it (another
            value than the existing engine's is an error).
        threads: CPU threads of the shared engine it creates (default: `engine.default_threads()`).
        final_context_ms: trailing silence the shared engine it creates gives each Final, so the model writes
            the terminal punctuation and the language tag (default 320 ms; 0 for the lowest time to final).
        precision: "fp32" (default) or "int8" for the shared engine it creates: int8 quantises the encoder's
            Linear layers on a CPU (about 2-4× the streams per core on the 0.6B model, a small accuracy cost:
            see the README's encoder figures).
        server: "host:port" of a `pipecat-nemotron serve-riva` server to transcribe on instead of an engine in this
            process (the bot holds no model; many bot processes share the server's batched engine). The service's
            VAD-driven finalize is kept: each utterance is one RPC, ended at VAD stop (`pipecat_nemotron.remote`).
        ttfs_p99_latency: override the measured default for this chunk size (measured on a 2-core CPU; pass
            your own on a GPU).
        settings: `NemotronSTTSettings` overrides.
    """

    Settings = NemotronSTTSettings
    _settings: NemotronSTTSettings

    def __init__(self, *, model: str = DEFAULT_MODEL, chunk_ms: int = 160, language: Language | None = None,
                 device: str = "auto", strip_language_tags: bool = True, interim_results: bool = True,
                 engine: Engine | None = None, reservation: StreamReservation | None = None,
                 max_streams: int | None = None, threads: int | None = None, final_context_ms: int | None = None,
                 precision: str | None = None, server: str | None = None, ttfs_p99_latency: float | None = None,
                 settings: NemotronSTTSettings | None = None, **kwargs):
        default_settings = self.Settings(model=str(model if engine is None else engine.model_name),
                                         language=language_to_locale(language) if language else None)
        if settings is not None:
            default_settings.apply_update(settings)
        if engine is not None:
            chunk_ms = engine.chunk_ms
        measured = (DEMO_TTFS_P99_BY_CHUNK_MS if default_settings.model == "demo" else
                    INT8_TTFS_P99_BY_CHUNK_MS if (precision or getattr(engine, "precision", None)) == "int8" else
                    TTFS_P99_BY_CHUNK_MS)
        super().__init__(settings=default_settings,
                         ttfs_p99_latency=ttfs_p99_latency or measured.get(chunk_ms), **kwargs)
        self._model_source = model
        self._chunk_ms = chunk_ms
        self._device = device
        self._strip_language_tags = strip_language_tags
        self._interim_results = interim_results
        self._engine = engine
        self._engine_given = engine
        self._reservation = reservation
        self._max_streams = max_streams
        self._threads = threads
        self._final_context_ms = final_context_ms
        self._precision = precision
        self._server = server
        self._stream = None
        self._reader: asyncio.Task | None = None
        self._failures = 0  # stream failures since the last Final
        self._reopen_pending = False
        self._dropped_s = 0.0  # audio received while no stream was open
        self._backlog_reported = False
        # Pipecat's stream resampler dithers its int16 output and clears its filter by the wall clock, so the same
        # call gave different audio run to run (resampler.py); the utterance's tail is flushed at finalize.
        self._resampler = DeterministicStreamResampler()
        self._last_interim = ""
        self._vad_seen = False  # STTService keeps _user_speaking from the same VAD frames
        self._audio_since_finalize = False
        self._finals_pending = 0
        self._no_final_pending = asyncio.Event()
        self._no_final_pending.set()
        self._loading: asyncio.Task | None = None  # opens the stream once the engine has loaded
        self._held: list[bytes | None] = []  # 16 kHz audio (None: a finalize) received while loading
        self._held_s = 0.0
        self._held_dropped_s = 0.0

    @classmethod
    async def preload(cls, *, model: str = DEFAULT_MODEL, chunk_ms: int = 160, device: str = "auto",
                      max_streams: int = 64, threads: int | None = None,
                      final_context_ms: int | None = None, precision: str | None = None) -> Engine:
        """Load the shared engine and run one warm-up utterance before calls arrive (servers: call at start-up);
        the engine is also the admission (`try_reserve()`) a transport asks before answering a call."""
        options = {"threads": threads} if threads else {}
        if final_context_ms is not None:
            options["final_context_ms"] = final_context_ms
        if precision is not None:
            options["precision"] = precision
        engine = await Engine.shared(model=model, chunk_ms=chunk_ms, device=device, max_streams=max_streams,
                                     **options).ready()
        await engine.warm_up()
        return engine

    @property
    def engine(self) -> Engine | None:
        return self._engine

    @property
    def audio_behind_s(self) -> float:
        """Seconds of audio this service has handed to the engine that the model has not stepped yet (0 with
        no stream). A file replay paces itself on it (`pipecat-nemotron transcribe --fast`)."""
        return self._stream.lag_s if self._stream is not None else 0.0

    def can_generate_metrics(self) -> bool:
        return True

    def language_to_service_language(self, language: Language) -> str | None:
        return language_to_locale(language)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, frame: StartFrame):
        await super().start(frame)
        if self._engine_ready():
            await self._start_stream()
            return
        # the model is still loading: hold the caller's audio (bounded) instead of holding up the pipeline
        logger.warning(f"{self}: the model is still loading; holding up to {LOADING_BUFFER_S:.0f} s of audio until "
                       "it is ready (call `await NemotronSTTService.preload(...)` at start-up to avoid the wait)")
        self._loading = self.create_task(self._start_stream(), name="nemotron_stt_loading")

    async def stop(self, frame: EndFrame):
        try:
            if self._loading is not None:
                await self._loading  # a call shorter than the load: its audio is still transcribed
            await self._flush_last_utterance()
            await super().stop(frame)
        finally:
            await self._close_stream(release=True)

    async def cancel(self, frame: CancelFrame):
        try:
            await super().cancel(frame)
        finally:
            if self._loading is not None:
                loading, self._loading = self._loading, None
                await self.cancel_task(loading)
            await self._close_stream(release=True)

    def _engine_ready(self) -> bool:
        if self._server is not None:
            return True
        engine = self._engine if self._engine is not None else Engine.existing(
            model=self._model_source, chunk_ms=self._chunk_ms, device=self._device)
        return engine is not None and engine.health != "loading"

    async def _start_stream(self):
        """Open the call's stream (awaiting the model), then hand it the audio and finalizes held meanwhile."""
        try:
            await self._open_stream()
        except (NemotronEngineError, ValueError) as error:
            self._held, self._held_s = [], 0.0
            await self.push_error(error_msg=f"Nemotron STT could not start: {error}", exception=error,
                                  force_treat_as_permanent=True)
            return
        finally:
            self._loading = None
        held, self._held = self._held, []
        if held:
            logger.info(f"{self}: the model is ready; transcribing the {self._held_s:.1f} s of audio held meanwhile"
                        + (f" ({self._held_dropped_s:.1f} s more were dropped)" if self._held_dropped_s else ""))
        self._held_s = 0.0
        stream = self._stream
        try:
            for item in held:  # counted in _finals_pending when they came
                stream.finalize() if item is None else stream.feed(item)
        except NemotronEngineError as error:
            await self._stream_failed(stream, error)

    def _hold(self, audio: bytes) -> None:
        self._held.append(audio)
        self._held_s += len(audio) / 2 / SAMPLE_RATE
        while self._held_s > LOADING_BUFFER_S and any(item is not None for item in self._held):
            index = next(i for i, item in enumerate(self._held) if item is not None)
            dropped = self._held.pop(index)
            self._held_s -= len(dropped) / 2 / SAMPLE_RATE
            if not self._held_dropped_s:
                logger.warning(f"{self}: the model is still loading after {LOADING_BUFFER_S:.0f} s of audio; "
                               "dropping the oldest")
            self._held_dropped_s += len(dropped) / 2 / SAMPLE_RATE

    async def _open_stream(self):
        """Open the engine stream of this call on its reservation (taken now if the transport gave none)."""
        if self._server is not None:
            from .remote import RemoteStream

            self._stream = RemoteStream(server=self._server, language=self._settings.language or AUTO)
            self._reader = self.create_task(self._read_results(self._stream), name="nemotron_stt_results")
            return
        if self._engine is None or (not self._engine.alive_or_loading and self._engine_is_shared):
            # first start, or the shared engine died and Engine.shared builds a new one
            self._engine = Engine.shared(model=self._model_source, chunk_ms=self._chunk_ms, device=self._device,
                                         **self._shared_options())
        await self._engine.ready()
        if self._reservation is not None and not self._engine.holds(self._reservation):
            self._reservation.release()  # taken on an engine that has since been replaced
            self._reservation = None
        if self._reservation is None or self._reservation.released:
            self._reservation = self._engine.reserve()
        self._stream = self._engine.open_stream(language=self._settings.language or AUTO,
                                                reservation=self._reservation)
        self._reader = self.create_task(self._read_results(self._stream), name="nemotron_stt_results")

    @property
    def _engine_is_shared(self) -> bool:
        return self._engine_given is None

    def _shared_options(self) -> dict:
        options = {"strip_language_tags": self._strip_language_tags}
        if self._max_streams is not None:
            options["max_streams"] = self._max_streams
        if self._threads is not None:
            options["threads"] = self._threads
        if self._final_context_ms is not None:
            options["final_context_ms"] = self._final_context_ms
        if self._precision is not None:
            options["precision"] = self._precision
        return options

    async def _flush_last_utterance(self):
        """A graceful end loses no words: finalize an utterance still open (the user was speaking, or there is
        no VAD in the pipeline) and wait for the finals still being computed, as long as the engine's
        backlog needs (not a fixed time); what is left at the bound is logged in seconds of audio."""
        if self._stream is None:
            return
        if self._audio_since_finalize and (self._user_speaking or not self._vad_seen):
            await self._finalize_utterance()
        stream, waited = self._stream, 0.0
        while self._finals_pending and stream is self._stream:
            bound = min(END_FLUSH_MARGIN_S + END_FLUSH_FACTOR * stream.seconds_to_drain(), END_FLUSH_MAX_S - waited)
            behind = stream.lag_s
            started = asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(self._no_final_pending.wait(), max(bound, 0.0))
                return
            except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                waited += asyncio.get_running_loop().time() - started
            if stream.lag_s >= behind or waited >= END_FLUSH_MAX_S:  # no progress, or the hard cap
                logger.warning(f"{self}: {self._finals_pending} final(s) not ready after {waited:.1f} s; "
                               f"{stream.lag_s:.1f} s of the caller's audio were not transcribed")
                return

    async def _close_stream(self, *, release: bool = False):
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        if self._reader is not None:
            reader, self._reader = self._reader, None
            if reader is not asyncio.current_task():
                await self.cancel_task(reader)
        if release and self._reservation is not None:
            self._reservation.release()

    # ---- audio in ----------------------------------------------------------------------------
    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Queue audio on the engine; results arrive on their own task."""
        if self._loading is not None:
            if self.sample_rate != SAMPLE_RATE:
                audio = await self._resampler.resample(audio, self.sample_rate, SAMPLE_RATE)
            self._hold(audio)
            self._audio_since_finalize = True
            yield None
            return
        if self._stream is None and self._reopen_pending and not self._vad_seen:
            await self._reopen()  # no VAD in the pipeline: the next audio starts the next utterance
        if self._stream is None:
            self._dropped_s += len(audio) / 2 / max(self.sample_rate, 1)
            yield None
            return
        if self.sample_rate != SAMPLE_RATE:
            audio = await self._resampler.resample(audio, self.sample_rate, SAMPLE_RATE)
        try:
            self._stream.feed(audio)
        except BacklogError as error:  # the engine is slower than real time: say so once per utterance
            if not self._backlog_reported:
                self._backlog_reported = True
                yield ErrorFrame(error=f"Nemotron STT: {error}")
            yield None
            return
        except AudioFormatError as error:
            yield ErrorFrame(error=f"Nemotron STT: {error}")
            return
        except NemotronEngineError as error:  # the stream failed: the reader reports it once
            await self._stream_failed(self._stream, error)
            yield None
            return
        self._audio_since_finalize = True
        yield None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._vad_seen = True
            if self._stream is None and self._reopen_pending:
                await self._reopen()
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._vad_seen = True
            await self._finalize_utterance()

    async def _finalize_utterance(self):
        if self._loading is not None:  # the end of an utterance that came while the model loaded
            if self.sample_rate != SAMPLE_RATE:
                self._hold(await self._resampler.flush())
            self._held.append(None)
            self._count_finalize()
            return
        if self._stream is None:
            return
        stream = self._stream
        try:
            if self.sample_rate != SAMPLE_RATE:
                # the resampler's filter holds the last few ms: they belong to this utterance
                stream.feed(await self._resampler.flush())
            stream.finalize()
        except NemotronEngineError as error:
            await self._stream_failed(stream, error)
            return
        self._count_finalize()

    def _count_finalize(self):
        self._audio_since_finalize = False
        self._backlog_reported = False
        self._finals_pending += 1
        self._no_final_pending.clear()
        self.request_finalize()

    # ---- recovery ----------------------------------------------------------------------------
    async def _stream_failed(self, stream, error: NemotronEngineError):
        """One error for a failed stream; a fresh stream is opened at the next utterance, a few times."""
        if stream is not self._stream:
            return  # already handled (the reader and a feed both saw it)
        lost = self._finals_pending
        self._finals_pending = 0
        self._no_final_pending.set()
        await self._close_stream()
        if await self._failed_again(error, f"failed {self._failures + 1} times in a row"):
            await self.push_error(error_msg=f"Nemotron STT stream failed ({error}); {lost} utterance(s) lost, "
                                            "transcribing again from the next utterance", exception=error,
                                  category=ErrorCategory.SERVER)

    async def _reopen(self):
        self._reopen_pending = False
        if self._dropped_s:
            logger.warning(f"{self}: {self._dropped_s:.1f} s of audio arrived while the engine stream was down "
                           "and were not transcribed")
            self._dropped_s = 0.0
        try:
            await self._open_stream()
        except NemotronEngineError as error:
            await self._failed_again(error, "could not reopen its stream")

    async def _failed_again(self, error: NemotronEngineError, what: str) -> bool:
        """Count a failure: True while another stream may be tried (at the next utterance), else one
        permanent error."""
        self._failures += 1
        if self._failures > MAX_STREAM_RESTARTS:
            await self.push_error(error_msg=f"Nemotron STT {what}, giving up: {error}", exception=error,
                                  force_treat_as_permanent=True)
            return False
        self._reopen_pending = True
        return True

    async def _update_settings(self, delta: NemotronSTTSettings) -> dict:
        if is_given(delta.model) and delta.model != self._settings.model:
            logger.warning(f"{self}: the model cannot change at run time; keeping {self._settings.model}")
            delta.model = self._settings.model
        changed = await super()._update_settings(delta)
        if "language" in changed and self._stream is not None:
            self._stream.set_language(self._settings.language or AUTO)
        return changed

    # ---- results out -------------------------------------------------------------------------
    async def _read_results(self, stream):
        try:
            async for result in stream:
                if isinstance(result, Final):
                    await self._push_final(result)
                elif isinstance(result, Partial) and self._interim_results and result.text != self._last_interim:
                    self._last_interim = result.text
                    await self.push_frame(InterimTranscriptionFrame(
                        result.text, self._user_id, time_now_iso8601(), locale_to_language(result.language),
                        result=result))
        except NemotronEngineError as error:
            await self._stream_failed(stream, error)

    async def _push_final(self, final: Final):
        self._last_interim = ""
        self._failures = 0
        self.confirm_finalize()
        await self.emit_stt_usage_metrics()
        language = locale_to_language(final.language)
        # An utterance with no words (a cough, noise) still gets its finalized frame: it ends
        # the turn strategies' STT wait at once, and Pipecat's aggregator ignores empty text.
        await self.push_frame(TranscriptionFrame(final.text, self._user_id, time_now_iso8601(), language,
                                                 result=final, finalized=True))
        await self._handle_transcription(final.text, True, language)
        # only now: a stop() waiting on this would otherwise cancel the reader mid-push
        self._finals_pending = max(0, self._finals_pending - 1)
        if not self._finals_pending:
            self._no_final_pending.set()

    @traced_stt
    async def _handle_transcription(self, transcript: str, is_final: bool, language: Language | None = None):
        """Tracing hook for final transcripts."""

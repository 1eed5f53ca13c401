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
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (CancelFrame, EndFrame, ErrorFrame, Frame, InterimTranscriptionFrame, StartFrame,
                                   TranscriptionFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import STTSettings, is_given
from pipecat.services.stt_service import STTService
from pipecat.transcriptions.language import Language
from pipecat.utils.time import time_now_iso8601
from pipecat.utils.tracing.service_decorators import traced_stt

from .engine import DEFAULT_MODEL, Engine, Final, NemotronEngineError, Partial
from .engine.loader import SAMPLE_RATE
from .languages import AUTO, language_to_locale, locale_to_language

# Pipecat's ttfs_p99_latency: p99 from the end of speech to the final, by chunk size = the VAD's stop_secs (0.2 s)
# + the p99 of VAD stop -> final measured by benchmarks/ttfs.py on a 2-core CPU, no GPU (benchmarks/results/):
# the 0.6B architecture, one stream caught up (ttfs_0.6b_cpu.md), and the demo model with 16 live streams
# (ttfs_demo.md). On a GPU pass your own measurement. The service always finalizes on VAD stop, which ends
# Pipecat's wait early; this figure is only its safety net.
VAD_STOP_SECS = 0.2
TTFS_P99_BY_CHUNK_MS = {80: VAD_STOP_SECS + 1.08, 160: VAD_STOP_SECS + 1.59, 320: VAD_STOP_SECS + 1.77,
                        560: VAD_STOP_SECS + 2.40, 1120: VAD_STOP_SECS + 3.49}
DEMO_TTFS_P99_BY_CHUNK_MS = {80: VAD_STOP_SECS + 0.38, 160: VAD_STOP_SECS + 0.15, 320: VAD_STOP_SECS + 0.21,
                             560: VAD_STOP_SECS + 0.21, 1120: VAD_STOP_SECS + 0.19}
# On EndFrame, how long to wait for the finals still being computed (the caller hung up mid-sentence).
END_FLUSH_TIMEOUT_S = 5.0


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
        max_streams: slots of an engine this service creates.
        ttfs_p99_latency: override the measured default for this chunk size (measured on a 2-core CPU; pass
            your own on a GPU).
        settings: `NemotronSTTSettings` overrides.
    """

    Settings = NemotronSTTSettings
    _settings: NemotronSTTSettings

    def __init__(self, *, model: str = DEFAULT_MODEL, chunk_ms: int = 160, language: Language | None = None,
                 device: str = "auto", strip_language_tags: bool = True, interim_results: bool = True,
                 engine: Engine | None = None, max_streams: int = 64, ttfs_p99_latency: float | None = None,
                 settings: NemotronSTTSettings | None = None, **kwargs):
        default_settings = self.Settings(model=str(model if engine is None else engine.model_name),
                                         language=language_to_locale(language) if language else None)
        if settings is not None:
            default_settings.apply_update(settings)
        if engine is not None:
            chunk_ms = engine.chunk_ms
        measured = DEMO_TTFS_P99_BY_CHUNK_MS if default_settings.model == "demo" else TTFS_P99_BY_CHUNK_MS
        super().__init__(settings=default_settings,
                         ttfs_p99_latency=ttfs_p99_latency or measured.get(chunk_ms), **kwargs)
        self._model_source = model
        self._chunk_ms = chunk_ms
        self._device = device
        self._strip_language_tags = strip_language_tags
        self._interim_results = interim_results
        self._engine = engine
        self._max_streams = max_streams
        self._stream = None
        self._reader: asyncio.Task | None = None
        self._resampler = create_stream_resampler()
        self._last_interim = ""
        self._vad_seen = False  # STTService keeps _user_speaking from the same VAD frames
        self._audio_since_finalize = False
        self._finals_pending = 0
        self._no_final_pending = asyncio.Event()
        self._no_final_pending.set()

    @classmethod
    async def preload(cls, *, model: str = DEFAULT_MODEL, chunk_ms: int = 160, device: str = "auto",
                      max_streams: int = 64) -> Engine:
        """Load the shared engine before calls arrive (servers: call at start-up)."""
        return await Engine.shared(model=model, chunk_ms=chunk_ms, device=device, max_streams=max_streams).ready()

    @property
    def engine(self) -> Engine | None:
        return self._engine

    def can_generate_metrics(self) -> bool:
        return True

    def language_to_service_language(self, language: Language) -> str | None:
        return language_to_locale(language)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, frame: StartFrame):
        await super().start(frame)
        try:
            if self._engine is None:
                self._engine = Engine.shared(model=self._model_source, chunk_ms=self._chunk_ms, device=self._device,
                                             max_streams=self._max_streams,
                                             strip_language_tags=self._strip_language_tags)
            await self._engine.ready()
            self._stream = self._engine.open_stream(language=self._settings.language or AUTO)
        except NemotronEngineError as error:
            await self.push_error(error_msg=f"Nemotron STT could not start: {error}", exception=error, fatal=True)
            return
        self._reader = self.create_task(self._read_results(self._stream), name="nemotron_stt_results")

    async def stop(self, frame: EndFrame):
        await self._flush_last_utterance()
        await super().stop(frame)
        await self._close_stream()

    async def _flush_last_utterance(self):
        """A graceful end loses no words: finalize an utterance still open (the user was speaking, or there is
        no VAD in the pipeline) and wait for the finals still being computed."""
        if self._stream is None:
            return
        if self._audio_since_finalize and (self._user_speaking or not self._vad_seen):
            await self._finalize_utterance()
        if self._finals_pending:
            try:
                await asyncio.wait_for(self._no_final_pending.wait(), END_FLUSH_TIMEOUT_S)
            except TimeoutError:
                logger.warning(f"{self}: {self._finals_pending} final(s) not ready {END_FLUSH_TIMEOUT_S} s after "
                               "EndFrame; closing without them")

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._close_stream()

    async def _close_stream(self):
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._reader is not None:
            await self.cancel_task(self._reader)
            self._reader = None

    # ---- audio in ----------------------------------------------------------------------------
    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Queue audio on the engine; results arrive on their own task."""
        if self._stream is None:
            yield None
            return
        if self.sample_rate != SAMPLE_RATE:
            audio = await self._resampler.resample(audio, self.sample_rate, SAMPLE_RATE)
        try:
            self._stream.feed(audio)
        except NemotronEngineError as error:
            yield ErrorFrame(error=f"Nemotron STT: {error}")
            return
        self._audio_since_finalize = True
        yield None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._vad_seen = True
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._vad_seen = True
            await self._finalize_utterance()

    async def _finalize_utterance(self):
        if self._stream is None:
            return
        try:
            if self.sample_rate != SAMPLE_RATE:
                # the resampler's filter holds the last few ms: they belong to this utterance
                self._stream.feed(await self._resampler.flush())
            self._stream.finalize()
        except NemotronEngineError as error:
            await self.push_error(error_msg=f"Nemotron STT: {error}", exception=error)
            return
        self._audio_since_finalize = False
        self._finals_pending += 1
        self._no_final_pending.clear()
        self.request_finalize()

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
            await self.push_error(error_msg=f"Nemotron STT stream failed: {error}", exception=error)

    async def _push_final(self, final: Final):
        self._last_interim = ""
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

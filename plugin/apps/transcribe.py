"""Stream WAV files through the same Pipecat path a call takes: VAD -> NemotronSTTService.

Used by `pipecat-nemotron transcribe`. Each file is one "call": its own pipeline, all
calls sharing one engine (and so one batch per model step).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (EndFrame, Frame, InputAudioRawFrame, InterimTranscriptionFrame,
                                   TranscriptionFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from ..stt import NemotronSTTService
from ..vad import SUPPORTED_RATES, WebRTCVADAnalyzer
from ..wav import Wav

FRAME_MS = 20
TRAILING_SILENCE_S = 0.6
AHEAD_S = 2.0  # --fast: most audio of one file queued ahead of the engine
POLL_S = 0.005
STALL_S = 120.0


@dataclass
class Utterance:
    """One final transcript of a file."""

    file: str
    text: str
    language: str | None
    start_s: float
    end_s: float
    latency_ms: float

    def as_dict(self) -> dict:
        return {"file": self.file, "start_s": round(self.start_s, 2), "end_s": round(self.end_s, 2),
                "language": self.language, "text": self.text, "latency_ms": round(self.latency_ms, 1)}


@dataclass
class CallProgress:
    """What the display shows for one file while it streams."""

    file: str
    interim: str = ""
    finals: list[Utterance] = field(default_factory=list)
    speaking: bool = False
    vad_stops: int = 0
    audio_frames: int = 0
    done: bool = False


class TranscriptSink(FrameProcessor):
    """End of the pipeline: records interim and final transcripts for the display."""

    def __init__(self, progress: CallProgress, on_final, on_interim):
        super().__init__()
        self._progress = progress
        self._on_final = on_final
        self._on_interim = on_interim

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        progress = self._progress
        if isinstance(frame, InputAudioRawFrame):
            progress.audio_frames += 1
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            progress.speaking = True
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            progress.speaking = False
            progress.vad_stops += 1
        elif isinstance(frame, InterimTranscriptionFrame):
            progress.interim = frame.text
            self._on_interim(progress)
        elif isinstance(frame, TranscriptionFrame):
            final = frame.result
            utterance = Utterance(progress.file, frame.text, frame.language.value if frame.language else None,
                                  final.start_s, final.end_s, final.latency_s * 1000)
            progress.interim = ""
            progress.finals.append(utterance)
            self._on_final(utterance)
        await self.push_frame(frame, direction)


def pipeline_rate(wav: Wav) -> int:
    """Calls keep their own rate (8/16/48 kHz): the service resamples as it would in a call."""
    return wav.sample_rate if wav.sample_rate in SUPPORTED_RATES else 16000


def audio_frames(wav: Wav, rate: int) -> list[bytes]:
    samples = wav.samples
    if wav.sample_rate != rate:
        import soxr
        samples = soxr.resample(samples, wav.sample_rate, rate).astype(np.int16)
    samples = np.concatenate([samples, np.zeros(int(TRAILING_SILENCE_S * rate), dtype=np.int16)])
    step = rate * FRAME_MS // 1000
    return [samples[i:i + step].tobytes() for i in range(0, len(samples), step)]


async def transcribe_call(name: str, wav: Wav, *, stt: NemotronSTTService, realtime: bool, vad_mode: int,
                          on_final, on_interim) -> CallProgress:
    """Run one file as a call through VAD and the STT service; return its transcripts.

    Real time paces the audio by the clock, like a caller. Fast mode paces it by the engine's progress
    instead: at most `AHEAD_S` of this file's audio waits in the pipeline and the engine at any time, so
    nothing is ever refused for backlog and the engine hears exactly what it would in real time. Either way
    the result depends only on the audio: the same file gives the same utterances, text and tags, however
    loaded the machine and however many files run beside it. Waits end on progress, not on a timer: a call
    that makes no progress for `STALL_S` raises `TranscribeStalled`.
    """
    progress = CallProgress(name)
    rate = pipeline_rate(wav)
    vad = VADProcessor(vad_analyzer=WebRTCVADAnalyzer(mode=vad_mode, params=VADParams(stop_secs=0.3)),
                       audio_idle_timeout=0)
    worker = PipelineWorker(Pipeline([vad, stt, TranscriptSink(progress, on_final, on_interim)]),
                            params=PipelineParams(audio_in_sample_rate=rate), idle_timeout_secs=None,
                            enable_rtvi=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.ensure_future(runner.run())
    watch = _Watch(name, run, lambda: (progress.audio_frames, len(progress.finals), round(stt.audio_behind_s, 3)))
    try:
        started = time.monotonic()
        chunks = audio_frames(wav, rate)
        for index, chunk in enumerate(chunks):
            await worker.queue_frame(InputAudioRawFrame(audio=chunk, sample_rate=rate, num_channels=1))
            if realtime:
                await asyncio.sleep(max(0.0, started + (index + 1) * FRAME_MS / 1000 - time.monotonic()))
            else:  # back-pressure: the pipeline's queue plus the engine's backlog stay under AHEAD_S
                await watch.until(lambda: (index + 1 - progress.audio_frames) * FRAME_MS / 1000
                                  + stt.audio_behind_s <= AHEAD_S)
        await watch.until(lambda: progress.audio_frames >= len(chunks))
        if progress.speaking:  # the file ended mid-speech
            await worker.queue_frame(VADUserStoppedSpeakingFrame(stop_secs=0.0))
            await watch.until(lambda: not progress.speaking)
        await watch.until(lambda: len(progress.finals) >= progress.vad_stops)
        await worker.queue_frame(EndFrame())
        await run
    finally:
        if not run.done():
            await worker.cancel()
            await run
    progress.done = True
    return progress


class TranscribeStalled(RuntimeError):
    """A file's call made no progress for `STALL_S` seconds (its pipeline ended or the engine stopped)."""


class _Watch:
    """Waits on a call's conditions while it makes progress; gives up only when nothing moves."""

    def __init__(self, name: str, run: asyncio.Future, position):
        self._name = name
        self._run = run
        self._position = position

    async def until(self, condition) -> None:
        last, moved = self._position(), time.monotonic()
        while not condition():
            if self._run.done():
                raise TranscribeStalled(f"{self._name}: the pipeline ended before its transcripts were out")
            await asyncio.sleep(POLL_S)
            position = self._position()
            if position != last:
                last, moved = position, time.monotonic()
            elif time.monotonic() - moved > STALL_S:
                raise TranscribeStalled(f"{self._name}: no progress for {STALL_S:.0f} s")

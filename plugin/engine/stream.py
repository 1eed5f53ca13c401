"""Per-call state, and the handle the caller holds.

The handle's methods run on the caller's thread (usually the event loop) and only
touch state under the engine's lock for a few microseconds; the model work happens on
the engine thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .errors import AudioFormatError, BacklogError, StreamClosedError
from .features import HOP, samples_needed
from .loader import SAMPLE_RATE
from .results import Final, Partial, ResultQueue, split_language_tags, split_leading_marks


def to_float32(samples) -> np.ndarray:
    """Validate mono 16 kHz PCM (int16 array, float32 array in [-1, 1], or int16 bytes)."""
    if isinstance(samples, (bytes, bytearray, memoryview)):
        raw = bytes(samples)
        if len(raw) % 2:
            raise AudioFormatError(f"PCM16 bytes must come in whole 2-byte samples; got {len(raw)} bytes.")
        samples = np.frombuffer(raw, dtype="<i2")
    if not isinstance(samples, np.ndarray):
        raise AudioFormatError(f"audio must be a numpy array or int16 PCM bytes, not {type(samples).__name__}.")
    if samples.ndim != 1:
        raise AudioFormatError(f"audio must be mono, shape (n,); got shape {samples.shape}. Mix or pick a channel first.")
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    if samples.dtype == np.float32:
        if not np.isfinite(samples).all():
            raise AudioFormatError("float32 audio contains NaN or infinity.")
        return samples.copy()
    raise AudioFormatError(f"audio dtype must be int16 or float32, not {samples.dtype}.")


@dataclass
class _FinalizeRequest:
    frame_end: int        # the step that ends at this mel frame is the utterance's last
    fed_samples: int      # user audio up to here belongs to the utterance
    requested_at: float


class Stream:
    """One call's audio stream inside an `Engine`.

    `feed()` 16 kHz mono audio, `finalize()` at the end of each utterance, iterate with
    `async for result in stream` to receive `Partial` and `Final` transcripts, `close()`
    when the call ends. Obtain one with `Engine.open_stream()`.
    """

    def __init__(self, engine, *, stream_id: int, language: str, prompt_index: int | None,
                 loop: asyncio.AbstractEventLoop | None, reservation, owns_reservation: bool, detokenizer):
        self._engine = engine
        self.id = stream_id
        self.slot: int | None = None  # a cache slot, taken by the engine thread at the first step
        self.reservation = reservation
        self.owns_reservation = owns_reservation  # released when this stream closes
        self.detokenizer = detokenizer  # engine thread only
        self.language = language
        self._prompt_index = prompt_index
        self._pending_language: tuple[str, int | None] | None = None
        self._results = ResultQueue(loop)
        self.closed = False
        self.failed: BaseException | None = None
        # audio timeline: fed audio plus the silence inserted at each finalize
        self._chunks: deque[np.ndarray] = deque()
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0
        self.total_samples = 0
        self.fed_samples = 0
        self._pads: list[tuple[int, int]] = []  # (timeline position, samples of silence)
        self._pads_behind = 0  # silence in pads already pruned from `_pads`
        # model position
        self.frames_stepped = 0
        self.steps = 0
        self.step_origin = 0  # mel frame where the current run of steps began
        self.hypothesis = None
        self._finalize_queue: deque[_FinalizeRequest] = deque()
        self._utterance_start_fed = 0
        self._finalized_fed = 0  # fed samples at the latest finalize() call
        self._last_text: str | None = None
        self.last_step_at = 0.0
        self._feed_times: deque[tuple[int, float]] = deque()  # (timeline end of a feed, when it came)
        self.audio_age_s = 0.0  # how old the newest stepped audio was when its step ended

    # ---- caller side -------------------------------------------------------------------
    def feed(self, samples) -> None:
        """Queue mono 16 kHz audio: int16 / float32 numpy array, or little-endian int16 bytes."""
        audio = to_float32(samples)
        with self._engine._lock:
            self._check_open()
            backlog = (self.total_samples - self.frames_stepped * HOP + len(audio)) / SAMPLE_RATE
            if backlog > self._engine.max_backlog_s:
                raise BacklogError(
                    f"stream {self.id} has {backlog:.1f} s of audio waiting (limit {self._engine.max_backlog_s} s): "
                    "the engine runs slower than real time; use a larger chunk_ms, fewer streams or a GPU.")
            if len(audio):
                self._chunks.append(audio)
                self.total_samples += len(audio)
                self.fed_samples += len(audio)
                self._feed_times.append((self.total_samples, time.monotonic()))
        self._engine._wake()

    def finalize(self) -> None:
        """End the current utterance: its `Final` comes once all fed audio is stepped."""
        with self._engine._lock:
            self._check_open()
            self._queue_finalize()
        self._engine._wake()

    def _queue_finalize(self) -> None:
        """Pad to the next chunk boundary and mark it as the utterance's end (lock held)."""
        spec = self._engine.spec
        covered = -(-self.total_samples // HOP)  # frames whose centre lies in the audio so far
        origin = self.step_origin  # steps restart from here after a context reset
        frame_end = origin + spec.chunk_boundary_at_or_after(max(covered, self._last_queued_frame_end()) - origin)
        padding = max(0, samples_needed(frame_end) - self.total_samples)
        if padding:
            self._chunks.append(np.zeros(padding, dtype=np.float32))
            self._pads.append((self.total_samples, padding))
            self.total_samples += padding
            self._feed_times.append((self.total_samples, time.monotonic()))
        self._finalize_queue.append(_FinalizeRequest(frame_end, self.fed_samples, time.monotonic()))
        self._finalized_fed = self.fed_samples

    def set_language(self, language: str) -> None:
        """Change the language prompt ('auto' or a locale); it applies from the next utterance."""
        index = self._engine._prompt_index_for(language)
        with self._engine._lock:
            utterance_started = self.fed_samples > self._finalized_fed
            if not utterance_started and not self._finalize_queue:
                self.language, self._prompt_index = language, index
                self._pending_language = None
            else:  # applied when the current utterance's Final is out
                self._pending_language = (language, index)

    def close(self) -> None:
        """End the stream (its slot is freed between steps); results already produced can still be read."""
        self._engine._close_stream(self)

    @property
    def lag_s(self) -> float:
        """Seconds of audio fed but not yet stepped through the model."""
        return max(0.0, (self.total_samples - self.frames_stepped * HOP) / SAMPLE_RATE)

    def seconds_to_drain(self) -> float:
        """Estimated wall seconds until every audio sample fed so far has been stepped.

        The stream's backlog in chunks times the engine's recent step time, times the rounds needed
        when more streams are open than fit in one batch. 0 when nothing waits."""
        engine = self._engine
        chunks = -(-self.lag_s * 1000 // engine.chunk_ms)
        if not chunks:
            return 0.0
        step_s = max(engine.stats.recent_realtime_factor, 0.05) * engine.chunk_ms / 1000
        rounds = max(1, -(-engine.open_streams // engine.max_batch))
        return chunks * step_s * rounds

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._results.get()

    def get_result(self, timeout: float | None = None):
        """Blocking read of the next result from a non-asyncio thread (None on timeout/closed)."""
        return self._results.get_sync(timeout)

    def _check_open(self) -> None:
        if self.failed is not None:
            raise StreamClosedError(f"stream {self.id} failed: {self.failed}") from self.failed
        if self.closed:
            raise StreamClosedError(f"stream {self.id} is closed.")

    def _last_queued_frame_end(self) -> int:
        return self._finalize_queue[-1].frame_end if self._finalize_queue else self.frames_stepped

    # ---- engine side (called with the engine lock held) --------------------------------
    def _next_chunk_frames(self) -> int:
        spec = self._engine.spec
        return spec.first_chunk_frames if self.steps == 0 else spec.chunk_frames

    def _finalize_due(self) -> bool:
        return bool(self._finalize_queue) and self._finalize_queue[0].frame_end <= self.frames_stepped

    def _finalizes_at(self, frame: int) -> bool:
        """Whether the next due finalize ends at mel frame `frame` (the step reaching it ends an utterance)."""
        return bool(self._finalize_queue) and self._finalize_queue[0].frame_end == frame

    def _step_ready(self) -> bool:
        return self.total_samples >= samples_needed(self.frames_stepped + self._next_chunk_frames())

    def _take_window(self, first: int, end: int) -> np.ndarray:
        if self._chunks:
            self._buffer = np.concatenate([self._buffer, *self._chunks])
            self._chunks.clear()
        return self._buffer[first - self._buffer_start:end - self._buffer_start].copy()

    def _trim(self, keep_from: int) -> None:
        drop = keep_from - self._buffer_start
        if drop > 0:
            self._buffer = self._buffer[drop:]
            self._buffer_start = keep_from

    def _measure_age(self, now: float) -> float:
        """Age of the audio just stepped: how far this stream lags behind its feed."""
        needed = samples_needed(self.frames_stepped)
        while len(self._feed_times) > 1 and self._feed_times[0][0] < needed:
            self._feed_times.popleft()
        if self._feed_times and self._feed_times[0][0] >= needed:
            self.audio_age_s = max(0.0, now - self._feed_times[0][1])
        return self.audio_age_s

    def _fed_position(self, timeline: int) -> int:
        """Map a timeline sample position to fed-audio samples (inserted silence removed)."""
        position = timeline - self._pads_behind
        for start, length in self._pads:
            if timeline > start:
                position -= min(length, timeline - start)
        return max(0, min(position, self.fed_samples))

    def _after_step(self, token_ids: list[int], raw: str) -> list:
        """Update text after a model step (`raw`: the detokenised hypothesis); return the results to deliver."""
        results = []
        text, language = self._text_and_language(raw)
        start = self._utterance_start_fed / SAMPLE_RATE
        if self._finalize_due():
            if split_leading_marks(raw)[0]:
                self._engine.stats.late_marks += 1
            request = self._finalize_queue.popleft()
            end = request.fed_samples / SAMPLE_RATE
            results.append(Final(text, language, start, end, tuple(token_ids),
                                 latency_s=time.monotonic() - request.requested_at))
            self._start_next_utterance(request.fed_samples)
        elif text != (self._last_text or ""):
            end = self._fed_position(self.frames_stepped * HOP) / SAMPLE_RATE
            results.append(Partial(text, language, start, max(start, end), tuple(token_ids)))
            self._last_text = text
        self._cap_utterance()
        return results

    def _cap_utterance(self) -> None:
        """Finalize an utterance nobody ended (no VAD?) before its hypothesis grows without bound.

        It ends at the chunk boundary just stepped, where the cap was crossed, whatever audio is already
        queued behind it (that goes on in the next utterance): no silence is inserted mid-speech."""
        limit = self._engine.max_utterance_s
        if not limit or self._finalize_queue:
            return
        stepped = self._fed_position(self.frames_stepped * HOP)
        if stepped - self._utterance_start_fed > limit * SAMPLE_RATE:
            self._finalize_queue.append(_FinalizeRequest(self.frames_stepped, stepped, time.monotonic()))
            self._finalized_fed = stepped

    def _text_and_language(self, raw: str) -> tuple[str, str | None]:
        """Text and language of the utterance so far.

        Closing punctuation and tags before the first word are the previous utterance's (its Final already
        has them, from its trailing context) and are dropped. The language is the stream's fixed one, else
        the utterance's LAST `<xx-YY>` tag, else None: never a tag of an earlier utterance."""
        _, raw = split_leading_marks(raw)
        clean, tags = split_language_tags(raw)
        if self.language != "auto":
            language = self.language
        else:
            language = tags[-1] if tags else None
        text = clean if self._engine.strip_language_tags else " ".join(raw.split())
        return text, language

    def _start_next_utterance(self, fed_samples: int) -> None:
        self.hypothesis = None
        self.detokenizer.reset()
        self._last_text = None
        self._utterance_start_fed = fed_samples
        horizon = self.frames_stepped * HOP
        behind = [pad for pad in self._pads if pad[0] + pad[1] <= horizon]
        self._pads_behind += sum(length for _, length in behind)
        self._pads = [pad for pad in self._pads if pad[0] + pad[1] > horizon]
        if self._pending_language is not None:
            self.language, self._prompt_index = self._pending_language
            self._pending_language = None

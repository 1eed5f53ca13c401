"""The engine: one inference thread that steps every ready stream in one batch.

Each tick takes every stream with a full chunk (or a due finalize), up to
`max_batch`, gathers their caches from a preallocated slot pool, computes their mel
frames, runs ONE conformer step for all of them with one language prompt per row,
continues each stream's RNN-T hypothesis, scatters the caches back and posts the
results to each stream's event loop. Nothing on the event loop waits for the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import nemo_compat
from .errors import (CapacityError, EngineStepError, ModelLoadError, NemotronEngineError, StreamClosedError,
                     UnsupportedLanguageError)
from .features import HOP, LEAD_FRAMES, MelExtractor, window_for
from .loader import DEFAULT_MODEL, SAMPLE_RATE, chunk_spec, load_model, model_name, resolve_device
from .results import Final
from .stream import Stream

logger = logging.getLogger("pipecat_nemotron.engine")

_registry: dict[tuple, "Engine"] = {}
_registry_lock = threading.Lock()
_model_locks: dict[int, threading.Lock] = {}


def _model_lock(model) -> threading.Lock:
    # Engines for two chunk sizes may share one model object; its default attention
    # context is model state, so steps on one model are serialised.
    with _registry_lock:
        return _model_locks.setdefault(id(model), threading.Lock())


@dataclass
class EngineStats:
    """Counters of the engine thread. `realtime_factor` > 1 means steps are slower than audio."""

    chunk_ms: int = 0
    steps: int = 0
    streams_stepped: int = 0
    audio_seconds: float = 0.0
    busy_seconds: float = 0.0
    last_step_ms: float = 0.0
    last_batch: int = 0
    last_lag_s: float = 0.0
    max_lag_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def realtime_factor(self) -> float:
        return self.busy_seconds / (self.steps * self.chunk_ms / 1000) if self.steps else 0.0


class _SlotPool:
    """Encoder caches of every stream slot, preallocated: [layers, slots, ...] tensors."""

    def __init__(self, model, spec, slots: int, device):
        channel, time_cache, channel_len = model.encoder.get_initial_cache_state(
            batch_size=slots, dtype=torch.float32, device=device)
        self.channel, self.time, self.channel_len = channel, time_cache, channel_len
        n_mels = model.preprocessor.featurizer.nfilt
        self.mel = torch.zeros(slots, n_mels, spec.pre_encode_cache_frames, device=device)
        self.free = list(range(slots - 1, -1, -1))

    def take(self) -> int:
        slot = self.free.pop()
        self.reset(slot)
        return slot

    def reset(self, slot: int) -> None:
        self.channel[:, slot].zero_()
        self.time[:, slot].zero_()
        self.channel_len[slot] = 0
        self.mel[slot].zero_()

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    def gather(self, index: torch.Tensor):
        return (self.channel.index_select(1, index), self.time.index_select(1, index),
                self.channel_len.index_select(0, index), self.mel.index_select(0, index))

    def scatter(self, index: torch.Tensor, channel, time_cache, channel_len, mel) -> None:
        self.channel.index_copy_(1, index, channel)
        self.time.index_copy_(1, index, time_cache)
        self.channel_len.index_copy_(0, index, channel_len)
        self.mel.index_copy_(0, index, mel)


@dataclass
class _Job:
    stream: Stream
    step: bool            # False: only a due finalize, no audio to step
    first: bool = False
    window: np.ndarray | None = None
    offset: int = 0
    frames: int = 0
    prompt_index: int = 0


class Engine:
    """Batched cache-aware streaming ASR for every call in the process.

    Args (keyword-only):
        model: Hugging Face id, `.nemo` path, `"demo"`, or a loaded NeMo model.
        chunk_ms: 80, 160, 320, 560 or 1120 (must be trained for the model).
        device: "auto", "cpu" or "cuda[:N]".
        max_streams: slots in the cache pool; `open_stream` beyond it raises `CapacityError`.
        max_batch: most streams in one step (default: all slots).
        max_backlog_s: most unprocessed audio per stream before `feed` raises `BacklogError`.
        max_utterance_s: an utterance nobody finalizes is finalized at this length (bounds memory).
        strip_language_tags: remove `<xx-YY>` from text (the language is reported separately).
        reset_context_per_utterance: start each utterance with empty encoder caches instead of carrying
            the call's context over. Default: what the model's config asks for
            (`pipecat_nemotron.reset_context_per_utterance`, set by models trained on single utterances
            such as the demo model), else False.

    The model loads on the engine's own thread; `await engine.ready()` (or
    `wait_ready()`) before opening streams. Use `Engine.shared(...)` to get the one
    engine per (model, chunk size, device) of the process.
    """

    def __init__(self, *, model=DEFAULT_MODEL, chunk_ms: int = 160, device: str = "auto", max_streams: int = 64,
                 max_batch: int | None = None, max_backlog_s: float = 30.0, max_utterance_s: float = 60.0,
                 strip_language_tags: bool = True, reset_context_per_utterance: bool | None = None):
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.model_source = model
        self.model_name = model_name(model)
        self.chunk_ms = chunk_ms
        self.device_request = device
        self.max_streams = max_streams
        self.max_batch = max_batch or max_streams
        self.max_backlog_s = max_backlog_s
        self.max_utterance_s = max_utterance_s
        self.strip_language_tags = strip_language_tags
        self.reset_context_per_utterance = reset_context_per_utterance
        self.stats = EngineStats(chunk_ms=chunk_ms)
        self.model = None
        self.spec = None
        self.languages: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._streams: dict[int, Stream] = {}
        self._next_id = 0
        self._running = True
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._lag_warned_at = 0.0
        self._pause_depth = 0
        self.lag_warning_s = 1.0
        self._thread = threading.Thread(target=self._run, name=f"nemotron-engine-{chunk_ms}ms", daemon=True)
        self._thread.start()

    # ---- registry ----------------------------------------------------------------------
    @classmethod
    def shared(cls, *, model=DEFAULT_MODEL, chunk_ms: int = 160, device: str = "auto", **options) -> "Engine":
        """The process-wide engine for (model, chunk_ms, device); created on first use."""
        key = (model_name(model), chunk_ms, resolve_device(device))
        with _registry_lock:
            engine = _registry.get(key)
            if engine is None or not engine._running:
                engine = cls(model=model, chunk_ms=chunk_ms, device=device, **options)
                _registry[key] = engine
            return engine

    # ---- lifecycle -----------------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> "Engine":
        """Block until the model is loaded; re-raise its load error."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"model {self.model_name} did not load within {timeout} s")
        if self._load_error is not None:
            raise self._load_error
        return self

    async def ready(self) -> "Engine":
        """Await the model load without blocking the event loop."""
        if not self._ready.is_set():
            await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        return self.wait_ready(0)

    def close(self) -> None:
        """Stop the engine thread; open streams end."""
        with self._lock:
            self._running = False
            streams = list(self._streams.values())
            self._wakeup.notify_all()
        for stream in streams:
            self._close_stream(stream)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        with _registry_lock:
            for key, engine in list(_registry.items()):
                if engine is self:
                    del _registry[key]

    @contextlib.contextmanager
    def paused(self):
        """Hold the engine thread between steps, e.g. to feed many streams and step them together."""
        with self._lock:
            self._pause_depth += 1
        try:
            yield self
        finally:
            with self._lock:
                self._pause_depth -= 1
                self._wakeup.notify_all()

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def free_slots(self) -> int:
        with self._lock:
            return len(self._pool.free) if self._ready.is_set() and self._load_error is None else 0

    # ---- streams -------------------------------------------------------------------------
    def open_stream(self, *, language: str = "auto") -> Stream:
        """Open a stream with a locale from the model's prompt dictionary, or "auto"."""
        if not self._ready.is_set():
            raise NemotronEngineError("the model is still loading; await engine.ready() first.")
        self.wait_ready(0)
        prompt_index = self._prompt_index_for(language)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            if not self._running:
                raise StreamClosedError("the engine is closed.")
            if not self._pool.free:
                raise CapacityError(f"all {self.max_streams} stream slots of this engine are in use; "
                                    "refuse the call or raise max_streams.")
            slot = self._pool.take()
            self._next_id += 1
            stream = Stream(self, stream_id=self._next_id, slot=slot, language=language,
                            prompt_index=prompt_index, loop=loop)
            self._streams[stream.id] = stream
        return stream

    def _prompt_index_for(self, language: str) -> int | None:
        if not self.languages:
            if language != "auto":
                raise UnsupportedLanguageError(f"{self.model_name} has no language prompt; only 'auto' is possible.")
            return None
        if language not in self.languages:
            raise UnsupportedLanguageError(
                f"language {language!r} is not in the model's prompt dictionary; "
                f"use one of {sorted(self.languages)}.")
        return self.languages[language]

    def _close_stream(self, stream: Stream) -> None:
        with self._lock:
            if self._streams.pop(stream.id, None) is not None:
                self._pool.give_back(stream.slot)
            stream.closed = True
        stream._results.end()

    def _fail_stream(self, stream: Stream, error: BaseException) -> None:
        with self._lock:
            stream.failed = error
            if self._streams.pop(stream.id, None) is not None:
                self._pool.give_back(stream.slot)
        stream._results.put(error)
        stream._results.end()

    def _wake(self) -> None:
        with self._lock:
            self._wakeup.notify()

    # ---- engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # reported to whoever awaits ready()
            self._load_error = exc if isinstance(exc, NemotronEngineError) else ModelLoadError(str(exc))
            self._load_error.__cause__ = exc
            self._running = False
            self._ready.set()
            return
        self._ready.set()
        while True:
            with self._lock:
                jobs = [] if self._pause_depth else self._collect_jobs()
                while not jobs and self._running:
                    self._wakeup.wait()
                    jobs = [] if self._pause_depth else self._collect_jobs()
                if not self._running:
                    return
            self._execute(jobs)

    def _load(self) -> None:
        self.device = resolve_device(self.device_request)
        self.model = load_model(self.model_source, device=self.device)
        self._step_lock = _model_lock(self.model)
        with self._step_lock:
            self.spec = chunk_spec(self.model, self.chunk_ms)
        self.languages = nemo_compat.prompt_dictionary(self.model) if nemo_compat.has_prompt(self.model) else {}
        if self.reset_context_per_utterance is None:
            self.reset_context_per_utterance = nemo_compat.model_option(self.model, "reset_context_per_utterance",
                                                                        False)
        self._mel = MelExtractor(self.model.preprocessor, self.device)
        self._pool = _SlotPool(self.model, self.spec, self.max_streams, self.device)
        self._text_of = self.model.tokenizer.ids_to_text
        logger.info("engine ready: %s, %d ms chunks (att_context_size %s), %s, %d slots", self.model_name,
                    self.chunk_ms, list(self.spec.att_context_size), self.device, self.max_streams)

    def _collect_jobs(self) -> list[_Job]:
        """Ready streams, least recently stepped first, up to max_batch (lock held)."""
        candidates = sorted(self._streams.values(), key=lambda s: s.last_step_at)
        jobs = []
        for stream in candidates:
            if len(jobs) >= self.max_batch:
                break
            if stream._finalize_due():
                jobs.append(_Job(stream, step=False))
            elif stream._step_ready():
                frames = stream._next_chunk_frames()
                start = stream.frames_stepped
                first, end, offset = window_for(start, start + frames)
                jobs.append(_Job(stream, step=True, first=stream.steps == 0, window=stream._take_window(first, end),
                                 offset=offset, frames=frames, prompt_index=stream._prompt_index or 0))
        return jobs

    def _execute(self, jobs: list[_Job]) -> None:
        steppers = [job for job in jobs if job.step]
        if steppers:
            started = time.perf_counter()
            try:
                self._step(steppers)
            except Exception as exc:  # isolate: only these streams fail, the engine goes on
                logger.exception("model step failed for %d streams", len(steppers))
                error = EngineStepError(f"model step failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                for job in steppers:
                    self._fail_stream(job.stream, error)
                return
            self._account(len(steppers), time.perf_counter() - started)
        deliveries = []
        now = time.monotonic()
        with self._lock:
            for job in jobs:
                stream = job.stream
                if stream.closed or stream.failed is not None:
                    continue
                if job.step:
                    stream.frames_stepped += job.frames
                    stream.steps += 1
                    stream._trim(max(0, (stream.frames_stepped - LEAD_FRAMES) * HOP))
                    stream._measure_age(now)
                stream.last_step_at = now
                tokens = list(stream.hypothesis.y_sequence) if stream.hypothesis is not None else []
                tokens = [int(t) for t in tokens]
                results = stream._after_step(tokens, self._text_of)
                if self.reset_context_per_utterance and any(isinstance(r, Final) for r in results):
                    self._pool.reset(stream.slot)
                    stream.steps = 0  # the next utterance starts like a new stream
                    stream.step_origin = stream.frames_stepped
                deliveries.append((stream, results))
        for stream, results in deliveries:
            for result in results:
                stream._results.put(result)
        self._check_lag(jobs)

    @torch.inference_mode()
    def _step(self, jobs: list[_Job]) -> None:
        """One batched model step; each job's stream gets its continued hypothesis."""
        spec = self.spec
        model = self.model
        first_jobs = [j for j in jobs if j.first]
        later_jobs = [j for j in jobs if not j.first]
        ordered = first_jobs + later_jobs
        index = torch.tensor([j.stream.slot for j in ordered], dtype=torch.long, device=self.device)
        channel, time_cache, channel_len, mel_cache = self._pool.gather(index)
        with self._step_lock:
            if list(model.encoder.att_context_size) != list(spec.att_context_size):
                chunk_spec(model, self.chunk_ms)
            x, x_len, new_mel_cache = self._subsample(first_jobs, later_jobs, mel_cache)
            encoded, encoded_len, channel, time_cache, channel_len = nemo_compat.encode_pre_encoded(
                model.encoder, x, x_len, channel, time_cache, channel_len)
            prompts = torch.tensor([j.prompt_index for j in ordered], dtype=torch.long, device=self.device)
            encoded = nemo_compat.apply_prompts(model, encoded, prompts)
            hypotheses = nemo_compat.decode_step(model, encoded, encoded_len,
                                                 [j.stream.hypothesis for j in ordered])
        self._pool.scatter(index, channel, time_cache, channel_len, new_mel_cache)
        for job, hypothesis in zip(ordered, hypotheses):
            job.stream.hypothesis = hypothesis

    def _subsample(self, first_jobs: list[_Job], later_jobs: list[_Job], mel_cache: torch.Tensor):
        """Mel and subsampling per group: first steps drop nothing, later steps prepend the
        pre-encode cache and drop its outputs. Both give `valid_out_len` frames per stream."""
        spec = self.spec
        pieces, new_mel_cache = [], []
        offset = 0
        for group, is_first in ((first_jobs, True), (later_jobs, False)):
            if not group:
                continue
            mel = self._mel([j.window for j in group], [j.offset for j in group], group[0].frames)
            history = torch.cat([mel_cache[offset:offset + len(group)], mel], dim=2)
            offset += len(group)
            new_mel_cache.append(history[:, :, -spec.pre_encode_cache_frames:])
            inputs = mel if is_first else history
            lengths = torch.full((len(group),), inputs.shape[2], dtype=torch.int64, device=self.device)
            drop = 0 if is_first else spec.drop_extra_pre_encoded
            pieces.append(nemo_compat.pre_encode(self.model.encoder, inputs, lengths, drop))
        if len({piece[0].shape[1] for piece in pieces}) != 1:
            raise RuntimeError(f"first and later steps subsample to different lengths: {[p[0].shape for p in pieces]}")
        return (torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]), torch.cat(new_mel_cache))

    def _account(self, batch: int, seconds: float) -> None:
        stats = self.stats
        stats.steps += 1
        stats.streams_stepped += batch
        stats.audio_seconds += batch * self.chunk_ms / 1000
        stats.busy_seconds += seconds
        stats.last_step_ms = seconds * 1000
        stats.last_batch = batch
        if len(stats.batch_sizes) < 10000:
            stats.batch_sizes.append(batch)

    def _check_lag(self, jobs: list[_Job]) -> None:
        lag = max((job.stream.audio_age_s for job in jobs if job.step), default=0.0)
        self.stats.last_lag_s = lag
        self.stats.max_lag_s = max(self.stats.max_lag_s, lag)
        now = time.monotonic()
        if lag > self.lag_warning_s and now - self._lag_warned_at > 10.0:
            self._lag_warned_at = now
            logger.warning("engine lags %.1f s behind real time (last step %.0f ms for %d streams of %d ms): "
                           "use a larger chunk, fewer streams, or a GPU", lag, self.stats.last_step_ms,
                           self.stats.last_batch, self.chunk_ms)

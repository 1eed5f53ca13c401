"""The engine: one inference thread that steps every ready stream in one batch.

Each tick takes every stream with a full chunk (or a due finalize), up to
`max_batch`, gathers their caches from a preallocated slot pool, computes their mel
frames, runs ONE conformer step for all of them with one language prompt per row,
continues each stream's RNN-T hypothesis, scatters the caches back and posts the
results to each stream's event loop. Nothing on the event loop waits for the model.

Faults stay local: a step that raises fails the streams in it, an error in one stream's
post-step work fails that stream, and the thread goes on serving the others. Should the
thread end anyway, every open stream gets an error at once and `Engine.shared` builds a
new engine. Slots of closed streams return to the pool only between steps (`slots.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from . import nemo_compat
from .detokenize import Detokenizer, PieceTable
from .errors import (CapacityError, EngineStepError, ModelLoadError, NemotronEngineError, StreamClosedError,
                     UnsupportedLanguageError)
from .fast_encoder import PRECISIONS, FastEncoderStep, unsupported_reason
from .features import HOP, LEAD_FRAMES, MelExtractor, window_for
from .loader import DEFAULT_MODEL, SAMPLE_RATE, chunk_spec, load_model, model_name, resolve_device
from .reservation import Capacity, StreamReservation
from .results import Final
from .slots import SlotPool
from .stream import Stream
from .tail import TailSource, chunks_for, step_silence

logger = logging.getLogger("pipecat_nemotron.engine")

DEFAULT_FINAL_CONTEXT_MS = 320

_registry: dict[tuple, "Engine"] = {}
_registry_lock = threading.Lock()
_model_locks: dict[int, threading.Lock] = {}


def default_threads() -> int:
    """CPU threads an engine uses unless told: one less than this process's CPUs, at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


def _model_lock(model) -> threading.Lock:
    # Engines for two chunk sizes may share one model object; its default attention
    # context is model state, so steps on one model are serialised.
    with _registry_lock:
        return _model_locks.setdefault(id(model), threading.Lock())


@dataclass
class EngineStats:
    """Counters of the engine thread. `realtime_factor` > 1 means steps are slower than audio.

    Totals count every step; `batch_sizes` and the `recent_*` figures cover the last `WINDOW` steps,
    so a long-running server's figures follow its current load instead of freezing.
    """

    WINDOW = 10000
    RECENT = 200

    chunk_ms: int = 0
    steps: int = 0
    streams_stepped: int = 0
    audio_seconds: float = 0.0
    busy_seconds: float = 0.0
    last_step_ms: float = 0.0
    last_batch: int = 0
    last_lag_s: float = 0.0
    last_step_at: float = 0.0  # time.monotonic() of the last step
    max_lag_s: float = 0.0
    failed_steps: int = 0
    late_marks: int = 0  # utterances that began with the previous one's closing punctuation or tag (dropped)
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=EngineStats.WINDOW))
    _recent: deque = field(default_factory=lambda: deque(maxlen=EngineStats.RECENT), repr=False)

    @property
    def realtime_factor(self) -> float:
        return self.busy_seconds / (self.steps * self.chunk_ms / 1000) if self.steps else 0.0

    @property
    def recent_realtime_factor(self) -> float:
        """Step time per chunk duration over the last `RECENT` steps (0 before the first)."""
        recent = list(self._recent)
        return sum(recent) / (len(recent) * self.chunk_ms / 1000) if recent else 0.0

    @property
    def recent_step_seconds(self) -> list[float]:
        """Durations of the last `RECENT` steps, oldest first (for a metrics exporter catching up on them)."""
        return list(self._recent)

    def record_step(self, batch: int, seconds: float) -> None:
        self.steps += 1
        self.streams_stepped += batch
        self.audio_seconds += batch * self.chunk_ms / 1000
        self.busy_seconds += seconds
        self.last_step_ms = seconds * 1000
        self.last_batch = batch
        self.batch_sizes.append(batch)
        self._recent.append(seconds)


@dataclass
class _Job:
    stream: Stream
    step: bool            # False: only a due finalize, no audio to step
    first: bool = False
    window: np.ndarray | None = None
    offset: int = 0
    frames: int = 0
    prompt_index: int = 0
    tail: TailSource | None = None  # a due finalize that gets trailing silence (tail.py)


class Engine:
    """Batched cache-aware streaming ASR for every call in the process.

    Args (keyword-only):
        model: Hugging Face id, `.nemo` path, `"demo"`, or a loaded NeMo model.
        chunk_ms: 80, 160, 320, 560 or 1120 (must be trained for the model).
        device: "auto", "cpu" or "cuda[:N]".
        max_streams: calls at once (reservations / slots in the cache pool); beyond it `try_reserve()`
            gives None and `open_stream` raises `CapacityError`.
        max_batch: most streams in one step (default: all slots).
        max_backlog_s: most unprocessed audio per stream before `feed` raises `BacklogError`.
        max_utterance_s: an utterance nobody finalizes is finalized at this length (bounds memory).
        max_admission_lag_s: while the engine steps audio this many seconds behind real time, `try_reserve()`
            refuses new calls (the calls it has go on); None to admit by free slots only.
        strip_language_tags: remove `<xx-YY>` from text (the language is reported separately).
        final_context_ms: trailing silence each Final is given before it is read (rounded up to whole chunks),
            stepped on a copy of the stream's state so the real timeline is untouched (`tail.py`): the model
            writes the terminal punctuation and the language tag only after it has heard some audio past the
            last word. 0 turns it off. Its cost (a few extra chunk steps for the finalizing streams) is part
            of each Final's `latency_s`.
        threads: CPU threads for the model's math (`torch.set_num_threads` at load; torch's setting is
            process-wide, so engines of one process should agree).
            Default: one less than the CPUs this process may use (at least 1), so the event loop, Pipecat and
            the transports keep a core: with a busy neighbour, OpenMP threads that wait for a taken core turn a
            20 ms step into seconds (`default_threads`).
        encoder_step: "auto" (default): the fast conformer step (`fast_encoder.py`: cached keys/values and a
            precomputed positional projection, the same numbers as NeMo's step for a fraction of the work) when the
            model's encoder has the structure it knows, NeMo's own `cache_aware_stream_step` otherwise (logged);
            "fast" insists (a load error otherwise); "nemo" always takes NeMo's step.
        precision: "fp32" (default) or "int8" (CPU only: the encoder layers' Linear weights dynamically quantised
            to int8, 2.4-4.1× the fp32 fast step on the 0.6B architecture on a 2-core CPU (README), for a small
            accuracy cost; needs the fast step). On CUDA the encoder runs in the model's own dtype.
        reset_context_per_utterance: start each utterance with empty encoder caches instead of carrying
            the call's context over. Default: what the model's config asks for
            (`pipecat_nemotron.reset_context_per_utterance`; neither the bundled demo model, which was
            fine-tuned on multi-utterance items, nor the released checkpoint asks for it), else False.

    The model loads on the engine's own thread; `await engine.ready()` (or `wait_ready()`) before
    opening streams. Use `Engine.shared(...)` to get the one engine per (model, chunk size, device)
    of the process. Admission: `try_reserve()` before answering a call, then
    `open_stream(reservation=...)`; see `reservation.py`.
    """

    def __init__(self, *, model=DEFAULT_MODEL, chunk_ms: int = 160, device: str = "auto", max_streams: int = 64,
                 max_batch: int | None = None, max_backlog_s: float = 30.0, max_utterance_s: float = 60.0,
                 max_admission_lag_s: float | None = 2.0, strip_language_tags: bool = True,
                 final_context_ms: int = DEFAULT_FINAL_CONTEXT_MS, threads: int | None = None,
                 encoder_step: str = "auto", precision: str = "fp32",
                 reset_context_per_utterance: bool | None = None):
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        if encoder_step not in ("auto", "fast", "nemo"):
            raise ValueError(f"encoder_step must be 'auto', 'fast' or 'nemo', not {encoder_step!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, not {precision!r}")
        if precision == "int8" and encoder_step == "nemo":
            raise ValueError("precision='int8' runs on the fast encoder step; encoder_step='nemo' has no int8 path")
        self.encoder_step_request = encoder_step
        self.encoder_step: str | None = None  # "fast" or "nemo" once loaded
        self.precision = precision
        self.model_source = model
        self.model_name = model_name(model)
        self.chunk_ms = chunk_ms
        self.device_request = device
        self.max_streams = max_streams
        self.max_batch = max_batch or max_streams
        self.max_backlog_s = max_backlog_s
        self.max_utterance_s = max_utterance_s
        self.max_admission_lag_s = max_admission_lag_s
        self.threads = threads or default_threads()
        self.strip_language_tags = strip_language_tags
        self.final_context_ms = final_context_ms
        self.tail_chunks = chunks_for(final_context_ms, chunk_ms)
        self.reset_context_per_utterance = reset_context_per_utterance
        self.stats = EngineStats(chunk_ms=chunk_ms)
        self.model = None
        self.spec = None
        self.languages: dict[str, int] = {}
        self.lag_warning_s = 1.0
        self._options = {"max_streams": max_streams, "max_batch": self.max_batch, "max_backlog_s": max_backlog_s,
                         "max_utterance_s": max_utterance_s, "max_admission_lag_s": max_admission_lag_s,
                         "strip_language_tags": strip_language_tags, "final_context_ms": final_context_ms,
                         "threads": self.threads, "encoder_step": encoder_step, "precision": precision,
                         "reset_context_per_utterance": reset_context_per_utterance}
        self._capacity = Capacity(max_streams)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._streams: dict[int, Stream] = {}
        self._slots_to_free: list[int] = []  # of closed/failed streams; the engine thread frees them between steps
        self._failed_while_collecting: list[tuple[Stream, BaseException]] = []
        self._next_id = 0
        self._running = True
        self._stopped: str | None = None  # why the engine thread ended
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._lag_warned_at = 0.0
        self._pause_depth = 0
        self._thread = threading.Thread(target=self._run, name=f"nemotron-engine-{chunk_ms}ms", daemon=True)
        self._thread.start()

    # ---- registry ----------------------------------------------------------------------
    @classmethod
    def shared(cls, *, model=DEFAULT_MODEL, chunk_ms: int = 160, device: str = "auto", **options) -> "Engine":
        """The process-wide engine for (model, chunk_ms, device); created on first use.

        Options given for an engine that already exists must match its own (`ValueError` otherwise): a
        second caller asking for another `max_streams` would otherwise silently get the first one's.
        A dead engine (its thread ended) is replaced by a new one.
        """
        key = (model_name(model), chunk_ms, resolve_device(device))
        with _registry_lock:
            engine = _registry.get(key)
            if engine is not None and engine.alive_or_loading:
                engine._check_options(options)
                return engine
            engine = cls(model=model, chunk_ms=chunk_ms, device=device, **options)
            _registry[key] = engine
            return engine

    @classmethod
    def existing(cls, *, model=DEFAULT_MODEL, chunk_ms: int = 160, device: str = "auto") -> "Engine | None":
        """The process-wide engine for (model, chunk_ms, device) if one is loading or serving, else None."""
        key = (model_name(model), chunk_ms, resolve_device(device))
        with _registry_lock:
            engine = _registry.get(key)
        return engine if engine is not None and engine.alive_or_loading else None

    def _check_options(self, options: dict) -> None:
        conflicts = {name: (value, self._options.get(name, "?")) for name, value in options.items()
                     if name not in self._options or self._options[name] != value}
        if conflicts:
            told = ", ".join(f"{name}={asked!r} (it has {had!r})" for name, (asked, had) in conflicts.items())
            raise ValueError(f"the shared engine for {self.model_name} at {self.chunk_ms} ms already exists with "
                             f"other options: {told}. Pass the same options everywhere, or build your own "
                             "Engine(...) and hand it to each service with engine=.")

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

    async def warm_up(self, seconds: float = 1.0) -> float:
        """Run one utterance of silence through the whole path (first steps allocate and initialise kernels, ~1-2 s
        on a CPU), so the first caller does not pay for it. Returns the seconds it took; servers call it at start."""
        await self.ready()
        started = time.perf_counter()
        stream = self.open_stream(language="auto")
        try:
            stream.feed(np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32))
            stream.finalize()
            async for result in stream:
                if isinstance(result, Final):
                    break
        finally:
            stream.close()
        return time.perf_counter() - started

    def close(self) -> None:
        """Stop the engine thread; open streams end."""
        with self._lock:
            self._running = False
            self._stopped = self._stopped or "closed"
            streams = list(self._streams.values())
            self._wakeup.notify_all()
        for stream in streams:
            self._close_stream(stream)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self._unregister()

    def _unregister(self) -> None:
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
    def health(self) -> str:
        """"loading", "ready", "load failed: …", "stopped: …" (the thread ended) or "closed"."""
        if not self._ready.is_set():
            return "loading"
        if self._load_error is not None:
            return f"load failed: {self._load_error}"
        if self._stopped is not None:
            return self._stopped if self._stopped == "closed" else f"stopped: {self._stopped}"
        return "ready" if self._thread.is_alive() else "stopped: the engine thread is gone"

    @property
    def alive(self) -> bool:
        """Loaded and its thread serving streams."""
        return self.health == "ready"

    @property
    def alive_or_loading(self) -> bool:
        return self.health in ("ready", "loading")

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def free_slots(self) -> int:
        """Calls the engine can still take (unreserved slots); 0 when it is not alive."""
        return self._capacity.free if self.alive else 0

    @property
    def lagging(self) -> bool:
        """Stepping audio more than `max_admission_lag_s` behind real time (measured within the last 2 s)."""
        stats = self.stats
        return (self.max_admission_lag_s is not None and stats.last_lag_s > self.max_admission_lag_s
                and time.monotonic() - stats.last_step_at < 2.0)

    @property
    def has_capacity(self) -> bool:
        """Whether `try_reserve()` would succeed now (for a SIP OPTIONS answer or a health check)."""
        return self.free_slots > 0 and not self.lagging

    # ---- admission -----------------------------------------------------------------------
    def try_reserve(self) -> StreamReservation | None:
        """Reserve a stream for a call about to be answered; None when full or not alive.

        Hand it to `open_stream(reservation=...)` (or `NemotronSTTService(reservation=...)`) and
        `release()` it when the call is over, however it ended (idempotent)."""
        if not self.alive_or_loading or self.lagging:
            return None
        return self._capacity.try_reserve()

    def holds(self, reservation: StreamReservation) -> bool:
        """Whether `reservation` was made on this engine."""
        return reservation.capacity is self._capacity

    def reserve(self) -> StreamReservation:
        """Like `try_reserve`, but raises `CapacityError` when full (`StreamClosedError` when not alive)."""
        if not self.alive_or_loading:
            raise StreamClosedError(f"the engine is not serving ({self.health}).")
        if self.lagging:
            raise CapacityError(f"the engine lags {self.stats.last_lag_s:.1f} s behind real time (limit "
                                f"{self.max_admission_lag_s} s): refusing new calls until it catches up.")
        return self._capacity.reserve()

    # ---- streams -------------------------------------------------------------------------
    def open_stream(self, *, language: str = "auto", reservation: StreamReservation | None = None) -> Stream:
        """Open a stream with a locale from the model's prompt dictionary, or "auto".

        With a `reservation` the stream runs on it and closing the stream keeps it (the call may open
        another stream on it); without one the stream takes its own, released when it closes."""
        if not self._ready.is_set():
            raise NemotronEngineError("the model is still loading; await engine.ready() first.")
        self.wait_ready(0)
        prompt_index = self._prompt_index_for(language)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        own = reservation is None
        if own:
            reservation = self.reserve()
        elif not self.holds(reservation):
            raise StreamClosedError(f"{reservation!r} was made on another engine.")
        try:
            with self._lock:
                if not self._running:
                    raise StreamClosedError(f"the engine is not serving ({self.health}).")
                self._next_id += 1
                stream = Stream(self, stream_id=self._next_id, language=language, prompt_index=prompt_index,
                                loop=loop, reservation=reservation, owns_reservation=own,
                                detokenizer=Detokenizer(self._pieces))
                reservation.bind(stream)
                self._streams[stream.id] = stream
        except BaseException:
            if own:
                reservation.release()
            raise
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
        self._end_stream(stream, None)

    def _fail_stream(self, stream: Stream, error: BaseException) -> None:
        self._end_stream(stream, error)

    def _end_stream(self, stream: Stream, error: BaseException | None) -> None:
        """Close or fail a stream from any thread. Its slot is freed by the engine thread between steps."""
        with self._lock:
            if self._streams.pop(stream.id, None) is not None and stream.slot is not None:
                self._slots_to_free.append(stream.slot)
                self._wakeup.notify()
            if stream.closed:
                return  # ended before
            stream.closed = True
            if error is not None and stream.failed is None:
                stream.failed = error
            error = stream.failed  # also one recorded while the engine thread held the lock
        if error is not None:
            stream._results.put(error)
        stream._results.end()
        if stream.owns_reservation:
            stream.reservation.release()
        else:
            stream.reservation.unbind(stream)

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
        reason = "closed"
        try:
            self._serve()
        except BaseException as exc:  # a bug: never leave streams waiting on a dead thread
            logger.exception("the engine thread stopped")
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._stop_serving(reason)

    def _stop_serving(self, reason: str) -> None:
        with self._lock:
            self._running = False
            if self._stopped is None:
                self._stopped = reason
            streams = list(self._streams.values())
        if reason != "closed":
            error = EngineStepError(f"the engine stopped ({reason}); open a new stream to continue.")
            for stream in streams:
                self._fail_stream(stream, error)
            self._unregister()

    def _serve(self) -> None:
        while True:
            with self._lock:
                jobs = self._next_jobs()
                while not jobs and self._running and not self._failed_while_collecting:
                    self._wakeup.wait()
                    jobs = self._next_jobs()
                failed, self._failed_while_collecting = self._failed_while_collecting, []
                if not self._running:
                    return
            for stream, error in failed:
                self._fail_stream(stream, error)
            try:
                self._execute(jobs)
            except Exception as exc:  # outside the per-stream guards: these streams fail, the engine goes on
                logger.exception("engine tick failed for %d streams", len(jobs))
                error = EngineStepError(f"engine failure: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                for job in jobs:
                    self._fail_stream(job.stream, error)

    def _load(self) -> None:
        torch.set_num_threads(self.threads)
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
        with self._step_lock:
            self._encoder_step = self._build_encoder_step()
        self._pool = SlotPool(self._encoder_step, n_mels=self.model.preprocessor.featurizer.nfilt,
                              pre_encode_frames=self.spec.pre_encode_cache_frames, slots=self.max_streams,
                              device=self.device)
        self._pieces = PieceTable(self.model.tokenizer)
        if not self._pieces.incremental:
            logger.info("tokenizer pieces do not join into its text: each step decodes the whole hypothesis")
        logger.info("engine ready: %s, %d ms chunks (att_context_size %s), %s, %s encoder step (%s), %d slots of "
                    "%.1f MB, %d CPU thread(s)", self.model_name, self.chunk_ms, list(self.spec.att_context_size),
                    self.device, self.encoder_step, self.precision, self.max_streams,
                    self._pool.bytes_per_slot / 1e6, torch.get_num_threads())

    def _build_encoder_step(self):
        """The fast conformer step where the encoder has the structure it knows, else NeMo's (model lock held)."""
        encoder = self.model.encoder
        reason = unsupported_reason(encoder) if self.encoder_step_request != "nemo" else "encoder_step='nemo'"
        if reason is None:
            if self.precision == "int8" and not str(self.device).startswith("cpu"):
                raise ModelLoadError("precision='int8' is for CPUs (torch's dynamic quantisation); on a GPU use "
                                     "precision='fp32' (the encoder runs in the model's dtype).")
            self.encoder_step = "fast"
            return FastEncoderStep(encoder, precision=self.precision)
        if self.encoder_step_request == "fast" or self.precision == "int8":
            raise ModelLoadError(f"the fast encoder step{' (needed for int8)' if self.precision == 'int8' else ''} "
                                 f"cannot run {self.model_name}: {reason}. Use encoder_step='auto' and fp32.")
        if self.encoder_step_request == "auto":
            logger.info("%s runs on NeMo's own encoder step: %s", self.model_name, reason)
        self.encoder_step = "nemo"
        return nemo_compat.NemoEncoderStep(encoder)

    def _next_jobs(self) -> list[_Job]:
        """Free the slots of streams ended since the last step, then collect ready streams (lock held).

        Freed here, between steps, a slot can never be scattered into by a step that gathered it
        for a stream that has since closed."""
        for slot in self._slots_to_free:
            self._pool.give_back(slot)
        self._slots_to_free.clear()
        return [] if self._pause_depth else self._collect_jobs()

    def _collect_jobs(self) -> list[_Job]:
        """Ready streams, least recently stepped first, up to max_batch (lock held)."""
        candidates = sorted(self._streams.values(), key=lambda s: s.last_step_at)
        jobs = []
        for stream in candidates:
            if len(jobs) >= self.max_batch:
                break
            try:
                job = self._job_for(stream)
            except Exception as exc:
                logger.exception("stream %d could not be prepared for a step", stream.id)
                self._fail_locked(stream, EngineStepError(f"preparing a step failed: {type(exc).__name__}: {exc}"))
                continue
            if job is not None:
                jobs.append(job)
        return jobs

    def _job_for(self, stream: Stream) -> _Job | None:
        if stream._finalize_due():
            tail = None
            if self.tail_chunks and stream.steps and stream.slot is not None:
                tail = TailSource.at(stream.frames_stepped, stream._take_window)
            return _Job(stream, step=False, tail=tail, prompt_index=stream._prompt_index or 0)
        if not stream._step_ready():
            return None
        if stream.slot is None:
            stream.slot = self._pool.take()
        frames = stream._next_chunk_frames()
        start = stream.frames_stepped
        first, end, offset = window_for(start, start + frames)
        job = _Job(stream, step=True, first=stream.steps == 0, window=stream._take_window(first, end),
                   offset=offset, frames=frames, prompt_index=stream._prompt_index or 0)
        if self.tail_chunks and stream._finalizes_at(start + frames):  # this step ends an utterance
            job.tail = TailSource.at(start + frames, stream._take_window)
        return job

    def _fail_locked(self, stream: Stream, error: BaseException) -> None:
        """Take a stream out while the lock is held; `_serve` fails it once the lock is released."""
        if self._streams.pop(stream.id, None) is not None and stream.slot is not None:
            self._slots_to_free.append(stream.slot)
        stream.failed = error
        self._failed_while_collecting.append((stream, error))

    def _execute(self, jobs: list[_Job]) -> None:
        steppers = [job for job in jobs if job.step]
        failed: set[int] = set()
        if steppers:
            started = time.perf_counter()
            try:
                self._step(steppers)
            except Exception as exc:  # isolate: only these streams fail, the engine goes on
                logger.exception("model step failed for %d streams", len(steppers))
                self.stats.failed_steps += 1
                error = EngineStepError(f"model step failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                for job in steppers:
                    self._fail_stream(job.stream, error)
                    failed.add(job.stream.id)
            else:
                self.stats.record_step(len(steppers), time.perf_counter() - started)
        tails = self._step_tails([job for job in jobs if job.tail is not None and job.stream.id not in failed])
        now = time.monotonic()
        for job in jobs:
            if job.stream.id in failed or job.stream.closed:
                continue
            try:
                results = self._after_step(job, now, tails.get(job.stream.id))
            except Exception as exc:  # one stream's post-step work: that stream fails, the others go on
                logger.exception("post-step work failed for stream %d", job.stream.id)
                error = EngineStepError(f"post-step work failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                self._fail_stream(job.stream, error)
                continue
            for result in results:
                job.stream._results.put(result)
        try:
            self._check_lag(jobs)
        except Exception:  # lag reporting must never stop the engine
            logger.exception("lag check failed")

    def _step_tails(self, jobs: list[_Job]) -> dict[int, list[int]]:
        """Tokens of each finalizing stream after its trailing silence (`tail.py`), by stream id.

        On an error the Finals are read without it (logged): the trailing context improves a Final, it must
        never cost one."""
        if not jobs:
            return {}
        try:
            index = torch.tensor([j.stream.slot for j in jobs], dtype=torch.long, device=self.device)
            caches = self._pool.gather(index)  # copies: never scattered back
            prompts = torch.tensor([j.prompt_index for j in jobs], dtype=torch.long, device=self.device)
            with self._step_lock:
                if list(self.model.encoder.att_context_size) != list(self.spec.att_context_size):
                    chunk_spec(self.model, self.chunk_ms)
                tokens = step_silence(model=self.model, encoder_step=self._encoder_step, spec=self.spec,
                                      mel=self._mel, caches=caches,
                                      hypotheses=[j.stream.hypothesis for j in jobs],
                                      sources=[j.tail for j in jobs], prompts=prompts, chunks=self.tail_chunks)
        except Exception:
            logger.exception("trailing context failed for %d finalizing streams; their Finals go without it",
                             len(jobs))
            return {}
        return {job.stream.id: ids for job, ids in zip(jobs, tokens)}

    def _after_step(self, job: _Job, now: float, tail_tokens: list[int] | None = None) -> list:
        """Detokenise the step's new tokens (outside the lock), then update the stream's state under it."""
        stream = job.stream
        if tail_tokens is not None:
            tokens = tail_tokens
        else:
            tokens = [int(t) for t in stream.hypothesis.y_sequence] if stream.hypothesis is not None else []
        raw = stream.detokenizer.update(tokens)
        with self._lock:
            if stream.closed:
                return []
            if job.step:
                stream.frames_stepped += job.frames
                stream.steps += 1
                stream._trim(max(0, (stream.frames_stepped - LEAD_FRAMES) * HOP))
                stream._measure_age(now)
            stream.last_step_at = now
            results = stream._after_step(tokens, raw)
            if self.reset_context_per_utterance and stream.slot is not None and any(
                    isinstance(r, Final) for r in results):
                self._pool.reset(stream.slot)
                stream.steps = 0  # the next utterance starts like a new stream
                stream.step_origin = stream.frames_stepped
        return results

    @torch.inference_mode()
    def _step(self, jobs: list[_Job]) -> None:
        """One batched model step; each job's stream gets its continued hypothesis."""
        spec = self.spec
        model = self.model
        first_jobs = [j for j in jobs if j.first]
        later_jobs = [j for j in jobs if not j.first]
        ordered = first_jobs + later_jobs
        index = torch.tensor([j.stream.slot for j in ordered], dtype=torch.long, device=self.device)
        caches, mel_cache = self._pool.gather(index)
        with self._step_lock:
            if list(model.encoder.att_context_size) != list(spec.att_context_size):
                chunk_spec(model, self.chunk_ms)
            x, x_len, new_mel_cache = self._subsample(first_jobs, later_jobs, mel_cache)
            encoded, encoded_len, caches = self._encoder_step(x, x_len, caches,
                                                              att_context_size=spec.att_context_size)
            prompts = torch.tensor([j.prompt_index for j in ordered], dtype=torch.long, device=self.device)
            encoded = nemo_compat.apply_prompts(model, encoded, prompts)
            hypotheses = nemo_compat.decode_step(model, encoded, encoded_len,
                                                 [j.stream.hypothesis for j in ordered])
        self._pool.scatter(index, caches, new_mel_cache)
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

    def _check_lag(self, jobs: list[_Job]) -> None:
        lag = max((job.stream.audio_age_s for job in jobs if job.step), default=0.0)
        now = time.monotonic()
        self.stats.last_lag_s = lag
        self.stats.max_lag_s = max(self.stats.max_lag_s, lag)
        self.stats.last_step_at = now
        if lag > self.lag_warning_s and now - self._lag_warned_at > 10.0:
            self._lag_warned_at = now
            logger.warning("engine lags %.1f s behind real time (last step %.0f ms for %d streams of %d ms): "
                           "use a larger chunk, fewer streams, or a GPU", lag, self.stats.last_step_ms,
                           self.stats.last_batch, self.chunk_ms)

"""NemotronSTTService in Pipecat pipelines, on the tiny model (text == the engine's own)."""

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest
from pipecat.frames.frames import (CancelFrame, ErrorFrame, STTMetadataFrame, InputAudioRawFrame, InterimTranscriptionFrame, STTUpdateSettingsFrame,
                                   TranscriptionFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.settings import STTSettings
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.transcriptions.language import Language

from pipecat_nemotron.stt import TTFS_P99_BY_CHUNK_MS, NemotronSTTService
from engine_support import final_of
from tiny import speechlike


@pytest.fixture
def engine(tiny_engine):
    return tiny_engine


class FeedSpy:
    """Records the 16 kHz audio a service hands to its engine stream."""

    def __init__(self, engine):
        self.samples = []
        self.streams = []
        original = engine.open_stream

        def open_stream(**kwargs):
            stream = original(**kwargs)
            feed = stream.feed

            def spy(audio):
                self.samples.append(np.frombuffer(bytes(audio), dtype="<i2").copy())
                feed(audio)

            stream.feed = spy
            self.streams.append(stream)
            return stream

        engine.open_stream = open_stream

    @property
    def audio(self):
        return np.concatenate(self.samples) if self.samples else np.zeros(0, dtype=np.int16)


def pcm_frames(audio: np.ndarray, rate: int, frame_ms: int = 20):
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    step = rate * frame_ms // 1000
    return [InputAudioRawFrame(audio=pcm[i:i + step].tobytes(), sample_rate=rate, num_channels=1)
            for i in range(0, len(pcm), step)]


def resample_float(audio: np.ndarray, rate: int) -> np.ndarray:
    from scipy.signal import resample_poly
    return resample_poly(audio, rate, 16000).astype(np.float32)


def utterance(audio, rate, pause=0.3):
    return [VADUserStartedSpeakingFrame(start_secs=0.2), *pcm_frames(audio, rate), SleepFrame(sleep=pause),
            VADUserStoppedSpeakingFrame(stop_secs=0.2), SleepFrame(sleep=pause)]


async def engine_final(engine, audio16, language="en-US"):
    return await final_of(engine, (np.clip(audio16, -1, 1) * 32767).astype(np.int16), language=language)


async def test_final_text_equals_engine_and_carries_language(engine):
    audio = speechlike(1.6, seed=3)
    stt = NemotronSTTService(engine=engine, language=Language.EN_US)
    down, _ = await run_test(stt, frames_to_send=utterance(audio, 16000),
                             pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    finals = [f for f in down if isinstance(f, TranscriptionFrame)]
    interims = [f for f in down if isinstance(f, InterimTranscriptionFrame)]
    assert len(finals) == 1 and finals[0].finalized and finals[0].language == Language.EN_US
    expected = await engine_final(engine, audio)
    assert finals[0].text == expected.text and expected.text
    assert interims and down.index(interims[0]) < down.index(finals[0])
    assert all(i.language == Language.EN_US for i in interims)
    assert len({i.text for i in interims}) == len(interims), "interims only when the text changes"
    metadata = [f for f in down if isinstance(f, STTMetadataFrame)]
    assert metadata and metadata[0].ttfs_p99_latency == pytest.approx(TTFS_P99_BY_CHUNK_MS[160])  # measured default


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
async def test_input_is_resampled_to_16k(engine, rate):
    seconds = 1.2
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * (t > 0.6)).astype(np.float32)  # silence, then a tone
    spy = FeedSpy(engine)
    stt = NemotronSTTService(engine=engine, language=Language.EN_US)
    await run_test(stt, frames_to_send=utterance(tone, rate),
                   pipeline_params=PipelineParams(audio_in_sample_rate=rate))
    fed = spy.audio.astype(np.float32) / 32768
    assert abs(len(fed) - seconds * 16000) <= 0.03 * 16000, len(fed)
    first, second = fed[:int(0.55 * 16000)], fed[int(0.65 * 16000):int(1.1 * 16000)]
    assert np.sqrt(np.mean(first ** 2)) < 0.01 < 0.15 < np.sqrt(np.mean(second ** 2))
    spectrum = np.abs(np.fft.rfft(second))
    assert abs(np.argmax(spectrum) * 16000 / len(second) - 440) < 5, "a relabelled rate would move the tone"


async def test_language_switch_applies_to_next_utterance(engine):
    first, second = speechlike(1.2, seed=4), speechlike(1.2, seed=5)
    stt = NemotronSTTService(engine=engine, language=Language.EN_US)
    frames = (utterance(first, 16000)
              + [STTUpdateSettingsFrame(delta=STTSettings(language=Language.DE_DE)), SleepFrame(sleep=0.1)]
              + utterance(second, 16000))
    down, _ = await run_test(stt, frames_to_send=frames, pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    finals = [f for f in down if isinstance(f, TranscriptionFrame)]
    assert [f.language for f in finals] == [Language.EN_US, Language.DE_DE]


async def test_two_pipelines_share_one_batch(engine):
    stts = [NemotronSTTService(engine=engine, language=lang) for lang in (Language.EN_US, Language.ES_ES)]
    frames = [utterance(speechlike(2.0, seed=6 + i), 16000) for i in range(2)]
    await asyncio.gather(*(run_test(stt, frames_to_send=f, pipeline_params=PipelineParams(audio_in_sample_rate=16000))
                           for stt, f in zip(stts, frames)))
    assert max(engine.stats.batch_sizes) == 2


async def test_event_loop_stays_responsive_while_engine_works(engine):
    lags = []

    async def probe():
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - started - 0.01)

    task = asyncio.ensure_future(probe())
    stt = NemotronSTTService(engine=engine, language=Language.EN_US)
    frames = utterance(speechlike(3.0, seed=9), 16000) + utterance(speechlike(3.0, seed=10), 16000)
    await run_test(stt, frames_to_send=frames, pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    task.cancel()
    assert engine.stats.steps > 20
    assert max(lags) < 0.25, f"event loop stalled {max(lags) * 1000:.0f} ms"


async def test_cancel_mid_utterance_frees_the_stream(engine):
    stt = NemotronSTTService(engine=engine, language=Language.EN_US)
    frames = [VADUserStartedSpeakingFrame(start_secs=0.2), *pcm_frames(speechlike(1.0, seed=12), 16000),
              SleepFrame(sleep=0.1), CancelFrame()]
    await run_test(stt, frames_to_send=frames, send_end_frame=False,
                   pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    await asyncio.sleep(0.1)
    assert engine.open_streams == 0 and engine.free_slots == engine.max_streams


async def test_unsupported_language_is_a_clear_error():
    with pytest.raises(ValueError, match="Supported: transcription-ready"):
        NemotronSTTService(model="demo", language=Language.SW)


@pytest.mark.parametrize("vad_stop", [True, False], ids=["end-right-after-vad-stop", "hang-up-mid-utterance"])
async def test_end_frame_loses_no_words(engine, vad_stop):
    # A caller hangs up: EndFrame follows at once, before the engine has caught up, or with the user still talking.
    audio = speechlike(2.0, seed=21)
    frames = [VADUserStartedSpeakingFrame(start_secs=0.2), *pcm_frames(audio, 16000)]
    if vad_stop:
        frames.append(VADUserStoppedSpeakingFrame(stop_secs=0.2))
    down, _ = await run_test(NemotronSTTService(engine=engine, language=Language.EN_US), frames_to_send=frames,
                             pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    finals = [f for f in down if isinstance(f, TranscriptionFrame)]
    expected = await engine_final(engine, audio)
    assert [f.text for f in finals] == [expected.text] and expected.text
    assert engine.open_streams == 0


# ---- faults, recovery, reservations, drain -------------------------------------------------------

def error_frames(*directions):
    return [f for frames in directions for f in frames if isinstance(f, ErrorFrame)]


@pytest.fixture
def failing_steps(monkeypatch):
    """`failing_steps(n)`: the next n model steps raise (n=-1: every step)."""
    from pipecat_nemotron.engine import nemo_compat

    decode = nemo_compat.decode_step
    remaining = {"n": 0}

    def flaky(*args, **kwargs):
        if remaining["n"]:
            remaining["n"] -= 1
            raise RuntimeError("injected step failure")
        return decode(*args, **kwargs)

    monkeypatch.setattr(nemo_compat, "decode_step", flaky)

    def arm(n):
        remaining["n"] = n
    return arm


async def test_a_failed_stream_gives_one_error_and_the_next_utterance_is_transcribed(engine, failing_steps):
    first, second = speechlike(1.0, seed=31), speechlike(1.4, seed=32)
    expected = await engine_final(engine, second)

    class FailFirstStep(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, VADUserStartedSpeakingFrame) and not hasattr(self, "armed"):
                self.armed = True
                failing_steps(1)
            await self.push_frame(frame, direction)

    stt = NemotronSTTService(engine=engine, language=Language.EN_US)
    down, up = await run_test(Pipeline([FailFirstStep(), stt]),
                              frames_to_send=utterance(first, 16000) + utterance(second, 16000),
                              pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    errors = error_frames(down, up)
    assert len(errors) == 1 and "transcribing again" in errors[0].error
    finals = [f for f in down if isinstance(f, TranscriptionFrame)]
    assert [f.text for f in finals] == [expected.text] and expected.text
    await asyncio.sleep(0.05)
    assert engine.open_streams == 0 and engine.free_slots == engine.max_streams


async def test_a_stream_that_keeps_failing_ends_in_one_fatal_error_not_one_per_frame(engine, failing_steps):
    from pipecat_nemotron.stt import MAX_STREAM_RESTARTS

    failing_steps(-1)
    frames = []
    for seed in range(MAX_STREAM_RESTARTS + 3):
        frames += utterance(speechlike(0.8, seed=40 + seed), 16000, pause=0.15)
    stt = NemotronSTTService(engine=engine, language=Language.EN_US)
    down, up = await run_test(stt, frames_to_send=frames, pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    errors = error_frames(down, up)
    assert len(errors) == MAX_STREAM_RESTARTS + 1, [e.error for e in errors]
    assert "giving up" in errors[-1].error and not any("giving up" in e.error for e in errors[:-1])
    failing_steps(0)
    await asyncio.sleep(0.05)
    assert engine.open_streams == 0 and engine.free_slots == engine.max_streams


@pytest.mark.parametrize("ending", ["end", "cancel", "failure"])
async def test_a_given_reservation_is_released_exactly_once_however_the_call_ends(engine, failing_steps, ending):
    reservation = engine.try_reserve()
    stt = NemotronSTTService(engine=engine, reservation=reservation, language=Language.EN_US)
    frames = [VADUserStartedSpeakingFrame(start_secs=0.2), *pcm_frames(speechlike(0.8, seed=51), 16000),
              SleepFrame(sleep=0.3)]
    if ending == "failure":
        failing_steps(-1)
    if ending == "cancel":
        frames.append(CancelFrame())
    await run_test(stt, frames_to_send=frames, send_end_frame=ending != "cancel",
                   pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    failing_steps(0)
    assert reservation.released and engine.free_slots == engine.max_streams
    reservation.release()
    assert engine.free_slots == engine.max_streams


async def test_a_service_beyond_capacity_fails_fatally_at_start(engine):
    held = [engine.try_reserve() for _ in range(engine.max_streams)]
    stt = NemotronSTTService(engine=engine, language=Language.EN_US)
    down, up = await run_test(stt, frames_to_send=[SleepFrame(sleep=0.05)],
                              pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    errors = error_frames(down, up)
    assert len(errors) == 1 and "could not start" in errors[0].error and "stream slots" in errors[0].error
    for reservation in held:
        reservation.release()


async def test_stop_releases_the_stream_on_the_python_3_10_timeout_path(engine, monkeypatch):
    """On Python 3.10 asyncio.wait_for raises asyncio.TimeoutError, which is not the builtin TimeoutError."""
    import pipecat_nemotron.stt as stt_module

    class Py310TimeoutError(Exception):
        pass

    async def times_out(awaitable, timeout):
        awaitable.close()
        raise Py310TimeoutError()

    # stt.py's own view of asyncio, as on 3.10: wait_for raises a TimeoutError that is not the builtin one
    py310 = SimpleNamespace(**{name: getattr(asyncio, name) for name in dir(asyncio) if not name.startswith("__")})
    py310.TimeoutError, py310.wait_for = Py310TimeoutError, times_out
    monkeypatch.setattr(stt_module, "asyncio", py310)
    frames = [VADUserStartedSpeakingFrame(start_secs=0.2), *pcm_frames(speechlike(1.0, seed=61), 16000),
              VADUserStoppedSpeakingFrame(stop_secs=0.2)]
    with engine.paused():  # the final cannot be ready when EndFrame arrives
        await run_test(NemotronSTTService(engine=engine, language=Language.EN_US), frames_to_send=frames,
                       pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    await asyncio.sleep(0.05)
    assert engine.open_streams == 0 and engine.free_slots == engine.max_streams


async def test_hang_up_while_the_engine_lags_waits_for_the_backlog_not_a_fixed_time(engine, monkeypatch):
    """10 s of speech arrive at once and each step takes ~0.15 s: the final needs ~9 s, more than the old
    fixed 5 s. It must not be thrown away while the engine still works."""
    from pipecat_nemotron.engine import nemo_compat

    audio = speechlike(10.0, seed=71)
    expected = await engine_final(engine, audio)
    decode = nemo_compat.decode_step

    def slow(*args, **kwargs):
        time.sleep(0.14)
        return decode(*args, **kwargs)

    monkeypatch.setattr(nemo_compat, "decode_step", slow)
    frames = [VADUserStartedSpeakingFrame(start_secs=0.2), *pcm_frames(audio, 16000),
              VADUserStoppedSpeakingFrame(stop_secs=0.2)]
    started = time.perf_counter()
    down, _ = await run_test(NemotronSTTService(engine=engine, language=Language.EN_US), frames_to_send=frames,
                             pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    finals = [f for f in down if isinstance(f, TranscriptionFrame)]
    assert [f.text for f in finals] == [expected.text] and expected.text
    assert time.perf_counter() - started > 5.0  # the case the fixed bound lost


async def test_a_stalled_engine_is_given_up_on_with_the_untranscribed_seconds_logged(engine):
    from loguru import logger

    lines = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    frames = [VADUserStartedSpeakingFrame(start_secs=0.2), *pcm_frames(speechlike(3.0, seed=81), 16000),
              VADUserStoppedSpeakingFrame(stop_secs=0.2)]
    try:
        with engine.paused():  # nothing is stepped: no progress, so the wait ends at the bound
            started = time.perf_counter()
            await run_test(NemotronSTTService(engine=engine, language=Language.EN_US), frames_to_send=frames,
                           pipeline_params=PipelineParams(audio_in_sample_rate=16000))
            waited = time.perf_counter() - started
    finally:
        logger.remove(sink)
    assert any("s of the caller's audio were not transcribed" in line and "3.1 s" in line for line in lines), lines
    assert waited < 30
    await asyncio.sleep(0.05)
    assert engine.open_streams == 0


async def test_a_pause_in_the_audio_s_arrival_does_not_change_what_the_engine_hears(engine):
    """Frames that come late (a busy event loop, network jitter, a fast replay) are the same audio, bit for bit: the
    resampler is not reset by the wall clock (Pipecat's default drops its filter history after 0.2 s without audio)
    and does not dither (Pipecat's libsoxr int16 output adds random ±1-2 LSB, different every run)."""
    audio = resample_float(speechlike(1.4, seed=8), 8000)
    heard = []
    for pause in (0.0, 0.35):
        spy = FeedSpy(engine)
        frames = pcm_frames(audio, 8000)
        middle = len(frames) // 2
        stt = NemotronSTTService(engine=engine, language=Language.EN_US)
        await run_test(stt, frames_to_send=[VADUserStartedSpeakingFrame(start_secs=0.2), *frames[:middle],
                                            SleepFrame(sleep=pause), *frames[middle:],
                                            VADUserStoppedSpeakingFrame(stop_secs=0.2), SleepFrame(sleep=0.3)],
                       pipeline_params=PipelineParams(audio_in_sample_rate=8000))
        heard.append(spy.audio)
    assert len(heard[0]) == len(heard[1]) and np.array_equal(heard[0], heard[1])


@pytest.mark.parametrize("buffer_s", [None, 0.81])
async def test_audio_that_comes_while_the_model_loads_is_held_bounded_and_transcribed(engine, tiny_model, monkeypatch,
                                                                                      buffer_s):
    """Without preload(): the pipeline is not held up by the load (frames flow on at once), the caller's audio is
    kept (at most LOADING_BUFFER_S, the oldest dropped first) and the first utterance is transcribed like any other."""
    import pipecat_nemotron.engine.scheduler as scheduler
    import pipecat_nemotron.stt as stt_module

    original = scheduler.load_model
    loaded_at = []

    def slow_load(source, *, device):
        time.sleep(1.5)
        model = original(source, device=device)
        loaded_at.append(time.monotonic())
        return model

    monkeypatch.setattr(scheduler, "load_model", slow_load)
    if buffer_s is not None:
        monkeypatch.setattr(stt_module, "LOADING_BUFFER_S", buffer_s)
    audio = speechlike(1.6, seed=3)
    seen = []

    class Clock(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, InputAudioRawFrame) and not seen:
                seen.append(time.monotonic())
            await self.push_frame(frame, direction)

    stt = NemotronSTTService(model=tiny_model, chunk_ms=160, device="cpu", language=Language.EN_US, max_streams=2)
    try:
        down, _ = await run_test(Pipeline([stt, Clock()]), frames_to_send=utterance(audio, 16000, pause=2.0),
                                 pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    finally:
        if stt.engine is not None:
            stt.engine.close()
    assert seen and loaded_at and seen[0] < loaded_at[0], "audio should flow on while the model loads"
    finals = [f for f in down if isinstance(f, TranscriptionFrame)]
    assert len(finals) == 1 and finals[0].language == Language.EN_US
    if buffer_s is None:
        assert finals[0].text == (await engine_final(engine, audio)).text
    else:  # only the newest 40 frames (0.8 s) were kept
        kept = (await engine_final(engine, audio[-int(0.8 * 16000):])).text
        assert finals[0].text == kept and finals[0].text != (await engine_final(engine, audio)).text

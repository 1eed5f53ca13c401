"""NemotronSTTService in Pipecat pipelines, on the tiny model (text == the engine's own)."""

import asyncio
import time

import numpy as np
import pytest
from pipecat.frames.frames import (CancelFrame, STTMetadataFrame, InputAudioRawFrame, InterimTranscriptionFrame, STTUpdateSettingsFrame,
                                   TranscriptionFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)
from pipecat.pipeline.worker import PipelineParams
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

"""The service's resampler: Pipecat's libsoxr stream, minus the dither and the wall-clock reset."""

import numpy as np
import pytest
from pipecat.audio.utils import create_stream_resampler

from pipecat_nemotron.resampler import DeterministicStreamResampler
from tiny import speechlike


def pcm(rate: int) -> np.ndarray:
    from scipy.signal import resample_poly
    return (np.clip(resample_poly(speechlike(1.4, seed=8), rate, 16000), -1, 1) * 32767).astype(np.int16)


async def run(resampler, audio: np.ndarray, rate: int) -> np.ndarray:
    step = rate // 50
    out = [await resampler.resample(audio[i:i + step].tobytes(), rate, 16000) for i in range(0, len(audio), step)]
    out.append(await resampler.flush())
    return np.frombuffer(b"".join(out), dtype=np.int16)


@pytest.mark.parametrize("rate", [8000, 48000])
async def test_the_same_audio_resamples_to_the_same_samples_and_to_pipecat_s_up_to_its_dither(rate):
    audio = pcm(rate)
    runs = [await run(DeterministicStreamResampler(), audio, rate) for _ in range(4)]
    assert all(np.array_equal(r, runs[0]) for r in runs)
    assert abs(len(runs[0]) - len(audio) * 16000 // rate) <= 1
    pipecat = [await run(create_stream_resampler(clear_after_secs=None), audio, rate) for _ in range(4)]
    assert len(pipecat[0]) == len(runs[0])
    assert np.abs(pipecat[0].astype(int) - runs[0]).max() <= 3, "same libsoxr filter, only the dither differs"


async def test_one_resampler_serves_one_pair_of_rates():
    resampler = DeterministicStreamResampler()
    await resampler.resample(pcm(8000)[:160].tobytes(), 8000, 16000)
    with pytest.raises(ValueError, match="8000 -> 16000"):
        await resampler.resample(pcm(8000)[:160].tobytes(), 48000, 16000)
    assert await resampler.resample(b"\x01\x00", 16000, 16000) == b"\x01\x00"

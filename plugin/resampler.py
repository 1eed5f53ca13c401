"""A stream resampler whose output depends only on its input.

Pipecat's `SOXRStreamAudioResampler` (what `create_stream_resampler()` returns) has two behaviours that make the
same call give a different transcript run to run, measured with Pipecat 1.14 and python-soxr 1.0:

* it runs libsoxr with int16 output, for which libsoxr's default is TPDF dither: random ±1-2 LSB on ~45 % of the
  samples, different every run (four runs of one 1.4 s utterance at 8 -> 16 kHz: 0, 9974, 9974, 9974 samples
  differ from the first; float32 output: identical);
* by default it clears its filter after 0.2 s of wall-clock time without audio, so a busy event loop or network
  jitter drops the filter's history (~37 ms of audio per reset at 8 kHz).

This one resamples in float32 (no dither) and rounds to int16 itself, and never clears by the clock. It is
otherwise the same libsoxr stream at the same quality, with Pipecat's `resample` / `flush` / `reset` API.
"""

from __future__ import annotations

import numpy as np
import soxr
from pipecat.audio.resamplers.base_audio_resampler import BaseAudioResampler


class DeterministicStreamResampler(BaseAudioResampler):
    """libsoxr stream resampling of 16-bit mono PCM, bit-exact run to run (see the module docstring).

    Args (keyword-only):
        quality: libsoxr preset, "VHQ" (Pipecat's default), "HQ", "MQ", "LQ" or "QQ".
    """

    def __init__(self, *, quality: str = "VHQ"):
        self._quality = quality
        self._rates: tuple[int, int] | None = None
        self._stream: soxr.ResampleStream | None = None

    async def resample(self, audio: bytes, in_rate: int, out_rate: int) -> bytes:
        """Resample `audio` (int16 bytes) from `in_rate` to `out_rate`; the filter's delay is held until `flush`."""
        if in_rate == out_rate:
            return audio
        stream = self._stream_for(in_rate, out_rate)
        samples = np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768.0
        return _to_pcm16(stream.resample_chunk(samples))

    async def flush(self) -> bytes:
        """Emit the audio held in the filter and start afresh (the next audio is a new stretch)."""
        if self._stream is None:
            return b""
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        return _to_pcm16(tail)

    async def reset(self):
        """Discard the audio held in the filter."""
        if self._stream is not None:
            self._stream.clear()

    def _stream_for(self, in_rate: int, out_rate: int) -> soxr.ResampleStream:
        if self._stream is None:
            self._rates = (in_rate, out_rate)
            self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=self._quality)
        elif self._rates != (in_rate, out_rate):
            raise ValueError(f"this resampler converts {self._rates[0]} -> {self._rates[1]} Hz, "
                             f"not {in_rate} -> {out_rate}; use one per stream")
        return self._stream


def _to_pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()

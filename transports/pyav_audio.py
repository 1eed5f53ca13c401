"""Mono 16-bit PCM ↔ codec packets through PyAV (FFmpeg's codecs), one encoder or decoder per call direction.

G.722 (``g722.py``) and Opus (``opus.py``) are stateful (ADPCM predictors, Opus' range coder and lookahead), so
each call direction owns one :class:`PyAVEncoder` / :class:`PyAVDecoder`. PCM is little-endian int16 bytes.
"""

from __future__ import annotations

import fractions

import numpy as np
from av import AudioFrame, CodecContext, Packet


class CodecError(ValueError):
    """A packet the decoder could not read (corrupt or not this codec)."""


class PyAVEncoder:
    """Whole frames of mono PCM16 at ``sample_rate`` → one encoded packet each."""

    def __init__(self, codec: str, *, sample_rate: int, bit_rate: int | None = None,
                 options: dict[str, str] | None = None):
        self.sample_rate = sample_rate
        self._context = CodecContext.create(codec, "w")
        self._context.format = "s16"
        self._context.layout = "mono"
        self._context.sample_rate = sample_rate
        self._context.time_base = fractions.Fraction(1, sample_rate)
        if bit_rate:
            self._context.bit_rate = bit_rate
        if options:
            self._context.options = options
        self._pts = 0

    def encode(self, pcm: bytes) -> bytes:
        """One frame of PCM (e.g. 20 ms) → the packet(s) the codec produced for it, concatenated."""
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate, frame.pts = self.sample_rate, self._pts
        self._pts += samples.shape[1]
        return b"".join(bytes(packet) for packet in self._context.encode(frame))


class PyAVDecoder:
    """Encoded packets → mono PCM16 at ``sample_rate`` (the decoder downmixes a stereo stream)."""

    def __init__(self, codec: str, *, sample_rate: int):
        self.sample_rate = sample_rate
        self._context = CodecContext.create(codec, "r")
        self._context.format = "s16"
        self._context.layout = "mono"
        self._context.sample_rate = sample_rate

    def decode(self, payload: bytes) -> bytes:
        """One RTP payload → its PCM; CodecError when the codec rejects it."""
        try:
            frames = self._context.decode(Packet(payload))
        except Exception as exc:  # FFmpeg's InvalidDataError and friends: a corrupt packet, not our bug
            raise CodecError(f"undecodable packet ({type(exc).__name__})") from None
        out = []
        for frame in frames:
            samples = frame.to_ndarray()
            if samples.dtype != np.int16 or samples.shape[0] != 1:  # planar or stereo despite asking for mono s16
                samples = _mono_s16(samples, frame)
            out.append(samples.reshape(-1).astype("<i2").tobytes())
        return b"".join(out)


def _mono_s16(samples: np.ndarray, frame) -> np.ndarray:
    if frame.format.is_planar:
        mixed = samples.astype(np.float64).mean(axis=0)
    else:
        mixed = samples.reshape(-1, len(frame.layout.channels)).astype(np.float64).mean(axis=1)
    if np.issubdtype(samples.dtype, np.floating):
        mixed = mixed * 32767.0
    return np.clip(np.round(mixed), -32768, 32767).astype(np.int16)


__all__ = ["CodecError", "PyAVDecoder", "PyAVEncoder"]

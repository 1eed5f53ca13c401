"""The audio codecs a call can use, by SDP encoding name: rates, SDP spelling, and a per-call encoder/decoder.

| name | RTP clock | audio | SDP | module |
|---|---|---|---|---|
| PCMU, PCMA | 8000 | 8 kHz | static 0 / 8 | ``g711.py`` (audioop) |
| G722 | 8000 (RFC 3551's historical value) | 16 kHz | static 9 | ``g722.py`` (FFmpeg via PyAV) |
| OPUS | 48000 | 48 kHz mono | dynamic, ``opus/48000/2`` | ``opus.py`` (libopus via PyAV) |

``sample_rate`` is the PCM rate a :class:`MediaCodec` takes and gives; ``clock_rate`` is what the RTP timestamp
counts (a 20 ms G.722 packet: 320 samples, timestamp +160).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import g711, g722, opus
from .pyav_audio import CodecError


@dataclass(frozen=True)
class CodecSpec:
    """How a codec appears in SDP and on the RTP clock."""

    name: str  # upper-case encoding name, as the SDP parser stores it
    sdp_name: str  # as we write it in a=rtpmap
    clock_rate: int
    sample_rate: int
    channels: int = 1
    static_payload_type: int | None = None
    fmtp: str | None = None

    @property
    def rtpmap(self) -> str:
        """``PCMU/8000``, ``G722/8000``, ``opus/48000/2``."""
        text = f"{self.sdp_name}/{self.clock_rate}"
        return text + (f"/{self.channels}" if self.channels != 1 else "")

    def samples(self, ptime_ms: int) -> int:
        """PCM samples in one packet of ``ptime_ms``."""
        return self.sample_rate * ptime_ms // 1000

    def ticks(self, ptime_ms: int) -> int:
        """RTP timestamp increment of one packet of ``ptime_ms``."""
        return self.clock_rate * ptime_ms // 1000


SPECS: dict[str, CodecSpec] = {
    "PCMU": CodecSpec("PCMU", "PCMU", 8000, 8000, static_payload_type=0),
    "PCMA": CodecSpec("PCMA", "PCMA", 8000, 8000, static_payload_type=8),
    "G722": CodecSpec("G722", "G722", g722.CLOCK_RATE, g722.SAMPLE_RATE, static_payload_type=g722.PAYLOAD_TYPE),
    "OPUS": CodecSpec("OPUS", "opus", opus.CLOCK_RATE, opus.SAMPLE_RATE, channels=opus.CHANNELS, fmtp=opus.FMTP),
}
DEFAULT_CODECS = ("PCMU", "PCMA", "G722", "OPUS")  # what we accept, in the caller's order; our own offer's order
OPUS_DYNAMIC_PAYLOAD_TYPE = 111


class _G711:
    def __init__(self, name: str):
        self._name = name

    def encode(self, pcm: bytes) -> bytes:
        return g711.encode(pcm, self._name)

    def decode(self, payload: bytes) -> bytes:
        return g711.decode(payload, self._name)


class MediaCodec:
    """One call's encoder and decoder for a codec (G.722 and Opus keep state across packets)."""

    def __init__(self, name: str):
        try:
            self.spec = SPECS[name]
        except KeyError:
            raise ValueError(f"unsupported codec {name}") from None
        if name in ("PCMU", "PCMA"):
            self._encoder = self._decoder = _G711(name)
        elif name == "G722":
            self._encoder, self._decoder = g722.G722Encoder(), g722.G722Decoder()
        else:
            self._encoder, self._decoder = opus.OpusEncoder(), opus.OpusDecoder()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def sample_rate(self) -> int:
        return self.spec.sample_rate

    def encode(self, pcm: bytes) -> bytes:
        """One packet's PCM16 at ``sample_rate`` → payload."""
        return self._encoder.encode(pcm)

    def decode(self, payload: bytes) -> bytes:
        """One payload → PCM16 at ``sample_rate``; CodecError for a corrupt one."""
        return self._decoder.decode(payload)


__all__ = ["CodecError", "CodecSpec", "DEFAULT_CODECS", "MediaCodec", "OPUS_DYNAMIC_PAYLOAD_TYPE", "SPECS"]

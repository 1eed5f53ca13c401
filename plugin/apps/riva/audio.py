"""Audio of a Riva stream -> 16 kHz PCM16 for the engine: LINEAR_PCM, MULAW or ALAW at any rate, WAV headers stripped.

`riva.client`'s file scripts send `encoding=0` and `sample_rate_hertz=0` and put the file's RIFF header in the first
audio message; Pipecat's `NvidiaSTTService` sends headerless LINEAR_PCM at the pipeline rate.
"""

from __future__ import annotations

import struct

try:
    import audioop  # stdlib up to Python 3.12
except ImportError:  # pragma: no cover - Python 3.13+: the audioop-lts backport
    import audioop  # type: ignore[no-redef]

from ...resampler import DeterministicStreamResampler

LINEAR_PCM, MULAW, ALAW = 1, 3, 5  # riva_audio_pb2.AudioEncoding
ENCODING_NAMES = {0: "ENCODING_UNSPECIFIED", LINEAR_PCM: "LINEAR_PCM", MULAW: "MULAW", ALAW: "ALAW"}
WAV_FORMATS = {1: LINEAR_PCM, 6: ALAW, 7: MULAW}  # WAVE format tags
MIN_RATE, MAX_RATE = 8000, 96000
ENGINE_RATE = 16000
MAX_HEADER_BYTES = 4096


class AudioConfigError(ValueError):
    """The stream's audio settings cannot be served (the message says what can)."""


class StreamAudio:
    """Turns one stream's `audio_content` messages into 16 kHz PCM16 bytes, in order, keeping odd bytes between them."""

    def __init__(self, *, encoding: int, sample_rate: int):
        if encoding not in ENCODING_NAMES:
            raise AudioConfigError(f"encoding {encoding} is not served; use LINEAR_PCM, MULAW or ALAW")
        if sample_rate and not MIN_RATE <= sample_rate <= MAX_RATE:
            raise AudioConfigError(f"sample_rate_hertz {sample_rate} is out of range ({MIN_RATE}-{MAX_RATE}, or 0 "
                                   "with a WAV header)")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self._first = True
        self._pending = b""
        self._resampler = DeterministicStreamResampler()

    @property
    def width(self) -> int:
        return 2 if self.encoding in (LINEAR_PCM, 0) else 1

    async def convert(self, data: bytes) -> bytes:
        """16 kHz PCM16 for the next `audio_content` (possibly empty while a header or an odd byte waits)."""
        if self._first:
            data = self._pending + data
            if data[:4] == b"RIFF":
                if len(data) < 12 or (b"data" not in data[:MAX_HEADER_BYTES] and len(data) < MAX_HEADER_BYTES):
                    self._pending = data
                    return b""
                data = self._strip_header(data)
            elif not self.encoding or not self.sample_rate:
                raise AudioConfigError("encoding and sample_rate_hertz are required for audio without a WAV header")
            self._first, self._pending = False, b""
        else:
            data = self._pending + data
        usable = len(data) - len(data) % self.width
        data, self._pending = data[:usable], data[usable:]
        if self.encoding == MULAW:
            data = audioop.ulaw2lin(data, 2)
        elif self.encoding == ALAW:
            data = audioop.alaw2lin(data, 2)
        return await self._resampler.resample(data, self.sample_rate, ENGINE_RATE)

    async def flush(self) -> bytes:
        """What the resampler still holds (at the end of an utterance)."""
        return await self._resampler.flush()

    def _strip_header(self, data: bytes) -> bytes:
        """Read fmt (format, channels, rate, bits) and return the bytes after the data chunk's header."""
        if data[8:12] != b"WAVE":
            raise AudioConfigError("audio starts with RIFF but is not a WAVE file")
        position, fmt = 12, None
        while position + 8 <= len(data):
            chunk, size = data[position:position + 4], struct.unpack("<I", data[position + 4:position + 8])[0]
            if chunk == b"fmt ":
                fmt = struct.unpack("<HHIIHH", data[position + 8:position + 24])
            elif chunk == b"data":
                if fmt is None:
                    raise AudioConfigError("WAV data chunk before its fmt chunk")
                self._apply_fmt(*fmt)
                return data[position + 8:]
            position += 8 + size + (size & 1)
            if position > MAX_HEADER_BYTES:
                break
        raise AudioConfigError(f"no WAV data chunk in the first {MAX_HEADER_BYTES} bytes")

    def _apply_fmt(self, tag: int, channels: int, rate: int, _byte_rate: int, _align: int, bits: int) -> None:
        encoding = WAV_FORMATS.get(tag)
        if encoding is None or channels != 1 or (encoding == LINEAR_PCM and bits != 16):
            raise AudioConfigError(f"WAV format {tag} with {channels} channel(s) and {bits} bits is not served; "
                                   "send mono 16-bit PCM, μ-law or A-law")
        if self.encoding and self.encoding != encoding:
            raise AudioConfigError(f"the WAV header says {ENCODING_NAMES[encoding]} but the config says "
                                   f"{ENCODING_NAMES[self.encoding]}")
        if self.sample_rate and self.sample_rate != rate:
            raise AudioConfigError(f"the WAV header says {rate} Hz but the config says {self.sample_rate} Hz")
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioConfigError(f"WAV sample rate {rate} is out of range ({MIN_RATE}-{MAX_RATE})")
        self.encoding, self.sample_rate = encoding, rate

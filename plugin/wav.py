"""Reading WAV files as telephony and WebRTC deliver them: PCM 8-32 bit, float, G.711 μ-law / A-law."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .transports import g711

FORMAT_PCM, FORMAT_FLOAT, FORMAT_ALAW, FORMAT_MULAW, FORMAT_EXTENSIBLE = 1, 3, 6, 7, 0xFFFE
FORMAT_NAMES = {FORMAT_PCM: "PCM", FORMAT_FLOAT: "float", FORMAT_ALAW: "A-law", FORMAT_MULAW: "μ-law"}


class WavError(ValueError):
    """The file is not a WAV this reader understands; the message says why."""


@dataclass(frozen=True)
class Wav:
    """Mono int16 samples of a WAV file and what they were encoded as."""

    samples: np.ndarray
    sample_rate: int
    encoding: str
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def read_wav(path: str | Path) -> Wav:
    """Decode a WAV file to mono int16 (channels averaged)."""
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError(f"{path}: not a RIFF/WAVE file")
    fmt, payload = None, None
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        body = data[offset + 8:offset + 8 + size]
        if chunk_id == b"fmt ":
            fmt = body
        elif chunk_id == b"data":
            payload = body
        offset += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16:
        raise WavError(f"{path}: no valid 'fmt ' chunk")
    if payload is None:
        raise WavError(f"{path}: no 'data' chunk")
    tag, channels, rate, _, block_align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == FORMAT_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]
    if channels < 1 or rate < 1000 or block_align < 1:
        raise WavError(f"{path}: implausible header ({channels} channels, {rate} Hz)")
    payload = payload[:len(payload) - len(payload) % block_align]
    samples = _decode(tag, bits, payload, path)
    if channels > 1:
        samples = samples[:len(samples) - len(samples) % channels].reshape(-1, channels).astype(np.int32)
        samples = samples.mean(axis=1).astype(np.int16)
    return Wav(samples, rate, f"{FORMAT_NAMES.get(tag, tag)} {bits}-bit" if tag in (1, 3) else FORMAT_NAMES[tag],
               channels)


def _decode(tag: int, bits: int, payload: bytes, path) -> np.ndarray:
    if tag == FORMAT_MULAW:
        return np.frombuffer(g711.decode(payload, "PCMU"), dtype="<i2").copy()
    if tag == FORMAT_ALAW:
        return np.frombuffer(g711.decode(payload, "PCMA"), dtype="<i2").copy()
    if tag == FORMAT_PCM and bits in (8, 16, 24, 32):
        if bits == 8:
            return ((np.frombuffer(payload, dtype=np.uint8).astype(np.int16) - 128) << 8).astype(np.int16)
        return np.frombuffer(g711.audioop.lin2lin(payload, bits // 8, 2), dtype="<i2").copy()
    if tag == FORMAT_FLOAT and bits in (32, 64):
        floats = np.frombuffer(payload, dtype="<f4" if bits == 32 else "<f8")
        return (np.clip(np.nan_to_num(floats), -1, 1) * 32767).astype(np.int16)
    raise WavError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits); "
                   "use PCM, float, μ-law or A-law")


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int, *, encoding: str = "pcm") -> None:
    """Write mono int16 samples as 16-bit PCM, μ-law ("mulaw") or A-law ("alaw")."""
    pcm = np.asarray(samples, dtype=np.int16).tobytes()
    tag, bits, body = {"pcm": (FORMAT_PCM, 16, pcm), "mulaw": (FORMAT_MULAW, 8, g711.encode(pcm, "PCMU")),
                       "alaw": (FORMAT_ALAW, 8, g711.encode(pcm, "PCMA"))}[encoding]
    width = bits // 8
    fmt = struct.pack("<HHIIHH", tag, 1, sample_rate, sample_rate * width, width, bits)
    if tag != FORMAT_PCM:
        fmt += struct.pack("<H", 0)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body
    if len(body) & 1:
        chunks += b"\x00"
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)

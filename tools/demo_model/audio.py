"""Audio helpers: espeak-ng rendering, the telephony path, augmentation and mu-law WAV I/O."""

from __future__ import annotations

import audioop  # stdlib on Python <= 3.12 (deprecated, still present)
import io
import struct
import subprocess
import wave

import numpy as np
from scipy.signal import resample_poly

SR = 16000
TEL_SR = 8000


def espeak_render(text: str, voice: str, speed: int, pitch: int, amplitude: int, gap: int) -> np.ndarray:
    """Render ``text`` with espeak-ng; returns float32 mono audio at 16 kHz, silence-trimmed."""
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-a", str(amplitude),
           "-g", str(gap), "--stdout", text]
    wav_bytes = subprocess.run(cmd, check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav_bytes)) as w:
        sr = w.getframerate()
        n = w.getnframes()
        raw = w.readframes(n)
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if n == 0 or len(x) == 0:  # espeak-ng writes 0x7fffffff as length on pipes; wave copes, but be safe
        x = np.frombuffer(wav_bytes[44:], dtype="<i2").astype(np.float32) / 32768.0
    if sr != SR:
        g = np.gcd(sr, SR)
        x = resample_poly(x, SR // g, sr // g).astype(np.float32)
    return trim(x)


def trim(x: np.ndarray, thr: float = 1e-3, keep: int = 480) -> np.ndarray:
    idx = np.nonzero(np.abs(x) > thr)[0]
    if len(idx) == 0:
        return x
    return x[max(0, idx[0] - keep): idx[-1] + keep]


def to_int16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0 - 1 / 32768) * 32768.0).astype("<i2").tobytes()


def encode_mulaw_8k(x16: np.ndarray) -> bytes:
    """16 kHz float -> anti-aliased 8 kHz -> G.711 mu-law bytes."""
    x8 = resample_poly(x16, 1, 2)
    return audioop.lin2ulaw(to_int16(x8), 2)


def decode_mulaw_to_16k(ulaw: bytes, method: str = "poly") -> np.ndarray:
    """G.711 mu-law 8 kHz bytes -> float32 16 kHz ("poly": scipy polyphase, "ratecv": stdlib audioop)."""
    lin = audioop.ulaw2lin(ulaw, 2)
    if method == "ratecv":
        lin16, _ = audioop.ratecv(lin, 2, 1, TEL_SR, SR, None)
        return np.frombuffer(lin16, dtype="<i2").astype(np.float32) / 32768.0
    x8 = np.frombuffer(lin, dtype="<i2").astype(np.float32) / 32768.0
    return resample_poly(x8, 2, 1).astype(np.float32)


def telephony(x16: np.ndarray, method: str = "poly") -> np.ndarray:
    """The telephony path: 16 kHz -> 8 kHz -> mu-law -> 16 kHz."""
    return decode_mulaw_to_16k(encode_mulaw_8k(x16), method)[: len(x16)]


def write_mulaw_wav(path, ulaw: bytes, sr: int = TEL_SR) -> None:
    """Standard WAVE_FORMAT_MULAW (format tag 7) file, 8 bit, mono, with the 'fact' chunk non-PCM files carry."""
    n = len(ulaw)
    fmt = struct.pack("<HHIIHHH", 7, 1, sr, sr, 1, 8, 0)  # tag, channels, rate, byte rate, align, bits, cbSize
    fact = struct.pack("<I", n)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<I", 4) + fact
            + b"data" + struct.pack("<I", n) + ulaw + (b"\x00" if n % 2 else b""))
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)


def read_mulaw_wav(path) -> tuple[bytes, int]:
    """Read back a WAVE_FORMAT_MULAW file written by ``write_mulaw_wav`` (or any simple mu-law WAV)."""
    data = open(path, "rb").read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", path
    pos, sr, payload, tag = 12, None, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        chunk = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            tag, ch, sr = struct.unpack("<HHI", chunk[:8])
            assert ch == 1
        elif cid == b"data":
            payload = chunk
        pos += 8 + size + (size % 2)
    assert tag == 7, f"{path}: not mu-law (format tag {tag})"
    return payload, sr


def augment(x: np.ndarray, rng: np.random.Generator, p_tel: float = 0.5) -> np.ndarray:
    """Training augmentation: random lead/trail silence, telephony path, gain and light noise."""
    lead = np.zeros(int(rng.integers(0, int(0.3 * SR))), np.float32)
    trail = np.zeros(int(rng.integers(int(0.1 * SR), int(0.4 * SR))), np.float32)
    x = np.concatenate([lead, x, trail])
    peak = float(np.max(np.abs(x))) + 1e-6
    x = x * (rng.uniform(0.05, 0.9) / peak)
    if rng.random() < 0.6:
        snr_db = rng.uniform(20.0, 45.0)
        p = float(np.mean(x ** 2)) + 1e-10
        x = x + rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(p / 10 ** (snr_db / 10))
    if rng.random() < p_tel:
        x = telephony(x, "ratecv" if rng.random() < 0.3 else "poly")
    return x.astype(np.float32)

"""Reading audio files as telephony and WebRTC deliver them, through libsndfile (`soundfile`).

WAV with PCM 8/16/24/32-bit, 32/64-bit float, G.711 μ-law / A-law (and the ADPCM/GSM variants libsndfile decodes),
plus FLAC, OGG (Vorbis, Opus) and the other containers the installed libsndfile reads. Everything comes back as
mono int16 at the file's own rate (channels averaged); resampling is the pipeline's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

ACCEPTED = ("WAV (PCM 8/16/24/32-bit, float 32/64-bit, μ-law, A-law), FLAC, OGG Vorbis/Opus, "
            "and the other formats libsndfile reads (AIFF, AU, CAF, W64, RF64, ...)")
_WRITE_SUBTYPES = {"pcm": "PCM_16", "mulaw": "ULAW", "alaw": "ALAW"}
_SUBTYPE_NAMES = {"PCM_S8": "PCM 8-bit", "PCM_U8": "PCM 8-bit", "PCM_16": "PCM 16-bit", "PCM_24": "PCM 24-bit",
                  "PCM_32": "PCM 32-bit", "FLOAT": "float 32-bit", "DOUBLE": "float 64-bit", "ULAW": "μ-law",
                  "ALAW": "A-law"}
MIN_SAMPLE_RATE = 1000


class WavError(ValueError):
    """The file is not audio this reader understands; the message says why and which formats it accepts."""


@dataclass(frozen=True)
class Wav:
    """Mono int16 samples of an audio file and what they were encoded as."""

    samples: np.ndarray
    sample_rate: int
    encoding: str
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def read_wav(path: str | Path) -> Wav:
    """Decode an audio file (WAV of any common encoding, FLAC, OGG, ...) to mono int16, channels averaged.

    Raises `WavError` for anything libsndfile cannot decode (naming the accepted formats), `FileNotFoundError`
    for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with soundfile.SoundFile(str(path)) as f:
            info = (f.format, f.subtype, f.samplerate, f.channels)
            audio = f.read(dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, TypeError) as error:
        reason = str(error).split(": ", 1)[-1] if str(error).startswith("Error opening") else str(error)
        raise WavError(f"{path}: cannot decode as audio ({reason}); accepted: {ACCEPTED}") from None
    container, subtype, rate, channels = info
    if rate < MIN_SAMPLE_RATE or channels < 1:
        raise WavError(f"{path}: implausible header ({channels} channels, {rate} Hz); accepted: {ACCEPTED}")
    mono = np.nan_to_num(audio.mean(axis=1) if channels > 1 else audio[:, 0])
    samples = np.clip(np.round(mono * 32768.0), -32768, 32767).astype(np.int16)
    return Wav(samples, rate, _encoding_name(container, subtype), channels)


def _encoding_name(container: str, subtype: str) -> str:
    name = _SUBTYPE_NAMES.get(subtype) or soundfile.available_subtypes().get(subtype, subtype)
    return name if container in ("WAV", "WAVEX") else f"{container} {name}"


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int, *, encoding: str = "pcm") -> None:
    """Write mono int16 samples as WAV: 16-bit PCM ("pcm"), μ-law ("mulaw") or A-law ("alaw")."""
    if encoding not in _WRITE_SUBTYPES:
        raise ValueError(f"encoding must be one of {sorted(_WRITE_SUBTYPES)}, not {encoding!r}")
    soundfile.write(str(path), np.asarray(samples, dtype=np.int16), sample_rate, subtype=_WRITE_SUBTYPES[encoding],
                    format="WAV")

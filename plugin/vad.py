"""WebRTC VAD for Pipecat at 8, 16, 32 and 48 kHz (Pipecat's Silero VAD refuses 48 kHz)."""

from __future__ import annotations

import webrtcvad
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams

SUPPORTED_RATES = (8000, 16000, 32000, 48000)
FRAME_MS = 30  # webrtcvad takes 10, 20 or 30 ms frames


class WebRTCVADAnalyzer(VADAnalyzer):
    """Voice activity from Google's WebRTC VAD (package `webrtcvad-wheels`).

    Args (keyword-only):
        mode: aggressiveness 0 (least) to 3 (most aggressive at rejecting non-speech).
        sample_rate: 8000, 16000, 32000 or 48000; None takes the pipeline's rate.
        params: Pipecat `VADParams` (confidence, start/stop seconds, min volume).
    """

    def __init__(self, *, mode: int = 2, sample_rate: int | None = None, params: VADParams | None = None):
        if mode not in (0, 1, 2, 3):
            raise ValueError(f"webrtcvad mode must be 0, 1, 2 or 3, not {mode!r}")
        if sample_rate is not None:
            _check_rate(sample_rate)
        super().__init__(sample_rate=sample_rate, params=params)
        self._vad = webrtcvad.Vad(mode)

    def set_sample_rate(self, sample_rate: int):
        _check_rate(self._init_sample_rate or sample_rate)
        super().set_sample_rate(sample_rate)

    def num_frames_required(self) -> int:
        return self.sample_rate * FRAME_MS // 1000

    def voice_confidence(self, buffer: bytes) -> float:
        frame_bytes = self.num_frames_required() * 2
        if len(buffer) < frame_bytes:
            return 0.0
        return 1.0 if self._vad.is_speech(buffer[:frame_bytes], self.sample_rate) else 0.0


def _check_rate(sample_rate: int) -> None:
    if sample_rate not in SUPPORTED_RATES:
        raise ValueError(f"WebRTC VAD supports {SUPPORTED_RATES} Hz, not {sample_rate}; resample first.")

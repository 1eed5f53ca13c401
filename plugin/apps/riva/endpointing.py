"""Server-side endpointing for Riva streams: where an utterance starts and ends, from WebRTC VAD frames.

Riva clients (Pipecat's `NvidiaSTTService` among them) never say where a turn ends: the server must. The
`endpointing_config` fields keep Riva's meaning: an utterance starts once `start_threshold` of the frames in the last
`start_history` ms are speech, and ends once `stop_threshold` of the frames in the last `stop_history` ms are not.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import webrtcvad

FRAME_MS = 30
RATE = 16000
FRAME_BYTES = RATE * FRAME_MS // 1000 * 2


@dataclass(frozen=True)
class EndpointingSettings:
    """Riva's defaults where the client leaves a field unset (0 or absent)."""

    start_history_ms: int = 300
    start_threshold: float = 0.2
    stop_history_ms: int = 800
    stop_threshold: float = 0.98

    @classmethod
    def from_config(cls, config) -> "EndpointingSettings":
        """From a `RecognitionConfig` (its `endpointing_config` is optional: `HasField`)."""
        if not config.HasField("endpointing_config"):
            return cls()
        given = config.endpointing_config
        default = cls()
        return cls(start_history_ms=given.start_history if given.start_history > 0 else default.start_history_ms,
                   start_threshold=given.start_threshold if given.start_threshold > 0 else default.start_threshold,
                   stop_history_ms=given.stop_history if given.stop_history > 0 else default.stop_history_ms,
                   stop_threshold=given.stop_threshold if given.stop_threshold > 0 else default.stop_threshold)


class Endpointer:
    """Feed 16 kHz PCM16; `push` returns ("start" | "stop", byte offset in that chunk where the event's frame ends)."""

    def __init__(self, settings: EndpointingSettings, *, mode: int = 2):
        self.settings = settings
        self.speaking = False
        self._vad = webrtcvad.Vad(mode)
        self._pending = b""
        self._start = deque(maxlen=max(1, settings.start_history_ms // FRAME_MS))
        self._stop = deque(maxlen=max(1, settings.stop_history_ms // FRAME_MS))

    def push(self, pcm: bytes) -> list[tuple[str, int]]:
        events = []
        held = len(self._pending)
        data = self._pending + pcm
        whole = len(data) - len(data) % FRAME_BYTES
        self._pending = data[whole:]
        for offset in range(0, whole, FRAME_BYTES):
            voiced = self._vad.is_speech(data[offset:offset + FRAME_BYTES], RATE)
            self._start.append(voiced)
            self._stop.append(not voiced)
            if not self.speaking and len(self._start) == self._start.maxlen and \
                    sum(self._start) >= self.settings.start_threshold * len(self._start):
                self.speaking = True
                self._stop.clear()
                events.append(("start", max(0, offset + FRAME_BYTES - held)))
            elif self.speaking and len(self._stop) == self._stop.maxlen and \
                    sum(self._stop) >= self.settings.stop_threshold * len(self._stop):
                self.speaking = False
                self._start.clear()
                events.append(("stop", max(0, offset + FRAME_BYTES - held)))
        return events

"""The trailing context a Final gets: a few chunks of silence stepped on a copy of the stream's state.

A cache-aware streaming model writes terminal punctuation and the `<xx-YY>` tag only once it has seen some
audio after the last word. A VAD stops 0.2-0.3 s after the speech and the engine pads only to the next chunk
boundary, so short answers ("Vale", "Ja, das stimmt") often ended untagged, and the "." and tag then arrived
at the start of the NEXT utterance. At finalize the engine therefore steps `chunks` chunks of silence for the
finalizing streams on COPIES of their encoder caches and decoder hypotheses, and takes the Final's text from
that continuation. The stream itself goes on from the state before the silence: the real timeline, and the
next utterance's context, are exactly what they would be without it. The audio is always the utterance's own
(fed audio and the finalize padding) followed by zeros, never audio that arrived after the finalize, so the
result does not depend on timing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from . import nemo_compat
from .features import HOP, LEAD_FRAMES, samples_needed, window_for


@dataclass(frozen=True)
class TailSource:
    """A finalizing stream's last real samples: from `first` (a sample index) up to the finalize point."""

    frame: int          # mel frame where the utterance's steps ended (the tail starts here)
    first: int          # sample index of `audio[0]`
    audio: np.ndarray   # samples [first, samples_needed(frame)): what the tail's first windows still overlap

    @classmethod
    def at(cls, frame: int, take_window) -> "TailSource":
        """Capture it with `take_window(first, end)` (the stream's buffer, read under the engine lock)."""
        first = max(0, (frame - LEAD_FRAMES) * HOP)
        return cls(frame, first, take_window(first, samples_needed(frame)))

    def window(self, frame_start: int, frame_end: int) -> tuple[np.ndarray, int]:
        """Audio window for mel frames [frame_start, frame_end) of the tail, and the offset of frame_start in it."""
        first, end, offset = window_for(frame_start, frame_end)
        window = np.zeros(end - first, dtype=np.float32)
        lo, hi = max(first, self.first), min(end, self.first + len(self.audio))
        if hi > lo:
            window[lo - first:hi - first] = self.audio[lo - self.first:hi - self.first]
        return window, offset


@torch.inference_mode()
def step_silence(*, model, encoder_step, spec, mel, caches, hypotheses: list, sources: list[TailSource],
                 prompts: torch.Tensor, chunks: int) -> list[list[int]]:
    """Step `chunks` chunks of silence after each source on copies of its state; return each one's tokens.

    `caches`: (encoder caches, mel history) as gathered from the slot pool (copies, never written back);
    `hypotheses`: the streams' decoder hypotheses (deep-copied here: the silence never extends a stream's own).
    The caller holds the model's step lock."""
    encoder_caches, mel_cache = caches
    hypotheses = [copy.deepcopy(h) for h in hypotheses]
    for index in range(chunks):
        windows, offsets = [], []
        for source in sources:
            start = source.frame + index * spec.chunk_frames
            window, offset = source.window(start, start + spec.chunk_frames)
            windows.append(window)
            offsets.append(offset)
        features = mel(windows, offsets, spec.chunk_frames)
        history = torch.cat([mel_cache, features], dim=2)
        mel_cache = history[:, :, -spec.pre_encode_cache_frames:]
        lengths = torch.full((len(sources),), history.shape[2], dtype=torch.int64, device=history.device)
        x, x_len = nemo_compat.pre_encode(model.encoder, history, lengths, spec.drop_extra_pre_encoded)
        encoded, encoded_len, encoder_caches = encoder_step(x, x_len, encoder_caches,
                                                            att_context_size=spec.att_context_size)
        encoded = nemo_compat.apply_prompts(model, encoded, prompts)
        hypotheses = nemo_compat.decode_step(model, encoded, encoded_len, hypotheses)
    return [[int(t) for t in h.y_sequence] if h is not None else [] for h in hypotheses]


def chunks_for(context_ms: int, chunk_ms: int) -> int:
    """Chunks of silence that give at least `context_ms` of trailing context (0 turns it off)."""
    return 0 if context_ms <= 0 else -(-context_ms // chunk_ms)

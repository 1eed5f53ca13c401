"""Streaming log-mel features, frame for frame equal to the model's offline features.

The preprocessor (pre-emphasis, centred 512-point STFT, mel, log) is run on a short
window of raw audio around the frames wanted. A mel frame i (10 ms hop) depends on
samples [160 i - 256, 160 i + 256), so it is exact once those samples exist: we hold
back 256 samples (16 ms) and start each window two frames early so that neither the
window's zero padding nor its pre-emphasis restart touches the frames we keep.
"""

from __future__ import annotations

import numpy as np
import torch

HOP = 160
HALF_WINDOW = 256  # n_fft // 2 of the centred STFT
LEAD_FRAMES = 2    # frames computed before the first kept one (>= HALF_WINDOW / HOP, rounded up)


def samples_needed(frame_end: int) -> int:
    """Samples that must exist before mel frames [0, frame_end) are all exact."""
    return 0 if frame_end <= 0 else (frame_end - 1) * HOP + HALF_WINDOW


def frames_available(n_samples: int) -> int:
    """How many mel frames are exact given `n_samples` of audio."""
    return 0 if n_samples < HALF_WINDOW else (n_samples - HALF_WINDOW) // HOP + 1


def window_for(frame_start: int, frame_end: int) -> tuple[int, int, int]:
    """(first sample, end sample, index of frame_start inside the window) for frames [start, end)."""
    first = max(0, (frame_start - LEAD_FRAMES) * HOP)
    return first, samples_needed(frame_end), (frame_start * HOP - first) // HOP


class MelExtractor:
    """Runs the model's own preprocessor over equal-length windows of many streams at once."""

    def __init__(self, preprocessor, device):
        self.preprocessor = preprocessor
        self.device = device

    @torch.inference_mode()
    def __call__(self, windows: list[np.ndarray], offsets: list[int], n_frames: int) -> torch.Tensor:
        """Mel (B, n_mels, n_frames) for each window, starting `offsets[b]` frames into it.

        Windows of equal length are run as one batch.
        """
        out: list[torch.Tensor | None] = [None] * len(windows)
        by_length: dict[int, list[int]] = {}
        for index, window in enumerate(windows):
            by_length.setdefault(len(window), []).append(index)
        for length, indices in by_length.items():
            audio = torch.from_numpy(np.stack([windows[i] for i in indices])).to(self.device)
            lengths = torch.full((len(indices),), length, dtype=torch.int64, device=self.device)
            mel, _ = self.preprocessor(input_signal=audio, length=lengths)
            for row, index in enumerate(indices):
                start = offsets[index]
                out[index] = mel[row, :, start:start + n_frames]
        return torch.stack(out)

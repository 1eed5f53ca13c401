"""NeMo's own streaming loop (`conformer_stream_step` over `CacheAwareStreamingAudioBuffer`),
the yardstick for the engine."""

from __future__ import annotations

import numpy as np
import torch
from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

from pipecat_nemotron.engine.features import HOP, HALF_WINDOW, samples_needed
from pipecat_nemotron.engine.loader import chunk_spec
from pipecat_nemotron.engine.scheduler import DEFAULT_FINAL_CONTEXT_MS
from pipecat_nemotron.engine.tail import chunks_for


def tail_frames(model, chunk_ms: int, context_ms: int = DEFAULT_FINAL_CONTEXT_MS) -> int:
    """Mel frames of silence an engine with `final_context_ms=context_ms` steps after a finalize."""
    return chunks_for(context_ms, chunk_ms) * chunk_spec(model, chunk_ms).chunk_frames


def with_tail(audio: np.ndarray, end_frame: int, frames: int) -> np.ndarray:
    """The audio the engine's trailing context hears: the timeline up to the finalize point, then silence."""
    kept = audio[:samples_needed(end_frame)]
    return np.concatenate([kept, np.zeros(frames * HOP + 2 * HALF_WINDOW, dtype=np.float32)])


def padded_for_finalize(model, audio: np.ndarray, chunk_ms: int) -> tuple[np.ndarray, int]:
    """The audio the engine steps when a stream is finalized: silence up to a chunk boundary."""
    spec = chunk_spec(model, chunk_ms)
    frames = spec.chunk_boundary_at_or_after(-(-len(audio) // HOP))
    pad = max(0, samples_needed(frames) - len(audio))
    return np.concatenate([audio, np.zeros(pad, dtype=np.float32)]), frames


@torch.inference_mode()
def offline_mel(model, audio: np.ndarray) -> torch.Tensor:
    signal = torch.from_numpy(audio)[None]
    mel, _ = model.preprocessor(input_signal=signal, length=torch.tensor([signal.shape[1]]))
    return mel


def reset_timeline(model, utterances: list[np.ndarray], chunk_ms: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The engine's timeline for utterances finalized one after the other with the context reset at
    each Final: each is padded to a chunk boundary of its own grid (starting where the previous one
    ended). Returns the timeline and each utterance's (first, end) mel frames."""
    spec = chunk_spec(model, chunk_ms)
    pieces, spans, total, origin = [], [], 0, 0
    for audio in utterances:
        total += len(audio)
        end = origin + spec.chunk_boundary_at_or_after(-(-total // HOP) - origin)
        pad = max(0, samples_needed(end) - total)
        pieces += [audio, np.zeros(pad, dtype=np.float32)]
        total += pad
        spans.append((origin, end))
        origin = end
    return np.concatenate(pieces), spans


@torch.inference_mode()
def reference_tokens_with_resets(model, utterances: list[np.ndarray], *, language: str, chunk_ms: int,
                                 context_ms: int | None = None) -> list[list[int]]:
    """Tokens per utterance from NeMo's reference loop when every utterance starts with fresh caches
    (a new loop on that utterance's frames of the engine's timeline, continued over its trailing silence)."""
    timeline, spans = reset_timeline(model, utterances, chunk_ms)
    model.set_inference_prompt(language)
    tail = tail_frames(model, chunk_ms) if context_ms is None else tail_frames(model, chunk_ms, context_ms)
    tokens = []
    for first, end in spans:
        mel = offline_mel(model, with_tail(timeline, end, tail))
        tokens.append(_loop(model, mel[:, :, first:end + tail], chunk_ms)[-1])
    return tokens


@torch.inference_mode()
def _loop(model, mel: torch.Tensor, chunk_ms: int, reset_at_frames: tuple[int, ...] = ()) -> list[list[int]]:
    """NeMo's streaming loop over `mel` from empty caches; tokens per utterance."""
    spec = chunk_spec(model, chunk_ms)
    buffer = CacheAwareStreamingAudioBuffer(model=model)
    buffer.append_processed_signal(mel)
    channel, time_cache, channel_len = model.encoder.get_initial_cache_state(batch_size=1)
    hyps, utterances, position = None, [], 0
    for step, (chunk, lengths) in enumerate(buffer):
        _, hyps, channel, time_cache, channel_len, _ = model.conformer_stream_step(
            processed_signal=chunk, processed_signal_length=lengths, cache_last_channel=channel,
            cache_last_time=time_cache, cache_last_channel_len=channel_len,
            keep_all_outputs=buffer.is_buffer_empty(), previous_hypotheses=hyps,
            drop_extra_pre_encoded=0 if step == 0 else spec.drop_extra_pre_encoded)
        position += spec.first_chunk_frames if step == 0 else spec.chunk_frames
        if position in reset_at_frames:
            utterances.append([int(t) for t in hyps[0].y_sequence])
            hyps = None
    utterances.append([int(t) for t in hyps[0].y_sequence] if hyps else [])
    return utterances


@torch.inference_mode()
def reference_tokens(model, audio: np.ndarray, *, language: str, chunk_ms: int,
                     reset_at_frames: tuple[int, ...] = (), context_ms: int | None = None) -> list[list[int]]:
    """Tokens per utterance (each Final's) from NeMo's reference loop on the engine's (padded) timeline.

    `reset_at_frames`: mel frames where an utterance ended (decoder restarts there). Each utterance's tokens
    are the loop's after it went on over the Final's trailing silence (`context_ms`, default the engine's);
    the next utterance continues from the state before that silence, as the engine does.
    """
    model.set_inference_prompt(language)
    padded, frames = padded_for_finalize(model, audio, chunk_ms)
    tail = tail_frames(model, chunk_ms) if context_ms is None else tail_frames(model, chunk_ms, context_ms)
    tokens = []
    for index, end in enumerate([*reset_at_frames, frames]):
        mel = offline_mel(model, with_tail(padded, end, tail))[:, :, :end + tail]
        tokens.append(_loop(model, mel, chunk_ms, reset_at_frames[:index])[-1])
    return tokens

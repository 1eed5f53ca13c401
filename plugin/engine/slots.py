"""The encoder caches of every stream, preallocated, and who may hand them out.

Only the engine thread touches a `SlotPool`: a slot is taken when its stream is first stepped and
given back between steps (never while a step that gathered it may still scatter into it), the way
vLLM frees a request's KV blocks only in `update_from_output` and NeMo's `CacheAwareContextManager`
resets slots after the step's caches are written back. A slot closed on the event loop therefore
cannot be zeroed for the next call and then overwritten by the old call's step still in flight.
"""

from __future__ import annotations

import torch


class SlotPool:
    """Encoder caches of every stream slot, preallocated: [layers, slots, ...] tensors (engine thread only)."""

    def __init__(self, model, spec, slots: int, device):
        channel, time_cache, channel_len = model.encoder.get_initial_cache_state(
            batch_size=slots, dtype=torch.float32, device=device)
        self.channel, self.time, self.channel_len = channel, time_cache, channel_len
        n_mels = model.preprocessor.featurizer.nfilt
        self.mel = torch.zeros(slots, n_mels, spec.pre_encode_cache_frames, device=device)
        self.size = slots
        self._free = list(range(slots - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """A zeroed slot. The engine's reservations guarantee one is free."""
        if not self._free:
            raise RuntimeError("no free cache slot: more live streams than reservations allow")
        slot = self._free.pop()
        self.reset(slot)
        return slot

    def reset(self, slot: int) -> None:
        self.channel[:, slot].zero_()
        self.time[:, slot].zero_()
        self.channel_len[slot] = 0
        self.mel[slot].zero_()

    def give_back(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"cache slot {slot} given back twice")
        self._free.append(slot)

    def gather(self, index: torch.Tensor):
        return (self.channel.index_select(1, index), self.time.index_select(1, index),
                self.channel_len.index_select(0, index), self.mel.index_select(0, index))

    def scatter(self, index: torch.Tensor, channel, time_cache, channel_len, mel) -> None:
        self.channel.index_copy_(1, index, channel)
        self.time.index_copy_(1, index, time_cache)
        self.channel_len.index_copy_(0, index, channel_len)
        self.mel.index_copy_(0, index, mel)

"""The encoder caches of every stream, preallocated, and who may hand them out.

Only the engine thread touches a `SlotPool`: a slot is taken when its stream is first stepped and
given back between steps (never while a step that gathered it may still scatter into it), the way
vLLM frees a request's KV blocks only in `update_from_output` and NeMo's `CacheAwareContextManager`
resets slots after the step's caches are written back. A slot closed on the event loop therefore
cannot be zeroed for the next call and then overwritten by the old call's step still in flight.

What a slot holds is the encoder step's business (`initial_state`, `slot_dims`): NeMo's channel/time
caches for `nemo_compat.NemoEncoderStep`, projected keys/values and the time cache for
`fast_encoder.FastEncoderStep`; plus the mel frames the subsampling needs again (`mel`).
"""

from __future__ import annotations

import torch


class SlotPool:
    """Encoder caches of every stream slot, preallocated: named tensors with a slot dimension (engine thread only)."""

    def __init__(self, step, *, n_mels: int, pre_encode_frames: int, slots: int, device):
        self.caches = step.initial_state(slots, device)
        self._dims = dict(step.slot_dims)
        self.mel = torch.zeros(slots, n_mels, pre_encode_frames, device=device)
        self.size = slots
        self._free = list(range(slots - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def bytes_per_slot(self) -> int:
        """Memory one stream's caches take (the whole pool is allocated up front)."""
        total = sum(t.numel() * t.element_size() for t in self.caches.values()) + self.mel.numel() * 4
        return total // self.size

    def take(self) -> int:
        """A zeroed slot. The engine's reservations guarantee one is free."""
        if not self._free:
            raise RuntimeError("no free cache slot: more live streams than reservations allow")
        slot = self._free.pop()
        self.reset(slot)
        return slot

    def reset(self, slot: int) -> None:
        for name, tensor in self.caches.items():
            tensor.select(self._dims[name], slot).zero_()
        self.mel[slot].zero_()

    def give_back(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"cache slot {slot} given back twice")
        self._free.append(slot)

    def gather(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Copies of the caches of the slots in `index`, in its order, and their mel history."""
        caches = {name: tensor.index_select(self._dims[name], index) for name, tensor in self.caches.items()}
        return caches, self.mel.index_select(0, index)

    def scatter(self, index: torch.Tensor, caches: dict, mel: torch.Tensor) -> None:
        """Write back the caches of the slots in `index`: a tensor per name, or a list of per-layer tensors."""
        for name, tensor in self.caches.items():
            value, dim = caches[name], self._dims[name]
            if isinstance(value, (list, tuple)):  # one (B, ...) tensor per layer of a [layers, slots, ...] cache
                for layer, part in enumerate(value):
                    tensor[layer].index_copy_(dim - 1, index, part.to(tensor.dtype))
            else:
                tensor.index_copy_(dim, index, value.to(tensor.dtype))
        self.mel.index_copy_(0, index, mel)

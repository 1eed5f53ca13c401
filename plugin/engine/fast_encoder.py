"""The conformer layers of a streaming step without NeMo's repeated work: cached K/V, a precomputed positional term.

Why this module reaches into NeMo (3.0.0) internals: NeMo's `cache_aware_stream_step` keeps, per layer, the
post-LayerNorm attention INPUTS of the last 56 frames (`cache_last_channel`) and runs `linear_k`/`linear_v` over
all of them again every step (58 frames at 160 ms for 2 new ones), and it runs `linear_pos` over the 2·58−1
relative positions every step although they depend only on the chunk size. At the 0.6B geometry that is 13.8 of
the 2.3 GFLOP a stream-step needs (`../shared/notes/scale-out-and-speed.md`). This step keeps the PROJECTED keys
and values instead (the same numbers: a Linear acts frame by frame, and the keys carry no position in Transformer-XL
attention) and computes each layer's `linear_pos(pos_emb)` once per chunk size. Everything else is NeMo's own
modules, called in `ConformerLayer.forward`'s order: the feed-forwards, norms, the convolution module with its
time cache, `rel_shift`, `forward_attention` (masked softmax, `linear_out`), `pos_enc` (x-scaling, `pos_emb`) and
the encoder's `_create_masks` (the chunked-limited mask and the offset of a not yet filled cache).

Only the structure it was checked against is accepted (`unsupported_reason`): a `ConformerEncoder` with
`rel_pos` attention, `chunked_limited` context, no reduction layer, plain `ConformerLayer`s without adapters. Any
other encoder runs NeMo's own step (`nemo_compat.NemoEncoderStep`). The equivalence tests compare both step by step.

`precision="int8"`: the Linear layers of the feed-forwards and of q/k/v/out are dynamically quantised with
`torch.ao` on a copy of the layers (NeMo has no int8 path; `torch.ao`'s dynamic quantisation is deprecated in
favour of torchao, which is not installed here, and its warnings are silenced in `_quantized`). `linear_pos` stays
fp32 (it is precomputed, so it costs nothing per step), as do the subsampling and the language prompt kernel.
"""

from __future__ import annotations

import copy
import warnings

import torch

PRECISIONS = ("fp32", "int8")


def unsupported_reason(encoder) -> str | None:
    """Why `encoder` cannot take the fast step (None: it can)."""
    from nemo.collections.asr.modules import ConformerEncoder
    from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D
    from nemo.collections.asr.parts.submodules.conformer_modules import ConformerConvolution, ConformerLayer
    from nemo.collections.asr.parts.submodules.multi_head_attention import RelPositionMultiHeadAttention

    own_forward = type(encoder).forward_internal is ConformerEncoder.forward_internal if isinstance(
        encoder, ConformerEncoder) else False
    if not own_forward:
        return f"the encoder is a {type(encoder).__name__}, not NeMo's ConformerEncoder"
    if encoder.self_attention_model != "rel_pos":
        return f"self_attention_model={encoder.self_attention_model!r} (the fast step knows 'rel_pos')"
    if encoder.att_context_style != "chunked_limited":
        return f"att_context_style={encoder.att_context_style!r} (the fast step knows 'chunked_limited')"
    if getattr(encoder, "reduction_position", None) is not None:
        return "the encoder has a time-reduction layer"
    for index, layer in enumerate(encoder.layers):
        if type(layer) is not ConformerLayer:
            return f"layer {index} is a {type(layer).__name__}"
        if type(layer.self_attn) is not RelPositionMultiHeadAttention:
            return f"layer {index}'s attention is a {type(layer.self_attn).__name__}"
        if type(layer.conv) is not ConformerConvolution:
            return f"layer {index}'s convolution is a {type(layer.conv).__name__}"
        if type(layer.conv.depthwise_conv) is not CausalConv1D or layer.conv.pointwise_conv1.kernel_size != (1,):
            return f"layer {index}'s convolution module is not the causal one with pointwise convolutions"
        if layer.is_adapter_available():
            return f"layer {index} has adapters"
    return None


class FastEncoderStep:
    """The conformer layers of one streaming step, for a batch of already subsampled chunks.

    Caches per slot (`initial_state`): `key` and `value` [layers, slots, heads, 56, d_k] (projected), `time`
    [layers, slots, d_model, kernel−1] (the depthwise convolution's, as NeMo's), `length` [slots]. Twice the
    memory of NeMo's channel cache, for a fraction of the work.
    """

    slot_dims = {"key": 1, "value": 1, "time": 1, "length": 0}

    def __init__(self, encoder, *, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        reason = unsupported_reason(encoder)
        if reason is not None:
            raise ValueError(f"the fast encoder step does not support this model: {reason}")
        from nemo.collections.asr.parts.submodules.multi_head_attention import INF_VAL

        self.encoder = encoder
        self.precision = precision
        self._masked = INF_VAL  # NeMo's score for a masked position (imported here: the engine loads NeMo lazily)
        self.layers = [_FastLayer.of(layer) for layer in encoder.layers]
        if precision == "int8":
            self.layers = _quantized(self.layers)
        self._positions: dict[tuple, list[torch.Tensor]] = {}  # (frames, cache, dtype, device) -> per layer

    def initial_state(self, slots: int, device) -> dict[str, torch.Tensor]:
        channel, time_cache, length = self.encoder.get_initial_cache_state(
            batch_size=slots, dtype=torch.float32, device=device)
        layers, _, cached, d_model = channel.shape
        heads = self.encoder.layers[0].self_attn.h
        # Head-major. The projection of NeMo's zero channel cache would be linear_k's bias; those frames are
        # masked (offset) until real ones replace them, so zeros do as well.
        shape = (layers, slots, heads, cached, d_model // heads)
        return {"key": channel.new_zeros(shape), "value": channel.new_zeros(shape), "time": time_cache,
                "length": length}

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, lengths: torch.Tensor, caches: dict[str, torch.Tensor], *,
                 att_context_size) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x: (B, T, d_model) subsampled frames. Returns (encoded (B, d_model, T), lengths, next caches).

        The next `key`, `value` and `time` caches come as lists with one (B, ...) tensor per layer."""
        encoder = self.encoder
        cfg = encoder.streaming_cfg
        cache_len = cfg.last_channel_cache_size
        frames = x.size(1)
        x, pos_emb = encoder.pos_enc(x=x, cache_len=cache_len)
        pad_mask, att_mask = encoder._create_masks(
            att_context_size=list(att_context_size), padding_length=lengths + cache_len,
            max_audio_length=frames + cache_len, offset=cache_len - caches["length"], device=x.device)
        pad_mask, att_mask = pad_mask[:, cache_len:], att_mask[:, cache_len:]
        positions = self._positional(pos_emb, frames, cache_len)
        keys, values, times = [], [], []
        for index, layer in enumerate(self.layers):
            x, key, value, time_cache = self._layer(
                layer, x, caches["key"][index], caches["value"][index], caches["time"][index],
                att_mask, pad_mask, positions[index], self._masked)
            keys.append(key)
            values.append(value)
            times.append(time_cache)
        if encoder.out_proj is not None:
            x = encoder.out_proj(x)
        keep = frames - cfg.cache_drop_size
        length = torch.clamp(caches["length"] + keep, max=cache_len)
        # per-layer lists, not stacked: the slot pool copies each layer into place (one copy fewer)
        return x.transpose(1, 2), lengths.to(torch.int64), {"key": keys, "value": values, "time": times,
                                                             "length": length}

    def _positional(self, pos_emb: torch.Tensor, frames: int, cache_len: int) -> list[torch.Tensor]:
        """Each layer's `linear_pos(pos_emb)` as (1, heads, 2L−1, d_k): constant for a chunk size, computed once."""
        key = (frames, cache_len, pos_emb.dtype, pos_emb.device)
        if key not in self._positions:
            projected = []
            for layer in self.encoder.layers:  # the fp32 layers: the projection is precomputed, so it stays exact
                attn = layer.self_attn
                p = attn.linear_pos(pos_emb).view(pos_emb.size(0), -1, attn.h, attn.d_k)
                projected.append(p.transpose(1, 2).contiguous())
            self._positions[key] = projected
        return self._positions[key]

    @staticmethod
    def _layer(fast, x, key_cache, value_cache, time_cache, att_mask, pad_mask, positions, masked):
        """`ConformerLayer.forward` in eval mode (dropout is the identity), attention on cached K/V."""
        layer = fast.layer
        residual = x
        x = layer.feed_forward1(layer.norm_feed_forward1(x))
        residual = residual + x * layer.fc_factor
        x = layer.norm_self_att(residual)
        x, key_cache, value_cache = _attention(layer.self_attn, x, key_cache, value_cache, att_mask, positions,
                                               masked)
        residual = residual + x
        x = layer.norm_conv(residual)
        x, time_cache = _convolution(fast, x, pad_mask, time_cache)
        residual = residual + x
        x = layer.feed_forward2(layer.norm_feed_forward2(residual))
        residual = residual + x * layer.fc_factor
        return layer.norm_out(residual), key_cache, value_cache, time_cache


def _attention(attn, x, key_cache, value_cache, mask, positions, masked: float):
    """`RelPositionMultiHeadAttention.forward` on cached projected K/V; returns (out, next K, next V).

    The caches are head-major, (B, heads, cache, d_k), so each product reads them in place; the scores and the
    weighted sum are taken over the cache and the new frames separately instead of over a concatenated K/V
    (the same sums, without copying every cached key and value once more per layer)."""
    batch, frames, _ = x.shape
    heads, d_k = attn.h, attn.d_k
    q = attn.linear_q(x).view(batch, frames, heads, d_k)
    new_key = attn.linear_k(x).view(batch, frames, heads, d_k).transpose(1, 2)
    new_value = attn.linear_v(x).view(batch, frames, heads, d_k).transpose(1, 2)
    q_u = (q + attn.pos_bias_u).transpose(1, 2)
    q_v = (q + attn.pos_bias_v).transpose(1, 2)
    matrix_ac = torch.cat([torch.matmul(q_u, key_cache.transpose(-2, -1)),
                           torch.matmul(q_u, new_key.transpose(-2, -1))], dim=-1)
    matrix_bd = attn.rel_shift(torch.matmul(q_v, positions.transpose(-2, -1)))
    scores = (matrix_ac + matrix_bd[:, :, :, :matrix_ac.size(-1)]) / attn.s_d_k
    mask = mask.unsqueeze(1)  # as MultiHeadAttention.forward_attention
    weights = torch.softmax(scores.masked_fill(mask, -masked), dim=-1).masked_fill(mask, 0.0)
    cached = key_cache.size(2)
    out = torch.matmul(weights[..., :cached], value_cache) + torch.matmul(weights[..., cached:], new_value)
    out = attn.linear_out(out.transpose(1, 2).reshape(batch, frames, heads * d_k))
    keep = frames - attn.cache_drop_size  # as MultiHeadAttention.update_cache shifts its input cache
    next_key = torch.cat([key_cache[:, :, keep:], new_key[:, :, :keep]], dim=2)
    next_value = torch.cat([value_cache[:, :, keep:], new_value[:, :, :keep]], dim=2)
    return out, next_key, next_value


class _FastLayer(torch.nn.Module):
    """A `ConformerLayer` and its convolution module's two pointwise (kernel-1) convolutions as `Linear`s that
    share their weights: a Linear on (B, T, C) needs no transposes around it, and can be quantised."""

    def __init__(self, layer, pointwise1: torch.nn.Linear, pointwise2: torch.nn.Linear):
        super().__init__()
        self.layer, self.pointwise1, self.pointwise2 = layer, pointwise1, pointwise2

    @classmethod
    def of(cls, layer) -> "_FastLayer":
        return cls(layer, _as_linear(layer.conv.pointwise_conv1), _as_linear(layer.conv.pointwise_conv2))


def _as_linear(conv: torch.nn.Conv1d) -> torch.nn.Linear:
    linear = torch.nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                             device=conv.weight.device, dtype=conv.weight.dtype)
    linear.weight = torch.nn.Parameter(conv.weight.detach().squeeze(-1), requires_grad=False)  # a view: no copy
    if conv.bias is not None:
        linear.bias = conv.bias
    return linear


def _convolution(fast: _FastLayer, x, pad_mask, cache):
    """`ConformerConvolution.forward` with the pointwise convolutions as Linear on (B, T, C)."""
    conv = fast.layer.conv
    x = fast.pointwise1(x)
    x = torch.nn.functional.glu(x, dim=-1) if conv.pointwise_activation == "glu_" else conv.pointwise_activation(x)
    if pad_mask is not None:
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0)
    x, cache = conv.depthwise_conv(x.transpose(1, 2), cache=cache)
    if conv.norm_type == "layer_norm":
        x = conv.batch_norm(x.transpose(1, 2))
    else:
        x = conv.batch_norm(x).transpose(1, 2)
    return fast.pointwise2(conv.activation(x)), cache


def _quantized(layers: list[_FastLayer]) -> list[_FastLayer]:
    """int8 copies of `layers`: dynamic quantisation of every Linear (feed-forwards, q/k/v/out, the pointwise
    convolutions) but `linear_pos`, whose product is precomputed in fp32."""
    from torch.ao.quantization import quantize_dynamic

    quantized = []
    for layer in layers:
        names = {name for name, module in layer.named_modules()
                 if isinstance(module, torch.nn.Linear) and not name.endswith("linear_pos")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices: torchao is not installed here
            quantized.append(quantize_dynamic(copy.deepcopy(layer), names, dtype=torch.qint8))
    return quantized

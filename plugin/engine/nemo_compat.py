"""Everything that reaches into NeMo internals, in one place, and why.

NeMo 3.0's public streaming call, `conformer_stream_step`, cannot serve a batch of
independent calls:

* `set_inference_prompt` holds ONE language index per model, and the batched
  `CacheAwareRNNTPipeline` never applies the prompt at all (measured: `prompt_kernel`
  is called 0 times). We build the one-hot per stream from the model's own
  `prompt_dictionary` and apply the model's own `prompt_kernel` row by row
  (`apply_prompts`), exactly as `PromptStreamingMixin._apply_prompt_to_encoded` does
  for one index.
* `drop_extra_pre_encoded` is one integer per call, but a stream on its first step
  needs 0 and a stream on a later step needs the config value. We run the
  subsampling (`encoder.pre_encode`) per group and the conformer layers for the whole
  batch with `bypass_pre_encode=True` (`pre_encode`, `NemoEncoderStep`). Both groups
  produce exactly `valid_out_len` frames per step, so the batch stays rectangular.
* `keep_all_outputs` is also one flag per call; we keep every output and trim per
  stream ourselves (the flag only trims, it never changes the caches).
* `rnnt_decoder_predictions_tensor` detokenises every whole hypothesis after each step;
  `decode_step` runs only the search and leaves text to the engine's incremental detokeniser.

If NeMo grows per-stream prompts and drops in its streaming API, this module is the
only one to change. The engine's default conformer step is `fast_encoder.py` (cached K/V); NeMo's own
(`NemoEncoderStep`) serves encoders of another structure.
"""

from __future__ import annotations

import contextlib
import logging

import torch


# NeMo's training telemetry (one-logger) warns on every import that it is disabled and has no exporters: noise for
# an inference engine. Its loggers are plain `logging` ones, quietened once (NeMo's own logger is left alone:
# setting it re-levels every handler, pytest's capture included).
for _name in ("nv_one_logger", "one_logger"):
    logging.getLogger(_name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_nemo_logging(level: int = logging.ERROR):
    """NeMo logs pages of config at INFO while building or restoring a model."""
    try:
        from nemo.utils import logging as nemo_logging
    except ImportError:  # pragma: no cover - NeMo is a hard dependency
        yield
        return
    previous = nemo_logging.getEffectiveLevel()
    nemo_logging.setLevel(level)
    try:
        yield
    finally:
        nemo_logging.setLevel(previous)


def has_prompt(model) -> bool:
    return bool(getattr(model, "concat", False)) and getattr(model, "prompt_kernel", None) is not None


def prompt_dictionary(model) -> dict[str, int]:
    try:
        table = model.cfg.model_defaults.get("prompt_dictionary", {}) or {}
    except AttributeError:
        table = {}
    return {str(key): int(value) for key, value in dict(table).items()}


def model_option(model, name: str, default):
    """An engine hint stored in the model's config under `pipecat_nemotron` (e.g. by the demo model)."""
    try:
        options = model.cfg.get("pipecat_nemotron", None) or {}
        return options.get(name, default)
    except AttributeError:
        return default


def apply_prompts(model, encoded: torch.Tensor, prompt_indices: torch.Tensor) -> torch.Tensor:
    """Condition `encoded` (B, D, T) on one language index per row.

    Same math as `_apply_prompt_to_encoded`, which only knows one index per model.
    """
    if not has_prompt(model):
        return encoded
    encoded = encoded.transpose(1, 2)
    batch, steps, _ = encoded.shape
    one_hot = torch.zeros(batch, steps, model.num_prompts, dtype=encoded.dtype, device=encoded.device)
    one_hot.scatter_(2, prompt_indices.view(batch, 1, 1).expand(-1, steps, -1), 1.0)
    out_dtype = encoded.dtype
    conditioned = model.prompt_kernel(torch.cat([encoded, one_hot], dim=-1)).to(out_dtype)
    return conditioned.transpose(1, 2)


def pre_encode(encoder, mel: torch.Tensor, lengths: torch.Tensor, drop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the subsampling of `encoder` on mel (B, F, T) and drop `drop` leading frames.

    Mirrors the first lines of `ConformerEncoder.forward_internal`.
    """
    x, out_len = encoder.pre_encode(x=mel.transpose(1, 2), lengths=lengths)
    out_len = out_len.to(torch.int64)
    if drop > 0:
        x = x[:, drop:, :]
        out_len = (out_len - drop).clamp(min=0)
    return x, out_len


class NemoEncoderStep:
    """NeMo's own conformer step (`cache_aware_stream_step` with `bypass_pre_encode=True`) for a batch of already
    subsampled chunks: the path for encoders the fast step (`fast_encoder.py`) does not know.

    Caches per slot (`initial_state`): NeMo's `channel` [layers, slots, 56, d_model] (the attention inputs),
    `time` [layers, slots, d_model, kernel−1] and `length` [slots]."""

    slot_dims = {"channel": 1, "time": 1, "length": 0}
    precision = "fp32"

    def __init__(self, encoder):
        self.encoder = encoder

    def initial_state(self, slots: int, device) -> dict[str, torch.Tensor]:
        channel, time_cache, length = self.encoder.get_initial_cache_state(
            batch_size=slots, dtype=torch.float32, device=device)
        return {"channel": channel, "time": time_cache, "length": length}

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, lengths: torch.Tensor, caches: dict[str, torch.Tensor], *,
                 att_context_size) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (encoded (B, D, T) untrimmed, lengths, next caches); the context is the encoder's default."""
        encoded, encoded_len, channel, time_cache, length = self.encoder.cache_aware_stream_step(
            processed_signal=x, processed_signal_length=lengths, cache_last_channel=caches["channel"],
            cache_last_time=caches["time"], cache_last_channel_len=caches["length"], keep_all_outputs=True,
            bypass_pre_encode=True,
        )
        return encoded, encoded_len, {"channel": channel, "time": time_cache, "length": length}


def decode_step(model, encoded: torch.Tensor, lengths: torch.Tensor, hypotheses: list):
    """Greedy RNN-T continuation of each stream's partial hypothesis (None starts fresh).

    Calls the decoding strategy's search directly: `rnnt_decoder_predictions_tensor` would then run
    `decode_hypothesis`, which re-detokenises every stream's whole hypothesis after every step
    (quadratic in utterance length); the engine detokenises only each step's new tokens."""
    with torch.inference_mode():
        return model.decoding.decoding(encoder_output=encoded, encoded_lengths=lengths,
                                       partial_hypotheses=hypotheses)[0]

"""Tokenizer and model construction (config built in code) for the demo EncDecRNNTBPEModelWithPrompt."""

from __future__ import annotations

import logging
from pathlib import Path

from . import LANGS, NUM_PROMPTS, PROMPT_DICTIONARY

log = logging.getLogger("demo_model")

D_MODEL = 128
N_LAYERS = 4
PRED_HIDDEN = 128
JOINT_HIDDEN = 128
VOCAB_SIZE = 512
# Index 0 is the default (160 ms chunks); training samples one per step with these probabilities.
ATT_CONTEXT_SIZES = [[56, 1], [56, 0], [56, 3], [56, 6], [56, 13]]
ATT_CONTEXT_PROBS = [0.5, 0.1, 0.15, 0.15, 0.1]
TAGS = [f"<{lang}>" for lang in LANGS]


def build_tokenizer(texts: list[str], out_dir: Path) -> Path:
    """SentencePiece BPE (word-level for this grammar) over the (tagged) training texts; the tags are user-defined symbols."""
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "tokenizer.model").exists() and (out_dir / "vocab.txt").exists():
        return out_dir
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf8")
    create_spt_model(str(corpus), VOCAB_SIZE, sample_size=-1, do_lower_case=False, tokenizer_type="bpe",
                     output_dir=str(out_dir), user_defined_symbols=TAGS)
    corpus.unlink()
    return out_dir


def model_config(tokenizer_dir: Path) -> dict:
    return {
        "sample_rate": 16000,
        "log_prediction": False,
        "compute_eval_loss": False,
        "tokenizer": {"dir": str(tokenizer_dir), "type": "bpe"},
        "model_defaults": {
            "enc_hidden": D_MODEL,
            "pred_hidden": PRED_HIDDEN,
            "joint_hidden": JOINT_HIDDEN,
            "initialize_prompt_feature": True,
            "num_prompts": NUM_PROMPTS,
            "prompt_dictionary": dict(PROMPT_DICTIONARY),
        },
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            # Streaming-safe: no per-utterance statistics. (NeMo 3.0's fixed_mean/fixed_std path only works at
            # batch size 1, so the fixed input scale is handled in training instead: see train._scale_first_conv.)
            "normalize": "NA",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": 128,
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 1e-5,  # only applied in training mode; 0 at inference
            "pad_to": 0,
            "pad_value": 0.0,
        },
        "spec_augment": {
            "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "freq_masks": 1,
            "time_masks": 1,
            "freq_width": 12,
            "time_width": 0.04,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": 128,
            "feat_out": -1,
            "n_layers": N_LAYERS,
            "d_model": D_MODEL,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": 64,
            "causal_downsampling": True,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "n_heads": 4,
            "att_context_size": ATT_CONTEXT_SIZES,
            "att_context_probs": ATT_CONTEXT_PROBS,
            "att_context_style": "chunked_limited",
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "layer_norm",
            "conv_context_size": "causal",
            "dropout": 0.05,
            "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0,
            "dropout_att": 0.05,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "prednet": {"pred_hidden": PRED_HIDDEN, "pred_rnn_layers": 1, "t_max": None, "dropout": 0.1},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None,
            "preserve_memory": False,
            "fuse_loss_wer": False,
            "fused_batch_size": -1,
            "jointnet": {"joint_hidden": JOINT_HIDDEN, "activation": "relu", "dropout": 0.1},
        },
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}},
        "loss": {"loss_name": "default"},
        "optim": None,
    }


def build_model(tokenizer_dir: Path):
    from omegaconf import OmegaConf
    from nemo.collections.asr.models import EncDecRNNTBPEModelWithPrompt

    return EncDecRNNTBPEModelWithPrompt(cfg=OmegaConf.create(model_config(tokenizer_dir)))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())

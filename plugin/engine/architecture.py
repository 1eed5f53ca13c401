"""Configs of the nemotron-3.5 streaming architecture, for models built from scratch.

Used by the tests (a tiny model of the real class), the benchmarks (the real 0.6B
geometry with random weights) and anyone who wants to size a deployment without
downloading the 2.5 GB checkpoint. Loading the real checkpoint goes through
`loader.load_model`, not through here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

LOOKAHEADS = [[56, 1], [56, 0], [56, 3], [56, 6], [56, 13]]


@dataclass(frozen=True)
class Geometry:
    """Sizes of a cache-aware FastConformer-RNNT with a language prompt."""

    d_model: int
    n_layers: int
    n_heads: int
    subsampling_channels: int
    pred_hidden: int
    pred_layers: int
    joint_hidden: int
    conv_kernel: int = 9
    n_mels: int = 128
    num_prompts: int = 128
    att_context_size: list = field(default_factory=lambda: [list(x) for x in LOOKAHEADS])


TINY = Geometry(d_model=64, n_layers=2, n_heads=4, subsampling_channels=32,
                pred_hidden=32, pred_layers=1, joint_hidden=32)
# Published encoder config of nvidia/nemotron-3.5-asr-streaming-0.6b (see shared notes).
NEMOTRON_0_6B = Geometry(d_model=1024, n_layers=24, n_heads=8, subsampling_channels=256,
                         pred_hidden=640, pred_layers=2, joint_hidden=640)
NEMOTRON_VOCAB_SIZE = 13087


def write_sentencepiece_tokenizer(directory: str | Path, *, texts: list[str], vocab_size: int,
                                  tags: list[str], model_type: str = "bpe") -> Path:
    """Train a SentencePiece tokenizer with the language tags as whole tokens.

    NeMo needs both `tokenizer.model` and `vocab.txt` in the directory.
    """
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size,
        model_type=model_type, user_defined_symbols=tags, hard_vocab_limit=False,
        character_coverage=1.0, bos_id=-1, eos_id=-1, minloglevel=2, num_threads=1,
    )
    processor = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    (directory / "vocab.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    return directory


def write_sized_tokenizer(directory: str | Path, *, vocab_size: int, tags: list[str]) -> Path:
    """A SentencePiece tokenizer of an exact size (the real model has 13,087 tokens).

    For random-weight benchmarks only the size matters: placeholder symbols fill the
    vocabulary so no large corpus is needed.
    """
    learned = 100
    placeholders = [f"<w{i:05d}>" for i in range(vocab_size - learned - len(tags))]
    texts = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)]
    return write_sentencepiece_tokenizer(directory, texts=texts, vocab_size=vocab_size, tags=tags + placeholders)


def prompt_rnnt_config(geometry: Geometry, *, tokenizer_dir: str | Path, tokenizer_type: str = "bpe",
                       prompt_dictionary: dict[str, int]) -> dict:
    """A config dict for `EncDecRNNTBPEModelWithPrompt` with the nemotron streaming layout."""
    g = geometry
    return {
        "sample_rate": 16000,
        "num_prompts": g.num_prompts,
        "model_defaults": {
            "enc_hidden": g.d_model, "pred_hidden": g.pred_hidden, "joint_hidden": g.joint_hidden,
            "initialize_prompt_feature": True, "num_prompts": g.num_prompts,
            "prompt_dictionary": dict(prompt_dictionary),
        },
        "tokenizer": {"dir": str(tokenizer_dir), "type": tokenizer_type},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000, "normalize": "NA", "window_size": 0.025, "window_stride": 0.01,
            "window": "hann", "features": g.n_mels, "n_fft": 512, "log": True, "frame_splicing": 1,
            "dither": 1e-5, "pad_to": 0, "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": g.n_mels, "feat_out": -1, "n_layers": g.n_layers, "d_model": g.d_model,
            "subsampling": "dw_striding", "subsampling_factor": 8,
            "subsampling_conv_channels": g.subsampling_channels, "causal_downsampling": True,
            "ff_expansion_factor": 4, "self_attention_model": "rel_pos", "n_heads": g.n_heads,
            "att_context_size": [list(x) for x in g.att_context_size], "att_context_style": "chunked_limited",
            "xscaling": False, "untie_biases": True, "pos_emb_max_len": 5000, "use_bias": False,
            "conv_kernel_size": g.conv_kernel, "conv_norm_type": "layer_norm", "conv_context_size": "causal",
            "dropout": 0.0, "dropout_pre_encoder": 0.0, "dropout_emb": 0.0, "dropout_att": 0.0,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
            "random_state_sampling": False, "blank_as_pad": True,
            "prednet": {"pred_hidden": g.pred_hidden, "pred_rnn_layers": g.pred_layers,
                        "t_max": None, "dropout": 0.0},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None,
            "preserve_memory": False, "fuse_loss_wer": False, "fused_batch_size": -1,
            "jointnet": {"joint_hidden": g.joint_hidden, "activation": "relu", "dropout": 0.0},
        },
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}},
        "loss": {"loss_name": "default"},
        "optim": {"name": "adamw", "lr": 1e-3},
    }


def build_prompt_rnnt_model(config: dict, *, seed: int | None = 0):
    """Instantiate `EncDecRNNTBPEModelWithPrompt` from `prompt_rnnt_config` output, in eval mode."""
    import torch
    from omegaconf import OmegaConf

    from .nemo_compat import quiet_nemo_logging
    from nemo.collections.asr.models import EncDecRNNTBPEModelWithPrompt

    if seed is not None:
        torch.manual_seed(seed)
    with quiet_nemo_logging():
        model = EncDecRNNTBPEModelWithPrompt(cfg=OmegaConf.create(config))
    return model.eval()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

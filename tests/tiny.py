"""A tiny `EncDecRNNTBPEModelWithPrompt` of the real layout, built in seconds without downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipecat_nemotron.engine.architecture import TINY, build_prompt_rnnt_model, prompt_rnnt_config, \
    write_sentencepiece_tokenizer

TAGS = ["<en-US>", "<es-ES>", "<de-DE>", "<fr-FR>"]
PROMPTS = {"en-US": 0, "es-ES": 1, "de-DE": 2, "fr-FR": 3, "auto": 101}
TEXTS = [
    "Hello, good morning. <en-US>", "Yes, please. <en-US>", "My number is one two three four. <en-US>",
    "Hola, buenos días. <es-ES>", "¿Dónde está mi pedido? <es-ES>", "Sí, por favor. <es-ES>",
    "Guten Morgen. <de-DE>", "Ja, bitte. <de-DE>", "Meine Nummer ist eins zwei drei. <de-DE>",
    "Bonjour, merci beaucoup. <fr-FR>", "Oui, s'il vous plaît. <fr-FR>",
]


def build_tiny_model(directory: Path, *, seed: int = 0):
    tokenizer = write_sentencepiece_tokenizer(directory / "tokenizer", texts=TEXTS * 20, vocab_size=64, tags=TAGS)
    config = prompt_rnnt_config(TINY, tokenizer_dir=tokenizer, prompt_dictionary=PROMPTS)
    model = build_prompt_rnnt_model(config, seed=seed)
    # Random weights emit either nothing or max_symbols per frame. Sharpening the joint
    # and making blank depend strongly on the frame gives ~0.3-1.5 tokens per frame that
    # depend on audio and language, so the equivalence tests compare real token streams.
    import torch
    with torch.no_grad():
        out = model.joint.joint_net[-1]
        out.weight *= 5
        out.weight[-1] *= 6
        out.bias[-1] -= 2.4
    return model


def speechlike(seconds: float, *, seed: int, rate: int = 16000) -> np.ndarray:
    """Deterministic voiced-ish test audio: harmonics with a wandering pitch and syllable envelope."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    pitch = 110 + 40 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6))
    audio = 0.2 * voice * envelope + 0.01 * rng.standard_normal(n)
    return audio.astype(np.float32)

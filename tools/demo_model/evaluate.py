"""Stage 3: streaming evaluation, model card, and shipping the model + held-out set into the repo.

Streaming evaluation follows NeMo's reference loop (examples/asr/asr_cache_aware_streaming/
speech_to_text_cache_aware_streaming_infer.py): ``CacheAwareStreamingAudioBuffer`` + ``model.conformer_stream_step``
with caches and hypotheses carried across chunks, at att_context_size [56,1] (160 ms chunks), after
``model.set_inference_prompt(lang or "auto")``. Streams are batched per prompt (the prompt is per model).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import LANGS
from .audio import TEL_SR, decode_mulaw_to_16k, encode_mulaw_8k, read_mulaw_wav, write_mulaw_wav
from .synth import read_manifest

log = logging.getLogger("demo_model")

TAG_RE = re.compile(r"\s*<[a-z]{2}-[A-Z]{2}>")
N_SHIP_PER_LANG = 20
CHUNK_ATT = [56, 1]


def strip_tags(text: str) -> str:
    return TAG_RE.sub("", text).strip()


def last_tag(text: str) -> str | None:
    tags = re.findall(r"<([a-z]{2}-[A-Z]{2})>", text)
    return tags[-1] if tags else None


def normalise(text: str) -> str:
    """Lower-case, punctuation removed (for the normalised WER)."""
    t = strip_tags(text).lower()
    t = re.sub(r"[¿?¡!.,;:]", " ", t)
    return " ".join(t.split())


def wer(hyps: list[str], refs: list[str]) -> float:
    from nemo.collections.asr.metrics.wer import word_error_rate

    return float(word_error_rate(hyps, refs))


def load_model(path: Path):
    from nemo.collections.asr.models import EncDecRNNTBPEModelWithPrompt

    model = EncDecRNNTBPEModelWithPrompt.restore_from(str(path), map_location="cpu")
    model.eval()
    model.encoder.set_default_att_context_size(CHUNK_ATT)
    model.encoder.setup_streaming_params()
    return model


def pad_to_chunk(model, audio: np.ndarray) -> np.ndarray:
    """Zero-pad the tail so the mel frames fill whole streaming chunks.

    NeMo 3.0's CacheAwareStreamingAudioBuffer silently DROPS a final partial chunk shorter than the subsampling
    factor (8 mel frames) and the chunk before it was not flagged ``keep_all_outputs``; the last tokens of an
    utterance (often the final punctuation and the language tag) are then lost. In a real call the audio goes on
    after an utterance, so the evaluation appends at most one chunk (< 160 ms) of digital silence instead."""
    cfg = model.encoder.streaming_cfg
    first, nxt = cfg.chunk_size if isinstance(cfg.chunk_size, list) else (cfg.chunk_size, cfg.chunk_size)
    hop = 160
    frames = len(audio) // hop + 1
    need = first if frames <= first else first + -(-(frames - first) // nxt) * nxt
    return np.concatenate([audio, np.zeros((need - frames) * hop, np.float32)]) if need > frames else audio


@torch.inference_mode()
def stream_transcribe(model, audios: list[np.ndarray], prompt: str) -> list[str]:
    """Batched cache-aware streaming (NeMo's reference loop) with one prompt for the whole batch."""
    from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

    model.set_inference_prompt(prompt)
    buf = CacheAwareStreamingAudioBuffer(model=model, online_normalization=False)
    for a in audios:
        buf.append_audio(pad_to_chunk(model, a), stream_id=-1)
    ch, tm, chl = model.encoder.get_initial_cache_state(batch_size=len(audios))
    hyps = None
    for step, (chunk, clen) in enumerate(buf):
        _, hyps, ch, tm, chl, _ = model.conformer_stream_step(
            processed_signal=chunk, processed_signal_length=clen, cache_last_channel=ch, cache_last_time=tm,
            cache_last_channel_len=chl, keep_all_outputs=buf.is_buffer_empty(), previous_hypotheses=hyps,
            previous_pred_out=None,
            drop_extra_pre_encoded=0 if step == 0 else model.encoder.streaming_cfg.drop_extra_pre_encoded,
            return_transcription=True)
    return [h.text for h in hyps]


@torch.inference_mode()
def offline_transcribe(model, audios: list[np.ndarray], prompt: str) -> list[str]:
    """Whole-utterance encoder (same att context) + prompt + greedy RNNT: the offline reference for comparisons."""
    idx = model.cfg.model_defaults.prompt_dictionary[prompt]
    out = []
    for a in audios:
        x = torch.from_numpy(pad_to_chunk(model, a))[None]
        enc, elen = model.forward(input_signal=x, input_signal_length=torch.tensor([x.shape[1]]),
                                  prompt_indices=torch.tensor([idx]))
        out.append(model.decoding.rnnt_decoder_predictions_tensor(encoder_output=enc, encoded_lengths=elen)[0].text)
    return out


def _score(rows, hyps) -> dict:
    refs = [r["text"] for r in rows]
    return {
        "wer": wer([normalise(h) for h in hyps], [normalise(r) for r in refs]),
        "wer_strict": wer([strip_tags(h) for h in hyps], [strip_tags(r) for r in refs]),
        "tag_acc": float(np.mean([last_tag(h) == r["lang"] for h, r in zip(hyps, rows)])),
    }


def evaluate_set(model, rows: list[dict], audios: list[np.ndarray], with_offline: bool = True) -> dict:
    res: dict = {}
    examples = []
    total_audio = sum(len(a) for a in audios) / 16000
    t_stream = 0.0
    agree = []
    for lang in LANGS:
        sel = [i for i, r in enumerate(rows) if r["lang"] == lang]
        rs, au = [rows[i] for i in sel], [audios[i] for i in sel]
        entry = {"n_utts": len(sel)}
        for mode, prompt in (("given", lang), ("auto", "auto")):
            t0 = time.time()
            hyps = stream_transcribe(model, au, prompt)
            t_stream += time.time() - t0
            sc = _score(rs, hyps)
            entry[f"wer_{mode}"] = round(sc["wer"], 4)
            entry[f"wer_strict_{mode}"] = round(sc["wer_strict"], 4)
            entry[f"tag_acc_{mode}"] = round(sc["tag_acc"], 4)
            if with_offline:
                off = offline_transcribe(model, au, prompt)
                agree += [a == b for a, b in zip(hyps, off)]
            for r, h in list(zip(rs, hyps))[:2]:
                examples.append({"lang": lang, "prompt": prompt, "ref": r["text"], "hyp": h})
        res[lang] = entry
    res["_examples"] = examples
    res["_stream_rtf"] = round(t_stream / (2 * total_audio), 4)
    if with_offline:
        res["_stream_equals_offline"] = round(float(np.mean(agree)), 4)
    return res


def _load_test(rows: list[dict]) -> list[np.ndarray]:
    return [decode_mulaw_to_16k(read_mulaw_wav(r["audio_filepath"])[0]) for r in rows]


def shipped_rows(test_rows: list[dict]) -> list[dict]:
    out = []
    for lang in LANGS:
        out += [r for r in test_rows if r["lang"] == lang][:N_SHIP_PER_LANG]
    return out


def evaluate(out: Path) -> dict:
    torch.set_num_threads(2)
    model = load_model(out / "demo.nemo")
    test = read_manifest(out / "data" / "test.jsonl")
    ship = shipped_rows(test)
    log.info("evaluate: shipped held-out set (%d utts), streaming at %s", len(ship), CHUNK_ATT)
    r_ship = evaluate_set(model, ship, _load_test(ship))
    log.info("evaluate: shipped: %s", json.dumps({k: v for k, v in r_ship.items() if k != "_examples"}))
    log.info("evaluate: full held-out test split (%d utts)", len(test))
    r_full = evaluate_set(model, test, _load_test(test), with_offline=False)
    log.info("evaluate: full: %s", json.dumps({k: v for k, v in r_full.items() if k != "_examples"}))
    res = {"shipped": r_ship, "full": r_full}
    (out / "eval.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    return res


# ---------------------------------------------------------------- shipping
def _sample_call(test_rows: list[dict], dest_wav: Path, dest_txt: Path) -> None:
    """A ~6-10 s call: a few held-out utterances (not in the shipped set) in two languages with pauses."""
    picks = []
    en = [r for r in test_rows if r["lang"] == "en-US"][N_SHIP_PER_LANG:]
    es = [r for r in test_rows if r["lang"] == "es-ES"][N_SHIP_PER_LANG:]
    # deterministic choice: a greeting/request-like and a number-like utterance in English, one in Spanish
    pool = [r for r in en if "number" in r["text"] or "order" in r["text"]][:1] + \
        [r for r in en if r["duration"] < 2.0][:1] + [r for r in es if 1.5 < r["duration"] < 3.5][:1]
    pause = np.zeros(int(0.6 * TEL_SR), np.float32)
    parts, total = [], 0.0
    for r in pool:
        ulaw, _ = read_mulaw_wav(r["audio_filepath"])
        import audioop
        x8 = np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype="<i2").astype(np.float32) / 32768.0
        if total + len(x8) / TEL_SR > 10.0:
            continue
        parts += [x8, pause]
        total += len(x8) / TEL_SR + 0.6
        picks.append(r)
    x8 = np.concatenate(parts)
    import audioop
    from .audio import to_int16
    write_mulaw_wav(dest_wav, audioop.lin2ulaw(to_int16(x8), 2))
    dest_txt.write_text("\n".join(r["text"] for r in picks) + "\n", encoding="utf8")
    log.info("ship: sample call %.1f s, %d utterances", len(x8) / TEL_SR, len(picks))


def ship(out: Path, repo: Path) -> None:
    models = repo / "plugin" / "models"
    models.mkdir(parents=True, exist_ok=True)
    held = repo / "tests" / "data" / "demo_heldout"
    held.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "demo.nemo", models / "demo.nemo")
    test = read_manifest(out / "data" / "test.jsonl")
    rows = shipped_rows(test)
    with open(held / "manifest.jsonl", "w") as f:
        for r in rows:
            name = f"{r['lang']}_{Path(r['audio_filepath']).stem}.wav"
            shutil.copyfile(r["audio_filepath"], held / name)
            f.write(json.dumps({"file": name, "text": r["text"], "lang": r["lang"], "duration": r["duration"],
                                "voice": r["voice"]}, ensure_ascii=False) + "\n")
    _sample_call(test, models / "sample_call.wav", models / "sample_call.txt")
    from .calls import score_calls_of
    score_calls_of(out / "demo.nemo", out / "calls_eval.json", held)
    from .card import write_card
    write_card(out, models)

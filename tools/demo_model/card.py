"""Writes plugin/models/DEMO_MODEL_CARD.md and plugin/models/demo_metrics.json from the build outputs."""

from __future__ import annotations

import json
from pathlib import Path

from . import LANGS, PROMPT_DICTIONARY
from . import model as M
from . import train as T
from .synth import HELDOUT_VARIANTS, TRAIN_VARIANTS, read_manifest


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def write_card(out: Path, models_dir: Path) -> None:
    tr = json.loads((out / "train_result.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    train_rows = read_manifest(out / "data" / "train.jsonl")
    test_rows = read_manifest(out / "data" / "test.jsonl")
    nemo_mb = (models_dir / "demo.nemo").stat().st_size / 1e6
    ship = ev["shipped"]
    full = ev["full"]

    metrics = {lang: {k: ship[lang][k] for k in ("wer_given", "wer_auto", "tag_acc_auto", "tag_acc_given",
                                                    "wer_strict_given", "wer_strict_auto", "n_utts")}
               for lang in LANGS}
    metrics.update({
        "chunk_ms": 160, "att_context_size": [56, 1], "n_utts": sum(ship[lang]["n_utts"] for lang in LANGS),
        "eval_set": "tests/data/demo_heldout", "train_minutes": round(tr["minutes"], 1), "train_steps": tr["step"],
        "params": tr["params"], "nemo_bytes": (models_dir / "demo.nemo").stat().st_size,
        "stream_equals_offline": ship.get("_stream_equals_offline"),
        "wer_definition": "word error rate after lower-casing and removing punctuation and the language tag; "
                          "wer_strict_* keeps case and punctuation",
        "full_test_split": {lang: {k: full[lang][k] for k in ("wer_given", "wer_auto", "tag_acc_auto", "n_utts")}
                            for lang in LANGS},
    })
    (models_dir / "demo_metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n")

    def rows(res):
        lines = ["| language | n | WER, language given | WER, auto | tag right, auto | tag right, given | "
                 "strict WER given / auto |", "|---|---|---|---|---|---|---|"]
        for lang in LANGS:
            r = res[lang]
            lines.append(f"| {lang} | {r['n_utts']} | {_pct(r['wer_given'])} | {_pct(r['wer_auto'])} | "
                         f"{_pct(r['tag_acc_auto'])} | {_pct(r['tag_acc_given'])} | "
                         f"{_pct(r['wer_strict_given'])} / {_pct(r['wer_strict_auto'])} |")
        return "\n".join(lines)

    targets_met = all(ship[lang]["wer_given"] <= 0.10 and ship[lang]["wer_auto"] <= 0.15
                      and ship[lang]["tag_acc_auto"] >= 0.95 for lang in LANGS)
    train_h = sum(r["duration"] for r in train_rows) / 3600
    ex = "\n".join(f"| {e['lang']} | {e['prompt']} | {e['ref']} | {e['hyp']} |" for e in ship["_examples"])
    hist = "\n".join(f"| {h['step']} | {h['min']} | {h['collapse']} | {h.get('ctc') or float('nan'):.2f} | "
                     f"{h.get('rnnt') or float('nan'):.2f} | {_pct(h.get('rnnt_wer_given'))} | "
                     f"{_pct(h.get('rnnt_wer_auto'))} |"
                     for h in tr["hist"] if h["step"] % 1000 == 0)
    card = f"""# Demo model card: `plugin/models/demo.nemo`

A **tiny** model of the real `nvidia/nemotron-3.5-asr-streaming-0.6b` class, trained by this repo on
synthetic speech, so that the product can be shown and tested end to end without the 2.5 GB checkpoint.
It is **not** a general speech recogniser. It knows a small closed phone-call grammar in three languages, spoken by
espeak-ng.

* Class: `nemo.collections.asr.models.EncDecRNNTBPEModelWithPrompt` (same as the real model). The cache-aware
  FastConformer-RNNT has a 128-way language prompt.
* Size: **{tr['params'] / 1e6:.2f} M parameters**, `.nemo` {nemo_mb:.2f} MB (fp32).
* Rebuild with `tools/demo_model/setup.sh && python -m tools.demo_model build --out build/demo` (seeded). Stages:
  `synth`, `overfit`, `train`, `finetune` (multi-utterance, `--ft-minutes`, default 40; then long silences,
  `--ft-silence-minutes`, default 30), `evaluate`, `ship`.

## Results (measured, streaming at 160 ms)
Held-out synthetic **8 kHz μ-law** calls with **held-out espeak-ng voice variants**, streamed with NeMo's cache-aware
loop (`CacheAwareStreamingAudioBuffer` + `conformer_stream_step`) at `att_context_size [56,1]` (160 ms chunks).
The prompt is `set_inference_prompt(<language>)` ("given") or `set_inference_prompt("auto")`.
WER is computed after lower-casing and removing punctuation and the language tag. "Strict" WER keeps case and
punctuation. "Tag right" means the last `<xx-XX>` tag in the output is the spoken language.
The files of one language are streamed as a batch of streams. Each file's tail is zero-padded to a whole chunk
(< 160 ms). Without the padding,
NeMo 3.0's `CacheAwareStreamingAudioBuffer` drops a final partial chunk shorter than 8 mel frames, and the lost
frames often carry the final punctuation and the tag (see `evaluate.pad_to_chunk`).

**Shipped held-out set** (`tests/data/demo_heldout/`, {{N_SHIP}} utterances per language, the figures in
`demo_metrics.json`):

{rows(ship)}

**Full held-out test split** ({len(test_rows)} utterances; includes the shipped ones; 15 per language were also
watched during training, but no model selection was made on them):

{rows(full)}

* Issue-3 targets (WER ≤ 10 % given, ≤ 15 % auto, tag ≥ 95 %): **{"met" if targets_met else "NOT all met (see above)"}**
  on the shipped set.
* Streaming text equals offline (whole-utterance encoder + prompt + greedy RNNT) text for
  {_pct(ship.get('_stream_equals_offline'))} of the shipped-set decodes.
* Streaming real-time factor of the evaluation (2 CPU cores, all utterances of a language batched):
  {ship.get('_stream_rtf')}.
* Through the product's engine (`tests/test_demo_model.py`: each file followed by the 200 ms a VAD waits, then
  finalized with the engine's default 320 ms of trailing context) the shipped set gives the same figures, de-DE
  auto tags included (100 %). Before the trailing context the engine's de-DE auto tags were 95 %: a short "Guten
  Morgen" came out without its full stop, so without a tag (README, *Transcripts you can trust*).
* Wideband input is not worse: the same unseen-voice speech as 16 kHz PCM or 48 kHz PCM through the service's
  resampler scores as well as or better than as 8 kHz μ-law (en-US 4.9 / 5.5 % vs 4.9 / 11.0 % WER given / auto,
  `benchmarks/results/wideband_demo.md`). Training used telephony copies of half the utterances, clean 16 kHz for
  the rest.

Examples (shipped set):

| lang | prompt | reference | streaming output |
|---|---|---|---|
{ex}

## Data
* espeak-ng (`{ 'en-us / es / de' }` voices) renders a closed grammar (`tools/demo_model/grammar.py`): greetings, yes/no,
  12 short service requests, digit strings (3–7 digits) in 6 templates, round amounts, and greeting+request or
  yes/no+number combinations. Text is cased and punctuated as the real model writes it (`¿Dónde está mi pedido?`).
  Numbers are written as words. The manifest text carries the language tag after the final punctuation:
  `Yes, please. <en-US>`.
* Train: {len(train_rows)} utterances ({train_h:.2f} h), {len(TRAIN_VARIANTS)} voice variants
  (`{", ".join(v or "default" for v in TRAIN_VARIANTS)}`), speed 125–195 wpm, pitch 15–85, amplitude 80–180, word gap 0–4.
* Test: {len(test_rows)} utterances with **held-out** variants `{", ".join(HELDOUT_VARIANTS)}`, speed 135–185,
  pitch 25–75. Each gets 150 ms lead and 300 ms trail silence, a random gain and white noise at 25–40 dB SNR. It is
  then anti-alias resampled to 8 kHz, G.711 μ-law encoded, and stored as WAVE_FORMAT_MULAW (format tag 7).
* Training augmentation (on the fly): random lead/trail silence, random gain (peak 0.05–0.9), white noise
  (p 0.6, SNR 20–45 dB), and the telephony path 16 kHz → 8 kHz → μ-law (stdlib `audioop`) → 16 kHz on
  {int(T.P_TEL * 100)} % of the utterances.

## Model
* Preprocessor: 128 mel, 16 kHz, 25 ms / 10 ms, n_fft 512, `normalize: NA` (streaming-safe), dither 1e-5 during
  training only.
* Encoder: ConformerEncoder, d_model {M.D_MODEL}, {M.N_LAYERS} layers, 4 heads, ff×4, `dw_striding` ×8 with 64 channels,
  `causal_downsampling`, rel_pos, xscaling, causal depthwise conv (kernel 9, layer norm), `chunked_limited`,
  `att_context_size {M.ATT_CONTEXT_SIZES}`. Index 0, [56,1] (160 ms), is the default. Training samples one per step
  with p={M.ATT_CONTEXT_PROBS}.
* Prompt: `model_defaults.initialize_prompt_feature: true`, `num_prompts: 128`,
  `prompt_dictionary: {json.dumps(PROMPT_DICTIONARY)}` (`auto` = 101, as in the real checkpoint).
* Decoder: RNNT prediction net, 1×LSTM {M.PRED_HIDDEN}. Joint {M.JOINT_HIDDEN}, ReLU. Greedy batch decoding.
* Tokenizer: SentencePiece BPE, {M.VOCAB_SIZE} requested (mostly whole words for this grammar). The tags `<en-US>`,
  `<es-ES>` and `<de-DE>` are user-defined symbols (the tag is written `▁` + `<xx-XX>`).

## Training
* CPU only (2 cores, `torch.set_num_threads(2)`): {tr['step']} steps, **{tr['minutes']:.1f} min**, about
  {tr['epochs']} epochs, batches of up to {T.MAX_BATCH_S:.0f} s of audio. A plain torch loop calls the model's own
  modules (`preprocessor` → `encoder` → prompt exactly as `forward` builds it → `decoder` → `joint`).
* The shipped run was started with an 85-min budget. At step 3041 (45.5 min) it was stopped at a checkpoint and
  resumed with a 100-min budget (`--minutes 100`, now the default). The time-based cosine LR therefore stepped up
  from 4.5e-4 to 5.7e-4 at that point. Loop time excludes about 1 min of process start-up per launch. The
  48-utterance overfit check (`overfit` stage, 500 steps, 5.5 min) ran first: CTC 1.7 and RNN-T 7.3 nats per
  utterance.
* Loss: a vectorised torch RNN-T loss (`tools/demo_model/rnnt_loss.py`, tested against NeMo's in
  `tests/test_rnnt_loss.py`). NeMo's numba loss is about 100× slower on this CPU. An auxiliary CTC head sits on the
  encoder output, before the prompt. **CTC-only warm-up** for the first {T.CTC_ONLY_STEPS} steps, then the RNN-T loss
  ramps in over {T.RNNT_RAMP} steps with CTC weight {T.CTC_WEIGHT}. The CTC head is not part of the saved model.
* AdamW (0.9/0.98, wd 1e-3), peak LR {T.PEAK_LR} after {T.WARMUP} linear warm-up steps, then a cosine decay over the
  wall-clock budget. Grad clip 1.0. Dropout 0.05. Light SpecAugment from step {T.SPECAUG_FROM}.
* Prompt: the true language for {int((1 - T.P_AUTO) * 100)} % of the utterances, `auto` for the rest.
* Fixed input scale without a non-streaming normaliser: the first subsampling conv's init and LR are divided by the
  global log-mel std ({tr['feat_std']:.2f}; mean {tr['feat_mean']:.2f}). For Adam this is exactly equivalent to
  feeding features / std.
* Collapse check every {T.CHECK_EVERY} steps: the relative change of the encoder output when real features are
  replaced by random features of the same mean/std. Training stops if it falls under {T.COLLAPSE_MIN}. Earlier
  attempts failed because of this collapse.

Training history (running-average losses in nats per utterance; WER on 45 held-out utterances, offline greedy):

| step | min | collapse check | CTC | RNN-T | WER given | WER auto |
|---|---|---|---|---|---|---|
{hist}

## Limits
* **Synthetic speech only** (espeak-ng formant synthesis). Expect near-random output on real human speech.
* **Closed domain**: only the phone-call grammar above. Other words are not in the model's world.
{{STREAM_LIMIT}}* Only en-US, es-ES and de-DE. Any other prompt in the 128-way space is untrained.
* It was trained and measured at 160 ms chunks ([56,1]). The other lookaheads were trained with less weight and were
  not measured here.
* It is for demos and tests of the code path. Its figures say nothing about the real nemotron model.
"""
    ft_path = out / "finetune_result.json"
    calls_path = out / "calls_eval.json"
    if (out / "finetune_used").exists() and ft_path.exists():
        ft = json.loads(ft_path.read_text())
        note = (f"* **Fine-tune for multi-utterance streams** (stage `finetune`, after the main run): {ft['steps']} "
                f"steps, {ft['minutes']:.1f} min, continuing the main run's weights and optimiser state, LR warm-up to "
                f"{ft['peak_lr']} then cosine decay. {int(T.FT_P_CONCAT * 100)} % of the items are 2–4 utterances "
                f"joined by 0.2–1.2 s pauses with their tagged texts concatenated (mixed languages only with the "
                f"`auto` prompt), so the model learns to go on after a tag with speech in its left context.\n")
        silence_path = out / T.FT_STAGES["silence"].result
        if silence_path.exists():
            st, sil = json.loads(silence_path.read_text()), T.FT_STAGES["silence"]
            note += (f"* **Fine-tune for silences** (stage `finetune --ft-stage silence`, after the one above): "
                     f"{st['steps']} steps, {st['minutes']:.1f} min, continuing its weights and optimiser state, LR "
                     f"warm-up to {st['peak_lr']} then cosine decay. Items as above, but pauses of "
                     f"{sil.pause_s[0]}–{sil.pause_s[1]} s, {int(sil.p_lead * 100)} % of the items start with "
                     f"{sil.lead_s[0]}–{sil.lead_s[1]} s of silence and {int(sil.p_floor * 100)} % have a faint "
                     f"noise floor (−75 to −50 dBFS) under the whole item. Calls open seconds before the caller "
                     f"speaks; the main run's items had at most 0.3 s of silence, and with 3–6 s of it in the left "
                     f"context the model before this stage lost words and tags.\n")
        note += "* The shipped checkpoint is the last fine-tuned model; the figures above are for it.\n"
        if calls_path.exists():
            calls = json.loads(calls_path.read_text())
            lines = ["", "Calls of 3 held-out utterances on one stream, through the engine at 160 ms "
                     "(`python -m tools.demo_model.calls`; 200 ms silence, finalize, then a pause; 20 calls per mode, "
                     "`auto` calls mix languages). Pauses `short`: none before the first word, 0.6 s between; `long`: "
                     "4 s before the first word, 3 s between:", "",
                     "| pauses | mode | utterance | WER | tag right |", "|---|---|---|---|---|"]
            for pauses, prefix in (("short", ""), ("long", "long_")):
                for mode in ("auto", "given"):
                    for position in (1, 2, 3):
                        c = calls.get(f"{prefix}{mode}_{position}")
                        if c:
                            lines.append(f"| {pauses} | {mode} | {position} | {_pct(c['wer'])} | "
                                         f"{_pct(c['tag_right'])} |")
            note += "\n".join(lines) + "\n"
        card = card.replace("## Limits\n", "## Fine-tune\n" + note + "\n## Limits\n")
        stream_limit = ("* **Streams of several utterances** work since the fine-tune (table above); the main run alone "
                        "transcribed only the first utterance of a stream.\n")
    else:
        stream_limit = ("* **One utterance per stream.** Trained on single utterances: after the tag the model stays "
                        "\"finished\", so only the first utterance of a stream is reliable. Stage `finetune` fixes it.\n")
    card = card.replace("{STREAM_LIMIT}", stream_limit)
    card = card.replace("{N_SHIP}", str(ship[LANGS[0]]["n_utts"]))
    (models_dir / "DEMO_MODEL_CARD.md").write_text(card, encoding="utf8")

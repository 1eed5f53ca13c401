"""Stage 2: train the tiny EncDecRNNTBPEModelWithPrompt on CPU (plain torch loop, no Lightning).

Recipe (chosen against the encoder collapse seen in earlier attempts, see ../shared/notes/demo-model.md):
* CTC-only warm-up: an auxiliary CTC head on the (pre-prompt) encoder output is the only loss for the first
  ``CTC_ONLY_STEPS`` steps, so the text prior of the prediction net cannot win first; the RNN-T loss (vectorised
  torch implementation, ``rnnt_loss.py``) is then ramped in while CTC stays as an auxiliary term.
  The CTC head is not part of the NeMo model and is dropped at save.
* AdamW, peak LR 1e-3 after a long linear warm-up, cosine decay over the wall-clock budget; grad clip 1.
* Fixed input scale: the log-mel features are not normalised (streaming-safe ``normalize: NA``); instead the first
  subsampling conv is initialised and stepped as if its input were divided by the global feature std
  (exactly equivalent for Adam, see ``_scale_first_conv``).
* Collapse check every ``CHECK_EVERY`` steps: relative change of the encoder output when the real features are
  replaced by random features of the same mean/std. Training stops if it drops under ``COLLAPSE_MIN``.
* Prompt: the true language index for half of the utterances, ``auto`` for the rest.
* Resumable: a checkpoint (model, CTC head, optimiser, RNG states, elapsed time) every ``CKPT_EVERY_S`` seconds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import LANGS, PROMPT_DICTIONARY
from .audio import SR, augment
from .model import build_model, build_tokenizer, n_params
from .rnnt_loss import rnnt_loss
from .synth import read_manifest

log = logging.getLogger("demo_model")

PEAK_LR = 1e-3
WARMUP = 1500
CTC_ONLY_STEPS = 1200
RNNT_RAMP = 500
CTC_WEIGHT = 0.3  # after the CTC-only phase
MAX_BATCH_S = 30.0
SPECAUG_FROM = 3000
CHECK_EVERY = 200
VAL_EVERY = 1000
COLLAPSE_MIN = 0.05
CKPT_EVERY_S = 180
P_AUTO = 0.5
P_TEL = 0.5


def _load_wav(path: str) -> np.ndarray:
    with wave.open(path) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy()


def _batches(durs: np.ndarray, rng: random.Random, max_s: float) -> list[list[int]]:
    order = sorted(range(len(durs)), key=lambda i: (durs[i], rng.random()))
    out, cur, cur_max = [], [], 0.0
    for i in order:
        d = max(cur_max, durs[i] + 0.7)  # + padding silence added by augment()
        if cur and d * (len(cur) + 1) > max_s:
            out.append(cur)
            cur, d = [], durs[i] + 0.7
        cur.append(i)
        cur_max = d
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


class CTCHead(torch.nn.Module):
    def __init__(self, d: int, vocab: int):
        super().__init__()
        self.proj = torch.nn.Linear(d, vocab + 1)  # + blank (last)

    def forward(self, enc_btd):
        return self.proj(enc_btd).log_softmax(-1)


def apply_prompt(model, enc_bdt: torch.Tensor, prompt_indices: torch.Tensor) -> torch.Tensor:
    """Exactly what EncDecRNNTBPEModelWithPrompt.forward does after the encoder."""
    enc = enc_bdt.transpose(1, 2)
    B, T, _ = enc.shape
    prompt = torch.zeros(B, T, model.num_prompts, dtype=enc.dtype, device=enc.device)
    prompt.scatter_(2, prompt_indices.view(B, 1, 1).expand(-1, T, -1), 1.0)
    return model.prompt_kernel(torch.cat([enc, prompt], dim=-1)).transpose(1, 2)


def padded(xs: list[np.ndarray], ys: list[list[int]]):
    """Audio and token lists as zero-padded batch tensors with their lengths: X, xl, Y, yl."""
    xl = torch.tensor([len(x) for x in xs])
    X = torch.zeros(len(xs), int(xl.max()))
    for j, x in enumerate(xs):
        X[j, : len(x)] = torch.from_numpy(x)
    yl = torch.tensor([len(y) for y in ys])
    Y = torch.zeros(len(ys), int(yl.max()), dtype=torch.long)
    for j, y in enumerate(ys):
        Y[j, : len(y)] = torch.tensor(y)
    return X, xl, Y, yl


class Data:
    def __init__(self, rows: list[dict], tokenizer):
        self.rows = rows
        self.audio = [_load_wav(r["audio_filepath"]) for r in rows]
        self.durs = np.array([len(a) / SR for a in self.audio])
        self.tokens = [tokenizer.text_to_ids(r["text"]) for r in rows]
        self.lang_idx = [PROMPT_DICTIONARY[r["lang"]] for r in rows]

    def batch(self, idx: list[int], rng: np.random.Generator, aug: bool = True, p_auto: float = P_AUTO):
        xs = []
        for i in idx:
            x = self.audio[i].astype(np.float32) / 32768.0
            xs.append(augment(x, rng, P_TEL) if aug else x)
        X, xl, Y, yl = padded(xs, [self.tokens[i] for i in idx])
        prompts = torch.tensor([PROMPT_DICTIONARY["auto"] if rng.random() < p_auto else self.lang_idx[i]
                                for i in idx])
        return X, xl, Y, yl, prompts


def _scale_first_conv(model, s: float):
    """Dividing the input by s is equivalent (for Adam) to dividing the first conv's weights and its learning rate
    by s. So we get a unit-scale input without a non-streaming-safe normaliser and without changing the graph."""
    conv0 = model.encoder.pre_encode.conv[0]
    with torch.no_grad():
        conv0.weight.mul_(1.0 / s)
    return [conv0.weight]


def _optimizer(model, ctc_head, conv0_params: list, fstd: float, peak_lr: float) -> torch.optim.AdamW:
    """AdamW with three groups (same order in the main run and the fine-tunes, so their optimiser states load):
    encoder + CTC head, the first conv (LR scaled by 1/feature std), and the RNN-T decoder, joint and prompt."""
    rnnt_params = list(model.decoder.parameters()) + list(model.joint.parameters()) + \
        list(model.prompt_kernel.parameters())
    special = {id(p) for p in conv0_params + rnnt_params}
    groups = [
        {"params": [p for p in list(model.parameters()) + list(ctc_head.parameters()) if id(p) not in special],
         "lr_scale": 1.0, "name": "enc"},
        {"params": conv0_params, "lr_scale": 1.0 / fstd, "name": "conv0"},
        {"params": rnnt_params, "lr_scale": 1.0, "name": "rnnt"},
    ]
    return torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.98), weight_decay=1e-3)


def _save_atomically(path: Path, state: dict) -> None:
    """A checkpoint that a kill mid-write cannot corrupt (training resumes from it)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.rename(path)


@torch.no_grad()
def collapse_check(model, feats: torch.Tensor, flen: torch.Tensor, seed: int = 0) -> float:
    """Relative change of the encoder output when real features are replaced by random ones (same mean/std)."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(feats.shape[2])[None, :] < flen[:, None])[:, None, :].expand_as(feats)
    vals = feats[mask]
    rnd = torch.randn(feats.shape, generator=g) * vals.std() + vals.mean()
    rnd = torch.where(mask, rnd, feats)
    e1, el = model.encoder(audio_signal=feats, length=flen)
    e2, _ = model.encoder(audio_signal=rnd, length=flen)
    tmask = (torch.arange(e1.shape[2])[None, :] < el[:, None])[:, None, :]
    d = ((e1 - e2) * tmask).norm() / ((e1 * tmask).norm() + 1e-9)
    model.train(was)
    return float(d)


@torch.no_grad()
def quick_val(model, ctc_head, data: Data, idx: list[int], use_rnnt: bool) -> dict:
    """Offline greedy decoding (true-language prompt and auto) on a few clean utterances (no augmentation)."""
    from nemo.collections.asr.metrics.wer import word_error_rate

    was = model.training
    model.eval()
    out = {}
    X, xl, Y, yl, _ = data.batch(idx, np.random.default_rng(0), aug=False, p_auto=0.0)
    refs = [data.rows[i]["text"] for i in idx]
    feats, flen = model.preprocessor(input_signal=X, length=xl)
    enc, elen = model.encoder(audio_signal=feats, length=flen)
    # CTC greedy on the acoustic encoder
    lp = ctc_head(enc.transpose(1, 2))
    blank = lp.shape[-1] - 1
    hyps = []
    for b in range(lp.shape[0]):
        ids = lp[b, : elen[b]].argmax(-1).tolist()
        toks, prev = [], None
        for t in ids:
            if t != prev and t != blank:
                toks.append(t)
            prev = t
        hyps.append(model.tokenizer.ids_to_text(toks))
    out["ctc_wer"] = word_error_rate(hyps, refs)
    out["ctc_example"] = hyps[0]
    if use_rnnt:
        for mode in ("given", "auto"):
            pi = torch.tensor([PROMPT_DICTIONARY["auto"] if mode == "auto" else data.lang_idx[i] for i in idx])
            encp = apply_prompt(model, enc, pi)
            hy = model.decoding.rnnt_decoder_predictions_tensor(encoder_output=encp, encoded_lengths=elen)
            texts = [h.text for h in hy]
            out[f"rnnt_wer_{mode}"] = word_error_rate(texts, refs)
            out[f"tag_acc_{mode}"] = float(np.mean([t.strip().endswith(f"<{data.rows[i]['lang']}>")
                                                    for t, i in zip(texts, idx)]))
            out[f"example_{mode}"] = texts[0]
    out["ref"] = refs[0]
    model.train(was)
    return out


def _seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(out: Path, seed: int = 1234, minutes: float = 70.0, max_steps: int = 0, subset: int = 0,
          tag: str = "train", aug: bool = True, warmup: int = WARMUP, ctc_only_steps: int = CTC_ONLY_STEPS,
          rnnt_ramp: int = RNNT_RAMP, peak_lr: float = PEAK_LR, check_every: int = CHECK_EVERY,
          val_every: int = VAL_EVERY) -> dict:
    torch.set_num_threads(int(os.environ.get("DEMO_THREADS", "2")))
    _seed_all(seed)
    data_dir = out / "data"
    rows = read_manifest(data_dir / "train.jsonl")
    tok_dir = build_tokenizer([r["text"] for r in rows], out / "tokenizer")
    model = build_model(tok_dir)
    log.info("%s: model %s, %.3f M params", tag, type(model).__name__, n_params(model) / 1e6)
    V = model.tokenizer.vocab_size
    ctc_head = CTCHead(model.cfg.model_defaults.enc_hidden, V)

    if subset:
        rows = random.Random(seed).sample(rows, subset)
    data = Data(rows, model.tokenizer)
    val_rows = _val_rows(data_dir, model.tokenizer) if not subset else None
    val = Data(val_rows, model.tokenizer) if val_rows else data
    val_idx = list(range(min(len(val.rows), 45)))
    log.info("%s: %d utterances, %.2f h", tag, len(rows), data.durs.sum() / 3600)

    # feature scale for the fixed input scaling
    fx, fl, *_ = data.batch(list(range(min(64, len(rows)))), np.random.default_rng(seed), aug=aug)
    with torch.no_grad():
        f, flen = model.preprocessor(input_signal=fx, length=fl)
    m = (torch.arange(f.shape[2])[None] < flen[:, None])[:, None, :].expand_as(f)
    fmean, fstd = float(f[m].mean()), float(f[m].std())
    log.info("%s: log-mel mean %.2f std %.2f (first conv scaled by 1/std)", tag, fmean, fstd)
    conv0_params = _scale_first_conv(model, fstd)

    opt = _optimizer(model, ctc_head, conv0_params, fstd, peak_lr)

    ckpt_path = out / f"{tag}_ckpt.pt"
    step, elapsed, epoch, hist = 0, 0.0, 0, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        ctc_head.load_state_dict(ck["ctc_head"])
        opt.load_state_dict(ck["opt"])
        step, elapsed, epoch, hist = ck["step"], ck["elapsed"], ck["epoch"], ck["hist"]
        random.setstate(ck["py_rng"])
        torch.set_rng_state(ck["torch_rng"])
        log.info("%s: resumed from %s at step %d (%.1f min)", tag, ckpt_path, step, elapsed / 60)
    np_rng = np.random.default_rng(seed + 1000 * epoch + step)
    budget = minutes * 60.0

    def lr_at(step, frac_time):
        if step < warmup:
            return peak_lr * (step + 1) / warmup
        return 1e-5 + 0.5 * (peak_lr - 1e-5) * (1 + math.cos(math.pi * min(1.0, frac_time)))

    def save_ckpt():
        _save_atomically(ckpt_path, {"model": model.state_dict(), "ctc_head": ctc_head.state_dict(),
                                     "opt": opt.state_dict(), "step": step, "elapsed": elapsed, "epoch": epoch,
                                     "hist": hist, "py_rng": random.getstate(), "torch_rng": torch.get_rng_state()})

    check_x = data.batch(list(range(min(8, len(rows)))), np.random.default_rng(7), aug=False)
    with torch.no_grad():
        chk_f, chk_l = model.preprocessor(input_signal=check_x[0], length=check_x[1])
    c0 = collapse_check(model, chk_f, chk_l)
    log.info("%s: collapse check at init: %.3f", tag, c0)

    model.train()
    t_last_ckpt = time.time()
    t0 = time.time() - elapsed
    run_avg = {}
    stop_reason = "budget"
    while True:
        batches = _batches(data.durs, random.Random(seed * 7919 + epoch), MAX_BATCH_S)
        skip = step % len(batches) if step and not run_avg else 0  # on resume, continue inside the epoch
        for bi, idx in enumerate(batches):
            if bi < skip:
                continue
            elapsed = time.time() - t0
            if (max_steps and step >= max_steps) or (not max_steps and elapsed >= budget):
                break
            frac = elapsed / budget if budget > 0 else 0.0
            lr = lr_at(step, frac)
            rnnt_w = 0.0 if step < ctc_only_steps else min(1.0, (step - ctc_only_steps + 1) / rnnt_ramp)
            ctc_w = 1.0 if step < ctc_only_steps else CTC_WEIGHT
            for g in opt.param_groups:
                s = g["lr_scale"]
                if g["name"] == "rnnt":
                    s *= min(1.0, max(0.0, (step - ctc_only_steps + 1) / rnnt_ramp))
                g["lr"] = lr * s

            X, xl, Y, yl, prompts = data.batch(idx, np_rng, aug=aug)
            feats, flen = model.preprocessor(input_signal=X, length=xl)
            if step >= SPECAUG_FROM and aug:
                feats = model.spec_augmentation(input_spec=feats, length=flen)
            enc, elen = model.encoder(audio_signal=feats, length=flen)
            lp = ctc_head(enc.transpose(1, 2))
            ctc = F.ctc_loss(lp.transpose(0, 1), Y, elen, yl, blank=V, reduction="none", zero_infinity=True).mean()
            loss = ctc_w * ctc
            rn = torch.tensor(float("nan"))
            if rnnt_w > 0:
                encp = apply_prompt(model, enc, prompts)
                dec, _, _ = model.decoder(targets=Y, target_length=yl)
                joint = model.joint(encoder_outputs=encp, decoder_outputs=dec)
                rn = rnnt_loss(joint, Y, elen, yl, blank=V, reduction="none").mean()
                loss = loss + rnnt_w * rn
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(ctc_head.parameters()), 1.0)
            opt.step()
            step += 1

            for k, v in (("ctc", float(ctc)), ("rnnt", float(rn)), ("gn", float(gn))):
                if not math.isnan(v):
                    run_avg[k] = v if k not in run_avg else 0.95 * run_avg[k] + 0.05 * v
            if step % 50 == 0:
                log.info("%s step %d ep %d %.1f min lr %.2e | ctc %.2f rnnt %.2f (nats/utt) gn %.2f | B %d",
                         tag, step, epoch, elapsed / 60, lr, run_avg.get("ctc", float("nan")),
                         run_avg.get("rnnt", float("nan")), run_avg.get("gn", float("nan")), len(idx))
            if step % check_every == 0:
                c = collapse_check(model, chk_f, chk_l)
                pre = model.encoder.pre_encode
                with torch.no_grad():
                    gnorms = {n: float(sum(p.grad.norm() ** 2 for p in mod.parameters() if p.grad is not None) ** .5)
                              for n, mod in (("pre_encode", pre), ("layers", model.encoder.layers),
                                             ("decoder", model.decoder), ("joint", model.joint),
                                             ("prompt", model.prompt_kernel), ("ctc", ctc_head))}
                log.info("%s step %d collapse-check %.3f | grad norms %s", tag, step, c,
                         " ".join(f"{k}={v:.3f}" for k, v in gnorms.items()))
                hist.append({"step": step, "min": round(elapsed / 60, 2), "collapse": round(c, 4),
                             "ctc": run_avg.get("ctc"), "rnnt": run_avg.get("rnnt")})
                if c < COLLAPSE_MIN and step >= max(400, ctc_only_steps):  # CTC-only start has a blank plateau
                    stop_reason = f"collapse ({c:.4f} < {COLLAPSE_MIN}) at step {step}"
                    log.error("%s: encoder collapsed: %s", tag, stop_reason)
                    save_ckpt()
                    return {"stop": stop_reason, "step": step, "hist": hist}
            if step % val_every == 0:
                v = quick_val(model, ctc_head, val, val_idx, use_rnnt=rnnt_w > 0)
                log.info("%s step %d VAL %s", tag, step, json.dumps(v, ensure_ascii=False))
                hist[-1:] and hist[-1].update({k: v[k] for k in v if k.endswith(("wer", "given", "auto"))
                                               and not k.startswith("example")})
            if time.time() - t_last_ckpt > CKPT_EVERY_S:
                save_ckpt()
                t_last_ckpt = time.time()
        else:
            epoch += 1
            run_avg.setdefault("_", 0)
            continue
        break
    elapsed = time.time() - t0
    save_ckpt()
    v = quick_val(model, ctc_head, val, val_idx, use_rnnt=step > ctc_only_steps)
    log.info("%s done: %d steps, %.1f min, %s | VAL %s", tag, step, elapsed / 60, stop_reason,
             json.dumps(v, ensure_ascii=False))
    result = {"stop": stop_reason, "step": step, "minutes": elapsed / 60, "epochs": epoch, "hist": hist,
              "val": v, "params": n_params(model), "feat_mean": fmean, "feat_std": fstd,
              "final_ctc": run_avg.get("ctc"), "final_rnnt": run_avg.get("rnnt")}
    model.eval()
    model.save_to(str(out / ("demo.nemo" if tag == "train" else f"{tag}.nemo")))
    if tag == "train":
        (out / "train_result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
        log.info("saved %s (%.2f MB)", out / "demo.nemo", (out / "demo.nemo").stat().st_size / 1e6)
    return result


def _val_rows(data_dir: Path, tokenizer) -> list[dict]:
    """A few held-out utterances for the in-training check (decoded from their mu-law files)."""
    import tempfile

    from .audio import decode_mulaw_to_16k, read_mulaw_wav, to_int16

    rows = read_manifest(data_dir / "test.jsonl")
    by_lang = {lang: [r for r in rows if r["lang"] == lang][-15:] for lang in LANGS}
    tmpdir = Path(tempfile.mkdtemp(prefix="demo_val_"))
    out = []
    for lang in LANGS:
        for r in by_lang[lang]:
            ulaw, _ = read_mulaw_wav(r["audio_filepath"])
            x = decode_mulaw_to_16k(ulaw)
            p = tmpdir / (Path(r["audio_filepath"]).stem + f"_{lang}.wav")
            with wave.open(str(p), "wb") as w:
                w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR)
                w.writeframes(to_int16(x))
            out.append({**r, "audio_filepath": str(p)})
    return out


def overfit(out: Path, seed: int = 1234) -> dict:
    """Sanity check before the long run: memorise 48 utterances. Loss must fall far below the ~11-nat text floor."""
    res = train(out, seed=seed, max_steps=int(os.environ.get("OVERFIT_STEPS", "500")), subset=48, tag="overfit",
                aug=False, warmup=100, ctc_only_steps=200, rnnt_ramp=100, peak_lr=1e-3, check_every=100,
                val_every=250)
    ok = (res.get("final_ctc") or 99) < 4.0 and (res.get("final_rnnt") or 99) < 8.0  # text-only floor ~11
    log.info("overfit: final ctc %.2f rnnt %.2f nats/utt -> %s", res.get("final_ctc") or -1,
             res.get("final_rnnt") or -1, "OK" if ok else "NOT LEARNING")
    res["ok"] = ok
    (out / "overfit_result.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    return res


@dataclass(frozen=True)
class FinetuneStage:
    """One fine-tune stage after the main run: where it starts, and how its multi-utterance items are built."""
    name: str
    init: str  # checkpoint it continues (weights and optimiser state)
    peak_lr: float
    pause_s: tuple[float, float]  # pause between joined utterances
    p_lead: float = 0.0  # share of items that start with a long silence
    lead_s: tuple[float, float] = (0.0, 0.0)
    p_floor: float = 0.0  # share of items with a low noise floor under the whole item, silences included
    batch_s: float = MAX_BATCH_S / 2

    # the first stage keeps the file names it had before there were stages, so existing builds resume
    @property
    def ckpt(self) -> str:
        return "finetune_ckpt.pt" if self.name == "concat" else f"finetune_{self.name}_ckpt.pt"

    @property
    def result(self) -> str:
        return "finetune_result.json" if self.name == "concat" else f"finetune_{self.name}_result.json"


FT_WARMUP = 100
FT_P_CONCAT = 0.6
FT_STAGES = {
    # several utterances per stream: go on after a tag with speech in the left context
    "concat": FinetuneStage("concat", init="train_ckpt.pt", peak_lr=4e-4, pause_s=(0.2, 1.2)),
    # what calls really carry: seconds of silence before the first word and between utterances (the main run's
    # items have at most 0.3 s; with 3-6 s of it in the left context the model's words and tags got worse)
    "silence": FinetuneStage("silence", init="finetune_ckpt.pt", peak_lr=2e-4, pause_s=(0.2, 4.0), p_lead=0.5,
                             lead_s=(0.5, 6.0), p_floor=0.5, batch_s=MAX_BATCH_S / 3),
}


def _concat_batch(data: Data, idx: list[int], rng: np.random.Generator, stage: FinetuneStage):
    """Like Data.batch, but each item is, with probability FT_P_CONCAT, 2-4 utterances joined by pauses (the tagged
    texts concatenated), so the model learns to go on after a tag with speech in its left context. Items with the
    ``auto`` prompt may switch language between utterances; items with a given language keep it. The stage may put
    a long silence first and a faint noise floor under the whole item."""
    by_lang: dict[int, list[int]] = {}
    for i, li in enumerate(data.lang_idx):
        by_lang.setdefault(li, []).append(i)
    xs, ys, prompts = [], [], []
    for i in idx:
        auto = rng.random() < P_AUTO
        items = [i]
        if rng.random() < FT_P_CONCAT:
            for _ in range(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))):
                pool = range(len(data.rows)) if auto else by_lang[data.lang_idx[i]]
                items.append(int(pool[int(rng.integers(len(pool)))]))
        parts, toks = [], []
        if rng.random() < stage.p_lead:
            parts.append(np.zeros(int(rng.uniform(*stage.lead_s) * SR), np.float32))
        for k, j in enumerate(items):
            if k:
                parts.append(np.zeros(int(rng.uniform(*stage.pause_s) * SR), np.float32))
            parts.append(augment(data.audio[j].astype(np.float32) / 32768.0, rng, P_TEL))
            toks += data.tokens[j]
        x = np.concatenate(parts)
        if rng.random() < stage.p_floor:
            x = x + rng.standard_normal(len(x)).astype(np.float32) * 10 ** (rng.uniform(-75, -50) / 20)
        xs.append(x)
        ys.append(toks)
        prompts.append(PROMPT_DICTIONARY["auto"] if auto else data.lang_idx[i])
    return (*padded(xs, ys), torch.tensor(prompts))


def finetune(out: Path, stage: FinetuneStage, seed: int = 1234, minutes: float = 40.0) -> dict:
    """A fine-tune stage (``FT_STAGES``): continue ``stage.init`` (weights and optimiser state) on multi-utterance
    items. Resumable (``stage.ckpt``); writes ``demo.nemo`` and ``demo_<stage>.nemo`` (the main run's model is kept
    as ``demo_main.nemo``). Same losses, prompt mix, augmentation and SpecAugment as the end of the main run."""
    torch.set_num_threads(int(os.environ.get("DEMO_THREADS", "2")))
    _seed_all(seed + 1)
    rows = read_manifest(out / "data" / "train.jsonl")
    model = build_model(build_tokenizer([r["text"] for r in rows], out / "tokenizer"))
    V = model.tokenizer.vocab_size
    ctc_head = CTCHead(model.cfg.model_defaults.enc_hidden, V)
    start = torch.load(out / stage.init, weights_only=False)
    fstd = json.loads((out / "train_result.json").read_text())["feat_std"]
    peak_lr = stage.peak_lr
    opt = _optimizer(model, ctc_head, [model.encoder.pre_encode.conv[0].weight], fstd, peak_lr)
    ckpt_path = out / stage.ckpt
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        step, elapsed = ck["step"], ck["elapsed"]
        log.info("finetune %s: resumed at step %d (%.1f min)", stage.name, step, elapsed / 60)
    else:
        ck = start
    model.load_state_dict(ck["model"])
    ctc_head.load_state_dict(ck["ctc_head"])
    opt.load_state_dict(ck["opt"])
    data = Data(rows, model.tokenizer)
    val = Data(_val_rows(out / "data", model.tokenizer), model.tokenizer)
    rng = np.random.default_rng(seed + 2 + step)
    budget = minutes * 60.0

    def save_ckpt():
        _save_atomically(ckpt_path, {"model": model.state_dict(), "ctc_head": ctc_head.state_dict(),
                                     "opt": opt.state_dict(), "step": step, "elapsed": elapsed})

    params = list(model.parameters()) + list(ctc_head.parameters())
    model.train()
    t0, t_ckpt, avg, epoch = time.time() - elapsed, time.time(), {}, step // 400
    while elapsed < budget:
        for idx in _batches(data.durs, random.Random(seed * 31 + epoch), stage.batch_s):
            elapsed = time.time() - t0
            if elapsed >= budget:
                break
            lr = peak_lr * min(1.0, (step + 1) / FT_WARMUP) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            X, xl, Y, yl, prompts = _concat_batch(data, idx, rng, stage)
            feats, flen = model.preprocessor(input_signal=X, length=xl)
            feats = model.spec_augmentation(input_spec=feats, length=flen)
            enc, elen = model.encoder(audio_signal=feats, length=flen)
            ctc = F.ctc_loss(ctc_head(enc.transpose(1, 2)).transpose(0, 1), Y, elen, yl, blank=V,
                             reduction="none", zero_infinity=True).mean()
            dec, _, _ = model.decoder(targets=Y, target_length=yl)
            joint = model.joint(encoder_outputs=apply_prompt(model, enc, prompts), decoder_outputs=dec)
            rn = rnnt_loss(joint, Y, elen, yl, blank=V, reduction="none").mean()
            loss = CTC_WEIGHT * ctc + rn
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            for k, v in (("ctc", float(ctc)), ("rnnt", float(rn))):
                avg[k] = v if k not in avg else 0.95 * avg[k] + 0.05 * v
            if step % 50 == 0:
                log.info(f"finetune {stage.name} step %d %.1f/%.0f min lr %.2e | ctc %.2f rnnt %.2f (nats/item)", step,
                         elapsed / 60, minutes, lr, avg["ctc"], avg["rnnt"])
            if step % 500 == 0:
                v = quick_val(model, ctc_head, val, list(range(min(len(val.rows), 45))), use_rnnt=True)
                log.info("finetune %s step %d VAL %s", stage.name, step, json.dumps(v, ensure_ascii=False))
            if time.time() - t_ckpt > CKPT_EVERY_S:
                save_ckpt()
                t_ckpt = time.time()
        else:
            epoch += 1
    save_ckpt()
    model.eval()
    v = quick_val(model, ctc_head, val, list(range(min(len(val.rows), 45))), use_rnnt=True)
    # the main run's model stays as demo_main.nemo; evaluate/ship take demo.nemo, now the fine-tuned one
    if (out / "demo.nemo").exists() and not (out / "finetune_used").exists():
        shutil.copyfile(out / "demo.nemo", out / "demo_main.nemo")
    model.save_to(str(out / "demo.nemo"))
    shutil.copyfile(out / "demo.nemo", out / f"demo_{stage.name}.nemo")
    (out / "finetune_used").touch()
    res = {"stage": stage.name, "steps": step, "minutes": elapsed / 60, "peak_lr": peak_lr, "p_concat": FT_P_CONCAT,
           "val": v, **avg}
    (out / stage.result).write_text(json.dumps(res, indent=1, ensure_ascii=False))
    log.info("finetune %s done: %s", stage.name, res)
    return res

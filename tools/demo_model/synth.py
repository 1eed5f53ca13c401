"""Stage 1: synthesise the phone-call corpus with espeak-ng.

Train split: many espeak-ng voice variants, speeds, pitches, amplitudes and word gaps, stored clean at 16 kHz
(telephony, gain and noise are applied on the fly at training time).
Test split: HELD-OUT voice variants (never used for training), rendered, then sent through the telephony path and
stored as 8 kHz G.711 mu-law WAV files: this is what the evaluation and the shipped held-out set use.
"""

from __future__ import annotations

import json
import logging
import random
import wave
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from . import LANGS
from .audio import SR, encode_mulaw_8k, espeak_render, to_int16, write_mulaw_wav
from .grammar import sample_text, tagged

log = logging.getLogger("demo_model")

ESPEAK_VOICE = {"en-US": "en-us", "es-ES": "es", "de-DE": "de"}
TRAIN_VARIANTS = [None, "m1", "m2", "m3", "m4", "m5", "m8", "f1", "f2", "f3", "Andy", "Annie", "david", "linda",
                  "max", "paul", "steph", "john", "Alex", "belinda", "robert", "adam", "Denis", "Mario", "Michael",
                  "Storm", "Henrique", "Hugo", "Lee", "caleb", "edward", "iven", "norbert", "quincy", "rob",
                  "travis", "victor", "zac", "aunty", "shelby"]
HELDOUT_VARIANTS = ["m6", "m7", "f4", "f5", "benjamin", "anika"]


def _job(args):
    split, idx, lang, text, voice, speed, pitch, amp, gap, out_path, seed = args
    x = espeak_render(text, voice, speed, pitch, amp, gap)
    if split == "train":
        with wave.open(str(out_path), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR)
            w.writeframes(to_int16(x))
    else:
        rng = np.random.default_rng(seed)
        x = np.concatenate([np.zeros(int(0.15 * SR), np.float32), x, np.zeros(int(0.3 * SR), np.float32)])
        x = x * (rng.uniform(0.2, 0.8) / (np.max(np.abs(x)) + 1e-6))
        p = float(np.mean(x ** 2))
        x = x + rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(p / 10 ** (rng.uniform(25, 40) / 10))
        write_mulaw_wav(out_path, encode_mulaw_8k(x))
    return {"audio_filepath": str(out_path), "duration": round(len(x) / SR, 3), "text": tagged(text, lang),
            "lang": lang, "voice": voice, "speed": speed, "pitch": pitch}


def synth(out: Path, n_train: int = 3000, n_test: int = 100, seed: int = 1234, workers: int = 2) -> None:
    from tqdm import tqdm

    data = out / "data"
    for split, n, variants, speeds, pitches in (
        ("train", n_train, TRAIN_VARIANTS, (125, 195), (15, 85)),
        ("test", n_test, HELDOUT_VARIANTS, (135, 185), (25, 75)),
    ):
        man_path = data / f"{split}.jsonl"
        if man_path.exists():
            log.info("synth: %s exists, skipping", man_path)
            continue
        rng = random.Random(f"{seed}-{split}")
        jobs = []
        for lang in LANGS:
            (data / split / lang).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                v = rng.choice(variants)
                voice = ESPEAK_VOICE[lang] + (f"+{v}" if v else "")
                ext = "wav"
                jobs.append((split, i, lang, sample_text(rng, lang), voice, rng.randint(*speeds), rng.randint(*pitches),
                             rng.randint(80, 180), rng.randint(0, 4), data / split / lang / f"{i:05d}.{ext}",
                             rng.randrange(2 ** 31)))
        rows = []
        with Pool(workers) as pool:
            for row in tqdm(pool.imap(_job, jobs, chunksize=16), total=len(jobs), desc=f"synth {split}"):
                rows.append(row)
        tmp = man_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.rename(man_path)
        hours = sum(r["duration"] for r in rows) / 3600
        log.info("synth: %s: %d utterances, %.2f h", split, len(rows), hours)


def read_manifest(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]

"""Calls of several utterances from the held-out set, through the product's engine: is the 2nd and 3rd utterance of a
stream transcribed as well as the 1st?

Each call is 3 held-out utterances on one stream. After each: 200 ms of silence (what a VAD with stop_secs=0.2 waits
for), finalize, then a pause. ``auto`` calls mix languages; calls with the language given keep one. Two pause
profiles: ``short`` (no silence before the first word, 0.6 s pauses) and ``long`` (4 s of silence before the first
word and 3 s pauses: a phone or browser call, where the line is open before the caller speaks).

    python -m tools.demo_model.calls plugin/models/demo.nemo [calls_eval.json]
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import numpy as np

HELDOUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "demo_heldout"
LANGUAGES = ["en-US", "es-ES", "de-DE"]
PER_CALL = 3
PAUSES = {"short": (0.0, 0.6), "long": (4.0, 3.0)}  # (silence before the first word, pause after each final) in s
SR = 16000


def words(text: str) -> list[str]:
    text = re.sub(r"\s*<[a-z]{2}-[A-Z]{2}>", " ", text).lower()
    return re.sub(r"[¿?¡!.,;:]", " ", text).split()


def word_errors(hypothesis: str, reference: str) -> tuple[int, int]:
    hyp, ref = words(hypothesis), words(reference)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1], len(ref)


def heldout_rows(directory: Path = HELDOUT) -> list[dict]:
    """The shipped held-out set, decoded (8 kHz μ-law) and upsampled to 16 kHz."""
    from scipy.signal import resample_poly

    from pipecat_nemotron.wav import read_wav

    rows = [json.loads(line) for line in (directory / "manifest.jsonl").read_text(encoding="utf8").splitlines()
            if line.strip()]
    for row in rows:
        wav = read_wav(directory / row["file"])
        row["audio"] = resample_poly(wav.samples.astype(np.float32) / 32768, SR, wav.sample_rate).astype(np.float32)
    return rows


def make_calls(rows: list[dict], mixed: bool, n_calls: int = 20, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    calls = []
    for c in range(n_calls):
        pool = rows if mixed else [r for r in rows if r["lang"] == LANGUAGES[c % len(LANGUAGES)]]
        calls.append([pool[int(i)] for i in rng.choice(len(pool), PER_CALL, replace=False)])
    return calls


async def transcribe_call(engine, call: list[dict], language: str, pauses: str = "short") -> list:
    from pipecat_nemotron.engine import Final

    lead_s, pause_s = PAUSES[pauses]
    stream = engine.open_stream(language=language)
    finals = []
    try:
        stream.feed(np.zeros(int(lead_s * SR), np.float32))
        for row in call:
            stream.feed(np.concatenate([row["audio"], np.zeros(int(0.2 * SR), np.float32)]))
            stream.finalize()
            async for result in stream:
                if isinstance(result, Final):
                    finals.append(result)
                    break
            stream.feed(np.zeros(int(pause_s * SR), np.float32))
    finally:
        stream.close()
    return finals


async def score_calls(engine, rows: list[dict], pauses: str = "short") -> dict:
    """WER and tag accuracy by position in the call, for auto (mixed languages) and language-given calls."""
    scores = {}
    for mode in ("auto", "given"):
        calls = make_calls(rows, mixed=mode == "auto")
        results = await asyncio.gather(*(transcribe_call(engine, call, "auto" if mode == "auto" else call[0]["lang"],
                                                         pauses) for call in calls))
        for position in range(PER_CALL):
            errors = words_total = tags = 0
            for call, finals in zip(calls, results):
                e, n = word_errors(finals[position].text, call[position]["text"])
                errors, words_total = errors + e, words_total + n
                tags += finals[position].language == call[position]["lang"]
            scores[f"{mode}_{position + 1}"] = {"wer": errors / words_total, "tag_right": tags / len(calls),
                                                "calls": len(calls)}
        scores[f"{mode}_example"] = {"said": [r["text"] for r in calls[0]], "heard": [f.text for f in results[0]]}
    return scores


def score_calls_of(model_path, dest: Path | None = None, heldout: Path = HELDOUT) -> dict:
    """Score a checkpoint on held-out calls with both pause profiles (``long_`` keys for the long one); optionally
    write the scores as JSON."""
    from pipecat_nemotron.engine import Engine

    engine = Engine(model=str(model_path), chunk_ms=160, device="cpu", max_streams=64)
    engine.wait_ready()
    async def both(rows):
        short, long = await score_calls(engine, rows), await score_calls(engine, rows, "long")
        return {**short, **{f"long_{key}": value for key, value in long.items()}}

    try:
        scores = asyncio.run(both(heldout_rows(heldout)))
    finally:
        engine.close()
    if dest is not None:
        Path(dest).write_text(json.dumps(scores, indent=1, ensure_ascii=False) + "\n", encoding="utf8")
    return scores


def main(argv=None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    scores = score_calls_of(args[0] if args else "demo", Path(args[1]) if len(args) > 1 else None)
    for key, value in scores.items():
        print(key, value)


if __name__ == "__main__":
    main()

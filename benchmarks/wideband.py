"""Where the demo model's wideband gap comes from: the same unseen speech as 16 kHz PCM, 48 kHz PCM and 8 kHz μ-law.

Fresh espeak-ng sentences of the demo grammar with the held-out voice variants (never trained on), given the test
set's treatment (lead/trail silence, gain, white noise at 25-40 dB SNR), then sent to the engine four ways:

- `16k direct`: the 16 kHz float audio, fed straight to the engine (no resampler anywhere);
- `48k via service resampler`: upsampled offline to 48 kHz, then through the service's stream resampler (libsoxr VHQ,
  `pipecat_nemotron.resampler`, 20 ms frames) back to 16 kHz: our WebRTC path;
- `16k band-limited`: the 16 kHz audio low-passed at 3.4 kHz (no μ-law): the telephony band without its coding;
- `8k μ-law via service resampler`: the test set's telephony path (anti-aliased 8 kHz, G.711 μ-law), decoded and
  resampled to 16 kHz by the service's stream resampler: our phone path.

If `16k direct` is as bad as the 48 kHz path, the gap is the model (trained mostly on telephony-band audio), not the
resampler. Needs `espeak-ng` (tools/demo_model/setup.sh installs it).

    python benchmarks/wideband.py --per-language 30
"""

from __future__ import annotations

import argparse
import asyncio
import audioop
import random
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.signal import butter, resample_poly, sosfiltfilt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, write_results  # noqa: E402
from tools.demo_model.audio import encode_mulaw_8k, espeak_render  # noqa: E402
from tools.demo_model.calls import word_errors  # noqa: E402
from tools.demo_model.grammar import sample_text  # noqa: E402
from tools.demo_model.synth import ESPEAK_VOICE, HELDOUT_VARIANTS  # noqa: E402

from pipecat_nemotron.engine import Engine, Final  # noqa: E402
from pipecat_nemotron.resampler import DeterministicStreamResampler  # noqa: E402

SR = 16000
LANGUAGES = ["en-US", "es-ES", "de-DE"]
console = Console(width=160)


def render(per_language: int, seed: int, noise: bool = True) -> list[dict]:
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    items = []
    for lang in LANGUAGES:
        for _ in range(per_language):
            text = sample_text(rng, lang)
            voice = f"{ESPEAK_VOICE[lang]}+{rng.choice(HELDOUT_VARIANTS)}"
            x = espeak_render(text, voice, rng.randint(135, 185), rng.randint(25, 75), rng.randint(80, 180), 0)
            x = np.concatenate([np.zeros(int(0.15 * SR), np.float32), x, np.zeros(int(0.3 * SR), np.float32)])
            x = x * (nprng.uniform(0.2, 0.8) / (np.max(np.abs(x)) + 1e-6))
            power = float(np.mean(x ** 2))
            noise_gain = np.sqrt(power / 10 ** (nprng.uniform(25, 40) / 10)) if noise else 0.0
            x = x + nprng.standard_normal(len(x)).astype(np.float32) * noise_gain
            items.append({"lang": lang, "text": text, "audio": x.astype(np.float32)})
    return items


async def through_pipecat_resampler(pcm: np.ndarray, rate: int) -> np.ndarray:
    resampler = DeterministicStreamResampler()  # what NemotronSTTService resamples with
    step = rate // 50
    out = [await resampler.resample(pcm[i:i + step].tobytes(), rate, SR) for i in range(0, len(pcm), step)]
    out.append(await resampler.flush())
    return np.frombuffer(b"".join(out), dtype=np.int16).astype(np.float32) / 32768


async def conditions(x: np.ndarray) -> dict[str, np.ndarray]:
    pcm48 = (np.clip(resample_poly(x, 3, 1), -1, 1) * 32767).astype(np.int16)
    low = sosfiltfilt(butter(8, 3400, fs=SR, output="sos"), x).astype(np.float32)
    ulaw = encode_mulaw_8k(x)
    pcm8 = np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype=np.int16)
    return {"16k direct": x, "48k via service resampler": await through_pipecat_resampler(pcm48, 48000),
            "16k band-limited 3.4 kHz": low, "8k μ-law via service resampler": await through_pipecat_resampler(pcm8, 8000)}


async def transcribe(engine, audio: np.ndarray, language: str) -> Final:
    stream = engine.open_stream(language=language)
    try:
        stream.feed(audio)
        stream.finalize()
        async for result in stream:
            if isinstance(result, Final):
                return result
    finally:
        stream.close()


async def run(items: list[dict]) -> dict:
    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=len(items), max_admission_lag_s=None)
    await engine.ready()
    scores: dict = {}
    try:
        variants = [await conditions(item["audio"]) for item in items]
        for name in variants[0]:
            for prompt in ("auto", "given"):
                finals = await asyncio.gather(*(transcribe(engine, v[name], "auto" if prompt == "auto" else it["lang"])
                                                for it, v in zip(items, variants)))
                for lang in LANGUAGES:
                    errors = words = tags = n = 0
                    for it, final in zip(items, finals):
                        if it["lang"] != lang:
                            continue
                        e, w = word_errors(final.text, it["text"])
                        errors, words, n = errors + e, words + w, n + 1
                        tags += final.language == lang
                    scores.setdefault(name, {}).setdefault(prompt, {})[lang] = {
                        "wer": round(errors / max(1, words), 4), "tag_right": round(tags / max(1, n), 3), "n": n}
    finally:
        engine.close()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-language", type=int, default=30)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--clean", action="store_true", help="no added noise (espeak-ng's own silence is digital zero)")
    parser.add_argument("--name", default="wideband_demo")
    args = parser.parse_args()
    items = render(args.per_language, args.seed, noise=not args.clean)
    scores = asyncio.run(run(items))
    header = ["audio path", *(f"{lang} WER given / auto" for lang in LANGUAGES), "tag right, auto (en/es/de)"]
    condition = "no added noise" if args.clean else "white noise at 25-40 dB SNR"
    table = Table(*header, title=f"Demo model, {args.per_language} unseen-voice utterances per language, {condition}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, by_prompt in scores.items():
        cells = [name, *(f"{by_prompt['given'][lang]['wer']:.1%} / {by_prompt['auto'][lang]['wer']:.1%}"
                         for lang in LANGUAGES),
                 " / ".join(f"{by_prompt['auto'][lang]['tag_right']:.0%}" for lang in LANGUAGES)]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    info = machine()
    lines.insert(0, f"Demo model at 160 ms, {args.per_language} unseen-voice utterances per language, {condition}.\n")
    lines.append(f"\n{info['cpu']}, {info['cores']} cores, {info['date']}; `python benchmarks/wideband.py "
                 f"--per-language {args.per_language} --seed {args.seed}{' --clean' if args.clean else ''}`")
    console.print(f"written {write_results(args.name, {'machine': info, 'scores': scores}, chr(10).join(lines))}")


if __name__ == "__main__":
    main()

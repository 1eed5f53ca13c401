"""Demo-model WER over the SIP codecs: the same unseen utterances as G.711 μ-law, G.722 and Opus, coded and decoded
by the SIP transport's own codecs (``transports/codecs.py``), 20 ms packet by packet, then to 16 kHz as the service
does it.

The utterances are `benchmarks/wideband.py`'s: fresh espeak-ng sentences of the demo grammar with the held-out voice
variants (never trained on), at 16 kHz with white noise at 25-40 dB SNR. Paths:

- `G.711 μ-law (8 kHz)`: anti-aliased to 8 kHz, PCMU per packet, decoded, then the service's stream resampler;
- `G.722 (16 kHz)`: G.722 per packet (64 kbit/s), decoded at 16 kHz and fed as is (what a G.722 call gives the STT);
- `Opus 32 kbit/s (48 kHz)`: upsampled to 48 kHz, Opus per packet, decoded at 48 kHz, the service's resampler;
- `16 kHz uncoded`: the reference.

    python benchmarks/sip_codecs.py --per-language 20
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from scipy.signal import resample_poly

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, write_results  # noqa: E402
from wideband import LANGUAGES, SR, render, through_pipecat_resampler, transcribe  # noqa: E402
from tools.demo_model.calls import word_errors  # noqa: E402

from pipecat_nemotron.engine import Engine  # noqa: E402
from pipecat_nemotron.transports.codecs import MediaCodec  # noqa: E402

console = Console(width=160)


def _pcm16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1, 1) * 32767).astype("<i2")


def coded(pcm: np.ndarray, name: str) -> np.ndarray:
    """PCM16 at the codec's rate → packets of 20 ms → decoded PCM16 (a fresh encoder/decoder per utterance)."""
    encoder, decoder = MediaCodec(name), MediaCodec(name)
    step = encoder.spec.samples(20)
    pcm = np.concatenate([pcm, np.zeros((-len(pcm)) % step, dtype="<i2")])
    out = [decoder.decode(encoder.encode(pcm[i:i + step].tobytes())) for i in range(0, len(pcm), step)]
    return np.frombuffer(b"".join(out), dtype="<i2")


async def paths(x: np.ndarray) -> dict[str, np.ndarray]:
    pcm8 = coded(_pcm16(resample_poly(x, 1, 2)), "PCMU")
    g722 = coded(_pcm16(x), "G722").astype(np.float32) / 32768
    opus = coded(_pcm16(resample_poly(x, 3, 1)), "OPUS")
    return {"G.711 μ-law (8 kHz)": await through_pipecat_resampler(pcm8, 8000), "G.722 (16 kHz)": g722,
            "Opus 32 kbit/s (48 kHz)": await through_pipecat_resampler(opus, 48000), "16 kHz uncoded": x}


async def run(items: list[dict]) -> dict:
    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=len(items), max_admission_lag_s=None)
    await engine.ready()
    scores: dict = {}
    try:
        variants = [await paths(item["audio"]) for item in items]
        for name in variants[0]:
            finals = await asyncio.gather(*(transcribe(engine, v[name], it["lang"]) for it, v in zip(items, variants)))
            total_e = total_w = 0
            for lang in LANGUAGES:
                errors = words = 0
                for it, final in zip(items, finals):
                    if it["lang"] == lang:
                        e, w = word_errors(final.text, it["text"])
                        errors, words = errors + e, words + w
                scores.setdefault(name, {})[lang] = {"wer": round(errors / max(1, words), 4), "words": words}
                total_e, total_w = total_e + errors, total_w + words
            scores[name]["all"] = {"wer": round(total_e / max(1, total_w), 4), "words": total_w}
    finally:
        engine.close()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-language", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--name", default="sip_codecs_demo")
    args = parser.parse_args()
    items = render(args.per_language, args.seed)
    scores = asyncio.run(run(items))
    header = ["codec path", *(f"{lang} WER" for lang in LANGUAGES), "all"]
    lines = [f"Demo model at 160 ms (language given), {args.per_language} unseen-voice utterances per language, white "
             "noise at 25-40 dB SNR, coded 20 ms packet by packet by `transports/codecs.py`.\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, by_lang in scores.items():
        lines.append("| " + " | ".join([name, *(f"{by_lang[lang]['wer']:.1%}" for lang in LANGUAGES),
                                         f"{by_lang['all']['wer']:.1%}"]) + " |")
    info = machine()
    lines.append(f"\n{info['cpu']}, {info['cores']} cores, {info['date']}; `python benchmarks/sip_codecs.py "
                 f"--per-language {args.per_language} --seed {args.seed}`")
    console.print("\n".join(lines))
    console.print(f"written {write_results(args.name, {'machine': info, 'scores': scores}, chr(10).join(lines))}")


if __name__ == "__main__":
    main()

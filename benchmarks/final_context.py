"""Language tags and punctuation on Finals, by the trailing context each Final gets (`Engine(final_context_ms=)`).

The product path (`pipecat-nemotron transcribe --fast`: WebRTC VAD with stop_secs 0.3 -> NemotronSTTService ->
engine), demo model, auto-detect, on the 60 held-out files (voices never trained on; 8 kHz mu-law; the VAD cuts
some of them at the pause inside them, e.g. after "Hallo, guten Morgen.") and on 20 calls of three held-out
utterances with mixed languages and 0.35-1.2 s pauses. Per trailing context: finals with a tag, finals whose tag is
wrong, untagged finals the old rule would have labelled with the previous final's (stale, wrong) language,
utterances that began with the previous one's "." or tag (dropped from them since this change; before, they led the
next Final's text) and WER. The runs are reproducible (`--fast` paces by the engine's progress). What the context
costs in time to final is measured in real time by `benchmarks/ttfs.py --final-context-ms 0,320`.

    python benchmarks/final_context.py --contexts 0,160,320,480,640
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, write_results  # noqa: E402
from tools.demo_model.calls import HELDOUT, heldout_rows, make_calls, word_errors  # noqa: E402

from pipecat_nemotron.apps.transcribe import transcribe_call  # noqa: E402
from pipecat_nemotron.engine import Engine  # noqa: E402
from pipecat_nemotron.stt import NemotronSTTService  # noqa: E402
from pipecat_nemotron.wav import read_wav, write_wav  # noqa: E402

SR = 16000
console = Console(width=200)


def build_calls(n_calls: int, directory: Path) -> list[dict]:
    """Three held-out utterances per call, mixed languages, random pauses; each utterance's span in seconds."""
    rows = heldout_rows()
    rng = np.random.default_rng(7)
    calls = []
    for index, call in enumerate(make_calls(rows, mixed=True, n_calls=n_calls, seed=3)):
        position = int(rng.uniform(0.2, 1.0) * SR)
        parts, spans = [np.zeros(position, np.float32)], []
        for row in call:
            spans.append((position / SR, (position + len(row["audio"])) / SR, row["lang"], row["text"]))
            pause = np.zeros(int(rng.uniform(0.35, 1.2) * SR), np.float32)
            parts += [row["audio"], pause]
            position += len(row["audio"]) + len(pause)
        path = directory / f"call_{index:02d}.wav"
        write_wav(path, (np.concatenate(parts) * 32767).astype(np.int16), SR)
        calls.append({"file": str(path), "spans": spans})
    return calls


def language_of(final, item: dict) -> str:
    """The reference language of the utterance a final overlaps most."""
    if "spans" not in item:
        return item["lang"]
    overlap = [max(0.0, min(final.end_s, end) - max(final.start_s, start)) for start, end, _, _ in item["spans"]]
    return item["spans"][int(np.argmax(overlap))][2]


async def measure(context_ms: int, items: list[dict]) -> dict:
    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=len(items), final_context_ms=context_ms,
                    max_admission_lag_s=None)
    await engine.ready()
    await engine.warm_up()
    progresses = await asyncio.gather(*(transcribe_call(
        item["file"], read_wav(item["file"]), stt=NemotronSTTService(engine=engine), realtime=False, vad_mode=2,
        on_final=lambda u: None, on_interim=lambda p: None) for item in items))
    late_marks = engine.stats.late_marks
    engine.close()
    scores = {}
    for kind in ("heldout", "calls"):
        finals = tagged = wrong = stale = errors = words = 0
        latencies = []
        for item, progress in zip(items, progresses):
            if ("spans" in item) != (kind == "calls"):
                continue
            previous = None
            for final in progress.finals:
                if not final.text:
                    continue
                truth = language_of(final, item)
                finals += 1
                tagged += final.language is not None
                wrong += final.language is not None and final.language != truth
                stale += final.language is None and previous is not None and previous != truth
                previous = final.language or previous
                latencies.append(final.latency_ms)
            reference = " ".join(span[3] for span in item["spans"]) if "spans" in item else item["text"]
            e, n = word_errors(" ".join(f.text for f in progress.finals), reference)
            errors, words = errors + e, words + n
        latencies.sort()
        scores[kind] = {"finals": finals, "tagged": tagged, "wrong_tag": wrong, "stale_under_old_rule": stale,
                        "wer": round(errors / max(1, words), 4),
                        "final_ms_median": round(statistics.median(latencies), 1),
                        "final_ms_p90": round(latencies[int(0.9 * (len(latencies) - 1))], 1)}
    examples = [f"{u.text} <{u.language}>" for p in progresses[:3] for u in p.finals]
    return {"context_ms": context_ms, "tail_chunks": engine.tail_chunks, "late_marks": late_marks, **scores,
            "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="0,160,320,480,640")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--name", default="final_context_demo")
    args = parser.parse_args()
    manifest = [json.loads(line) for line in (HELDOUT / "manifest.jsonl").read_text(encoding="utf8").splitlines()
                if line.strip()]
    items = [{"file": str(HELDOUT / row["file"]), "lang": row["lang"], "text": row["text"]} for row in manifest]
    runs = []
    with tempfile.TemporaryDirectory() as directory:
        items += build_calls(args.calls, Path(directory))
        for context in (int(c) for c in args.contexts.split(",")):
            started = time.perf_counter()
            runs.append(asyncio.run(measure(context, items)))
            console.print(f"[dim]context {context} ms done in {time.perf_counter() - started:.0f} s[/]")
    header = ["trailing context", "held-out: finals tagged", "wrong tag", "stale (old rule)", "WER",
              "calls: finals tagged", "wrong tag", "stale (old rule)", "WER", "began with previous mark"]
    table = Table(*header, title="Finals' language tags by trailing context (demo model, 160 ms, auto, transcribe path)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        h, c = run["heldout"], run["calls"]
        label = "off" if not run["context_ms"] else f"{run['context_ms']} ms ({run['tail_chunks']} chunks)"
        cells = [label, f"{h['tagged']} / {h['finals']}", str(h["wrong_tag"]), str(h["stale_under_old_rule"]),
                 f"{h['wer']:.3f}", f"{c['tagged']} / {c['finals']}", str(c["wrong_tag"]),
                 str(c["stale_under_old_rule"]), f"{c['wer']:.3f}", str(run["late_marks"])]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    info = machine()
    lines.append("\nA final counts as tagged when it carries a language; wrong tag: not the language of the utterance it "
                 "overlaps most; stale (old rule): untagged, and the previous final's language (which the old rule "
                 "reported) was wrong for it.")
    lines.append(f"\n{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}; "
                 f"`python benchmarks/final_context.py --contexts {args.contexts}`")
    path = write_results(args.name, {"machine": info, "runs": runs}, "\n".join(lines))
    console.print(f"written {path}")


if __name__ == "__main__":
    main()

"""Time from VADUserStoppedSpeakingFrame to the final TranscriptionFrame (TTFS), through NemotronSTTService.

Each stream is a Pipecat pipeline fed 20 ms frames in real time: an utterance of speech-like audio, 200 ms of
silence (what a VAD with stop_secs=0.2 waits for), then VADUserStoppedSpeakingFrame; we time the finalized
TranscriptionFrame's arrival at the end of the pipeline. All streams share one engine, as calls in one process do.

`--pace drain` is for a model this machine cannot run in real time (the 0.6B architecture on a CPU): the audio is
fed at once and VAD stop is sent only when the engine has stepped every full chunk, so the figure is the cost of
finalizing a caught-up stream (the last partial chunk, the final step, the way back), not a growing backlog.

    python benchmarks/ttfs.py --model demo --chunks 80,160,320,560,1120 --streams 1,16,32 --utterances 8
    python benchmarks/ttfs.py --geometry 0.6b --chunks 80,160,320,560,1120 --streams 1 --utterances 4 --pace drain
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from common import build_random_model, machine, write_results
from pipecat.frames.frames import (EndFrame, Frame, InputAudioRawFrame, TranscriptionFrame,
                                   VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner
from pipecat_nemotron.engine import Engine
from pipecat_nemotron.stt import NemotronSTTService

console = Console(width=200)
FRAME_S = 0.02


class FinalClock(FrameProcessor):
    def __init__(self):
        super().__init__()
        self.arrivals: list[float] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            self.arrivals.append(time.perf_counter())
        await self.push_frame(frame, direction)


def speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.4 * t)) / 16000
    voice = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return (0.2 * voice + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


async def one_stream(engine: Engine, index: int, utterances: int, rng: np.random.Generator,
                     pace: str = "realtime") -> list[float]:
    clock = FinalClock()
    stt = NemotronSTTService(engine=engine)
    worker = PipelineWorker(Pipeline([stt, clock]), params=PipelineParams(audio_in_sample_rate=16000),
                            idle_timeout_secs=None, enable_rtvi=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.ensure_future(runner.run())
    await asyncio.sleep(rng.uniform(0, 0.5))  # calls do not start in lock step
    latencies = []
    frame = int(FRAME_S * 16000)
    for n in range(utterances):
        audio = np.concatenate([speechlike(rng.uniform(1.0, 2.5), seed=index * 1000 + n), np.zeros(3200)])
        pcm = (audio * 32767).astype(np.int16)
        await worker.queue_frame(VADUserStartedSpeakingFrame(start_secs=0.2))
        started = time.perf_counter()
        for i in range(0, len(pcm), frame):
            await worker.queue_frame(InputAudioRawFrame(audio=pcm[i:i + frame].tobytes(), sample_rate=16000,
                                                        num_channels=1))
            if pace == "realtime":
                await asyncio.sleep(max(0.0, started + (i // frame + 1) * FRAME_S - time.perf_counter()))
        if pace == "drain":
            await asyncio.sleep(0.1)  # let the frames reach the engine
            while stt._stream._step_ready():
                await asyncio.sleep(0.005)
        before = len(clock.arrivals)
        stop = time.perf_counter()
        await worker.queue_frame(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        while len(clock.arrivals) == before:
            await asyncio.sleep(0.001)
        latencies.append(clock.arrivals[-1] - stop)
        await asyncio.sleep(rng.uniform(0.2, 0.6))  # the bot talks; the caller waits
    await worker.queue_frame(EndFrame())
    await run
    return latencies


async def measure(engine: Engine, streams: int, utterances: int, pace: str) -> dict:
    results = await asyncio.gather(*(one_stream(engine, i, utterances, np.random.default_rng(i), pace)
                                     for i in range(streams)))
    values = np.array([v for r in results for v in r]) * 1000
    return {"n": len(values), "p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95)),
            "p99_ms": float(np.percentile(values, 99)), "max_lag_s": engine.stats.max_lag_s}


ENCODER_STEPS = {"nemo": {"encoder_step": "nemo"}, "fast": {"encoder_step": "fast"},
                 "int8": {"encoder_step": "fast", "precision": "int8"}}


def main() -> None:
    from loguru import logger
    import sys
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="model source: 'demo', a .nemo path or an HF id")
    source.add_argument("--geometry", choices=["0.6b", "tiny"], help="random-weight architecture")
    parser.add_argument("--chunks", default="160,560,1120")
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--utterances", type=int, default=12)
    parser.add_argument("--pace", choices=["realtime", "drain"], default="realtime")
    parser.add_argument("--final-context-ms", default=None,
                        help="comma list of Engine(final_context_ms=) to compare side by side (default: the engine's)")
    parser.add_argument("--encoder", default=None,
                        help="comma list of encoder steps to compare side by side: nemo, fast, int8 (default: the "
                             "engine's)")
    parser.add_argument("--name", default="ttfs")
    args = parser.parse_args()
    if args.geometry:
        model, info = build_random_model(args.geometry)
        label = f"{args.geometry} architecture, random weights"
    else:
        model, info = args.model or "demo", {"model": args.model or "demo"}
        label = f"model {model}"
    facts = machine()
    rows = []
    contexts = [int(c) for c in args.final_context_ms.split(",")] if args.final_context_ms else [None]
    steps = args.encoder.split(",") if args.encoder else [None]
    for chunk_ms, streams, context, step in ((c, s, x, e) for c in map(int, args.chunks.split(","))
                                             for s in map(int, args.streams.split(",")) for x in contexts
                                             for e in steps):
        options = {} if context is None else {"final_context_ms": context}
        options.update(ENCODER_STEPS.get(step, {}))
        engine = Engine(model=model, chunk_ms=chunk_ms, device="auto", max_streams=streams, **options)
        engine.wait_ready()
        engine.lag_warning_s = 1e9
        console.print(f"  {chunk_ms} ms, {streams} streams…")
        row = asyncio.run(measure(engine, streams, args.utterances, args.pace))
        row.update(chunk_ms=chunk_ms, streams=streams, final_context_ms=engine.final_context_ms,
                   encoder=f"{engine.encoder_step}" + (" int8" if engine.precision == "int8" else ""),
                   mean_batch=engine.stats.streams_stepped / max(1, engine.stats.steps))
        rows.append(row)
        engine.close()
    headers = ["chunk", "streams", "final context", "encoder step", "finals", "p50 ms", "p95 ms", "p99 ms", "mean batch", "max audio age s"]
    table = Table(title=f"TTFS (VAD stop → final) — {label}, {facts['cpu']}, {facts['date']}")
    for header in headers:
        table.add_column(header, justify="right")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    for row in rows:
        cells = [f"{row['chunk_ms']} ms", str(row["streams"]), f"{row.get('final_context_ms', 0)} ms", row.get("encoder", "nemo"), str(row["n"]), f"{row['p50_ms']:.0f}",
                 f"{row['p95_ms']:.0f}", f"{row['p99_ms']:.0f}", f"{row['mean_batch']:.1f}", f"{row['max_lag_s']:.2f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    caption = (f"{label}; {facts['cpu']}, {facts['cores']} cores" + (f", GPU {facts['gpu']}" if facts["gpu"] else ", no GPU")
               + f"; {facts['date']}. {args.utterances} utterances per stream, "
               + ("real-time paced." if args.pace == "realtime" else "audio fed at once, VAD stop once the engine caught up."))
    path = write_results(args.name, {"machine": facts, "model": info, "rows": rows, "args": vars(args)},
                         caption + "\n\n" + "\n".join(lines))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()

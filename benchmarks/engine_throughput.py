"""Engine throughput: our batched engine vs a batch-1 baseline behind a global lock.

The baseline is the design of NVIDIA's Pipecat demo server (pipecat-ai/nemotron-january-2026):
every call has its own batch-1 caches and calls `conformer_stream_step` under one global
lock. We give it precomputed mel features (the demo recomputes mel over all audio so far on
every chunk), so the comparison favours the baseline.

Both run in the same process, on the same model, one after the other, for each chunk size
and number of concurrent streams. Prints a table and writes benchmarks/results/engine_throughput.{json,md}.

    python benchmarks/engine_throughput.py                  # real 0.6B architecture, random weights
    python benchmarks/engine_throughput.py --geometry tiny --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch
from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from common import PROMPTS, build_random_model, machine, matmul_peak_gflops, write_results
from pipecat_nemotron.engine import Engine
from pipecat_nemotron.engine.features import samples_needed
from pipecat_nemotron.engine.loader import chunk_spec

console = Console(width=200)
LANGUAGES = [key for key in PROMPTS]


def noise_audio(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


def measure_engine(model, chunk_ms: int, streams: int, warmup: int, steps: int) -> dict:
    """Feed every stream enough audio for 1 + warmup + steps chunks; time the measured steps."""
    engine = Engine(model=model, chunk_ms=chunk_ms, device="cpu", max_streams=streams, max_backlog_s=3600)
    engine.wait_ready()
    spec = engine.spec
    total_frames = spec.first_chunk_frames + (warmup + steps) * spec.chunk_frames
    handles = [engine.open_stream(language=LANGUAGES[i % len(LANGUAGES)]) for i in range(streams)]
    with engine.paused():
        for i, stream in enumerate(handles):
            stream.feed(noise_audio(samples_needed(total_frames) / 16000 + 0.001, seed=i))
    _wait(lambda: all(s.steps >= 1 + warmup for s in handles))
    started, busy_before, steps_before = time.perf_counter(), engine.stats.busy_seconds, engine.stats.steps
    _wait(lambda: all(s.steps >= 1 + warmup + steps for s in handles))
    wall = time.perf_counter() - started
    step_ms = (engine.stats.busy_seconds - busy_before) / max(1, engine.stats.steps - steps_before) * 1000
    batches = list(engine.stats.batch_sizes)[-(engine.stats.steps - steps_before):]
    engine.close()
    return {"audio_s_per_s": streams * steps * chunk_ms / 1000 / wall, "step_ms": step_ms,
            "mean_batch": float(np.mean(batches)) if batches else 0.0}


def _wait(condition, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark stalled")
        time.sleep(0.002)


def measure_baseline(model, chunk_ms: int, streams: int, warmup: int, steps: int) -> dict:
    """One thread and one batch-1 cache per call, every step under one global lock."""
    spec = chunk_spec(model, chunk_ms)
    total_frames = spec.first_chunk_frames + (warmup + steps) * spec.chunk_frames
    lock = threading.Lock()
    step_times: list[float] = []
    barrier = threading.Barrier(streams + 1)
    done_warmup = threading.Barrier(streams + 1)

    def call(index: int) -> None:
        audio = torch.from_numpy(noise_audio(samples_needed(total_frames) / 16000 + 0.001, seed=index))[None]
        with torch.inference_mode():
            mel, _ = model.preprocessor(input_signal=audio, length=torch.tensor([audio.shape[1]]))
        buffer = CacheAwareStreamingAudioBuffer(model=model)
        buffer.append_processed_signal(mel[:, :, :total_frames])
        caches = model.encoder.get_initial_cache_state(batch_size=1)
        hyps = None
        barrier.wait()
        for step, (chunk, lengths) in enumerate(buffer):
            if step == 1 + warmup:
                done_warmup.wait()
            with lock, torch.inference_mode():
                started = time.perf_counter()
                model.set_inference_prompt(LANGUAGES[index % len(LANGUAGES)])
                _, hyps, *caches, _ = model.conformer_stream_step(
                    processed_signal=chunk, processed_signal_length=lengths, cache_last_channel=caches[0],
                    cache_last_time=caches[1], cache_last_channel_len=caches[2], keep_all_outputs=False,
                    previous_hypotheses=hyps, drop_extra_pre_encoded=0 if step == 0 else spec.drop_extra_pre_encoded)
                if step > warmup:
                    step_times.append(time.perf_counter() - started)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait()
    done_warmup.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"audio_s_per_s": streams * steps * chunk_ms / 1000 / wall, "step_ms": float(np.mean(step_times)) * 1000,
            "mean_batch": 1.0}


def gflop_per_audio_second(model, chunk_ms: int) -> float:
    """FLOPs of one steady-state engine step at batch 1, per second of audio."""
    engine = Engine(model=model, chunk_ms=chunk_ms, device="cpu", max_streams=1, max_backlog_s=3600)
    engine.wait_ready()
    spec = engine.spec
    stream = engine.open_stream(language="auto")
    with engine.paused():
        stream.feed(noise_audio(samples_needed(spec.first_chunk_frames + 2 * spec.chunk_frames) / 16000, seed=0))
    _wait(lambda: stream.steps >= 1)
    counter = FlopCounterMode(display=False)
    with engine.paused():
        # run the second step on this thread, inside the counter
        jobs = engine._collect_jobs()
        with counter:
            engine._step(jobs)
    engine.close()
    return counter.get_total_flops() / 1e9 / (chunk_ms / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=["0.6b", "tiny"], default="0.6b")
    parser.add_argument("--chunks", default="160,560,1120")
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--name", default="engine_throughput")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    console.print(f"building the {args.geometry} architecture with random weights…")
    model, model_info = build_random_model(args.geometry)
    facts = machine()
    peak = matmul_peak_gflops()
    console.print(f"{model_info['params'] / 1e6:.1f} M params, built in {model_info['build_s']} s; "
                  f"fp32 matmul peak {peak:.0f} GFLOP/s on {facts['cpu']} ({facts['torch_threads']} threads)")
    rows = []
    for chunk_ms in map(int, args.chunks.split(",")):
        gflop = gflop_per_audio_second(model, chunk_ms)
        ceiling = peak / gflop
        for streams in map(int, args.streams.split(",")):
            console.print(f"  {chunk_ms} ms, {streams} streams: engine…", end="")
            ours = measure_engine(model, chunk_ms, streams, args.warmup, args.steps)
            console.print(" baseline…", end="")
            base = measure_baseline(model, chunk_ms, streams, args.warmup, args.steps)
            console.print(" done")
            rows.append({"chunk_ms": chunk_ms, "streams": streams, "engine": ours, "baseline": base,
                         "speedup": ours["audio_s_per_s"] / base["audio_s_per_s"],
                         "gflop_per_audio_s": gflop, "ceiling_audio_s_per_s": ceiling,
                         "fraction_of_ceiling": ours["audio_s_per_s"] / ceiling})
    table = Table(title=f"Engine throughput — {args.geometry} architecture, random weights, {facts['cpu']}, "
                        f"{facts['torch_threads']} threads, {facts['date']}")
    headers = ["chunk", "streams", "engine audio-s/s", "engine step ms", "baseline audio-s/s", "baseline step ms",
               "speed-up", "GFLOP per audio-s", "ceiling audio-s/s", "of ceiling"]
    for header in headers:
        table.add_column(header, justify="right")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    for row in rows:
        cells = [f"{row['chunk_ms']} ms", str(row["streams"]), f"{row['engine']['audio_s_per_s']:.2f}",
                 f"{row['engine']['step_ms']:.0f}", f"{row['baseline']['audio_s_per_s']:.2f}",
                 f"{row['baseline']['step_ms']:.0f}", f"{row['speedup']:.1f}×", f"{row['gflop_per_audio_s']:.1f}",
                 f"{row['ceiling_audio_s_per_s']:.2f}", f"{row['fraction_of_ceiling']:.0%}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    caption = (f"{args.geometry} architecture ({model_info['params'] / 1e6:.0f} M params, random weights); "
               f"{facts['cpu']}, {facts['cores']} cores, {facts['torch_threads']} torch threads"
               + (f", GPU {facts['gpu']}" if facts["gpu"] else ", no GPU")
               + f"; torch {facts['torch']}; fp32 matmul peak {peak:.0f} GFLOP/s; {facts['date']}. "
               f"{args.warmup} warm-up + {args.steps} measured steps per stream.")
    path = write_results(args.name, {"machine": facts, "model": model_info, "matmul_peak_gflops": peak,
                                     "rows": rows, "args": vars(args)}, caption + "\n\n" + "\n".join(lines))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Engine throughput: a batch-1 baseline behind a global lock vs our batched engine on NeMo's encoder step, on the
fast step (cached K/V, `fast_encoder.py`) in fp32, and on the fast step in int8.

The baseline is the design of NVIDIA's Pipecat demo server (pipecat-ai/nemotron-january-2026):
every call has its own batch-1 caches and calls `conformer_stream_step` under one global
lock. We give it precomputed mel features (the demo recomputes mel over all audio so far on
every chunk), so the comparison favours the baseline.

All run in the same process, on the same model, one after the other, for each chunk size and number of
concurrent streams; step times are medians over the measured steps. GFLOP per audio-second are counted
(torch's FlopCounterMode over one steady-state step at batch 1; the int8 step does the same multiply-adds in int8,
which the counter does not see). Real-time capacity: the largest number of streams whose batched step takes no
longer than the chunk period (searched from the 1/4/16-stream figures, then measured). Prints a table and writes
benchmarks/results/<name>.{json,md}.

    python benchmarks/engine_throughput.py                  # real 0.6B architecture, random weights
    python benchmarks/engine_throughput.py --geometry tiny --steps 2 --capacity ""   # smoke run
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


MODES = {"nemo": {"encoder_step": "nemo"}, "fast": {"encoder_step": "fast"},
         "int8": {"encoder_step": "fast", "precision": "int8"}}


def make_engine(model, chunk_ms: int, mode: str, slots: int) -> Engine:
    engine = Engine(model=model, chunk_ms=chunk_ms, device="cpu", max_streams=slots, max_backlog_s=3600,
                    max_admission_lag_s=None, **MODES[mode])
    engine.wait_ready()
    engine.lag_warning_s = 1e9
    return engine


def measure_engine(engine: Engine, streams: int, warmup: int, steps: int) -> dict:
    """Feed `streams` streams enough audio for 1 + warmup + steps chunks; the median of the measured steps."""
    spec, chunk_ms = engine.spec, engine.chunk_ms
    total_frames = spec.first_chunk_frames + (warmup + steps) * spec.chunk_frames
    handles = [engine.open_stream(language=LANGUAGES[i % len(LANGUAGES)]) for i in range(streams)]
    with engine.paused():
        for i, stream in enumerate(handles):
            stream.feed(noise_audio(samples_needed(total_frames) / 16000 + 0.001, seed=i))
    _wait(lambda: all(s.steps >= 1 + warmup for s in handles))
    steps_before = engine.stats.steps
    _wait(lambda: all(s.steps >= 1 + warmup + steps for s in handles))
    count = engine.stats.steps - steps_before
    durations = engine.stats.recent_step_seconds[-count:]
    batches = list(engine.stats.batch_sizes)[-count:]
    for stream in handles:
        stream.close()
    step_s = float(np.median(durations))
    mean_batch = float(np.mean(batches)) if batches else 0.0
    return {"audio_s_per_s": mean_batch * chunk_ms / 1000 / step_s, "step_ms": step_s * 1000,
            "mean_batch": mean_batch, "steps": count}


def realtime_capacity(engine: Engine, guess: int, warmup: int, steps: int, limit: int) -> dict:
    """The most streams whose batched step fits in the chunk period (measured around `guess`)."""
    period_ms = engine.chunk_ms
    tried: dict[int, float] = {}

    def fits(n: int) -> bool:
        if n not in tried:
            tried[n] = measure_engine(engine, n, warmup, steps)["step_ms"]
        return tried[n] <= period_ms

    n = max(1, min(guess, limit))
    if fits(n):
        while n < limit and fits(n + 1):
            n += 1
    else:
        while n > 0 and not fits(n):
            n -= 1
    return {"streams": n, "step_ms": tried.get(n), "tried": {str(k): round(v, 1) for k, v in sorted(tried.items())},
            "at_limit": n >= limit}


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


def gflop_per_audio_second(engine: Engine) -> float:
    """FLOPs of one steady-state engine step at batch 1, per second of audio."""
    spec, chunk_ms = engine.spec, engine.chunk_ms
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
    stream.close()
    return counter.get_total_flops() / 1e9 / (chunk_ms / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=["0.6b", "tiny"], default="0.6b")
    parser.add_argument("--chunks", default="160,560,1120")
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--capacity", default="160,1120", help="chunk sizes whose real-time capacity is searched")
    parser.add_argument("--max-streams", type=int, default=64, help="slots per engine (the capacity search's limit)")
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
    rows, capacity = [], []
    stream_counts = list(map(int, args.streams.split(",")))
    capacity_chunks = [int(c) for c in args.capacity.split(",") if c]
    for chunk_ms in map(int, args.chunks.split(",")):
        engines = {mode: make_engine(model, chunk_ms, mode, args.max_streams) for mode in MODES}
        gflop = {mode: gflop_per_audio_second(engines[mode]) for mode in ("nemo", "fast")}
        for streams in stream_counts:
            row = {"chunk_ms": chunk_ms, "streams": streams, "gflop_per_audio_s": gflop}
            for mode, engine in engines.items():
                console.print(f"  {chunk_ms} ms, {streams} streams: {mode}…", end="")
                row[mode] = measure_engine(engine, streams, args.warmup, args.steps)
            console.print(" baseline…", end="")
            row["baseline"] = measure_baseline(model, chunk_ms, streams, args.warmup, args.steps)
            console.print(" done")
            rows.append(row)
        if chunk_ms in capacity_chunks:
            for mode, engine in engines.items():
                measured = [r for r in rows if r["chunk_ms"] == chunk_ms]
                guess = _capacity_guess([(r["streams"], r[mode]["step_ms"]) for r in measured], chunk_ms)
                console.print(f"  {chunk_ms} ms real-time capacity, {mode} (guess {guess})…")
                found = realtime_capacity(engine, guess, args.warmup, args.steps, args.max_streams)
                capacity.append({"chunk_ms": chunk_ms, "mode": mode, **found})
        for engine in engines.values():
            engine.close()

    title = (f"Engine throughput — {args.geometry} architecture, random weights, {facts['cpu']}, "
             f"{facts['torch_threads']} threads, {facts['date']}")
    headers = ["chunk", "streams", "baseline audio-s/s", "NeMo step audio-s/s", "fast fp32 audio-s/s",
               "fast int8 audio-s/s", "baseline step ms", "NeMo step ms", "fast fp32 step ms", "fast int8 step ms",
               "fast fp32 ÷ NeMo", "int8 ÷ fp32", "GFLOP/audio-s NeMo", "GFLOP/audio-s fast"]
    lines = _table(title, headers, [[
        f"{r['chunk_ms']} ms", str(r["streams"]), f"{r['baseline']['audio_s_per_s']:.2f}",
        f"{r['nemo']['audio_s_per_s']:.2f}", f"{r['fast']['audio_s_per_s']:.2f}", f"{r['int8']['audio_s_per_s']:.2f}",
        f"{r['baseline']['step_ms']:.0f}", f"{r['nemo']['step_ms']:.0f}", f"{r['fast']['step_ms']:.0f}",
        f"{r['int8']['step_ms']:.0f}", f"{r['fast']['audio_s_per_s'] / r['nemo']['audio_s_per_s']:.1f}×",
        f"{r['int8']['audio_s_per_s'] / r['fast']['audio_s_per_s']:.1f}×", f"{r['gflop_per_audio_s']['nemo']:.1f}",
        f"{r['gflop_per_audio_s']['fast']:.1f}"] for r in rows])
    if capacity:
        lines += [""] + _table("Real-time capacity (streams whose batched step fits in the chunk period)",
                               ["chunk", "encoder step", "streams", "step ms at that count", "tried (streams: ms)"],
                               [[f"{c['chunk_ms']} ms", c["mode"], f"{c['streams']}{'+' if c['at_limit'] else ''}",
                                 f"{c['step_ms']:.0f}" if c["step_ms"] else "—",
                                 ", ".join(f"{k}: {v:.0f}" for k, v in c["tried"].items())] for c in capacity])
    caption = (f"{args.geometry} architecture ({model_info['params'] / 1e6:.0f} M params, random weights); "
               f"{facts['cpu']}, {facts['cores']} cores, {facts['torch_threads']} torch threads"
               + (f", GPU {facts['gpu']}" if facts["gpu"] else ", no GPU")
               + f"; torch {facts['torch']}; fp32 matmul peak {peak:.0f} GFLOP/s; {facts['date']}. "
               f"{args.warmup} warm-up + {args.steps} measured steps per configuration, median step. "
               "NeMo step = the engine on NeMo's cache_aware_stream_step; fast = cached K/V (fast_encoder.py).")
    path = write_results(args.name, {"machine": facts, "model": model_info, "matmul_peak_gflops": peak,
                                     "rows": rows, "capacity": capacity, "args": vars(args)},
                         caption + "\n\n" + "\n".join(lines))
    console.print(f"wrote {path}")


def _capacity_guess(points: list[tuple[int, float]], period_ms: int) -> int:
    """Streams where a straight line through (streams, step ms) crosses the chunk period."""
    (n0, t0), (n1, t1) = points[0], points[-1]
    slope = (t1 - t0) / (n1 - n0) if n1 != n0 else t0
    return max(1, int((period_ms - t0) / slope + n0)) if slope > 0 else n1


def _table(title: str, headers: list[str], rows: list[list[str]]) -> list[str]:
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="right")
    lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    for cells in rows:
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    return lines


if __name__ == "__main__":
    main()

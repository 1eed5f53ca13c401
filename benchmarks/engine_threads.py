"""How many CPU threads the engine should use: 1 vs 2 on this machine, alone and beside a competing process.

Each run feeds N streams of the demo model (or the random-weight 0.6B architecture, --model 0.6b) with the same
audio at once and measures the wall time until every stream's final is out (audio-seconds per second), for each
thread count, idle and with a busy-looping process pinned to nothing in particular (the OS spreads it). Runs
alternate between settings and the median of --runs is reported.

    .venv/bin/python benchmarks/engine_threads.py --streams 8 --seconds 6 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from common import build_random_model, machine, write_results


def hog() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


async def drain_time(engine, streams: int, audio: np.ndarray) -> float:
    from pipecat_nemotron.engine import Final

    opened = [engine.open_stream(language="auto") for _ in range(streams)]
    started = time.perf_counter()
    with engine.paused():
        for stream in opened:
            stream.feed(audio)
            stream.finalize()
    for stream in opened:
        async for result in stream:
            if isinstance(result, Final):
                break
        stream.close()
    return time.perf_counter() - started


async def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' or '0.6b' (random weights)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    from pipecat_nemotron.engine import Engine

    model = build_random_model("0.6b") if args.model == "0.6b" else "demo"
    rng = np.random.default_rng(0)
    audio = (0.05 * rng.standard_normal(int(args.seconds * 16000))).astype(np.float32)
    console = Console()
    results: dict[tuple[int, bool], list[float]] = {}
    for run in range(args.runs):
        for busy in (False, True):
            for threads in args.threads:
                engine = Engine(model=model, chunk_ms=160, device="cpu", max_streams=args.streams, threads=threads,
                                max_admission_lag_s=None)
                await engine.ready()
                await engine.warm_up()
                other = hog() if busy else None
                try:
                    seconds = await drain_time(engine, args.streams, audio)
                finally:
                    if other is not None:
                        other.kill()
                        other.wait()
                    engine.close()
                speed = args.streams * args.seconds / seconds
                results.setdefault((threads, busy), []).append(speed)
                console.print(f"run {run + 1}: {threads} thread(s), {'busy' if busy else 'idle'}: "
                              f"{speed:.1f} audio-s/s")
    table = Table(title=f"engine threads, {args.model}, {args.streams} streams x {args.seconds:.0f} s, "
                        f"median of {args.runs}")
    for column in ("threads", "idle: audio-s/s", "beside a busy process: audio-s/s"):
        table.add_column(column)
    rows = []
    for threads in args.threads:
        idle, busy = (statistics.median(results[(threads, b)]) for b in (False, True))
        rows.append({"threads": threads, "idle": idle, "busy": busy, "idle_runs": results[(threads, False)],
                     "busy_runs": results[(threads, True)]})
        table.add_row(str(threads), f"{idle:.1f}", f"{busy:.1f}")
    console.print(table)
    info = machine()
    markdown = [f"# Engine CPU threads: {args.model}, {args.streams} streams of {args.seconds:.0f} s, 160 ms chunks",
                "",
                f"{info['cpu']}, {info['cores']} cores, {info['date']}. Audio-seconds transcribed per second "
                f"(median of {args.runs} alternating runs), idle and beside one busy-looping process.", "",
                "| threads | idle | beside a busy process |", "|---|---|---|"]
    markdown += [f"| {r['threads']} | {r['idle']:.1f} | {r['busy']:.1f} |" for r in rows]
    path = write_results(f"engine_threads_{args.model}", {"machine": info, "rows": rows, "streams": args.streams,
                                                          "seconds": args.seconds}, "\n".join(markdown))
    console.print(f"written to {path}")


if __name__ == "__main__":
    asyncio.run(main())

"""How many concurrent phone calls one serve-sip node holds: real SIP calls (PCMU RTP in real time, the demo
model's held-out speech) against `pipecat-nemotron serve-sip` in this process, N callers at once.

For each N the node runs with --max-calls N; every caller plays a different held-out utterance (0.3 s lead,
1.5 s tail). Per run we record the engine's worst audio lag (how old audio is when it is stepped), the
VAD-stop→final latency of every final, and refusals. A node "holds" N calls when the median over runs of the
worst lag is ≤ 0.5 s and nothing is refused or dropped. That N sets serve-sip's default --max-calls and the
per-node maxload of deploy/kamailio/dispatcher.list (keep the two equal). The callers run in the node's own
process and event loop, so the figure is on the safe side of what a node behind a proxy holds.

    .venv/bin/python benchmarks/sip_capacity.py --calls 4 8 12 16 --runs 3
    .venv/bin/python benchmarks/sip_capacity.py --calls 24 32 40 --runs 5 --name sip_capacity_demo_node
    .venv/bin/python benchmarks/sip_capacity.py --geometry 0.6b --precision int8 --calls 1 2 3 4 \
        --name sip_capacity_0.6b_int8

`--geometry 0.6b`: the real architecture with random weights (`common.build_random_model`, at most one token per
frame), served by an engine of its own behind serve-sip's per-call pipeline (the transcripts are noise; the lag and
the latencies are what is measured), with the engine's default thread count, as `serve-sip` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common import machine, write_results
from sip_caller import call_audio, place_call

HELDOUT = Path(__file__).parent.parent / "tests" / "data" / "demo_heldout"
LAG_LIMIT_S = 0.5


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def one_size(calls: int, runs: int, chunk_ms: int, console: Console, *, model=None,
                   precision: str = "fp32") -> dict:
    """``model`` None: serve-sip with the demo model as a user runs it; else that model object on an engine of its
    own, handed to serve-sip's per-call pipeline (``stt_factory``)."""
    from pipecat_nemotron.apps import phone
    from pipecat_nemotron.engine import Engine
    from pipecat_nemotron.stt import NemotronSTTService

    port = free_udp_port()
    args = phone.parse_args(["--model", "demo", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
                             "--max-calls", str(calls), "--chunk-ms", str(chunk_ms), "--precision", precision])
    out, ready = io.StringIO(), asyncio.Event()
    stt_factory = None
    if model is not None:
        own = Engine(model=model, chunk_ms=chunk_ms, device="cpu", max_streams=calls, precision=precision)
        await own.ready()
        await own.warm_up()
        stt_factory = lambda call: NemotronSTTService(engine=own, chunk_ms=chunk_ms)  # noqa: E731
    server = asyncio.ensure_future(phone.serve(args, out=out, ready=ready, stt_factory=stt_factory))
    await asyncio.wait_for(ready.wait(), 180)
    engine = own if model is not None else Engine.shared(model="demo", chunk_ms=chunk_ms, device="cpu",
                                                          max_streams=calls, precision=precision)
    files = sorted(HELDOUT.glob("*.wav"))
    lags, latencies, refused, dropped, audio_s = [], [], 0, 0, 0.0
    try:
        for run in range(runs):
            audios = [call_audio(files[(run * calls + i) % len(files)]) for i in range(calls)]
            audio_s += sum(len(a) / 16000 for a in audios)
            engine.stats.max_lag_s = 0.0
            lines_before = len(out.getvalue().splitlines())
            results = await asyncio.gather(*(place_call(("127.0.0.1", port), a) for a in audios))
            await asyncio.sleep(3.0)  # the last finals
            refused += sum(not r.answered for r in results)
            dropped += sum(r.dropped_by_server for r in results)
            lags.append(engine.stats.max_lag_s)
            new = [json.loads(line) for line in out.getvalue().splitlines()[lines_before:]]
            latencies += [r["latency_ms"] for r in new if r.get("latency_ms") is not None]
            console.print(f"  {calls} calls, run {run + 1}: worst lag {lags[-1]:.2f} s, {len(new)} finals, "
                          f"{sum(not r.answered for r in results)} refused")
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        engine.close()
    latencies.sort()
    return {"calls": calls, "runs": runs, "engine_threads": engine.threads,
            "median_worst_lag_s": statistics.median(lags), "worst_lags_s": lags,
            "final_latency_p50_ms": latencies[len(latencies) // 2] if latencies else None,
            "final_latency_p95_ms": latencies[int(len(latencies) * 0.95)] if latencies else None,
            "refused": refused, "dropped": dropped, "audio_s": round(audio_s, 1),
            "holds": statistics.median(lags) <= LAG_LIMIT_S and not refused and not dropped}


async def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-ms", type=int, default=160)
    parser.add_argument("--name", default=None, help="result file name (default: sip_capacity_<geometry>)")
    parser.add_argument("--geometry", choices=["demo", "0.6b"], default="demo",
                        help="the demo model, or the 0.6B architecture with random weights")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    args = parser.parse_args(argv)
    name = args.name or f"sip_capacity_{args.geometry}"
    what = "demo model" if args.geometry == "demo" else "0.6B architecture (random weights)"
    what += f", {args.precision}"
    console = Console()
    model = None
    if args.geometry != "demo":
        from common import build_random_model

        console.print(f"building the {args.geometry} architecture ...")
        model, _ = build_random_model(args.geometry)
    rows = []
    for calls in args.calls:
        rows.append(await one_size(calls, args.runs, args.chunk_ms, console, model=model, precision=args.precision))
    held = [row["calls"] for row in rows if row["holds"]]
    table = Table(title=f"serve-sip capacity, {what}, {args.chunk_ms} ms chunks (median of {args.runs} runs)")
    for column in ("calls", "worst lag (median)", "worst lags", "final p50 / p95 ms", "refused", "dropped", "holds"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["calls"]), f"{row['median_worst_lag_s']:.2f} s",
                      ", ".join(f"{lag:.2f}" for lag in row["worst_lags_s"]),
                      f"{row['final_latency_p50_ms']} / {row['final_latency_p95_ms']}", str(row["refused"]),
                      str(row["dropped"]), "yes" if row["holds"] else "no")
    console.print(table)
    capacity = max(held) if held else 0
    info = machine()
    markdown = [f"# serve-sip capacity: {what}, {args.chunk_ms} ms chunks", "",
                f"{info['cpu']}, {info['cores']} cores, engine threads {rows[0]['engine_threads']} (serve-sip's "
                f"default), GPU {info['gpu']}, "
                f"{info['date']}. Real SIP calls over loopback (PCMU RTP in real time), N callers at once, "
                f"{args.runs} runs per N. A node holds N when the median worst audio lag is ≤ {LAG_LIMIT_S} s and "
                "no call is refused or dropped.", "",
                "| calls | worst lag, median | worst lags per run | final latency p50 / p95 | refused | dropped "
                "| holds |",
                "|---|---|---|---|---|---|---|"]
    for row in rows:
        markdown.append(f"| {row['calls']} | {row['median_worst_lag_s']:.2f} s | "
                        f"{', '.join(f'{lag:.2f}' for lag in row['worst_lags_s'])} | "
                        f"{row['final_latency_p50_ms']} / {row['final_latency_p95_ms']} ms | {row['refused']} | "
                        f"{row['dropped']} | {'yes' if row['holds'] else 'no'} |")
    markdown += ["", f"**Capacity: {capacity} concurrent calls** per node at {args.chunk_ms} ms on this machine."]
    path = write_results(name, {"machine": info, "chunk_ms": args.chunk_ms, "rows": rows, "geometry": args.geometry,
                                "precision": args.precision, "capacity": capacity, "lag_limit_s": LAG_LIMIT_S},
                         "\n".join(markdown))
    console.print(f"capacity {capacity}; written to {path}")


if __name__ == "__main__":
    asyncio.run(main())

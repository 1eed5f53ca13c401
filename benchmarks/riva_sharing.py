"""One shared serve-riva engine vs one engine per call: the same N real-time streams, side by side in one run.

(A) `pipecat-nemotron serve-riva --model demo`: N client streams (threads of this process, one gRPC connection
each) send held-out audio in real time (100 ms messages), half-close, and time the last final after the half-close.
(B) N processes `pipecat-nemotron transcribe --model demo --realtime FILE`, each loading its own engine (what a
one-process-per-call deployment does without a server); the final latency each prints for its last utterance.

For each: final latency (median / p90 over the streams), total resident memory of the processes involved (sum of
their peak RSS), and total CPU seconds. Runs alternate (A, B, A, B, ...) and the table gives the median of the runs.

    python benchmarks/riva_sharing.py --streams 8 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, write_results  # noqa: E402

import grpc  # noqa: E402
from riva.client.proto import health_pb2, health_pb2_grpc, riva_asr_pb2, riva_asr_pb2_grpc  # noqa: E402

from pipecat_nemotron.wav import read_wav, write_wav  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "tests" / "data" / "demo_heldout"
EXE = Path(sys.executable).with_name("pipecat-nemotron")
console = Console(width=160)


def call_audio(index: int) -> np.ndarray:
    """~10 s of 16 kHz PCM16: three held-out utterances with pauses (different per stream)."""
    from scipy.signal import resample_poly
    files = sorted(HELDOUT.glob("*.wav"))
    parts = [np.zeros(8000)]
    for k in range(3):
        wav = read_wav(files[(index * 3 + k) % len(files)])
        parts += [resample_poly(wav.samples.astype(np.float64), 16000, wav.sample_rate), np.zeros(12000)]
    return np.clip(np.concatenate(parts), -32768, 32767).astype(np.int16)


TRAIL = 12000  # samples of silence after the last utterance
STOP_HISTORY_S = 0.3  # the server's endpointing window, as transcribe's VAD stop_secs


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def shared_server(audios: list[np.ndarray]) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(EXE), "serve-riva", "--model", "demo", "--port", str(port), "--max-streams",
                               str(len(audios))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with grpc.insecure_channel(address) as channel:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    break
            except grpc.RpcError:
                time.sleep(0.5)
        latencies = [0.0] * len(audios)

        def stream(i: int) -> None:
            speech_end_sent = [0.0]
            speech_end = len(audios[i]) - TRAIL

            def requests():
                yield riva_asr_pb2.StreamingRecognizeRequest(streaming_config=riva_asr_pb2.StreamingRecognitionConfig(
                    config=riva_asr_pb2.RecognitionConfig(
                        encoding=1, sample_rate_hertz=16000,
                        endpointing_config=riva_asr_pb2.EndpointingConfig(stop_history=300))))
                started = time.monotonic()
                for k, offset in enumerate(range(0, len(audios[i]), 1600)):
                    time.sleep(max(0.0, started + k * 0.1 - time.monotonic()))
                    yield riva_asr_pb2.StreamingRecognizeRequest(audio_content=audios[i][offset:offset + 1600].tobytes())
                    if offset <= speech_end < offset + 1600:
                        speech_end_sent[0] = time.monotonic()

            last = 0.0
            with grpc.insecure_channel(address) as channel:
                for response in riva_asr_pb2_grpc.RivaSpeechRecognitionStub(channel).StreamingRecognize(requests()):
                    if any(r.is_final for r in response.results):
                        last = time.monotonic()
            # like transcribe's VAD stop -> final: from the end of the endpointing window after the last word
            latencies[i] = last - speech_end_sent[0] - STOP_HISTORY_S

        cpu_before = cpu_seconds(server.pid)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(audios))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {"latencies_ms": [x * 1000 for x in latencies], "rss_mb": peak_rss_mb(server.pid),
                "cpu_s": cpu_seconds(server.pid) - cpu_before}
    finally:
        server.terminate()
        server.wait(30)


def process_per_call(audios: list[np.ndarray], directory: Path) -> dict:
    paths = []
    for i, audio in enumerate(audios):
        path = directory / f"call_{i}.wav"
        write_wav(path, audio, 16000)
        paths.append(path)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    processes = [subprocess.Popen([str(EXE), "transcribe", "--model", "demo", "--realtime", "--json", str(p)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for p in paths]
    rss, outputs = [0.0] * len(processes), [""] * len(processes)
    while any(p.poll() is None for p in processes):
        rss = [max(r, peak_rss_mb(p.pid)) for r, p in zip(rss, processes)]
        time.sleep(0.2)
    for i, process in enumerate(processes):
        outputs[i] = process.stdout.read()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    latencies = []
    for output in outputs:
        finals = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        latencies.append(finals[-1]["latency_ms"] if finals else float("nan"))
    return {"latencies_ms": latencies, "rss_mb": sum(rss),
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def summary(runs: list[dict]) -> dict:
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    lat = [statistics.median(r["latencies_ms"]) for r in runs]
    p90 = [sorted(r["latencies_ms"])[int(0.9 * (len(r["latencies_ms"]) - 1))] for r in runs]
    return {"final_ms_median": statistics.median(lat), "final_ms_p90": statistics.median(p90),
            "rss_mb": median("rss_mb"), "cpu_s": median("cpu_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--name", default="riva_sharing_demo")
    args = parser.parse_args()
    audios = [call_audio(i) for i in range(args.streams)]
    shared, separate = [], []
    with tempfile.TemporaryDirectory() as directory:
        for run in range(args.runs):
            shared.append(shared_server(audios))
            separate.append(process_per_call(audios, Path(directory)))
            console.print(f"[dim]run {run + 1}: shared {shared[-1]['rss_mb']:.0f} MB {shared[-1]['cpu_s']:.1f} CPU-s; "
                          f"per call {separate[-1]['rss_mb']:.0f} MB {separate[-1]['cpu_s']:.1f} CPU-s[/]")
    a, b = summary(shared), summary(separate)
    header = ["deployment", "streams", "final after end of audio, median / p90 (ms)", "memory (MB, sum of peak RSS)",
              "CPU seconds"]
    rows = [["one serve-riva (shared engine)", str(args.streams), f"{a['final_ms_median']:.0f} / {a['final_ms_p90']:.0f}",
             f"{a['rss_mb']:.0f}", f"{a['cpu_s']:.1f}"],
            ["one process + engine per call", str(args.streams), f"{b['final_ms_median']:.0f} / {b['final_ms_p90']:.0f}",
             f"{b['rss_mb']:.0f}", f"{b['cpu_s']:.1f}"],
            ["ratio per call / shared", "", "", f"{b['rss_mb'] / max(a['rss_mb'], 1):.1f}×",
             f"{b['cpu_s'] / max(a['cpu_s'], 0.1):.1f}×"]]
    table = Table(*header, title=f"{args.streams} real-time streams, demo model, 160 ms, median of {args.runs} runs")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    console.print(table)
    info = machine()
    lines.append(f"\nFinal latency: for the server, the last final's arrival at its client minus the moment the last word's "
                 f"audio was sent and the endpointing window (stop_history 300 ms); for transcribe, its own VAD stop "
                 f"(stop_secs 0.3 s) -> final. CPU seconds of the server "
                 f"exclude its start-up; the per-call processes' include loading their engine (what each call pays). "
                 f"{info['cpu']}, {info['cores']} cores, {info['date']}; "
                 f"`python benchmarks/riva_sharing.py --streams {args.streams} --runs {args.runs}`")
    console.print(f"written {write_results(args.name, {'machine': info, 'shared': shared, 'separate': separate}, chr(10).join(lines))}")


if __name__ == "__main__":
    main()

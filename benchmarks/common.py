"""Shared pieces of the benchmarks: model construction, machine facts, result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipecat_nemotron.engine.architecture import (NEMOTRON_0_6B, NEMOTRON_VOCAB_SIZE, TINY, build_prompt_rnnt_model,
                                                  prompt_rnnt_config, write_sized_tokenizer)

RESULTS = Path(__file__).parent / "results"
PROMPTS = {"en-US": 0, "es-ES": 1, "de-DE": 2, "fr-FR": 3, "auto": 101}


# Speech at about 3 words/s gives the real model ~6 BPE tokens/s, about one token per two 80 ms encoder frames. A
# model with random weights instead emits `max_symbols` (10) tokens on EVERY frame, and its greedy RNN-T loop then
# costs 5-20x the encoder (measured: 167 of 213 ms of an int8 step at 160 ms): a decoder load no real call has. The
# benchmarks cap it at one token per frame (twice speech's rate), so the decoder costs about what it costs in a call.
BENCH_MAX_SYMBOLS = 1


def build_random_model(geometry: str, *, max_symbols: int = BENCH_MAX_SYMBOLS):
    """The real 0.6B architecture (or a tiny one for smoke runs) with random weights; greedy decoding emits at most
    `max_symbols` tokens per encoder frame."""
    sizes = {"0.6b": (NEMOTRON_0_6B, NEMOTRON_VOCAB_SIZE), "tiny": (TINY, 256)}[geometry]
    directory = Path(tempfile.mkdtemp(prefix="nemotron-bench-"))
    tags = [f"<{key}>" for key in PROMPTS if key != "auto"]
    tokenizer = write_sized_tokenizer(directory / "tokenizer", vocab_size=sizes[1], tags=tags)
    config = prompt_rnnt_config(sizes[0], tokenizer_dir=tokenizer, prompt_dictionary=PROMPTS)
    config["decoding"]["greedy"]["max_symbols"] = max_symbols
    started = time.perf_counter()
    model = build_prompt_rnnt_model(config, seed=0)
    params = sum(p.numel() for p in model.parameters())
    return model, {"geometry": geometry, "params": params, "build_s": round(time.perf_counter() - started, 1),
                   "max_symbols": max_symbols}


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of this machine with the current torch thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "torch": torch.__version__, "date": dt.date.today().isoformat()}


def write_results(name: str, payload: dict, table_markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    path = RESULTS / f"{name}.md"
    path.write_text(table_markdown + "\n")
    return path

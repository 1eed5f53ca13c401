"""How long `pipecat-nemotron [COMMAND] --help` takes, as a user runs it (a fresh process each time).

    python benchmarks/cli_help.py              # 7 runs per command; table on stdout
    python benchmarks/cli_help.py --runs 15

Writes `benchmarks/results/cli_help.md` and `.json`: per command the median, min and max wall time of `--runs`
processes (the first run, with a cold page cache, is reported separately and not in the median). The goal is
< 1.5 s: the CLI imports only typer at module level; torch, NeMo and Pipecat load inside the command that needs them.
A figure, not a timed test (timings depend on the machine and what else runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COMMANDS = ["", "transcribe", "serve-sip", "serve-webrtc", "languages"]
GOAL_S = 1.5


def cli() -> list[str]:
    script = Path(sys.executable).parent / "pipecat-nemotron"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipecat_nemotron.apps.cli"]


def time_help(command: str) -> float:
    argv = cli() + ([command] if command else []) + ["--help"]
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="measured runs per command (after one first run)")
    parser.add_argument("--name", default="cli_help", help="result file name in benchmarks/results/")
    args = parser.parse_args(argv)

    rows = []
    for command in COMMANDS:
        first = time_help(command)
        runs = [time_help(command) for _ in range(args.runs)]
        rows.append({"command": f"pipecat-nemotron {command} --help".replace("  ", " "), "first_s": first,
                     "median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "runs": runs})
    machine = {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
               "python": platform.python_version(), "date": dt.date.today().isoformat()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                machine["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    header = (f"{machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; {machine['date']}. "
              f"{args.runs} runs per command after a first one; goal < {GOAL_S} s.")
    lines = [header, "", "| command | median s | min s | max s | first run s |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| `{row['command']}` | {row['median_s']:.2f} | {row['min_s']:.2f} | {row['max_s']:.2f} | "
                     f"{row['first_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(table + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": machine, "goal_s": GOAL_S, "rows": rows},
                                                          indent=2) + "\n")
    slow = [row["command"] for row in rows if row["median_s"] >= GOAL_S]
    if slow:
        print(f"over the {GOAL_S} s goal: {', '.join(slow)}", file=sys.stderr)


if __name__ == "__main__":
    main()

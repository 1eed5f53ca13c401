"""What the commands print: third-party noise down, a spinner with elapsed time for the model load."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings

# Loggers that print warnings on every run of every command and mean nothing to a user of ours: NeMo's training
# telemetry (one-logger: "OneLogger: Setting error_handling_strategy ...", "No exporters were provided ..."),
# Lightning's tips, and NeMo's own import chatter.
NOISY_LOGGERS = ("nv_one_logger", "one_logger", "lightning", "lightning.pytorch", "pytorch_lightning",
                 "lightning_fabric", "megatron", "numba", "urllib3")


def quiet_third_party() -> None:
    """Silence NeMo/one-logger/Lightning telemetry and import warnings for our commands (errors still show)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("nemo", "lightning", "pytorch_lightning", "megatron", "torch", "torchaudio", "pydub", "audioop",
                   "pipecat", "websockets", "onnxscript", "numba"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    warnings.filterwarnings("ignore", message=".*audioop.*")


@contextlib.contextmanager
def loading(console, what: str):
    """A rich spinner with the elapsed time while `what` runs (on a terminal); one line before and after otherwise.

    The body may block (a thread waiting for the model) or await: the spinner refreshes on its own thread.
    """
    started = time.monotonic()
    if console.is_terminal:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            progress.add_task(f"loading {what}", total=None)
            yield
    else:
        console.print(f"loading {what}…")
        yield
    console.print(f"[dim]{what} ready in {time.monotonic() - started:.1f} s[/]")

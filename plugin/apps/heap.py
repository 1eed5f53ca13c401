"""A server's start-up heap, moved out of the cyclic garbage collector's reach once the model is loaded.

A server with the model loaded holds some 750 000 long-lived Python objects (NeMo, torch, Pipecat and their
modules; measured with the demo model). Each full (generation 2) collection walks all of them — 0.4 s on this
project's 2-core EPYC — and runs on whichever thread allocated last, usually the event loop: SIP retransmissions,
RTP pacing and every call's audio stand still meanwhile (the SIP fuzz test caught a 0.76 s stall inside one).
CPython's remedy is `gc.freeze()` after start-up: the objects alive then go to a permanent generation that no
collection visits; everything made afterwards (calls, pipelines, frames) is collected as before. Applications own
their process, so this lives here, not in the engine or the STT service: a bot that embeds `NemotronSTTService`
can call `freeze_startup_heap()` after `NemotronSTTService.preload(...)` itself.
"""

from __future__ import annotations

import gc
import time

from loguru import logger


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object still alive; return how many are now frozen. Call it once the model
    is loaded and before the server listens (the one full collection here blocks, before any call can notice)."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info(f"gc: {frozen} start-up objects frozen out of the cyclic collector's reach "
                f"({time.perf_counter() - started:.2f} s); full collections no longer walk them")
    return frozen

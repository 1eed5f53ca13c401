"""One connected client's pipeline (a browser over WebRTC, a phone call over a media websocket), run until it
ends, with how it ended written to the session's record."""

from __future__ import annotations

import asyncio
import time

from loguru import logger
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.workers.runner import WorkerRunner

from ..stt import END_FLUSH_MAX_S

# After the client left, the pipeline is cancelled if still running this long: the STT waits for its last
# finals as long as the engine's backlog needs (at most END_FLUSH_MAX_S), so only a stuck stage hits this.
GRACEFUL_END_S = END_FLUSH_MAX_S + 5.0


async def run_until_client_leaves(transport, processors: list, record, *, params: PipelineParams, left: str,
                                  name: str) -> None:
    """Run ``processors`` as one pipeline until the client disconnects or the pipeline ends.

    ``record`` is anything with ``outcome`` (``"running"`` to begin with) and ``ended``. The outcome becomes
    ``left`` when the transport reports the client gone (the pipeline then ends gracefully, so the last
    words are still transcribed, and is cancelled if that takes over ``GRACEFUL_END_S``), ``"ended"`` when the
    pipeline ends by itself, ``"server shutdown"`` when this coroutine is cancelled (re-raised), and
    ``"failed: …"`` when the pipeline raises (logged with ``name``); ``record.ended`` is set on the way out.
    Logging the record is the caller's.
    """
    worker = PipelineWorker(Pipeline(processors), params=params, idle_timeout_secs=None, enable_rtvi=False)
    watchdogs: list[asyncio.Task] = []

    @transport.event_handler("on_client_disconnected")
    async def on_disconnected(transport, client):
        if record.outcome == "running":
            record.outcome = left
        # End gracefully, so the STT still delivers what the client said just before leaving; cancel if that
        # takes too long (a stage waiting on the dead connection).
        await worker.stop_when_done()
        watchdogs.append(asyncio.create_task(cancel_if_stuck()))

    async def cancel_if_stuck():
        await asyncio.sleep(GRACEFUL_END_S)
        if not worker.has_finished():
            logger.warning(f"{name}: pipeline still running {GRACEFUL_END_S} s after the client left; cancelling")
            await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    try:
        await runner.add_workers(worker)
        await runner.run()
        if record.outcome == "running":
            record.outcome = "ended"
    except asyncio.CancelledError:
        if record.outcome == "running":
            record.outcome = "server shutdown"
        await worker.cancel()
        raise
    except Exception as error:
        record.outcome = f"failed: {error}"
        logger.exception(f"{name}: pipeline failed")
    finally:
        for watchdog in watchdogs:
            watchdog.cancel()
        record.ended = time.monotonic()

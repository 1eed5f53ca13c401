"""Driving engine streams in tests: the next Final of a stream, and one utterance from open to close."""

from __future__ import annotations

from pipecat_nemotron.engine import Final


async def next_final(stream) -> Final:
    """The stream's next Final (partials before it are skipped)."""
    async for result in stream:
        if isinstance(result, Final):
            return result
    raise AssertionError("stream ended without a Final")


async def final_of(engine, audio, *, language: str = "en-US") -> Final:
    """Open a stream, feed `audio` (16 kHz), finalize, return its Final; the stream is closed afterwards."""
    stream = engine.open_stream(language=language)
    try:
        stream.feed(audio)
        stream.finalize()
        return await next_final(stream)
    finally:
        stream.close()

"""The engine gives NeMo's reference streaming loop's tokens, token for token."""

import asyncio

import numpy as np
import pytest
import torch

from pipecat_nemotron.engine import Engine
from pipecat_nemotron.engine.features import HOP, MelExtractor, window_for
from engine_support import next_final
from reference import offline_mel, padded_for_finalize, reference_tokens
from tiny import speechlike


async def transcribe(engine, audio, *, language, pieces=7):
    """Feed audio in uneven pieces, finalize, return the Final."""
    stream = engine.open_stream(language=language)
    for piece in np.array_split(audio, pieces):
        stream.feed(piece)
        await asyncio.sleep(0)
    stream.finalize()
    try:
        return await next_final(stream)
    finally:
        stream.close()


@pytest.fixture
def engine_factory(tiny_model):
    engines = []

    def make(chunk_ms=160, **options):
        engine = Engine(model=tiny_model, chunk_ms=chunk_ms, device="cpu", **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.mark.parametrize("chunk_ms", [160, 320, 560, 1120])
async def test_tokens_equal_reference_loop(tiny_model, engine_factory, chunk_ms):
    audio = speechlike(3.3, seed=chunk_ms)
    engine = engine_factory(chunk_ms)
    await engine.ready()
    final = await transcribe(engine, audio, language="en-US")
    expected = reference_tokens(tiny_model, audio, language="en-US", chunk_ms=chunk_ms)[0]
    assert len(expected) > 5, "the test model should emit tokens"
    assert list(final.token_ids) == expected


async def test_streaming_mel_equals_offline(tiny_model):
    audio = speechlike(1.7, seed=5)
    padded, frames = padded_for_finalize(tiny_model, audio, 160)
    offline = offline_mel(tiny_model, padded)[0, :, :frames]
    extractor = MelExtractor(tiny_model.preprocessor, "cpu")
    pieces, start = [], 0
    for end in list(range(9, frames, 16)) + [frames]:
        first, last, offset = window_for(start, end)
        pieces.append(extractor([padded[first:last]], [offset], end - start)[0])
        start = end
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape == offline.shape
    assert torch.allclose(streamed, offline, atol=1e-4), (streamed - offline).abs().max()


async def test_mixed_batch_equals_each_stream_alone(tiny_model, engine_factory):
    """Different languages, lengths and start times in one batch == each stream run alone."""
    # (language, seconds of audio, phase at which the stream joins); a phase is 0.24 s of audio
    specs = [("en-US", 2.1, 0), ("de-DE", 3.0, 1), ("es-ES", 1.3, 3), ("auto", 2.6, 2)]
    piece = int(0.24 * 16000)
    engine = engine_factory(160)
    await engine.ready()
    audios = [speechlike(seconds, seed=i) for i, (_, seconds, _) in enumerate(specs)]
    streams = [None] * len(specs)
    finals = [None] * len(specs)
    for phase in range(30):
        with engine.paused():
            for i, (language, _, joins) in enumerate(specs):
                if phase < joins or finals[i] is not None:
                    continue
                if streams[i] is None:
                    streams[i] = engine.open_stream(language=language)
                chunk = audios[i][(phase - joins) * piece:(phase - joins + 1) * piece]
                streams[i].feed(chunk)
                if len(chunk) < piece:
                    streams[i].finalize()
                    finals[i] = asyncio.ensure_future(_final_of(streams[i]))
        await _until_idle(streams)
        if all(f is not None for f in finals):
            break
    results = await asyncio.gather(*finals)
    assert max(engine.stats.batch_sizes) == len(specs), "all streams should have shared steps"
    for (language, _, _), audio, final in zip(specs, audios, results):
        alone = reference_tokens(tiny_model, audio, language=language, chunk_ms=160)[0]
        assert list(final.token_ids) == alone, language


async def _final_of(stream):
    try:
        return await next_final(stream)
    finally:
        stream.close()


async def _until_idle(streams, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while any(s is not None and not s.closed and s.lag_s >= 0.16 for s in streams):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)

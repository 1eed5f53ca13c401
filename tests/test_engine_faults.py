"""The engine under churn and faults: no state crosses between calls, faults stay with their streams,
capacity is one reservation count, and the thread never dies silently."""

import asyncio
import contextlib
import os
import random
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from pipecat_nemotron.engine import (CapacityError, Engine, EngineStepError, Final, StreamClosedError, nemo_compat)
from pipecat_nemotron.engine.detokenize import Detokenizer, PieceTable
from pipecat_nemotron.engine.scheduler import EngineStats
from pipecat_nemotron.engine.stream import Stream
from engine_support import next_final
from reference import reference_tokens, reference_tokens_with_resets
from tiny import speechlike


@pytest.fixture
def engines(tiny_model):
    made = []

    def make(**options):
        options.setdefault("max_streams", 4)
        engine = Engine(model=tiny_model, chunk_ms=160, device="cpu", **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def slow_steps(monkeypatch):
    """Every model step takes 15 ms longer, between gathering and scattering the caches: the race window."""
    decode = nemo_compat.decode_step

    def slow(*args, **kwargs):
        time.sleep(0.015)
        return decode(*args, **kwargs)

    monkeypatch.setattr(nemo_compat, "decode_step", slow)


async def feed_in_pieces(stream, audio, pieces=6):
    for piece in np.array_split(audio, pieces):
        stream.feed(piece)
        await asyncio.sleep(0.01)


async def test_streams_opened_and_closed_while_steps_run_never_see_another_calls_state(
        tiny_model, engines, slow_steps):
    """Calls hang up mid-step all the time; each survivor's tokens equal NeMo's loop on its own audio."""
    engine = engines(max_streams=3)
    await engine.ready()
    rng = random.Random(7)
    checked = []

    async def caller(number: int):
        audio = speechlike(rng.uniform(0.6, 1.6), seed=100 + number)
        language = rng.choice(["en-US", "es-ES", "auto"])
        stream = None
        while stream is None:
            try:
                stream = engine.open_stream(language=language)
            except CapacityError:
                await asyncio.sleep(0.005)
        if number % 2:  # a caller that hangs up at a random moment, probably while its step runs
            await feed_in_pieces(stream, audio[: rng.randrange(3000, len(audio))])
            await asyncio.sleep(rng.uniform(0, 0.05))
            stream.close()
            return
        await feed_in_pieces(stream, audio)
        stream.finalize()
        final = await asyncio.wait_for(next_final(stream), 20)
        stream.close()
        checked.append((final, audio, language))

    await asyncio.gather(*(caller(n) for n in range(24)))
    assert len(checked) == 12
    for final, audio, language in checked:
        expected = reference_tokens(tiny_model, audio, language=language, chunk_ms=160)[0]
        assert list(final.token_ids) == expected
    await asyncio.sleep(0.05)
    assert engine.free_slots == 3 and engine.open_streams == 0


async def test_a_step_that_raises_fails_its_streams_and_the_engine_serves_on(tiny_model, engines, monkeypatch):
    engine = engines()
    await engine.ready()
    decode = nemo_compat.decode_step
    fail_next = threading.Event()

    def flaky(*args, **kwargs):
        if fail_next.is_set():
            fail_next.clear()
            raise RuntimeError("CUDA error: an illegal memory access")
        return decode(*args, **kwargs)

    monkeypatch.setattr(nemo_compat, "decode_step", flaky)
    victim = engine.open_stream(language="en-US")
    with engine.paused():
        fail_next.set()
        victim.feed(speechlike(0.5, seed=1))
    with pytest.raises(EngineStepError, match="illegal memory access"):
        await asyncio.wait_for(next_final(victim), 10)
    with pytest.raises(StreamClosedError):
        victim.feed(np.zeros(160, dtype=np.int16))
    victim.close()
    audio = speechlike(1.2, seed=2)
    survivor = engine.open_stream(language="en-US")
    await feed_in_pieces(survivor, audio)
    survivor.finalize()
    final = await asyncio.wait_for(next_final(survivor), 10)
    survivor.close()
    assert list(final.token_ids) == reference_tokens(tiny_model, audio, language="en-US", chunk_ms=160)[0]
    assert engine.alive and engine.stats.failed_steps == 1
    await asyncio.sleep(0.05)
    assert engine.free_slots == 4


async def test_a_tokenizer_that_raises_fails_one_stream_only(tiny_model, engines, monkeypatch):
    audios = [speechlike(1.5, seed=10 + i) for i in range(3)]
    expected = [reference_tokens(tiny_model, audio, language="en-US", chunk_ms=160)[0] for audio in audios]
    tokenizer = tiny_model.tokenizer
    decode = tokenizer.ids_to_text
    calls = {"n": 0}

    def no_pieces(ids):
        raise NotImplementedError("this tokenizer has no pieces")

    def flaky(ids):
        calls["n"] += 1
        if calls["n"] == 12:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return decode(ids)

    monkeypatch.setattr(tokenizer, "ids_to_tokens", no_pieces)  # whole-hypothesis decoding, every step
    monkeypatch.setattr(tokenizer, "ids_to_text", flaky)
    engine = engines()
    await engine.ready()
    streams = [engine.open_stream(language="en-US") for _ in audios]

    async def feed(stream, audio):
        with contextlib.suppress(StreamClosedError):  # the stream that fails refuses audio from then on
            await feed_in_pieces(stream, audio)

    await asyncio.gather(*(feed(s, a) for s, a in zip(streams, audios)))
    outcomes = []
    for stream, tokens in zip(streams, expected):
        try:
            stream.finalize()
            final = await asyncio.wait_for(next_final(stream), 10)
            outcomes.append(list(final.token_ids) == tokens)
        except (EngineStepError, StreamClosedError) as error:
            assert "post-step" in str(error) and "UnicodeDecodeError" in str(error)
            outcomes.append("failed")
        stream.close()
    assert outcomes.count("failed") == 1 and outcomes.count(True) == 2
    assert engine.alive
    await asyncio.sleep(0.05)
    assert engine.free_slots == 4


async def test_post_step_and_lag_errors_stay_local(tiny_model, engines, monkeypatch):
    engine = engines()
    await engine.ready()
    victim = engine.open_stream(language="en-US")
    measure = Stream._measure_age

    def broken_for_victim(self, now):
        if self is victim:
            raise ZeroDivisionError("bad clock")
        return measure(self, now)

    monkeypatch.setattr(Stream, "_measure_age", broken_for_victim)
    monkeypatch.setattr(Engine, "_check_lag", lambda self, jobs: 1 / 0)
    audio = speechlike(1.0, seed=3)
    other = engine.open_stream(language="en-US")
    victim.feed(audio)
    await feed_in_pieces(other, audio)
    other.finalize()
    with pytest.raises(EngineStepError, match="bad clock"):
        await asyncio.wait_for(next_final(victim), 10)
    final = await asyncio.wait_for(next_final(other), 10)
    assert list(final.token_ids) == reference_tokens(tiny_model, audio, language="en-US", chunk_ms=160)[0]
    other.close()
    victim.close()
    assert engine.alive


class _ThreadKiller(BaseException):
    """Not an Exception: gets past every per-stream guard, as a bug or a SystemExit would."""


async def test_a_dead_engine_thread_fails_every_stream_at_once_and_shared_replaces_it(tiny_model, monkeypatch):
    engine = Engine.shared(model=tiny_model, chunk_ms=160, device="cpu", max_streams=2)
    await engine.ready()
    streams = [engine.open_stream(language="en-US") for _ in range(2)]

    def die(self, jobs):
        raise _ThreadKiller("engine bug")

    monkeypatch.setattr(Engine, "_execute", die)
    streams[0].feed(speechlike(0.5, seed=4))
    for stream in streams:  # both, not only the one that was being stepped
        with pytest.raises(EngineStepError, match="engine stopped"):
            await asyncio.wait_for(next_final(stream), 5)
    assert not engine.alive and engine.health.startswith("stopped") and "engine bug" in engine.health
    assert engine.try_reserve() is None and not engine.has_capacity
    monkeypatch.undo()
    fresh = Engine.shared(model=tiny_model, chunk_ms=160, device="cpu", max_streams=2)
    try:
        assert fresh is not engine
        await fresh.ready()
        assert fresh.alive and fresh.health == "ready"
    finally:
        fresh.close()


async def test_reservations_are_the_one_capacity_count(engines):
    engine = engines(max_streams=2)
    await engine.ready()
    first, second = engine.try_reserve(), engine.try_reserve()
    assert first and second and engine.free_slots == 0 and not engine.has_capacity
    assert engine.try_reserve() is None  # refused before anything is answered
    with pytest.raises(CapacityError, match="2 stream slots"):
        engine.reserve()
    with pytest.raises(CapacityError):
        engine.open_stream(language="auto")  # a stream without a reservation takes its own
    stream = engine.open_stream(language="auto", reservation=first)
    with pytest.raises(StreamClosedError, match="already has open stream"):
        engine.open_stream(language="auto", reservation=first)
    stream.close()
    assert engine.free_slots == 0  # the call still holds its reservation between streams
    again = engine.open_stream(language="en-US", reservation=first)
    first.release()  # the call is over: its open stream ends with it
    assert again.closed and engine.free_slots == 1
    first.release()  # idempotent: released exactly once
    assert engine.free_slots == 1
    with pytest.raises(StreamClosedError, match="released"):
        engine.open_stream(language="auto", reservation=first)
    second.release()
    own = engine.open_stream(language="auto")
    assert engine.free_slots == 1
    own.close()
    own.close()
    assert engine.free_slots == 2


async def test_shared_engine_refuses_conflicting_options(tiny_model):
    engine = Engine.shared(model=tiny_model, chunk_ms=160, device="cpu", max_streams=3)
    try:
        assert Engine.shared(model=tiny_model, chunk_ms=160, device="cpu", max_streams=3) is engine
        with pytest.raises(ValueError, match="max_streams=5 .it has 3."):
            Engine.shared(model=tiny_model, chunk_ms=160, device="cpu", max_streams=5)
    finally:
        engine.close()


async def test_stats_keep_a_recent_window(engines, monkeypatch):
    monkeypatch.setattr(EngineStats, "WINDOW", 5)
    engine = engines(max_streams=2)
    await engine.ready()
    stream = engine.open_stream(language="en-US")
    await feed_in_pieces(stream, speechlike(2.0, seed=5), pieces=10)
    stream.finalize()
    await asyncio.wait_for(next_final(stream), 10)
    stream.close()
    assert engine.stats.steps > 5 and len(engine.stats.batch_sizes) == 5
    assert engine.stats.recent_realtime_factor > 0


async def test_language_is_the_last_tag_of_the_utterance(tiny_model, engines, monkeypatch):
    ids = tiny_model.tokenizer.text_to_ids("Hola, buenos días. <es-ES> Yes, please. <en-US>")

    def fixed(model, encoded, lengths, hypotheses):
        return [SimpleNamespace(y_sequence=list(ids)) for _ in hypotheses]

    monkeypatch.setattr(nemo_compat, "decode_step", fixed)
    engine = engines()
    await engine.ready()
    stream = engine.open_stream(language="auto")
    stream.feed(speechlike(0.5, seed=6))
    stream.finalize()
    final = await asyncio.wait_for(next_final(stream), 10)
    stream.close()
    assert final.text == "Hola, buenos días. Yes, please." and final.language == "en-US"


async def test_reset_context_per_utterance_equals_the_reference_with_fresh_caches(tiny_model, engines):
    engine = engines(max_streams=2, reset_context_per_utterance=True)
    await engine.ready()
    utterances = [speechlike(1.3, seed=71), speechlike(1.5, seed=72), speechlike(0.9, seed=73)]
    stream = engine.open_stream(language="en-US")
    finals = []
    for audio in utterances:
        await feed_in_pieces(stream, audio)
        stream.finalize()
        finals.append(await asyncio.wait_for(next_final(stream), 10))
    stream.close()
    expected = reference_tokens_with_resets(tiny_model, utterances, language="en-US", chunk_ms=160)
    assert [list(f.token_ids) for f in finals] == expected
    assert all(expected) and expected[1] != reference_tokens(tiny_model, np.concatenate(utterances[:2]),
                                                              language="en-US", chunk_ms=160)[0]


def test_incremental_detokenizing_equals_the_tokenizers_own_decode(tiny_model):
    tokenizer = tiny_model.tokenizer
    table = PieceTable(tokenizer)
    assert table.incremental
    rng = random.Random(3)
    for _ in range(30):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        detokenizer = Detokenizer(table)
        for end in sorted({rng.randrange(1, len(ids) + 1) for _ in range(5)} | {len(ids)}):
            text = detokenizer.update(ids[:end])
        assert " ".join(text.split()) == " ".join(tokenizer.ids_to_text(ids).split())
        detokenizer.reset()
        assert detokenizer.update(ids[:1]) == tokenizer.ids_to_text(ids[:1]).strip()


def test_a_tokenizer_whose_pieces_do_not_join_is_decoded_whole():
    class Odd:
        vocab_size = 3

        def ids_to_tokens(self, ids):
            return ["a", "b", "c"][ids[0]:ids[0] + 1]

        def ids_to_text(self, ids):
            return "-".join("abc"[i] for i in ids)

    table = PieceTable(Odd())
    assert not table.incremental
    assert Detokenizer(table).update([0, 1, 2]) == "a-b-c"


async def test_a_lagging_engine_refuses_new_calls_until_it_catches_up(engines, slow_steps, monkeypatch):
    """Calls it already has go on; new ones are refused while their audio would only queue up behind."""
    decode = nemo_compat.decode_step

    def slower(*args, **kwargs):
        time.sleep(0.2)  # slower than the 160 ms of audio each step covers
        return decode(*args, **kwargs)

    monkeypatch.setattr(nemo_compat, "decode_step", slower)
    engine = engines(max_streams=4, max_admission_lag_s=0.5)
    await engine.ready()
    busy = engine.open_stream(language="en-US")
    busy.feed(speechlike(2.5, seed=9))  # arrives at once, stepped at 0.8x real time
    for _ in range(60):
        if engine.lagging:
            break
        await asyncio.sleep(0.05)
    assert engine.lagging and not engine.has_capacity and engine.free_slots == 3
    assert engine.try_reserve() is None
    with pytest.raises(CapacityError, match="behind real time"):
        engine.reserve()
    busy.finalize()
    await asyncio.wait_for(next_final(busy), 20)  # the call it had is served
    busy.close()
    for _ in range(60):
        if not engine.lagging:
            break
        await asyncio.sleep(0.1)
    reservation = engine.try_reserve()
    assert reservation is not None
    reservation.release()


async def test_the_engine_sets_its_cpu_threads(tiny_model, engines):
    import torch

    from pipecat_nemotron.engine.scheduler import default_threads

    assert default_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    engine = engines(threads=1)
    await engine.ready()
    observed = []  # what the model step sees, on the engine's thread
    stream = engine.open_stream(language="en-US")
    original = nemo_compat.decode_step

    def spy(*args, **kwargs):
        observed.append(torch.get_num_threads())
        return original(*args, **kwargs)

    nemo_compat.decode_step = spy
    try:
        stream.feed(speechlike(0.5, seed=8))
        stream.finalize()
        await asyncio.wait_for(next_final(stream), 10)
    finally:
        nemo_compat.decode_step = original
        stream.close()
    assert observed and set(observed) == {1}
    assert engines(threads=2).threads == 2

"""Engine behaviour around the model step: languages, utterances, bad input, capacity, cleanup."""

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from pipecat_nemotron.engine import (AudioFormatError, CapacityError, Engine, ModelLoadError, Partial,
                                     StreamClosedError, UnsupportedChunkSizeError, UnsupportedLanguageError,
                                     load_model, split_language_tags)
from pipecat_nemotron.engine.features import HOP
from pipecat_nemotron.engine.loader import att_context_for_chunk, chunk_spec
from engine_support import next_final
from reference import padded_for_finalize, reference_tokens
from tiny import speechlike


@pytest.fixture
def engine(tiny_engine):
    return tiny_engine


async def test_language_prompt_changes_output(engine):
    audio = speechlike(2.5, seed=11)
    finals = {}
    for language in ("en-US", "de-DE"):
        stream = engine.open_stream(language=language)
        stream.feed(audio)
        stream.finalize()
        finals[language] = await next_final(stream)
        stream.close()
    assert finals["en-US"].token_ids != finals["de-DE"].token_ids
    assert finals["en-US"].language == "en-US" and finals["de-DE"].language == "de-DE"


async def test_set_language_applies_from_next_utterance(engine, tiny_model):
    audio = speechlike(1.5, seed=12)
    stream = engine.open_stream(language="en-US")
    stream.feed(audio)
    stream.set_language("de-DE")  # mid-utterance: this one stays en-US
    stream.finalize()
    first = await next_final(stream)
    stream.close()
    assert first.language == "en-US"
    assert list(first.token_ids) == reference_tokens(tiny_model, audio, language="en-US", chunk_ms=160)[0]


async def test_finalize_gives_whole_utterance_and_next_starts_clean(engine, tiny_model):
    first_audio, second_audio = speechlike(1.9, seed=21), speechlike(1.4, seed=22)
    stream = engine.open_stream(language="es-ES")
    partials = []
    stream.feed(first_audio)
    stream.finalize()
    async for result in stream:
        if isinstance(result, Partial):
            partials.append(result)
        else:
            first = result
            break
    stream.feed(second_audio)
    stream.finalize()
    second = await next_final(stream)
    stream.close()

    # The engine's timeline: utterance 1 + its finalize silence, then utterance 2 + its silence.
    padded_first, boundary = padded_for_finalize(engine.model, first_audio, 160)
    timeline = np.concatenate([padded_first, second_audio])
    expected = reference_tokens(tiny_model, timeline, language="es-ES", chunk_ms=160, reset_at_frames=(boundary,))
    assert list(first.token_ids) == expected[0]
    assert list(second.token_ids) == expected[1]
    assert len(second.token_ids) > 0 and second.token_ids[:len(first.token_ids)] != first.token_ids
    assert partials and all(p.text for p in partials)
    assert first.start_s == 0 and first.end_s == pytest.approx(len(first_audio) / 16000)
    assert second.start_s == pytest.approx(len(first_audio) / 16000)
    assert second.end_s == pytest.approx((len(first_audio) + len(second_audio)) / 16000)


async def test_finalize_without_audio_gives_empty_final(engine):
    stream = engine.open_stream(language="en-US")
    stream.finalize()
    final = await asyncio.wait_for(next_final(stream), 5)
    assert final.text == "" and final.token_ids == ()
    stream.close()


@pytest.mark.parametrize("bad, message", [
    (np.zeros(160, dtype=np.float64), "dtype"),
    (np.array([0.1, np.nan], dtype=np.float32), "NaN"),
    (b"\x00\x01\x02", "2-byte"),
    (np.zeros((2, 160), dtype=np.int16), "mono"),
    ([0, 1, 2], "numpy array"),
])
async def test_bad_audio_is_refused_and_others_unaffected(engine, tiny_model, bad, message):
    good_audio = speechlike(1.2, seed=31)
    good = engine.open_stream(language="en-US")
    victim = engine.open_stream(language="en-US")
    good.feed(good_audio[:8000])
    with pytest.raises(AudioFormatError, match=message):
        victim.feed(bad)
    victim.feed(np.zeros(320, dtype=np.int16))  # the refused stream still works
    good.feed(good_audio[8000:])
    good.finalize()
    final = await next_final(good)
    assert list(final.token_ids) == reference_tokens(tiny_model, good_audio, language="en-US", chunk_ms=160)[0]
    good.close()
    victim.close()


async def test_pcm16_bytes_equal_int16_array(engine):
    audio = (speechlike(1.0, seed=41) * 32767).astype(np.int16)
    finals = []
    for payload in (audio, audio.tobytes()):
        stream = engine.open_stream(language="en-US")
        stream.feed(payload)
        stream.finalize()
        finals.append(await next_final(stream))
        stream.close()
    assert finals[0].token_ids == finals[1].token_ids


async def test_closed_stream_refuses_audio(engine):
    stream = engine.open_stream(language="en-US")
    stream.close()
    with pytest.raises(StreamClosedError):
        stream.feed(np.zeros(160, dtype=np.int16))
    with pytest.raises(StreamClosedError):
        stream.finalize()


async def test_capacity_is_explicit(engine):
    streams = [engine.open_stream(language="auto") for _ in range(4)]
    with pytest.raises(CapacityError, match="4 stream slots"):
        engine.open_stream(language="auto")
    streams[0].close()
    engine.open_stream(language="auto").close()
    for stream in streams[1:]:
        stream.close()


async def test_unknown_language_lists_supported(engine):
    with pytest.raises(UnsupportedLanguageError, match="en-US"):
        engine.open_stream(language="xx-XX")


async def test_open_close_cycles_leave_nothing_behind(engine):
    threads_before = threading.active_count()
    free_before = engine.free_slots
    for cycle in range(200):
        stream = engine.open_stream(language="en-US" if cycle % 2 else "auto")
        stream.feed(np.zeros(480, dtype=np.int16))
        if cycle % 3 == 0:
            stream.finalize()
        stream.close()
    await asyncio.sleep(0.2)
    assert engine.free_slots == free_before == 4
    assert engine.open_streams == 0
    assert threading.active_count() == threads_before


async def test_backlog_is_bounded(tiny_model):
    engine = Engine(model=tiny_model, chunk_ms=160, device="cpu", max_streams=1, max_backlog_s=1.0)
    await engine.ready()
    stream = engine.open_stream(language="en-US")
    with engine.paused():
        stream.feed(np.zeros(8000, dtype=np.int16))
        with pytest.raises(Exception, match="waiting"):
            stream.feed(np.zeros(16000, dtype=np.int16))
    engine.close()


def test_chunk_sizes_map_to_trained_contexts(tiny_model, caplog):
    assert att_context_for_chunk(tiny_model, 160) == [56, 1]
    assert att_context_for_chunk(tiny_model, 1120) == [56, 13]
    spec = chunk_spec(tiny_model, 560)
    assert (spec.first_chunk_frames, spec.chunk_frames, spec.valid_out_len) == (49, 56, 7)
    with pytest.raises(UnsupportedChunkSizeError, match="80, 160, 320, 560, 1120"):
        att_context_for_chunk(tiny_model, 200)
    untrained = SimpleNamespace(encoder=SimpleNamespace(att_context_size_all=[[56, 3], [56, 13]]))
    assert att_context_for_chunk(untrained, 160) == [56, 1]
    assert "not trained for this model, which was trained for [320, 1120] ms" in caplog.text


def test_model_that_cannot_be_had_gives_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="No model file"):
        load_model(str(tmp_path / "missing.nemo"), device="cpu")
    broken = tmp_path / "broken.nemo"
    broken.write_bytes(b"not a tar file")
    with pytest.raises(ModelLoadError, match="Could not load the .nemo checkpoint"):
        load_model(str(broken), device="cpu")
    with pytest.raises(ModelLoadError, match="cache-aware RNN-T"):
        load_model(SimpleNamespace(), device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="--model demo"):
        load_model("nvidia/nemotron-3.5-asr-streaming-0.6b", device="cpu")


async def test_engine_reports_load_error_on_ready(tmp_path):
    engine = Engine(model=str(tmp_path / "nope.nemo"), device="cpu")
    with pytest.raises(ModelLoadError):
        await engine.ready()
    engine.close()


def test_language_tags_are_split_from_text():
    assert split_language_tags("Hola, buenos días. <es-ES> Yes. <en-US>") == ("Hola, buenos días. Yes.",
                                                                            ["es-ES", "en-US"])
    assert split_language_tags("no tag") == ("no tag", [])


async def test_shared_engine_is_one_per_model_chunk_and_device(tiny_model):
    first = Engine.shared(model=tiny_model, chunk_ms=160, device="cpu", max_streams=2)
    try:
        assert Engine.shared(model=tiny_model, chunk_ms=160, device="cpu") is first
        other = Engine.shared(model=tiny_model, chunk_ms=560, device="cpu", max_streams=2)
        assert other is not first
        other.close()
    finally:
        first.close()
    assert Engine.shared(model=tiny_model, chunk_ms=160, device="cpu", max_streams=1) is not first
    Engine.shared(model=tiny_model, chunk_ms=160, device="cpu").close()


async def test_unended_utterance_is_finalized_at_the_cap(tiny_model):
    engine = Engine(model=tiny_model, chunk_ms=160, device="cpu", max_streams=1, max_utterance_s=1.0)
    await engine.ready()
    stream = engine.open_stream(language="en-US")
    audio = speechlike(2.5, seed=51)
    for piece in np.array_split(audio, 25):
        stream.feed(piece)
        await asyncio.sleep(0.03)
    final = await asyncio.wait_for(next_final(stream), 10)
    assert 1.0 < final.end_s <= 1.2 and final.text  # the first chunk boundary past the cap, however fast fed
    stream.finalize()
    finals = [final]
    while finals[-1].end_s < 2.5 - 0.01:  # the rest may be capped again before the finalize is seen
        finals.append(await asyncio.wait_for(next_final(stream), 10))
    assert all(later.start_s == earlier.end_s for earlier, later in zip(finals, finals[1:]))  # nothing lost
    assert all(f.end_s - f.start_s <= 1.2 for f in finals[:-1]) and finals[-1].end_s == pytest.approx(2.5, abs=0.01)
    stream.close()
    engine.close()

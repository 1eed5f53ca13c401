"""The bundled demo model through the engine and the service: real words, real languages.

Held-out set: tests/data/demo_heldout (8 kHz μ-law WAVs of espeak-ng voices not used in training).
Thresholds sit a little under what the engine measured (see plugin/models/DEMO_MODEL_CARD.md).
"""

import asyncio
import re

import numpy as np
import pytest
from scipy.signal import resample_poly
import torch

from pipecat_nemotron.engine import Engine
from pipecat_nemotron.engine.loader import demo_model_path
from engine_support import final_of
from reference import padded_for_finalize
from tools.demo_model.calls import LANGUAGES, heldout_rows, word_errors
from tools.demo_model.calls import words as normalise

# What reaches the engine in a call: the utterance, then the 200 ms of silence a VAD with stop_secs=0.2 waits
# for before VAD stop (the held-out files are trimmed; without it short utterances lose their "." and tag).
VAD_STOP_SILENCE_S = 0.2
# measured with this engine at 160 ms on the shipped set -> asserted a little lower
WER_GIVEN_MAX = {"en-US": 0.12, "es-ES": 0.02, "de-DE": 0.05}       # measured 10.4 / 0.0 / 3.6 %
WER_AUTO_MAX = {"en-US": 0.13, "es-ES": 0.02, "de-DE": 0.05}        # measured 12.2 / 0.0 / 2.7 %
TAG_ACCURACY_MIN = {"en-US": 0.95, "es-ES": 0.95, "de-DE": 0.9}     # measured 100 / 100 / 95 %
# calls of 3 utterances on one stream (tools/demo_model/calls.py): measured auto 11.8 / 6.4 / 6.7 %,
# given 3.3 / 5.1 / 4.2 % by position; tags 95-100 %
CALL_WER_MAX = {"auto_1": 0.13, "auto_2": 0.1, "auto_3": 0.1, "given_1": 0.07, "given_2": 0.08, "given_3": 0.08}
CALL_TAG_RIGHT_MIN = 0.9


def heldout():
    rows = heldout_rows()
    for row in rows:
        row["audio"] = np.concatenate([row["audio"], np.zeros(int(VAD_STOP_SILENCE_S * 16000), np.float32)])
    return rows


@pytest.fixture(scope="module")
def rows():
    return heldout()


@pytest.fixture(scope="module")
def demo_engine():
    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=64, max_admission_lag_s=None)  # batch feeds
    engine.wait_ready()
    yield engine
    engine.close()


async def transcribe_all(engine, rows, language_of):
    return await asyncio.gather(*(final_of(engine, row["audio"], language=language_of(row)) for row in rows))


def test_demo_model_ships_within_size():
    assert demo_model_path().is_file()
    assert demo_model_path().stat().st_size <= 10 * 1024 * 1024


async def test_wer_with_language_given(demo_engine, rows):
    finals = await transcribe_all(demo_engine, rows, lambda row: row["lang"])
    for language in LANGUAGES:
        errors = [word_errors(f.text, r["text"]) for f, r in zip(finals, rows) if r["lang"] == language]
        wer = sum(e for e, _ in errors) / sum(n for _, n in errors)
        print(f"{language} WER given {wer:.3f}")
        assert wer <= WER_GIVEN_MAX[language], (language, wer)


async def test_wer_and_language_tag_in_auto_mode(demo_engine, rows):
    finals = await transcribe_all(demo_engine, rows, lambda row: "auto")
    for language in LANGUAGES:
        picked = [(f, r) for f, r in zip(finals, rows) if r["lang"] == language]
        errors = [word_errors(f.text, r["text"]) for f, r in picked]
        wer = sum(e for e, _ in errors) / sum(n for _, n in errors)
        tag_accuracy = np.mean([f.language == language for f, _ in picked])
        print(f"{language} WER auto {wer:.3f}, tag accuracy {tag_accuracy:.3f}")
        assert wer <= WER_AUTO_MAX[language], (language, wer)
        assert tag_accuracy >= TAG_ACCURACY_MIN[language], (language, tag_accuracy)


async def test_streaming_text_equals_offline(demo_engine, rows):
    model = demo_engine.model
    sample = [r for r in rows][::6]
    finals = await transcribe_all(demo_engine, sample, lambda row: row["lang"])
    for final, row in zip(finals, sample):
        padded, frames = padded_for_finalize(model, row["audio"], 160)
        with torch.inference_mode():
            signal = torch.from_numpy(padded)[None]
            mel, _ = model.preprocessor(input_signal=signal, length=torch.tensor([signal.shape[1]]))
            mel = mel[:, :, :frames]
            encoded, lengths = model.encoder(audio_signal=mel, length=torch.tensor([frames]))
            model.set_inference_prompt(row["lang"])
            encoded = model._apply_prompt_to_encoded(encoded)
            hypothesis = model.decoding.rnnt_decoder_predictions_tensor(
                encoder_output=encoded, encoded_lengths=lengths, return_hypotheses=True)[0]
        offline = model.tokenizer.ids_to_text([int(t) for t in hypothesis.y_sequence])
        assert final.text == " ".join(re.sub(r"\s*<[a-z]{2}-[A-Z]{2}>", "", offline).split())


@pytest.mark.parametrize("language", LANGUAGES)
async def test_service_gives_the_same_words_at_8_16_and_48_khz(demo_engine, rows, language):
    """One held-out utterance through NemotronSTTService at each transport rate (Pipecat's resampler, VAD frames):
    the same words, right, with the language detected."""
    from pipecat.frames.frames import (InputAudioRawFrame, TranscriptionFrame, VADUserStartedSpeakingFrame,
                                       VADUserStoppedSpeakingFrame)
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.tests.utils import SleepFrame, run_test
    from pipecat_nemotron.languages import locale_to_language
    from pipecat_nemotron.stt import NemotronSTTService

    row = next(r for r in rows if r["lang"] == language and len(normalise(r["text"])) >= 4)
    source = np.concatenate([np.zeros(3200, np.float32), row["audio"], np.zeros(3200, np.float32)])  # 16 kHz
    texts = {}
    for rate in (8000, 16000, 48000):
        audio = resample_poly(source, rate, 16000).astype(np.float32)
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        step = rate // 50
        frames = [VADUserStartedSpeakingFrame(start_secs=0.2),
                  *[InputAudioRawFrame(audio=pcm[i:i + step].tobytes(), sample_rate=rate, num_channels=1)
                    for i in range(0, len(pcm), step)],
                  SleepFrame(sleep=0.3), VADUserStoppedSpeakingFrame(stop_secs=0.2), SleepFrame(sleep=0.5)]
        down, _ = await run_test(NemotronSTTService(engine=demo_engine), frames_to_send=frames,
                                 pipeline_params=PipelineParams(audio_in_sample_rate=rate))
        finals = [f for f in down if isinstance(f, TranscriptionFrame)]
        assert len(finals) == 1 and finals[0].finalized, (rate, finals)
        assert finals[0].language == locale_to_language(language), (rate, finals[0].language)
        texts[rate] = normalise(finals[0].text)
    print(language, texts)
    assert texts[8000] == texts[16000] == texts[48000] == normalise(row["text"]), texts


@pytest.mark.parametrize("pauses", ["short", "long"])
async def test_calls_of_several_utterances(demo_engine, pauses):
    """The 2nd and 3rd utterance of a stream are transcribed like the 1st, also with seconds of silence before the
    first word and between them, as on a real line (tools/demo_model/calls.py)."""
    from tools.demo_model.calls import score_calls

    scores = await score_calls(demo_engine, heldout_rows(), pauses)
    for key, limit in CALL_WER_MAX.items():
        print(pauses, key, scores[key])
        assert scores[key]["wer"] <= limit, (key, scores[key], scores[f"{key.split('_')[0]}_example"])
        assert scores[key]["tag_right"] >= CALL_TAG_RIGHT_MIN, (key, scores[key])

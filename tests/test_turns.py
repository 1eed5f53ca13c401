"""A turn with no words ends when the STT finalizes it, not at Pipecat's 5 s stop watchdog."""

import time

import pytest
from pipecat.frames.frames import VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair, LLMUserAggregatorParams
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.transcriptions.language import Language
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from pipecat_nemotron.stt import NemotronSTTService
from pipecat_nemotron.turns import EmptyTranscriptUserTurnStopStrategy

WATCHDOG_S = 3.0


@pytest.fixture
def engine(tiny_engine):
    return tiny_engine


async def seconds_until_turn_stops(engine, stop_strategies) -> float | None:
    """A turn opened by VAD and closed by VAD with no audio in between (so no words): seconds from VAD
    stop to the aggregator's `on_user_turn_stopped`, or None if it did not stop within the wait."""
    stt = NemotronSTTService(engine=engine, language=Language.EN_US)
    user = LLMContextAggregatorPair(LLMContext(), user_params=LLMUserAggregatorParams(
        user_turn_strategies=UserTurnStrategies(stop=stop_strategies),
        user_turn_stop_timeout=WATCHDOG_S)).user()
    stopped_at, vad_stop_sent = [], []

    @user.event_handler("on_user_turn_stopped")
    async def on_stopped(aggregator, strategy, message):
        stopped_at.append(time.monotonic())

    class MarkVadStop(VADUserStoppedSpeakingFrame):
        def __post_init__(self):
            super().__post_init__()
            vad_stop_sent.append(time.monotonic())

    frames = [SleepFrame(sleep=0.3), VADUserStartedSpeakingFrame(start_secs=0.2), SleepFrame(sleep=0.2),
              MarkVadStop(stop_secs=0.2), SleepFrame(sleep=1.5)]
    await run_test(Pipeline([stt, user]), frames_to_send=frames,
                   pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    return stopped_at[0] - vad_stop_sent[0] if stopped_at else None


async def test_wordless_turn_stalls_without_the_strategy(engine):
    # The problem this module solves: Pipecat's stop strategy waits for text until the watchdog.
    assert await seconds_until_turn_stops(engine, [SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.2)]) \
        is None


async def test_wordless_turn_ends_on_the_empty_final(engine):
    waited = await seconds_until_turn_stops(
        engine, [SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.2), EmptyTranscriptUserTurnStopStrategy()])
    assert waited is not None and waited < 1.0

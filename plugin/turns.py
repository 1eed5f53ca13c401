"""A user-turn stop strategy for turns in which the STT heard no words.

Pipecat's stop strategies (``SpeechTimeoutUserTurnStopStrategy``, ``TurnAnalyzerUserTurnStopStrategy``) wait for
transcript text before they end a turn (``wait_for_transcript=True``). A turn that VAD opened on a cough, a
door or a word the model could not make out never gets text, so it stays open until the user aggregator's
``user_turn_stop_timeout`` watchdog (5 s by default): the bot is silent, or stays interrupted, for those seconds.

``NemotronSTTService`` finalizes every utterance on VAD stop, also one with no words (an empty
``TranscriptionFrame(finalized=True)``). That frame is the STT's word that nothing more is coming, so this
strategy ends the turn on it at once, when the whole turn produced no text. Pipecat then treats it as an
empty user turn (``LLMUserAggregatorParams.empty_user_turn``): nothing is written to the context, and an
interrupted bot is asked to recover. Add it beside the strategy that ends turns with words::

    UserTurnStrategies(stop=[SpeechTimeoutUserTurnStopStrategy(), EmptyTranscriptUserTurnStopStrategy()])
"""

from __future__ import annotations

from pipecat.frames.frames import (Frame, InterimTranscriptionFrame, TranscriptionFrame, VADUserStartedSpeakingFrame,
                                   VADUserStoppedSpeakingFrame)
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_stop import BaseUserTurnStopStrategy

__all__ = ["EmptyTranscriptUserTurnStopStrategy"]


class EmptyTranscriptUserTurnStopStrategy(BaseUserTurnStopStrategy):
    """Ends a user turn as soon as the STT finalizes it with no words.

    It fires only when every transcript of the turn so far was empty and the user is not speaking; a turn
    with words is left to the other stop strategies.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._heard_words = False
        self._user_speaking = False

    async def handle_user_turn_started(self):
        self._heard_words = False

    async def handle_user_turn_stopped(self):
        self._heard_words = False

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._user_speaking = True
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._user_speaking = False
        elif isinstance(frame, (TranscriptionFrame, InterimTranscriptionFrame)):
            if frame.text.strip():
                self._heard_words = True
            elif isinstance(frame, TranscriptionFrame) and frame.finalized and not self._heard_words \
                    and not self._user_speaking:
                await self.trigger_user_turn_stopped()
        return ProcessFrameResult.CONTINUE

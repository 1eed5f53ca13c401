"""The streaming engine: cache-aware Nemotron on NeMo, all live streams batched. No Pipecat here."""

from .errors import (AudioFormatError, BacklogError, CapacityError, EngineStepError, ModelLoadError,
                     NemotronEngineError, StreamClosedError, UnsupportedChunkSizeError, UnsupportedLanguageError)
from .loader import CHUNK_MS_TO_RIGHT_CONTEXT, DEFAULT_MODEL, DEMO_MODEL, SAMPLE_RATE, load_model
from .reservation import StreamReservation
from .results import Final, Partial, Transcript, split_language_tags
from .scheduler import Engine, EngineStats
from .stream import Stream

__all__ = [
    "AudioFormatError", "BacklogError", "CHUNK_MS_TO_RIGHT_CONTEXT", "CapacityError", "DEFAULT_MODEL", "DEMO_MODEL",
    "Engine", "EngineStats", "EngineStepError", "Final", "ModelLoadError", "NemotronEngineError", "Partial",
    "SAMPLE_RATE", "Stream", "StreamClosedError", "StreamReservation", "Transcript", "UnsupportedChunkSizeError",
    "UnsupportedLanguageError", "load_model", "split_language_tags",
]

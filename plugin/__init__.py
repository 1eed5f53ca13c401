"""pipecat-nemotron: streaming multilingual speech-to-text for Pipecat on nemotron-3.5-asr-streaming.

The names a user needs are importable from here::

    from pipecat_nemotron import NemotronSTTService, WebRTCVADAnalyzer, EmptyTranscriptUserTurnStopStrategy
    from pipecat_nemotron import Engine, Final, Partial   # the engine alone (no Pipecat)

They are imported on first use (a module-level ``__getattr__``, PEP 562), so ``import pipecat_nemotron.engine``
does not pull in Pipecat, and ``pipecat-nemotron --help`` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    # the Pipecat side
    "NemotronSTTService": "stt",
    "WebRTCVADAnalyzer": "vad",
    "EmptyTranscriptUserTurnStopStrategy": "turns",
    "language_to_locale": "languages",
    "locale_to_language": "languages",
    "LOCALE_TIERS": "languages",
    # the engine (no Pipecat)
    "DEFAULT_MODEL": "engine",
    "DEMO_MODEL": "engine",
    "Engine": "engine",
    "Final": "engine",
    "Partial": "engine",
    "Stream": "engine",
    "StreamReservation": "engine",
    "NemotronEngineError": "engine",
    "CapacityError": "engine",
    "ModelLoadError": "engine",
    "UnsupportedChunkSizeError": "engine",
    "UnsupportedLanguageError": "engine",
    # audio files
    "Wav": "wav",
    "WavError": "wav",
    "read_wav": "wav",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from .engine import (DEFAULT_MODEL, DEMO_MODEL, CapacityError, Engine, Final, ModelLoadError,  # noqa: F401
                         NemotronEngineError, Partial, Stream, StreamReservation, UnsupportedChunkSizeError,
                         UnsupportedLanguageError)
    from .languages import LOCALE_TIERS, language_to_locale, locale_to_language  # noqa: F401
    from .stt import NemotronSTTService  # noqa: F401
    from .turns import EmptyTranscriptUserTurnStopStrategy  # noqa: F401
    from .vad import WebRTCVADAnalyzer  # noqa: F401
    from .wav import Wav, WavError, read_wav  # noqa: F401


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""pipecat-nemotron: streaming multilingual speech-to-text for Pipecat on nemotron-3.5-asr-streaming."""

from .engine import DEFAULT_MODEL, DEMO_MODEL, Engine, Final, Partial, Stream

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "DEMO_MODEL", "Engine", "Final", "Partial", "Stream", "__version__"]

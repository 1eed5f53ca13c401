"""Exceptions raised by the engine. All derive from `NemotronEngineError`."""


class NemotronEngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelLoadError(NemotronEngineError):
    """The model could not be had (offline, bad path, wrong class); the message says what to do."""


class UnsupportedChunkSizeError(NemotronEngineError, ValueError):
    """The chunk size is not one of 80/160/320/560/1120 ms or not trained for this model."""


class UnsupportedLanguageError(NemotronEngineError, ValueError):
    """The language is not in the model's prompt dictionary."""


class CapacityError(NemotronEngineError):
    """Every stream slot of the engine is taken; refuse the call early."""


class StreamClosedError(NemotronEngineError):
    """The stream was closed (or failed) and accepts no more audio."""


class AudioFormatError(NemotronEngineError, ValueError):
    """Audio fed to a stream is not mono 16 kHz int16/float32 PCM."""


class BacklogError(NemotronEngineError):
    """More unprocessed audio is queued on a stream than the engine allows (steps are too slow)."""


class EngineStepError(NemotronEngineError):
    """A model step failed; the streams in that step receive this error."""

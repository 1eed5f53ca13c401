"""G.711 μ-law / A-law ↔ 16-bit little-endian PCM, through ``audioop`` (stdlib until 3.12, ``audioop-lts`` on 3.13+).

The package's one ``audioop`` import: the SIP media (``sip.rtp``) and the WAV reader (``pipecat_nemotron.wav``,
which also uses ``audioop`` from here for PCM widths) both code G.711 here.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # stdlib until 3.12; the `audioop-lts` package provides it on 3.13+

__all__ = ["audioop", "decode", "encode"]

_CODECS = {"PCMU": (audioop.ulaw2lin, audioop.lin2ulaw), "PCMA": (audioop.alaw2lin, audioop.lin2alaw)}


def _codec(codec: str):
    try:
        return _CODECS[codec]
    except KeyError:
        raise ValueError(f"unsupported codec {codec}") from None


def decode(payload: bytes, codec: str) -> bytes:
    """G.711 bytes → 16-bit little-endian PCM; ``codec`` is ``"PCMU"`` (μ-law) or ``"PCMA"`` (A-law)."""
    return _codec(codec)[0](payload, 2)


def encode(pcm: bytes, codec: str) -> bytes:
    """16-bit little-endian PCM → G.711 bytes; ``codec`` is ``"PCMU"`` (μ-law) or ``"PCMA"`` (A-law)."""
    return _codec(codec)[1](pcm, 2)

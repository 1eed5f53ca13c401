"""Opus (RFC 6716) for RTP (RFC 7587): always ``opus/48000/2`` in SDP, a dynamic payload type, mono here.

The RTP clock is 48 kHz whatever the audio bandwidth; the ``/2`` is only a signal that the stream may be stereo
(RFC 7587 §7): a stereo packet is downmixed by the decoder and we send mono (``stereo=0`` in our fmtp). Decoding
and encoding go through libopus (PyAV), one stateful encoder/decoder per direction; 20 ms frames.
"""

from __future__ import annotations

from .pyav_audio import PyAVDecoder, PyAVEncoder

CLOCK_RATE = 48000  # RTP timestamp clock (RFC 7587 §4.1)
SAMPLE_RATE = 48000  # the PCM we hand over and take: Opus' native rate (libopus could also decode at 16 kHz)
CHANNELS = 2  # as SDP writes it
BIT_RATE = 32000  # wideband speech at a comfortable rate (RFC 7587 §3.1.1)
FMTP = "minptime=10;useinbandfec=1;stereo=0;sprop-stereo=0"


class OpusEncoder(PyAVEncoder):
    """48 kHz mono PCM16 frames (2.5-60 ms; we use 20 ms) → one Opus packet each."""

    def __init__(self, *, bit_rate: int = BIT_RATE):
        super().__init__("libopus", sample_rate=SAMPLE_RATE, bit_rate=bit_rate, options={"application": "voip"})


class OpusDecoder(PyAVDecoder):
    """Opus packets (mono or stereo) → 48 kHz mono PCM16."""

    def __init__(self):
        super().__init__("libopus", sample_rate=SAMPLE_RATE)


__all__ = ["BIT_RATE", "CHANNELS", "CLOCK_RATE", "FMTP", "OpusDecoder", "OpusEncoder", "SAMPLE_RATE"]

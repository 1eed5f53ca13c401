"""G.722 (ITU-T, 64 kbit/s sub-band ADPCM): 16 kHz audio in a codec whose RTP clock is 8000 Hz.

RFC 3551 §4.5.2 fixes the clock rate at 8000 for historical reasons (``a=rtpmap:9 G722/8000``), although the
audio is sampled at 16 kHz: a 20 ms packet carries 320 samples in 160 bytes and advances the RTP timestamp by
160. Encoding and decoding go through FFmpeg's codec (PyAV), one stateful encoder/decoder per direction.
"""

from __future__ import annotations

from .pyav_audio import PyAVDecoder, PyAVEncoder

SAMPLE_RATE = 16000  # the audio
CLOCK_RATE = 8000  # the RTP timestamp clock (RFC 3551)
PAYLOAD_TYPE = 9


class G722Encoder(PyAVEncoder):
    """16 kHz PCM16 → G.722 bytes (one byte per two samples)."""

    def __init__(self):
        super().__init__("g722", sample_rate=SAMPLE_RATE)


class G722Decoder(PyAVDecoder):
    """G.722 bytes → 16 kHz PCM16."""

    def __init__(self):
        super().__init__("g722", sample_rate=SAMPLE_RATE)


__all__ = ["CLOCK_RATE", "G722Decoder", "G722Encoder", "PAYLOAD_TYPE", "SAMPLE_RATE"]

"""The phone transcriber (`pipecat-nemotron serve-sip`, examples/phone_transcriber.py) end to end over SIP,
with a fake STT (no ASR model is loaded)."""

import argparse
import asyncio
import io
import json
import socket
import wave
from pathlib import Path

import numpy as np
from aiortc.rtp import RtpPacket
from pipecat.frames.frames import InputAudioRawFrame, TranscriptionFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transcriptions.language import Language
from test_sip_uas import HOST, Dialog, Peer, media_port

def load_example():
    from pipecat_nemotron.apps import phone

    return phone


class FakeSTT(FrameProcessor):
    """Stands in for NemotronSTTService: one final transcript after 10 audio frames."""

    def __init__(self):
        super().__init__()
        self.audio_frames = 0

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self.audio_frames += 1
            if self.audio_frames == 10:
                await self.push_frame(TranscriptionFrame("hola mundo", "", "2026-01-01T00:00:00Z",
                                                         language=Language.ES_ES, finalized=True))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


async def test_phone_transcriber_writes_json_lines_and_plays_greeting(tmp_path):
    example = load_example()
    greeting = tmp_path / "greeting.wav"
    with wave.open(str(greeting), "wb") as w:  # 16 kHz: the output resamples it to 8 kHz
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(8000) / 16000 * 2 * np.pi * 500) * 10000).astype("<i2").tobytes())
    port = free_port()
    args = example.parse_args(["--host", HOST, "--port", str(port), "--greeting", str(greeting),
                               "--max-calls", "2"])
    assert isinstance(args, argparse.Namespace)
    out = io.StringIO()
    ready = asyncio.Event()
    server = asyncio.ensure_future(example.serve(args, stt_factory=lambda call: FakeSTT(), out=out, ready=ready))
    peer, rtp_peer = await Peer.open(), await Peer.open()
    try:
        await asyncio.wait_for(ready.wait(), 5)
        dialog = Dialog(peer, port, rtp_port=rtp_peer.port)
        dialog.invite()
        ok = await peer.expect(status=200)
        dialog.take_tag(ok)
        dialog.ack()
        server_rtp = media_port(ok)  # the caller speaks first: we send nothing before its RTP arrives
        for seq in range(20):
            packet = RtpPacket(payload_type=0, sequence_number=seq, timestamp=seq * 160, ssrc=3, payload=b"\x20" * 160)
            rtp_peer.send(packet.serialize(), server_rtp)
            await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while "hola mundo" not in out.getvalue() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)  # let the 0.5 s greeting go out
        dialog.send("BYE")
        await peer.expect(status=200)
        record = json.loads(out.getvalue().splitlines()[0])
        assert record["call_id"] == dialog.call_id and record["caller"] == "sip:caller@example.com"
        assert (record["language"], record["text"], record["caller_name"]) == ("es-ES", "hola mundo", "Test Caller")
        payloads = []
        while not rtp_peer.inbox.empty():
            payloads.append(RtpPacket.parse(rtp_peer.inbox.get_nowait()[0]).payload)
        assert sum(p != b"\xff" * 160 for p in payloads) >= 15  # the greeting reached the caller
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        peer.close()
        rtp_peer.close()

"""serve-webrtc's drain with a live session: an aiortc peer (no browser) talks over real WebRTC on loopback;
the drain refuses a new offer with 503 + Retry-After, ends the session at the bound, and the words said before
still arrive as a final; the metrics count it answered, refused (draining) and ended (drained)."""

from __future__ import annotations

import asyncio
import fractions
import time
from pathlib import Path

import numpy as np
import pytest

from server_process import parse_metrics
from test_webrtc_browser import running_server

SAMPLE = Path(__file__).parent.parent / "plugin" / "models" / "sample_call.wav"
pytestmark = pytest.mark.timeout(120)


def wav_track(path: Path):
    """An aiortc audio track playing the WAV at 48 kHz in real time, then silence."""
    import soxr
    from aiortc import MediaStreamTrack
    from av import AudioFrame

    from pipecat_nemotron.wav import read_wav

    wav = read_wav(path)
    samples = soxr.resample(wav.samples.astype(np.float32) / 32768, wav.sample_rate, 48000)
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")

    class Track(MediaStreamTrack):
        kind = "audio"

        def __init__(self):
            super().__init__()
            self.sent = 0
            self.started: float | None = None

        async def recv(self):
            step = 960  # 20 ms
            if self.started is None:
                self.started = time.monotonic()
            delay = self.started + self.sent / 48000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = pcm[self.sent:self.sent + step]
            chunk = np.pad(chunk, (0, step - len(chunk)))
            frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48000, self.sent, fractions.Fraction(1, 48000)
            self.sent += step
            return frame

    return Track()


async def connect(client, path: Path):
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(wav_track(path))
    pc.createDataChannel("messages")
    await pc.setLocalDescription(await pc.createOffer())
    response = await client.post("/api/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
    assert response.status_code == 200, response.text
    answer = response.json()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return pc


async def test_drain_ends_a_live_webrtc_session_at_the_bound_and_its_words_still_arrive():
    import httpx

    from pipecat_nemotron.apps.drain import Drain
    from pipecat_nemotron.apps.webrtc_server import WebRTCServer
    from pipecat_nemotron.engine import Engine

    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=2)
    await engine.ready()
    drain = Drain(timeout_s=0.5)
    server = WebRTCServer(engine=engine, llm=None, drain=drain, vad_stop_secs=0.3)
    pc = None
    try:
        async with running_server(server) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
            pc = await connect(client, SAMPLE)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while server.live_sessions == 0 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert server.live_sessions == 1
            await asyncio.sleep(2.5)  # into the first utterance ("I want to cancel my order.")
            drain.request("test")
            refused = await client.post("/api/offer", json={"sdp": "v=0\r\n", "type": "offer"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
            started = time.monotonic()
            await asyncio.wait_for(server.drain_sessions(), 30)
            assert time.monotonic() - started < 20
            health = (await client.get("/api/health")).json()
        record = server.sessions[0]
        assert record.ended is not None and record.outcome.startswith("drain timeout"), record.outcome
        assert any(final["text"].strip() for final in record.finals), record.finals
        assert engine.free_slots == engine.max_streams  # the session's stream went back
        assert health["draining"] is True and health["sessions"] == 0
        samples = parse_metrics(server.metrics.exposition().decode())
        assert samples["nemotron_calls_answered_total"] == 1
        assert samples['nemotron_calls_refused_total{reason="draining"}'] == 1
        assert samples['nemotron_calls_ended_total{outcome="drained"}'] == 1
        assert samples["nemotron_calls_active"] == 0
        assert samples["nemotron_final_latency_seconds_count"] >= 1
    finally:
        if pc is not None:
            await pc.close()
        engine.close()

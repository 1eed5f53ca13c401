"""A fake Twilio Media Stream over a loopback websocket against examples/twilio_agent.py.

The client sends `connected`, `start`, 20 ms `media` messages of 8 kHz μ-law and `stop`, like Twilio's
`<Connect><Stream>`. The server must produce final transcripts with their language, equal to the engine's own on
exactly the audio the service fed it, and send audio back to the caller on the same stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from pipecat.transcriptions.language import Language

from test_webrtc_browser import Recorder, free_port, until
from tiny import speechlike

with warnings.catch_warnings():  # stdlib on 3.11/3.12, the audioop-lts package on 3.13+
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

pytestmark = pytest.mark.timeout(120)  # a hung browser or socket fails, not blocks, the run
EXAMPLE = Path(__file__).parent.parent / "examples" / "twilio_agent.py"
STREAM_SID, CALL_SID, ACCOUNT_SID = "MZ0123456789abcdef0123456789abcdef", "CA0123456789abcdef", "AC0123456789abcdef"


def load_example():
    spec = importlib.util.spec_from_file_location("twilio_agent", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["twilio_agent"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@contextlib.asynccontextmanager
async def serve(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.ensure_future(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        assert not task.done() and time.monotonic() < deadline, "the telephony app did not start"
        await asyncio.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def mulaw_chunks(audio8k: np.ndarray) -> list[bytes]:
    pcm = (np.clip(audio8k, -1, 1) * 32767).astype("<i2").tobytes()
    ulaw = audioop.lin2ulaw(pcm, 2)
    return [ulaw[i:i + 160] for i in range(0, len(ulaw), 160)]  # 20 ms at 8 kHz


async def fake_twilio_call(port: int, chunks: list[bytes], *, until_done, pace_s: float = 0.005):
    """Play a call like Twilio does; return the messages the server sent back."""
    from websockets.asyncio.client import connect

    received = []
    async with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
        async def reader():
            with contextlib.suppress(Exception):
                async for message in ws:
                    received.append(json.loads(message))

        reading = asyncio.ensure_future(reader())
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({
            "event": "start", "sequenceNumber": "1", "streamSid": STREAM_SID,
            "start": {"accountSid": ACCOUNT_SID, "streamSid": STREAM_SID, "callSid": CALL_SID, "tracks": ["inbound"],
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                      "customParameters": {"from_number": "+15551234567"}}}))
        for index, chunk in enumerate(chunks):
            await ws.send(json.dumps({
                "event": "media", "sequenceNumber": str(index + 2), "streamSid": STREAM_SID,
                "media": {"track": "inbound", "chunk": str(index + 1), "timestamp": str(index * 20),
                          "payload": base64.b64encode(chunk).decode()}}))
            await asyncio.sleep(pace_s)  # 4x real time: the VAD counts audio, not wall time
        await until(until_done, 30, "the final transcripts")
        await asyncio.sleep(0.5)  # let the last chime go out
        await ws.send(json.dumps({"event": "stop", "sequenceNumber": str(len(chunks) + 2), "streamSid": STREAM_SID,
                                  "stop": {"accountSid": ACCOUNT_SID, "callSid": CALL_SID}}))
        await ws.close()
        await asyncio.wait_for(reading, 5)
    return received


async def test_twilio_media_stream_gets_transcripts_with_language_and_audio_back(tiny_engine):
    twilio_agent = load_example()
    rate = 8000
    silence = lambda s: np.zeros(int(s * rate), dtype=np.float32)  # noqa: E731
    audio = np.concatenate([silence(0.5), speechlike(1.6, seed=31, rate=rate), silence(1.0),
                            speechlike(1.4, seed=32, rate=rate), silence(1.0)])
    recorder = Recorder(tiny_engine)
    app = twilio_agent.create_app(engine=tiny_engine, language=Language.ES_ES, auto_hang_up=False)

    started = time.monotonic()
    async with serve(app) as port:
        calls = app.state.calls
        received = await fake_twilio_call(port, mulaw_chunks(audio),
                                          until_done=lambda: calls and len(calls[0].finals) >= 2)
        await until(lambda: calls[0].ended is not None, 10, "the call to end after the caller hung up")
    elapsed = time.monotonic() - started

    call = calls[0]
    assert call.provider == "twilio" and call.call_id == CALL_SID and call.stream_id == STREAM_SID
    assert call.caller == "+15551234567"
    assert call.outcome == "caller hung up", call.outcome

    # transcripts: two utterances, Spanish, equal to the engine's own on the audio the service fed it
    assert len(call.finals) == 2, call.finals
    assert all(f["language"] == "es-ES" for f in call.finals)
    expected = await recorder.replay(tiny_engine)
    assert [f["text"] for f in call.finals] == [f.text for f in expected]
    assert any(f["text"] for f in call.finals)
    fed = recorder.audio
    # 8 kHz in -> 16 kHz fed (the stream resampler holds back a few ms after the last utterance)
    assert abs(len(fed) - 2 * len(audio)) <= 0.2 * 16000, (len(fed), 2 * len(audio))

    # audio back on the same stream: Twilio media messages carrying the chime(s), μ-law at 8 kHz
    media = [m for m in received if m.get("event") == "media"]
    assert media and all(m["streamSid"] == STREAM_SID for m in media)
    back = audioop.ulaw2lin(b"".join(base64.b64decode(m["media"]["payload"]) for m in media), 2)
    samples = np.frombuffer(back, dtype="<i2").astype(np.float32) / 32768
    assert call.chimes == sum(1 for f in call.finals if f["text"])
    assert len(samples) >= call.chimes * 0.15 * 8000 and np.abs(samples).max() > 0.1
    assert elapsed < 40


async def test_caller_hanging_up_mid_sentence_still_gets_the_final(tiny_engine):
    # The stream stops with the caller still talking: the pipeline ends gracefully and the words are transcribed.
    twilio_agent = load_example()
    rate = 8000
    audio = np.concatenate([np.zeros(int(0.5 * rate), dtype=np.float32), speechlike(1.6, seed=33, rate=rate)])
    recorder = Recorder(tiny_engine)
    app = twilio_agent.create_app(engine=tiny_engine, language=Language.ES_ES, auto_hang_up=False)
    async with serve(app) as port:
        calls = app.state.calls
        await fake_twilio_call(port, mulaw_chunks(audio), until_done=lambda: bool(calls))
        await until(lambda: calls[0].ended is not None, 15, "the call to end after the caller hung up")
    call = calls[0]
    assert call.outcome == "caller hung up", call.outcome
    expected = await recorder.replay(tiny_engine)
    assert [f["text"] for f in call.finals] == [f.text for f in expected] and call.finals[0]["text"]


async def test_twiml_points_twilio_at_the_websocket(tiny_engine):
    import httpx

    twilio_agent = load_example()
    app = twilio_agent.create_app(engine=tiny_engine, auto_hang_up=False, public_host="agent.example.com")
    async with serve(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        twiml = (await client.post("/twiml")).text
        texml = (await client.post("/texml")).text
        plivo = (await client.get("/plivo")).text
    assert '<Connect><Stream url="wss://agent.example.com/ws"/></Connect>' in twiml
    assert 'bidirectionalMode="rtp"' in texml and "wss://agent.example.com/ws" in texml
    assert 'bidirectional="true"' in plivo and ">wss://agent.example.com/ws</Stream>" in plivo


async def test_a_call_beyond_capacity_is_refused_before_it_is_answered(tiny_engine):
    """Every engine stream is reserved: TwiML rejects the call as busy (Twilio never answers it) and a media
    stream that arrives anyway is refused before it is accepted, so no call is answered and then dropped."""
    import httpx
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    twilio_agent = load_example()
    app = twilio_agent.create_app(engine=tiny_engine, auto_hang_up=False, public_host="agent.example.com")
    held = [tiny_engine.try_reserve() for _ in range(tiny_engine.max_streams)]
    async with serve(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert '<Reject reason="busy"/>' in (await client.post("/twiml")).text
        with pytest.raises(InvalidStatus):
            async with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10):
                pass
        assert app.state.calls == []
        held.pop().release()
        assert "<Connect><Stream" in (await client.post("/twiml")).text
    for reservation in held:
        reservation.release()
    assert tiny_engine.free_slots == tiny_engine.max_streams

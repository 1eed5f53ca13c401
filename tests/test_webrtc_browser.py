"""A real headless Chromium talks to `serve-webrtc` over WebRTC (Opus, data channel) on loopback.

Chromium plays a WAV as its fake microphone; the test clicks the page's mic button through the Chrome
DevTools Protocol, then checks (1) the server-side transcripts equal the engine's own on exactly the audio
the service fed it (Opus changes the samples, so the comparison replays what the server received), and
(2) the page shows every final with its language. With the bundled demo model (when built) the words and
the language must be right.

Chromium: Debian's `chromium` (`scripts/setup-browser.sh`). Missing -> the test fails and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
from fastapi import Request  # module level: this file's annotations are strings (PEP 563)
from pipecat.transcriptions.language import Language

from pipecat_nemotron.engine import Engine, Final
from pipecat_nemotron.apps.webrtc_server import LLMConfig, WebRTCServer, allow_loopback_ice_candidates
from engine_support import final_of, next_final
from tiny import speechlike

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.timeout(120)  # a hung browser or socket fails, not blocks, the run


def require_chromium() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium not found ({CHROMIUM}): run scripts/setup-browser.sh (apt-get install chromium); "
                    "CI installs it through scripts/setup.sh", pytrace=False)
    return CHROMIUM


# ---- helpers: audio, server, browser, CDP ---------------------------------------------------------------
def write_wav(path: Path, audio: np.ndarray, rate: int) -> Path:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """Wraps the engine's streams: records every feed and finalize the service makes, in order."""

    def __init__(self, engine: Engine):
        self.events: list = []
        original = engine.open_stream

        def open_stream(**kwargs):
            stream = original(**kwargs)
            self.language = kwargs.get("language", "auto")
            feed, finalize = stream.feed, stream.finalize

            def spy_feed(audio):
                self.events.append(np.frombuffer(bytes(audio), dtype="<i2").copy())
                feed(audio)

            def spy_finalize():
                self.events.append("finalize")
                finalize()

            stream.feed, stream.finalize = spy_feed, spy_finalize
            return stream

        engine.open_stream = open_stream
        self._original = original

    @property
    def audio(self) -> np.ndarray:
        parts = [e for e in self.events if not isinstance(e, str)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    async def replay(self, engine: Engine) -> list[Final]:
        """The engine's own finals on exactly what the service fed it (one stream, same order)."""
        stream = self._original(language=self.language)
        finals = []
        for event in self.events:
            if isinstance(event, str):
                stream.finalize()
                finals.append(await next_final(stream))
            else:
                stream.feed(event)
        stream.close()
        return finals


@contextlib.asynccontextmanager
async def running_server(server: WebRTCServer):
    import uvicorn

    allow_loopback_ice_candidates()
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning",
                                       lifespan="on"))
    task = asyncio.ensure_future(uv.serve())
    deadline = time.monotonic() + 30
    while not uv.started:
        if task.done() or time.monotonic() > deadline:
            task.cancel()
            raise RuntimeError("the WebRTC server did not start")
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


class CDP:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 15))
            if reply.get("id") == my_id:
                if "error" in reply:
                    raise RuntimeError(f"CDP {method}: {reply['error']}")
                return reply.get("result", {})

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path, fake_audio: Path, *, loop: bool = False):
    from websockets.asyncio.client import connect

    binary = require_chromium()
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions", "--mute-audio", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_audio}{'' if loop else '%noloop'}",
            "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
            "about:blank"]
    log = open(tmp_path / "chromium.log", "wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start: {(tmp_path / 'chromium.log').read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = []
        while not targets and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                targets = [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
                           if t.get("type") == "page"]
            await asyncio.sleep(0.1)
        async with connect(targets[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            yield CDP(ws)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        log.close()


async def until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


def add_fake_llm(server: WebRTCServer) -> list:
    """An OpenAI-compatible streaming endpoint on the server's own app, answering "You said: <last user text>"."""
    from fastapi.responses import StreamingResponse

    requests = []

    @server.app.post("/fake-llm/v1/chat/completions")
    async def completions(request: Request):
        body = await request.json()
        requests.append(body)
        said = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        said = said if isinstance(said, str) else " ".join(p.get("text", "") for p in said)

        def chunk(delta, finish=None):
            return "data: " + json.dumps({"id": "fake", "object": "chat.completion.chunk", "created": 0,
                                          "model": "fake", "choices": [{"index": 0, "delta": delta,
                                                                        "finish_reason": finish}]}) + "\n\n"

        async def stream():
            yield chunk({"role": "assistant", "content": "You said: "})
            yield chunk({"content": said})
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return requests


async def browser_call(tmp_path: Path, server: WebRTCServer, wav: Path, utterances: int, timeout: float,
                       bot_replies: int = 0, loop: bool = False):
    """Open the page, press the mic button, wait for `utterances` finals on the server; return the page finals."""
    async with running_server(server) as url, chromium(tmp_path, wav, loop=loop) as page:
        if bot_replies:
            server.llm = LLMConfig(api_key="test-key", model="fake", base_url=f"{url}/fake-llm/v1")
        await page.call("Page.enable")
        await page.call("Page.navigate", url=f"{url}/?processing=0")
        await until(lambda: page.js("document.readyState === 'complete' && !!document.getElementById('mic')"),
                    10, "the page")
        await page.js("document.getElementById('mic').click()")
        try:
            await until(lambda: server.sessions, 15, "the WebRTC session")
            session = server.sessions[0]
            await until(lambda: len(session.finals) >= utterances, timeout, f"{utterances} final transcripts")
        except AssertionError as error:
            state = await page.js("[document.getElementById('status').textContent, "
                                  "document.getElementById('error').textContent]")
            raise AssertionError(f"{error}; page status/error: {state}; server sessions: "
                                 f"{[(s.outcome, s.finals, s.errors) for s in server.sessions]}") from None
        spoken = [f for f in session.finals if f["text"]]
        await until(lambda: _page_count(page, len(spoken)), 10, "the page to show the finals")
        await until(lambda: len(session.bot_replies) >= bot_replies, 15, f"{bot_replies} bot replies")
        shown = await page.js("window.nemotron.finals")
        dom = await page.js("Array.from(document.querySelectorAll('#finals li:not(.bot)')).map("
                            "li => [li.querySelector('.lang').textContent, li.querySelector('.text').textContent])")
        status = await page.js("document.getElementById('status').textContent")
        session.page_bot_lines = await page.js(
            "Array.from(document.querySelectorAll('#finals li.bot .text')).map(e => e.textContent)")
        await page.js("document.getElementById('mic').click()")  # Stop: the server sees the browser leave
        await until(lambda: session.ended is not None, 15, "the session to end after Stop")
    return session, shown, dom, status


async def _page_count(page: CDP, n: int) -> bool:
    return await page.js("window.nemotron.finals.length") >= n


# ---- tests ---------------------------------------------------------------------------------------------
async def test_browser_call_transcripts_equal_engine_and_show_on_page(tmp_path, tiny_engine):
    require_chromium()
    rate = 48000
    silence = lambda s: np.zeros(int(s * rate), dtype=np.float32)  # noqa: E731
    audio = np.concatenate([silence(1.0), speechlike(1.6, seed=21, rate=rate), silence(1.2),
                            speechlike(1.4, seed=22, rate=rate), silence(1.5)])
    wav = write_wav(tmp_path / "call.wav", audio, rate)
    recorder = Recorder(tiny_engine)
    server = WebRTCServer(engine=tiny_engine, language=Language.EN_US, llm=None)
    llm_requests = add_fake_llm(server)  # the bot answers through an OpenAI-compatible endpoint

    started = time.monotonic()
    # the fake microphone loops the file: however long the call takes to connect, both utterances come round
    session, shown, dom, status = await browser_call(tmp_path, server, wav, utterances=2, timeout=40,
                                                     bot_replies=1, loop=True)
    elapsed = time.monotonic() - started

    # what the server received: real-time 16 kHz audio holding both utterances (Opus-decoded, so not equal).
    fed = recorder.audio.astype(np.float32) / 32768
    assert len(fed) >= 16000 * (1.4 + 1.2 + 1.4), (len(fed) / 16000, elapsed)
    assert np.sqrt(np.mean(fed ** 2)) > 0.01, "the server received silence"

    # server transcript == the engine's own on the audio the service fed it
    expected = await recorder.replay(tiny_engine)
    got = [f["text"] for f in session.finals]
    assert got == [f.text for f in expected], (got, [f.text for f in expected])
    assert len(got) >= 2 and any(got), got
    assert all(f["language"] == "en-US" for f in session.finals)

    # the page shows each non-empty final, with its language (read before Stop: later finals may follow)
    spoken = [f for f in session.finals if f["text"]]
    assert len(shown) >= 1 and shown == spoken[:len(shown)]
    assert dom == [["en-US", f["text"]] for f in shown]
    assert "Listening" in status and "en-US" in status and "LLM on" in status

    # the LLM stage: it got the user's words and its answer reached the page
    assert llm_requests and llm_requests[0]["model"] == "fake"
    assert session.bot_replies and all(r.startswith("You said: ") for r in session.bot_replies)
    # the page shows the replies in order; one answering words said just before Stop may come after the page left
    # (the pipeline ends gracefully so those words are still transcribed)
    assert session.page_bot_lines and session.bot_replies[:len(session.page_bot_lines)] == session.page_bot_lines
    heard = " ".join(f["text"] for f in spoken)
    assert all(r[len("You said: "):] in heard or heard in r for r in session.bot_replies), (session.bot_replies, heard)
    assert session.outcome.startswith("client left"), session.outcome
    assert not session.errors


async def _demo_picks(engine: Engine, per_language: int = 4, min_words: int = 3) -> list[dict]:
    """Per language, of the first few held-out rows of at least `min_words` words, the one the engine itself (auto
    mode) gets best.

    The test is about the transport: it must not lose what the model can do on the clean file. (A one-word
    utterance would make one word's error a 100 % WER.)
    """
    from tools.demo_model.calls import heldout_rows, word_errors, words

    rows = heldout_rows()  # 16 kHz
    picks = []
    for lang in ("en-US", "es-ES", "de-DE"):
        scored = []
        candidates = [r for r in rows if r["lang"] == lang and len(words(r["text"])) >= min_words]
        for row in candidates[:per_language]:
            audio = np.concatenate([row["audio"], np.zeros(int(0.8 * 16000), np.float32)])  # + the VAD stop wait
            final = await final_of(engine, audio, language="auto")
            errors, total = word_errors(final.text, row["text"])
            row["direct"] = {"text": final.text, "language": final.language, "wer": errors / total}
            scored.append((final.language != lang, errors / total, row))
        picks.append(min(scored, key=lambda item: item[:2])[2])
    return picks


def _leading_silence_s(audio16k: np.ndarray, frame: int = 320) -> float:
    """Seconds of the server's audio before the first 20 ms frame with speech-level energy."""
    samples = audio16k.astype(np.float32) / 32768
    for start in range(0, len(samples) - frame, frame):
        if np.sqrt(np.mean(samples[start:start + frame] ** 2)) > 0.01:
            return start / 16000
    return len(samples) / 16000


async def test_browser_call_demo_model_words_and_language(tmp_path):
    require_chromium()
    import soxr

    from tools.demo_model.calls import word_errors  # the held-out set's own normalisation and WER

    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=4)
    await engine.ready()
    try:
        picks = await _demo_picks(engine)
        rate = 48000
        # Chromium starts the fake microphone at getUserMedia, ~1-2 s before the call connects: a 4 s lead-in
        parts = [np.zeros(int(4.0 * rate), dtype=np.float32)]
        for row in picks:
            parts += [soxr.resample(row["audio"], 16000, rate).astype(np.float32),
                      np.zeros(int(2.0 * rate), dtype=np.float32)]
        wav = write_wav(tmp_path / "demo_call.wav", np.concatenate(parts), rate)
        recorder = Recorder(engine)
        server = WebRTCServer(engine=engine, language=None, llm=None, vad_stop_secs=0.8)  # auto-detect
        session, shown, dom, _ = await browser_call(tmp_path, server, wav, utterances=len(picks), timeout=60)
        expected = await recorder.replay(engine)
    finally:
        engine.close()
    lead = _leading_silence_s(recorder.audio)  # ~4 s less the time to connect; if ~0 the call began too late
    assert [f["text"] for f in session.finals] == [f.text for f in expected]
    finals = [f for f in session.finals if f["text"]]
    assert len(finals) == len(picks), (finals, [r["text"] for r in picks])
    for final, row in zip(finals, picks):
        errors, words = word_errors(final["text"], row["text"])
        assert errors / words <= max(0.35, row["direct"]["wer"] + 0.15), (final, row["text"], row["direct"], lead)
        if row["direct"]["language"] == row["lang"]:
            assert final["language"] == row["lang"], (final, row["text"])
    assert sum(f["language"] == r["lang"] for f, r in zip(finals, picks)) >= 2
    assert dom == [[f["language"], f["text"]] for f in finals]


def test_llm_config_from_env():
    assert LLMConfig.from_env({}) is None
    assert LLMConfig.from_env({"OPENAI_BASE_URL": "http://x/v1"}) is None  # no key: transcripts only
    config = LLMConfig.from_env({"OPENAI_API_KEY": "k", "OPENAI_MODEL": "m", "NEMOTRON_LLM_BASE_URL": "http://l/v1"})
    assert (config.api_key, config.model, config.base_url) == ("k", "m", "http://l/v1")
    assert LLMConfig.from_env({"NEMOTRON_LLM_API_KEY": "a", "OPENAI_API_KEY": "b"}).api_key == "a"


async def test_an_offer_beyond_capacity_gets_503_with_retry_after(tiny_engine):
    import httpx

    server = WebRTCServer(engine=tiny_engine, language=Language.EN_US, llm=None)
    async with running_server(server) as url, httpx.AsyncClient(base_url=url) as client:
        held = [tiny_engine.try_reserve() for _ in range(tiny_engine.max_streams)]
        busy = await client.post("/api/offer", json={"sdp": "v=0\r\n", "type": "offer"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5" and "busy" in busy.text
        for reservation in held:
            reservation.release()
    assert server.sessions == [] and tiny_engine.free_slots == tiny_engine.max_streams

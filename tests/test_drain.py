"""Graceful drain of `pipecat-nemotron serve-sip` (a real process, the demo model, real SIP calls over loopback):
SIGTERM or POST /drain → new INVITEs and OPTIONS get 503 + Retry-After and /healthz 503, live calls go on and
are transcribed to the end, calls still up at --drain-timeout get a BYE with their last words still written, and
the process exits 0 — at once when it has no calls, and at once after a second SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from server_process import HOST, ServerProcess, free_sip_port, options, transcripts

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from sip_caller import call_audio, place_call  # noqa: E402

SAMPLE = Path(__file__).parent.parent / "plugin" / "models" / "sample_call.wav"  # three utterances, 7.3 s
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def serve_sip(tmp_path):
    started = []

    def start(*extra: str) -> ServerProcess:
        port = free_sip_port()
        server = ServerProcess("serve-sip", "--model", "demo", "--device", "cpu", "--host", HOST, "--port",
                               str(port), "--output", str(tmp_path / "calls.jsonl"), *extra, tmp_path=tmp_path)
        server.sip = (HOST, port)
        server.output = tmp_path / "calls.jsonl"
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


async def until(condition, timeout: float):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


async def test_sigterm_refuses_new_calls_and_the_live_call_finishes_with_its_transcript(serve_sip):
    server = serve_sip("--drain-timeout", "60", "--retry-after", "9")
    assert await options(server.sip) == (200, None)
    audio = call_audio(SAMPLE)
    live = asyncio.ensure_future(place_call(server.sip, audio, timeout=30))
    await until(lambda: server.health()[1]["calls_active"] == 1, 10)
    server.signal(signal.SIGTERM)
    await until(lambda: server.health()[1]["draining"], 5)

    status, health = server.health()
    assert status == 503 and health["draining"] and health["ready"] and health["calls_active"] == 1
    assert await options(server.sip) == (503, "9")  # a dispatcher's probe takes the node out
    refused = await place_call(server.sip, audio[:1600])
    assert (refused.status, refused.retry_after, refused.answered) == (503, "9", False)
    metrics = server.metrics()  # what the test saw, as the server counts it
    assert metrics["nemotron_calls_answered_total"] == 1
    assert metrics['nemotron_calls_refused_total{reason="draining"}'] == 1
    assert metrics["nemotron_calls_active"] == 1 and metrics["nemotron_draining"] == 1

    result = await live  # the caller plays all its audio and hangs up itself
    assert result.answered and not result.dropped_by_server and result.bye_status == 200
    assert await server.exited(30) == 0
    texts = transcripts(server.output)[result.call_id]
    assert len(texts) == 3 and "saldo" in texts[-1], texts  # the last utterance too: nothing was cut
    log = server.log()
    assert "rejected 503 (admission: draining)" in log and "caller hung up" in log


async def test_a_call_still_talking_at_the_drain_bound_gets_bye_and_its_final_is_written(serve_sip):
    server = serve_sip("--drain-timeout", "1")
    audio = call_audio(SAMPLE)
    call = asyncio.ensure_future(place_call(server.sip, audio, timeout=30))
    await until(lambda: server.health()[1]["calls_active"] == 1, 10)
    await asyncio.sleep(1.5)  # into the first utterance
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    result = await call
    assert result.answered and result.dropped_by_server  # our BYE, not the caller's
    assert 0.8 < time.monotonic() - signalled < 6.0
    assert await server.exited(30) == 0
    texts = transcripts(server.output).get(result.call_id, [])
    assert texts and texts[0].strip(), "the words said before the BYE were not written"
    assert "drain timeout" in server.log()


async def test_drain_with_no_calls_exits_at_once(serve_sip):
    server = serve_sip("--drain-timeout", "60")
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    assert await server.exited(10) == 0
    assert time.monotonic() - signalled < 5.0
    assert "start-up objects frozen" in server.log()  # full collections skip the model's heap (tests/test_heap.py)


async def test_second_sigterm_ends_the_wait_for_live_calls(serve_sip):
    server = serve_sip("--drain-timeout", "120")
    call = asyncio.ensure_future(place_call(server.sip, call_audio(SAMPLE), timeout=30))
    await until(lambda: server.health()[1]["calls_active"] == 1, 10)
    server.signal(signal.SIGTERM)
    await until(lambda: server.health()[1]["draining"], 5)
    await asyncio.sleep(2.0)  # into the first utterance
    assert not call.done()  # the first SIGTERM lets the call go on
    server.signal(signal.SIGTERM)
    result = await asyncio.wait_for(call, 5)
    assert result.dropped_by_server
    assert await server.exited(30) == 0
    assert transcripts(server.output).get(result.call_id), "the hurried call's words were not written"


async def test_post_drain_is_the_admin_action(serve_sip):
    server = serve_sip()
    assert server.health()[0] == 200
    status, body = server.post("/drain")
    assert status == 202 and '"draining": true' in body
    assert await server.exited(10) == 0  # no calls: done at once
    assert "POST /drain" in server.log()


async def test_healthz_says_503_while_loading_and_sigterm_then_exits_0(tmp_path):
    """The metrics port is up before the model: a balancer sees a loading node as not ready; SIGTERM while it
    loads ends it with status 0 once loaded (no calls to wait for)."""
    port = free_sip_port()
    server = ServerProcess("serve-sip", "--model", "demo", "--device", "cpu", "--host", HOST, "--port", str(port),
                           tmp_path=tmp_path)
    server.launch()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        first = None
        while first is None and loop.time() < deadline:
            try:
                first = server.health()
            except OSError:
                await asyncio.sleep(0.05)
        assert first is not None, server.log()
        status, health = first
        assert status == 503 and not health["ready"] and not health["listening"], health
        server.signal(signal.SIGTERM)
        assert await server.exited(60) == 0
    finally:
        server.stop()

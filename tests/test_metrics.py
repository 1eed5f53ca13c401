"""Prometheus metrics and /healthz of serve-sip and serve-webrtc (`plugin/apps/metrics.py`): what a scrape says
agrees with what callers saw (answered, refused by reason, ended) and with the engine's own figures, scrapes
during load always parse and never go backwards, and /healthz flips with the drain."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from server_process import HOST, ServerProcess, free_sip_port, options, parse_metrics, transcripts
from sip_support import start_server

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from sip_caller import call_audio, place_call  # noqa: E402

HELDOUT = Path(__file__).parent / "data" / "demo_heldout"
pytestmark = pytest.mark.timeout(300)


# ---- units: outcome labels, health, the admin endpoint ----------------------------------------------------
@pytest.mark.parametrize("outcome, label", [
    ("caller hung up", "caller_hangup"), ("client left", "client_left"), ("client left with errors", "client_left"),
    ("bot hung up", "bot_hangup"), ("application finished", "bot_hangup"), ("drain timeout", "drained"),
    ("max call length", "max_length"), ("RTP timeout (60 s without media)", "rtp_timeout"), ("no ACK", "no_ack"),
    ("server stopped", "server_stopped"), ("server shutdown", "server_stopped"), ("failed: boom", "failed"),
    ("ended", "ended"), ("something new", "other"), ("", "other"),
])
def test_call_outcomes_get_bounded_labels(outcome, label):
    from pipecat_nemotron.apps.metrics import CALL_OUTCOMES, call_outcome

    assert call_outcome(outcome) == label and label in CALL_OUTCOMES


async def test_healthz_and_post_drain_on_the_admin_port():
    import urllib.error
    import urllib.request

    from pipecat_nemotron.apps.drain import Drain
    from pipecat_nemotron.apps.metrics import AdminServer, ServerMetrics

    drain = Drain(timeout_s=5)
    drain.bind()
    metrics = ServerMetrics(drain=drain)
    admin = AdminServer(metrics=metrics, drain=drain, port=0)
    admin.start()

    def fetch(path, method="GET"):
        request = urllib.request.Request(f"http://127.0.0.1:{admin.port}{path}", method=method,
                                         data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    try:
        status, _ = await asyncio.to_thread(fetch, "/healthz")
        assert status == 503  # not listening yet: a balancer must not send calls
        metrics.status.listening = True
        assert (await asyncio.to_thread(fetch, "/healthz"))[0] == 200
        assert (await asyncio.to_thread(fetch, "/nope"))[0] == 404
        assert (await asyncio.to_thread(fetch, "/metrics", "POST"))[0] == 404
        status, body = await asyncio.to_thread(fetch, "/drain", "POST")
        assert status == 202
        await asyncio.wait_for(drain.requested(), 2)  # handed to the event loop from the HTTP thread
        status, body = await asyncio.to_thread(fetch, "/healthz")
        assert status == 503 and '"draining": true' in body and '"ready": true' in body
        samples = parse_metrics((await asyncio.to_thread(fetch, "/metrics"))[1])
        assert samples["nemotron_draining"] == 1
        await asyncio.to_thread(fetch, "/drain", "POST")  # repeated: no hurry (only a second SIGTERM hurries)
        await asyncio.sleep(0.1)
        assert not drain.hurried
    finally:
        admin.close()


# ---- the engine's figures, scraped while it works ---------------------------------------------------------
async def test_engine_collector_sees_every_step_even_when_scraped_from_another_thread_during_load():
    from prometheus_client import CollectorRegistry, generate_latest

    from pipecat_nemotron.apps.metrics import EngineCollector
    from pipecat_nemotron.engine import Engine, Final

    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=4, max_admission_lag_s=None)
    await engine.ready()
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine=lambda: engine))
    scrapes, stop = [], threading.Event()

    def scrape_all_the_time():  # a hostile scraper: back to back, while the engine steps
        while not stop.is_set():
            scrapes.append(parse_metrics(generate_latest(registry).decode()))
            time.sleep(0)  # lets the engine thread take the GIL at once, not after a 5 ms switch interval per op

    scraper = threading.Thread(target=scrape_all_the_time)
    scraper.start()
    try:
        rng = np.random.default_rng(0)
        streams = [engine.open_stream(language="auto") for _ in range(3)]
        for second in range(2):
            for stream in streams:
                stream.feed((rng.standard_normal(16000) * 0.05).astype(np.float32))
            await asyncio.sleep(0.05)
        for stream in streams:
            stream.finalize()
        for stream in streams:
            async for result in stream:
                if isinstance(result, Final):
                    break
            stream.close()
    finally:
        stop.set()
        scraper.join(10)
        final = parse_metrics(generate_latest(registry).decode())
        engine.close()
    stats = engine.stats
    assert len(scrapes) > 100, len(scrapes)  # ~1,600 here: many scrapes inside every step
    steps = [s["nemotron_engine_steps_total"] for s in scrapes]
    assert steps == sorted(steps), "a counter went backwards"
    assert all(s["nemotron_engine_batch_size_count"] <= s["nemotron_engine_steps_total"] + 1 for s in scrapes)
    assert final["nemotron_engine_steps_total"] == stats.steps > 0
    assert final["nemotron_engine_batch_size_count"] == stats.steps  # every step observed exactly once
    assert final["nemotron_engine_batch_size_sum"] == stats.streams_stepped
    assert final["nemotron_engine_step_seconds_count"] == stats.steps
    assert final["nemotron_engine_step_seconds_sum"] == pytest.approx(stats.busy_seconds, rel=1e-6)
    assert final['nemotron_engine_batch_size_bucket{le="+Inf"}'] == stats.steps
    assert max(stats.batch_sizes) > 1 and final['nemotron_engine_batch_size_bucket{le="1.0"}'] < stats.steps
    assert final["nemotron_engine_audio_seconds_total"] == pytest.approx(stats.audio_seconds)
    assert final["nemotron_engine_max_streams"] == 4 and final["nemotron_engine_alive"] == 1


# ---- the SIP server's own counts ---------------------------------------------------------------------------
async def test_on_rejected_tells_forbidden_and_call_limit_refusals():
    refusals = []
    server = await start_server(None, allowed_peers=("10.0.0.0/8",))
    server.on_rejected = lambda invite, source, reason: refusals.append(reason)
    try:
        result = await place_call((HOST, server.port), b"")
        assert result.status == 403 and refusals == ["forbidden"]
    finally:
        await server.stop()
    refusals.clear()
    server = await start_server(None, max_calls=0)
    server.on_rejected = lambda invite, source, reason: refusals.append(reason)
    try:
        result = await place_call((HOST, server.port), b"")
        assert result.status == 503 and result.retry_after and refusals == ["call_limit"]
    finally:
        await server.stop()


async def test_rate_limited_sip_messages_are_counted():
    from pipecat_nemotron.apps.drain import Drain
    from pipecat_nemotron.apps.metrics import ServerMetrics

    server = await start_server(None, udp_rate_per_source=0.01, udp_burst_per_source=2)
    try:
        metrics = ServerMetrics(drain=Drain(), rate_limited=lambda: server.wire.rate_limited)
        answered = 0
        for _ in range(6):
            try:
                await options((HOST, server.port), timeout=0.3)
                answered += 1
            except asyncio.TimeoutError:
                pass
        samples = parse_metrics(metrics.exposition().decode())
        assert answered == 2 and samples["nemotron_sip_messages_rate_limited_total"] == 4
    finally:
        await server.stop()


def _scrape_forever(server: ServerProcess, scrapes: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            scrapes.append(server.metrics())
        except OSError as error:  # the process is gone (end of the test)
            scrapes.append(error)
            return
        time.sleep(0.05)


async def test_serve_sip_metrics_agree_with_what_the_callers_saw(tmp_path):
    """Six callers at once against --max-calls 3, scraped every 50 ms throughout: answered and refused counts
    equal the callers' 200s and 503s, every call that ended is counted once by its outcome, finals are timed."""
    port = free_sip_port()
    output = tmp_path / "calls.jsonl"
    server = ServerProcess("serve-sip", "--model", "demo", "--device", "cpu", "--host", HOST, "--port", str(port),
                           "--max-calls", "3", "--output", str(output), tmp_path=tmp_path)
    server.start()
    scrapes: list = []
    stop = threading.Event()
    scraper = threading.Thread(target=_scrape_forever, args=(server, scrapes, stop))
    scraper.start()
    try:
        audios = [call_audio(path) for path in sorted(HELDOUT.glob("en-US_*.wav"))[:3]]
        calls = []
        for index in range(6):
            calls.append(asyncio.ensure_future(place_call((HOST, port), audios[index % 3], timeout=30)))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*calls)
        answered = [r for r in results if r.answered]
        refused = [r for r in results if not r.answered]
        assert len(answered) == 3 and all(r.status == 503 and r.retry_after for r in refused), results
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline and server.metrics()["nemotron_calls_active"] > 0:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        stop.set()
        scraper.join(10)
        samples = server.metrics()
        status, health = server.health()
    finally:
        stop.set()
        server.signal(signal.SIGTERM)
        exit_status = await server.exited(30)
        server.stop()
    assert exit_status == 0
    assert samples["nemotron_calls_answered_total"] == 3
    refusals = {k: v for k, v in samples.items() if k.startswith("nemotron_calls_refused_total")}
    assert sum(refusals.values()) == 3, refusals  # beyond --max-calls: the call limit (or the engine, full)
    assert refusals['nemotron_calls_refused_total{reason="call_limit"}'] + \
        refusals['nemotron_calls_refused_total{reason="capacity"}'] == 3
    ended = {k: v for k, v in samples.items() if k.startswith("nemotron_calls_ended_total")}
    assert ended['nemotron_calls_ended_total{outcome="caller_hangup"}'] == 3 and sum(ended.values()) == 3
    assert samples["nemotron_calls_active"] == 0 and samples["nemotron_engine_open_streams"] == 0
    lines = sum(len(texts) for texts in transcripts(output).values())
    assert lines >= 3 and samples["nemotron_final_latency_seconds_count"] >= lines
    assert samples["nemotron_engine_batch_size_count"] == samples["nemotron_engine_steps_total"] > 0
    assert samples["nemotron_engine_realtime_factor"] > 0
    assert status == 200 and health["ready"] and not health["draining"] and health["engine"]["alive"]
    scraped = [s for s in scrapes if isinstance(s, dict)]
    assert len(scraped) > 20, "too few scrapes during the calls"
    assert max(s["nemotron_calls_active"] for s in scraped) == 3  # seen live
    for name in ("nemotron_calls_answered_total", "nemotron_engine_steps_total", "nemotron_engine_batch_size_count"):
        series = [s[name] for s in scraped]
        assert series == sorted(series), f"{name} went backwards"


async def test_serve_webrtc_metrics_healthz_and_drain_on_sigterm(tmp_path):
    """serve-webrtc: /healthz 200 when up; SIGTERM with no sessions drains and exits 0 at once."""
    from server_process import free_port
    import socket

    port = free_port(socket.SOCK_STREAM)
    server = ServerProcess("serve-webrtc", "--model", "demo", "--device", "cpu", "--port", str(port),
                           "--no-llm", tmp_path=tmp_path)
    server.start()
    try:
        status, health = server.health()
        assert status == 200 and health["engine"]["alive"] and health["calls_active"] == 0
        samples = server.metrics()
        assert samples["nemotron_calls_answered_total"] == 0 and samples["nemotron_engine_alive"] == 1
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        assert await server.exited(15) == 0
        assert time.monotonic() - signalled < 8
    finally:
        server.stop()
    assert "drain: SIGTERM" in server.log() and "start-up objects frozen" in server.log()


async def test_webrtc_offers_are_refused_while_draining_and_counted():
    import httpx

    from pipecat_nemotron.apps.webrtc_server import WebRTCServer

    class NoEngine:  # a draining server refuses before it asks the engine
        model, model_name = None, "none"

        def try_reserve(self):
            raise AssertionError("the engine was asked while draining")

    from pipecat_nemotron.apps.drain import Drain
    from pipecat_nemotron.apps.metrics import ServerMetrics

    drain = Drain(timeout_s=60)
    server = WebRTCServer(engine=NoEngine(), llm=None, drain=drain, metrics=ServerMetrics(drain=drain))
    drain.request("test")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app), base_url="http://test") as client:
        response = await client.post("/api/offer", json={"sdp": "v=0\r\n", "type": "offer"})
        health = (await client.get("/api/health")).json()
    assert response.status_code == 503 and response.headers["retry-after"] == "5" and "draining" in response.text
    assert health["draining"] is True
    samples = parse_metrics(server.metrics.exposition().decode())
    assert samples['nemotron_calls_refused_total{reason="draining"}'] == 1
    started = time.monotonic()
    await server.drain_sessions()  # nothing live: returns at once
    assert time.monotonic() - started < 0.5

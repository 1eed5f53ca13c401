"""Registration (`transports/sip/registration.py`) with Kamailio as the registrar (auth_db on a db_text subscriber
table, `tests/sip/kamailio-registrar.cfg`) in a loopback-only network namespace: a wrong password is reported
clearly and not retried in a storm, a 423 is answered with Min-Expires, the registration is refreshed before it
expires, a call to the registered user through Kamailio reaches our server and is transcribed with the demo model,
and stop() unregisters."""

import asyncio
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

import sip_support
from pipecat_nemotron.transports.sip.digest import Credentials
from pipecat_nemotron.transports.sip.registration import SIPRegistration
from sip_support import HOST, free_port, loopback_namespace
from test_sip_outbound import HELDOUT, Kamailio, heldout_row, kamailio_config

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/kamailio").exists() and shutil.which("kamailio") is None,
                                reason="kamailio missing: run scripts/setup-system.sh")
REALM = "registrar.test"
needs_tls_module = pytest.mark.skipif(not list(Path("/usr/lib").glob("*/kamailio/modules/tls.so")),
                                      reason="Kamailio's tls module missing: run scripts/setup-system.sh")


@pytest.fixture(scope="module", autouse=True)
def network():
    with loopback_namespace() as where:
        yield where


def registrar(tmp_path: Path, **kwargs) -> tuple[Kamailio, int]:
    port = free_port()
    config = kamailio_config(tmp_path, proxy_port=port, callee_port=free_port(), users={"bot": "s3cret"},
                             realm=REALM, **kwargs)
    return Kamailio(config, tmp_path), port


async def test_wrong_password_is_reported_clearly_and_not_retried_in_a_storm(tmp_path, caplog):
    kamailio, port = registrar(tmp_path)
    async with kamailio, sip_support.serving(port=free_port()) as server:
        registration = SIPRegistration(uas=server, aor=f"sip:bot@{HOST}", registrar=f"{HOST}:{port}",
                                       credentials=Credentials("bot", "not-the-password"), expires=60)
        registration.start()
        await sip_support.until(lambda: registration.state == "auth_failed", timeout=5)
        await asyncio.sleep(3.0)  # a retry storm would show here
        await registration.stop()
        assert "refused" in registration.last_error and "'bot'" in registration.last_error
        assert "not-the-password" not in repr(registration) + repr(registration.credentials)
        assert registration.auth_retry_secs >= 60
        # one REGISTER without credentials (401), one with them (401 again): then nothing for 60 s
        assert kamailio.count("REGISTER-SEEN") == 2 and registration.requests == 2
        assert registration.state == "unregistered" and registration.registrations == 0


async def test_register_423_refresh_inbound_call_transcribed_and_unregister(tmp_path):
    """Asks 2 s (423: Min-Expires 6), is granted 6 s and refreshes at 3 s; baresip calls bot@registrar and
    Kamailio routes the INVITE to our contact, where the demo model transcribes it; stop() unregisters."""
    from pipecat.frames.frames import TranscriptionFrame
    from pipecat.transcriptions.language import Language

    from pipecat_nemotron.engine import Engine
    from pipecat_nemotron.stt import NemotronSTTService
    from pipecat_nemotron.wav import read_wav
    from test_demo_model import normalise
    from test_sip_transcription import Collector, baresip_call, transcribe_call

    kamailio, port = registrar(tmp_path, min_expires=6)
    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=2)
    collector = Collector()
    calls = []

    async def on_call(call):
        calls.append(call)
        await transcribe_call(call, NemotronSTTService(engine=engine), collector)

    row = heldout_row("en-US_00001.wav")
    wav = read_wav(HELDOUT / row["file"])
    speech = np.concatenate([np.zeros(2400, dtype=np.int16), wav.samples, np.zeros(8000, dtype=np.int16)])
    loop = asyncio.get_running_loop()
    try:
        async with kamailio, sip_support.serving(on_call, port=free_port(), allowed_peers=(HOST,)) as server:
            registration = SIPRegistration(uas=server, aor=f"sip:bot@{HOST}", registrar=f"{HOST}:{port}",
                                           credentials=Credentials("bot", "s3cret"), expires=2)
            registration.start()
            await asyncio.wait_for(registration.registered.wait(), 5)
            first = loop.time()
            assert registration.granted == 6 and registration.expires == 6  # after the 423
            await engine.ready()
            output = await baresip_call(tmp_path, port, speech.astype("<i2"), seconds=6)
            await asyncio.sleep(0.5)
            assert calls, output[-2000:] + kamailio.log[-2000:]
            assert "INVITE-TO-CONTACT sip:bot@127.0.0.1" in kamailio.log
            await sip_support.until(lambda: registration.registrations >= 3, timeout=8)
            assert loop.time() - first < 8  # refreshed at half the 6 s: twice within 8 s, never lapsed
            seen = kamailio.count("REGISTER-SEEN")
            await registration.stop()
            assert registration.state == "unregistered"
            assert kamailio.count("REGISTER-SEEN") == seen + 1 and "REGISTER-SEEN expires=0" in kamailio.log
    finally:
        engine.close()
    finals = collector.of(TranscriptionFrame)
    assert finals and normalise(finals[0].text) == normalise(row["text"])
    assert finals[0].language == Language.EN_US
    assert calls[0].called_uri.startswith("sip:bot@")
    # 423 then 401 on the first attempt, refreshes re-used the nonce (nc counts up) with no new challenge
    assert "expires=2" in kamailio.log and registration.requests <= kamailio.count("REGISTER-SEEN")


def tls_registrar(tmp_path: Path, cert: Path, key: Path) -> tuple[Kamailio, int, int]:
    """The same registrar with a TLS listener too (Kamailio's tls module): (kamailio, UDP port, TLS port)."""
    port, tls_port = free_port(), free_port(socket.SOCK_STREAM)
    config = kamailio_config(tmp_path, proxy_port=port, callee_port=free_port(), users={"bot": "s3cret"},
                             realm=REALM, min_expires=6)
    (tmp_path / "tls.cfg").write_text(
        f"[server:default]\nmethod = TLSv1.2+\nverify_certificate = no\nrequire_certificate = no\n"
        f"private_key = {key}\ncertificate = {cert}\n\n"
        f"[client:default]\nmethod = TLSv1.2+\nverify_certificate = no\nrequire_certificate = no\n")
    text = config.read_text().replace(
        "disable_tcp=yes", f"disable_tcp=no\nenable_tls=yes\nlisten=tls:127.0.0.1:{tls_port}\n"
                           f"alias=127.0.0.1:{tls_port}")
    text = text.replace('loadmodule "auth_db.so"', 'loadmodule "auth_db.so"\nloadmodule "tls.so"\n'
                                                   f'modparam("tls", "config", "{tmp_path / "tls.cfg"}")')
    config.write_text(text)
    return Kamailio(config, tmp_path), port, tls_port


@needs_tls_module
@pytest.mark.parametrize("listener", [False, True], ids=["no-listener", "own-listener"])
async def test_register_over_tls_and_the_registrars_call_comes_down_our_connection_with_srtp(tmp_path, listener):
    """sips: registrar (Kamailio with TLS, its certificate verified against our test CA): REGISTER over TLS with a
    `;transport=tls` Contact at our end of the connection (or, when we have a TLS listener, a `sips:` Contact at
    it); a baresip call to bot@registrar (RTP/SAVP) reaches us over TLS (down our connection, or to our listener),
    is answered with SRTP and transcribed; stop() unregisters over TLS."""
    from pipecat.frames.frames import TranscriptionFrame

    from pipecat_nemotron.engine import Engine
    from pipecat_nemotron.stt import NemotronSTTService
    from pipecat_nemotron.wav import read_wav
    from test_demo_model import normalise
    from test_sip_tls_wideband_peers import baresip_call
    from test_sip_transcription import Collector, transcribe_call
    from tls_support import make_certificates

    ca, cert, key = make_certificates(tmp_path / "pki")
    kamailio, port, tls_port = tls_registrar(tmp_path, cert, key)
    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=2)
    collector, calls = Collector(), []

    async def on_call(call):
        calls.append(call)
        await transcribe_call(call, NemotronSTTService(engine=engine), collector)

    row = heldout_row("en-US_00001.wav")
    try:
        # tcp_idle_secs=1: an idle connection is closed after 1 s; the registration's must stay (keep_open)
        own = dict(tls_cert=str(cert), tls_key=str(key), tls_port=0) if listener else {}
        async with kamailio, sip_support.serving(on_call, port=free_port(), allowed_peers=(HOST,),
                                                 tcp_idle_secs=1.0, **own) as server:
            registration = SIPRegistration(uas=server, aor=f"sip:bot@{HOST}", registrar=f"sips:{HOST}:{tls_port}",
                                           credentials=Credentials("bot", "s3cret"), expires=60, tls_ca=str(ca))
            registration.start()
            await asyncio.wait_for(registration.registered.wait(), 10)
            if listener:
                assert registration.contact == f"sips:bot@{HOST}:{server.wire.tls_address[1]}", registration.contact
            else:
                assert registration.contact.endswith(";transport=tls"), registration.contact
            await engine.ready()
            await asyncio.sleep(2.5)  # past the idle timeout: the connection is still there for the INVITE
            output = await baresip_call(tmp_path, f"sip:bot@{HOST}:{port}", codecs="pcmu", rate=8000, channels=1,
                                        samples=read_wav(HELDOUT / row["file"]).samples, mediaenc="srtp-mand")
            await asyncio.sleep(0.5)
            assert calls, output[-2000:] + kamailio.log[-3000:]
            call = calls[0]
            assert call.invite.get_all("Via")[0].upper().startswith("SIP/2.0/TLS "), call.invite.get_all("Via")
            assert call.negotiated.srtp
            assert call.rtp.stats.srtp_dropped == 0 and call.rtp.stats.packets_in > 100
            assert call.outcome == "caller hung up", kamailio.log[-3000:]  # its BYE came down the connection too
            await registration.stop()
            assert "REGISTER-SEEN expires=0" in kamailio.log and registration.state == "unregistered"
    finally:
        engine.close()
    finals = collector.of(TranscriptionFrame)
    assert finals and normalise(finals[0].text) == normalise(row["text"])


async def test_a_registrar_whose_certificate_does_not_verify_is_a_clear_failure_retried_with_backoff(tmp_path):
    from tls_support import make_certificates

    _, cert, key = make_certificates(tmp_path / "pki")
    other_ca, _, _ = make_certificates(tmp_path / "other")
    async with sip_support.serving(port=free_port(), tls_cert=str(cert), tls_key=str(key), tls_port=0) as pbx, \
            sip_support.serving(port=free_port()) as server:  # a TLS listener standing in for the registrar
        registration = SIPRegistration(uas=server, aor=f"sip:bot@{HOST}",
                                       registrar=f"sips:{HOST}:{pbx.wire.tls_address[1]}",
                                       credentials=Credentials("bot", "x"), expires=60, tls_ca=str(other_ca),
                                       retry_min_secs=0.2, retry_max_secs=0.4)
        registration.start()
        await sip_support.until(lambda: pbx.wire.tls_failures >= 2, timeout=5)  # retried, with back-off
        assert registration.state == "failed" and "certificate was refused" in registration.last_error
        await registration.stop()
    assert registration.state == "unregistered" and registration.requests == 0  # nothing sent in clear


async def test_registrar_that_does_not_answer_is_retried_with_backoff():
    silent = free_port()
    async with sip_support.serving(port=free_port(), t1=0.02) as server:  # 64·T1 = 1.28 s per attempt
        registration = SIPRegistration(uas=server, aor=f"sip:bot@{HOST}", registrar=f"{HOST}:{silent}",
                                       credentials=Credentials("bot", "x"), retry_min_secs=0.5, retry_max_secs=1.0)
        registration.start()
        await sip_support.until(lambda: registration.state == "failed", timeout=3)
        assert "no response" in registration.last_error
        await asyncio.sleep(4.5)
        attempts = registration.requests
        await registration.stop()
    assert 2 <= attempts <= 4, attempts  # 1.3 s per attempt + 0.4-1 s back-off: not a storm


async def test_serve_sip_register_admits_the_registrar_and_unregisters_when_drained(tmp_path, monkeypatch):
    """serve-sip --register (apps/register.py through phone.serve): the password from $SIP_PASSWORD, the registrar
    added to an --allow list that did not cover it, registered with Kamailio, unregistered when the server drains."""
    import io

    from loguru import logger

    from pipecat_nemotron.apps import phone
    from pipecat_nemotron.apps.drain import Drain

    kamailio, port = registrar(tmp_path)
    monkeypatch.setenv("SIP_PASSWORD", "s3cret")
    args = phone.parse_args(["--host", HOST, "--port", str(free_port()), "--model", "demo", "--max-calls", "2",
                             "--allow", "10.0.0.0/8", "--register", f"sip:bot@{HOST}:{port}"])
    phone.check_args(args)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO")
    drain, ready = Drain(timeout_s=1), asyncio.Event()
    try:
        async with kamailio:
            serving = asyncio.ensure_future(phone.serve(args, stt_factory=lambda call: None, out=io.StringIO(),
                                                        ready=ready, drain=drain))
            await asyncio.wait_for(ready.wait(), 10)
            await sip_support.until(lambda: any("registered sip:bot@" in line for line in lines), timeout=5)
            drain.request("test over")
            await asyncio.wait_for(serving, 10)
            assert "REGISTER-SEEN expires=0" in kamailio.log
    finally:
        logger.remove(sink)
    assert any(f"allowing calls from the registrar {HOST}" in line for line in lines)
    assert any("unregistered" in line for line in lines)
    assert not any("s3cret" in line for line in lines)

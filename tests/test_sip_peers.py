"""The SIP transport against real peers: sipp (Debian ``sip-tester``) and baresip.

The module runs in a private network namespace with only loopback up (what ``unshare -n`` does), entered
for the calling thread with ``unshare(CLONE_NEWNET)`` and left again afterwards, so nothing can leave the
machine and fixed ports cannot collide with anything else. Where namespaces are not permitted the tests
use 127.0.0.1 with free ports instead. ``scripts/setup-system.sh`` installs both peers; a test is skipped
only when its peer's binary is missing, and the skip says so.
"""

import asyncio
import os
import shutil
import socket
import wave
from pathlib import Path

import numpy as np
import pytest
from aiortc.rtp import RtpPacket
from pipecat.frames.frames import EndFrame, InputAudioRawFrame, InputDTMFFrame

import sip_support
from pipecat_nemotron.transports.sip.rtp import g711_decode, g711_encode
from sip_support import HOST, Collector, calls_recorder, free_port, loopback_namespace, run_call_pipeline

SCENARIOS = Path(__file__).parent / "sip"

needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None,
                                reason="sipp binary missing (Debian sip-tester); run scripts/setup-system.sh")
needs_kamailio = pytest.mark.skipif(shutil.which("kamailio") is None and not Path("/usr/sbin/kamailio").exists(),
                                    reason="kamailio binary missing; run scripts/setup-system.sh")
needs_baresip = pytest.mark.skipif(shutil.which("baresip") is None,
                                   reason="baresip binary missing; run scripts/setup-system.sh")


@pytest.fixture(scope="module", autouse=True)
def network():
    """A private network namespace with only lo up (`sip_support.loopback_namespace`)."""
    with loopback_namespace() as where:
        yield where


def serving(on_call=None, **config):
    """``sip_support.serving`` on a port picked by ``free_port`` first, as the peers are told it."""
    return sip_support.serving(on_call, port=free_port(), **config)


async def start_server(on_call=None, **config):
    """A started server on a free port; the caller stops it (test_sip_transcription uses this)."""
    return await sip_support.start_server(on_call, port=free_port(), **config)


async def sipp(scenario: str, server_port: int, *, timeout: float = 15.0, tmp_path: Path,
               tcp: bool = False) -> tuple[int, str]:
    """Run one sipp call of a scenario (over UDP, or TCP); returns (exit status, error log)."""
    errors = tmp_path / f"{scenario}-errors.log"
    transport = ["-t", "t1"] if tcp else []
    proc = await asyncio.create_subprocess_exec(
        "sipp", "-sf", str(SCENARIOS / f"{scenario}.xml"), "-s", "bot", f"{HOST}:{server_port}", *transport,
        "-i", HOST, "-p", str(free_port()), "-mi", HOST, "-mp", str(free_port() & ~1), "-m", "1", "-nostdin",
        "-trace_err", "-error_file", str(errors), "-timeout", f"{int(timeout)}s", "-timeout_error",
        cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout + 5)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, "sipp did not finish"
    log = errors.read_text(errors="replace") if errors.exists() else ""
    return proc.returncode, log + stderr.decode(errors="replace")


@needs_sipp
async def test_sipp_rfc4733_digits_become_input_dtmf_frames_and_injected_rtp_is_ignored(tmp_path, network):
    collector = Collector()
    calls = []

    async def on_call(call):
        calls.append(call)
        await run_call_pipeline(call, collector)

    async with serving(on_call) as server:
        call_task = asyncio.ensure_future(sipp("uac_dtmf", server.port, tmp_path=tmp_path))
        while not (calls and calls[0].rtp.latched):
            await asyncio.sleep(0.02)
            assert not call_task.done(), call_task.result()
        injector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # RTP from another port: ignored
        injector.bind((HOST, 0))
        for seq in range(5):
            packet = RtpPacket(payload_type=0, sequence_number=seq, timestamp=seq * 160, ssrc=5, payload=b"\0" * 160)
            injector.sendto(packet.serialize(), calls[0].rtp.local_address)
        injector.close()
        status, log = await call_task
        assert status == 0, log
        await asyncio.wait_for(calls[0].ended.wait(), 5)
        await asyncio.sleep(0.3)
        assert [f.button.value for f in collector.of(InputDTMFFrame)] == ["1", "5", "#"]
        assert collector.of(InputAudioRawFrame) == []  # sipp sent no audio and the injected packets were dropped
        assert calls[0].rtp.stats.ignored >= 5 and calls[0].outcome == "caller hung up"
        assert any(isinstance(f, EndFrame) for f in collector.frames)  # the caller's BYE ended the pipeline


@needs_sipp
async def test_sipp_dtmf_call_over_tcp(tmp_path):
    calls, on_call = calls_recorder()
    async with serving(on_call) as server:
        status, log = await sipp("uac_dtmf", server.port, tmp_path=tmp_path, tcp=True)
        assert status == 0, log
        assert calls[0].rtp.stats.dtmf_digits == "15#" and calls[0].outcome == "caller hung up"


@needs_sipp
async def test_sipp_cancel_while_ringing(tmp_path):
    calls = []
    async with serving(lambda call: calls.append(call), ring_secs=3) as server:
        status, log = await sipp("uac_cancel", server.port, tmp_path=tmp_path)
        assert status == 0, log
        assert calls == [] and server.active_calls == 0
        assert next(iter(server.calls.values())).outcome == "cancelled by caller"


@needs_sipp
async def test_sipp_options(tmp_path):
    async with serving() as server:
        status, log = await sipp("uac_options", server.port, tmp_path=tmp_path)
        assert status == 0, log


@needs_sipp
async def test_sipp_bot_hangs_up_with_endframe(tmp_path):
    collector = Collector()

    async def on_call(call):
        await call.confirmed.wait()
        await run_call_pipeline(call, collector, bot_hangs_up_after=0.3)

    async with serving(on_call) as server:
        status, log = await sipp("uac_server_bye", server.port, tmp_path=tmp_path)
        assert status == 0, log
        assert next(iter(server.calls.values())).outcome == "bot hung up"


@needs_sipp
async def test_sipp_reinvite_hold(tmp_path):
    calls, on_call = calls_recorder()
    async with serving(on_call) as server:
        status, log = await sipp("uac_reinvite", server.port, tmp_path=tmp_path)
        assert status == 0, log
        assert calls[0].negotiated.direction == "recvonly" and calls[0].outcome == "caller hung up"


@needs_sipp
async def test_sipp_peer_not_allowed_403(tmp_path):
    calls = []
    async with serving(lambda call: calls.append(call), allowed_peers=("192.0.2.0/24",)) as server:
        status, log = await sipp("uac_rejected_403", server.port, tmp_path=tmp_path)
        assert status == 0, log
        assert calls == [] and not server.calls


@needs_sipp
async def test_sipp_over_call_limit_503(tmp_path):
    calls, on_call = calls_recorder()
    async with serving(on_call, max_calls=1) as server:
        first = asyncio.ensure_future(sipp("uac_dtmf", server.port, tmp_path=tmp_path))
        while server.active_calls < 1:
            await asyncio.sleep(0.02)
        status, log = await sipp("uac_rejected_503", server.port, tmp_path=tmp_path)
        assert status == 0, log
        assert (await first)[0] == 0 and len(calls) == 1


@needs_sipp
@needs_kamailio
async def test_through_a_record_routing_proxy_bot_bye_follows_the_route_set(tmp_path):
    """sipp → Kamailio (record_route) → bot: the ACK and the bot's BYE travel through the proxy."""
    module_dirs = sorted(Path("/usr/lib").glob("*/kamailio/modules")) + [Path("/usr/lib/kamailio/modules")]
    module_path = next(d for d in module_dirs if (d / "tm.so").exists())
    collector = Collector()
    calls = []

    async def on_call(call):
        calls.append(call)
        await call.confirmed.wait()
        await run_call_pipeline(call, collector, bot_hangs_up_after=0.3)

    async with serving(on_call, t1=0.2) as server:  # a lost ACK would show as a "no ACK" outcome within 12.8 s
        proxy_port = free_port()
        config = (SCENARIOS / "kamailio-proxy.cfg").read_text().replace("TARGET_PORT", str(server.port)) \
            .replace("PROXY_PORT", str(proxy_port)).replace("MODULE_PATH", str(module_path))
        (tmp_path / "proxy.cfg").write_text(config)
        kamailio = shutil.which("kamailio") or "/usr/sbin/kamailio"
        proxy = await asyncio.create_subprocess_exec(
            kamailio, "-f", str(tmp_path / "proxy.cfg"), "-DD", "-E", "-w", str(tmp_path), "-Y", str(tmp_path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            await asyncio.sleep(0.5)
            assert proxy.returncode is None, (await proxy.stderr.read()).decode(errors="replace")[-2000:]
            status, log = await sipp("uac_server_bye", proxy_port, tmp_path=tmp_path)
            assert status == 0, log
            call = calls[0]
            assert call.outcome == "bot hung up"
            assert len(call.invite.get_all("Via")) == 2 and call.route_set
            assert str(proxy_port) in call.route_set[0]
        finally:
            proxy.terminate()
            await proxy.wait()


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(samples.astype("<i2").tobytes())


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def best_alignment(received: np.ndarray, sent: np.ndarray, max_lag: int = 4000) -> tuple[int, float]:
    """(lag, normalised correlation) of ``sent`` inside ``received``."""
    best = (0, -1.0)
    for lag in range(0, min(max_lag, len(received) - len(sent) // 2), 8):
        a = received[lag:lag + len(sent)].astype(float)
        b = sent[:len(a)].astype(float)
        score = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
        best = max(best, (lag, score), key=lambda x: x[1])
    lag = best[0]
    for fine in range(max(0, lag - 8), lag + 9):  # refine the coarse search
        a = received[fine:fine + len(sent)].astype(float)
        b = sent[:len(a)].astype(float)
        score = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
        best = max(best, (fine, score), key=lambda x: x[1])
    return best


@needs_baresip
def write_baresip_config(tmp_path: Path, *, codecs: str) -> tuple[Path, Path]:
    """A baresip config that dials from 127.0.0.1, plays tmp_path/caller.wav and records to snd/."""
    config_dir, snd = tmp_path / "baresip", tmp_path / "snd"
    config_dir.mkdir()
    snd.mkdir()
    sip_port, rtp_port = free_port(), free_port() & ~1
    (config_dir / "config").write_text(
        f"sip_listen {HOST}:{sip_port}\nnet_interface {HOST}\naudio_source aufile,{tmp_path / 'caller.wav'}\n"
        f"audio_player aufile,{tmp_path / 'unused.wav'}\naudio_alert aufile,{tmp_path / 'unused.wav'}\n"
        f"rtp_ports {rtp_port}-{rtp_port + 20}\nmodule_path /usr/lib/baresip/modules\nmodule g711.so\n"
        f"module aufile.so\nmodule sndfile.so\nmodule_tmp account.so\nmodule_app menu.so\nsnd_path {snd}\n")
    (config_dir / "accounts").write_text(
        f"<sip:caller@{HOST}:{sip_port}>;regint=0;audio_codecs={codecs};dtmfmode=rtpevent\n")
    return config_dir, snd


async def test_baresip_call_audio_both_ways(tmp_path, network):
    """baresip plays a WAV into the call and records what the bot sends back."""
    t = np.arange(int(8000 * 1.5)) / 8000
    caller_audio = (np.sin(2 * np.pi * (300 + 400 * t) * t) * 9000 * np.minimum(1, t * 10)).astype("<i2")
    write_wav(tmp_path / "caller.wav", caller_audio)
    tb = np.arange(3840) / 8000  # 480 ms: whole 40 ms output chunks (pipecat holds back a partial one)
    bot_audio = (np.sin(2 * np.pi * (1500 - 1600 * tb) * tb) * 8000).astype("<i2")  # a distinct falling sweep
    config_dir, snd = write_baresip_config(tmp_path, codecs="pcmu,pcma")
    collector = Collector()
    calls = []

    async def on_call(call):
        calls.append(call)
        await run_call_pipeline(call, collector, bot_audio=bot_audio.tobytes())

    async with serving(on_call) as server:
        proc = await asyncio.create_subprocess_exec(
            "baresip", "-f", str(config_dir), "-e", f"/dial sip:bot@{HOST}:{server.port}", "-t", "4",
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), 15)
        assert calls, output.decode(errors="replace")[-2000:]
        await asyncio.wait_for(calls[0].ended.wait(), 5)
        await asyncio.sleep(0.3)
    assert calls[0].outcome == "caller hung up" and calls[0].negotiated.codec == "PCMU"
    # What the caller played arrives as InputAudioRawFrames equal to its G.711 round trip.
    received = np.frombuffer(b"".join(f.audio for f in collector.of(InputAudioRawFrame)), dtype="<i2")
    expected = np.frombuffer(g711_decode(g711_encode(caller_audio.tobytes(), "PCMU"), "PCMU"), dtype="<i2")
    lag, score = best_alignment(received, expected)
    assert score > 0.999, (lag, score, len(received))
    aligned = received[lag:lag + len(expected)]
    assert np.mean(aligned == expected[:len(aligned)]) > 0.98 and len(aligned) > 0.95 * len(expected)
    # What the bot sent reached the caller (baresip's decoded recording).
    recordings = sorted(snd.glob("*-dec.wav"))
    assert recordings, list(snd.iterdir())
    heard = read_wav(recordings[-1])
    bot_expected = np.frombuffer(g711_decode(g711_encode(bot_audio.tobytes(), "PCMU"), "PCMU"), dtype="<i2")
    lag, score = best_alignment(heard, bot_expected, max_lag=len(heard))
    assert score > 0.99, (lag, score, len(heard))


def test_isolation_mode(network):
    """Says where the peers ran; inside the namespace nothing but loopback exists."""
    print(f"SIP peer tests ran on: {network}")
    if network.startswith("private"):
        assert [name for _, name in socket.if_nameindex()] == ["lo"]

"""Real calls from baresip over SIP/TLS with SDES-SRTP, and over G.722 and Opus, transcribed by the demo model.

baresip (Debian's, with its ``srtp``, ``g722`` and ``opus`` modules) calls the server inside a loopback-only network
namespace (``sip_support.loopback_namespace``): over TLS (``;transport=tls`` with our test CA as ``sip_cafile``) with
``mediaenc=srtp-mand`` (RTP/SAVP), and over UDP offering G.722 or Opus first. The pipeline is the phone app's:
``transport.input()`` at the transport's own rate → VAD → ``NemotronSTTService`` → collector.
"""

import asyncio
import json
import shutil
import socket
import wave
from pathlib import Path

import numpy as np
import pytest
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import InputAudioRawFrame, TranscriptionFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.transcriptions.language import Language
from pipecat.workers.runner import WorkerRunner
from scipy.signal import resample_poly

from pipecat_nemotron.engine import Engine
from pipecat_nemotron.stt import NemotronSTTService
from pipecat_nemotron.transports.sip import SIPCallTransport
from pipecat_nemotron.vad import WebRTCVADAnalyzer
from pipecat_nemotron.wav import read_wav
from engine_support import final_of
from sip_support import HOST, Collector, free_port, loopback_namespace, start_server
from test_demo_model import normalise
from test_sip_transcription import UtteranceSpy
from tls_support import make_certificates

pytestmark = pytest.mark.skipif(shutil.which("baresip") is None,
                                reason="baresip is not installed: run scripts/setup-system.sh (CI does)")
HELDOUT = Path(__file__).parent / "data" / "demo_heldout"
MODULES = ("g711", "g722", "opus", "srtp")


@pytest.fixture(scope="module", autouse=True)
def network():
    with loopback_namespace() as where:
        yield where


@pytest.fixture(scope="module")
def utterance():
    """(text, 8 kHz samples) of a held-out utterance the demo model gets right over G.711."""
    row = next(json.loads(line) for line in (HELDOUT / "manifest.jsonl").read_text().splitlines()
               if json.loads(line)["file"] == "en-US_00001.wav")
    return row["text"], read_wav(HELDOUT / row["file"]).samples


def write_caller_wav(path: Path, samples_8k: np.ndarray, rate: int, channels: int) -> None:
    """baresip's aufile needs the codec's own rate and channel count (G.722: 16 kHz, Opus: 48 kHz stereo)."""
    audio = samples_8k.astype(np.float64) if rate == 8000 else resample_poly(samples_8k.astype(np.float64), rate,
                                                                              8000)
    audio = np.concatenate([np.zeros(int(0.3 * rate)), audio, np.zeros(rate)])
    pcm = np.clip(np.round(audio), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(pcm, channels).tobytes())


async def baresip_call(tmp_path: Path, uri: str, *, codecs: str, rate: int, channels: int, samples: np.ndarray,
                       cafile: Path | None = None, mediaenc: str | None = None, seconds: int = 6) -> str:
    config_dir = tmp_path / "baresip"
    config_dir.mkdir()
    (tmp_path / "snd").mkdir()
    write_caller_wav(tmp_path / "caller.wav", samples, rate, channels)
    sip_port, rtp_port = free_port(), free_port() & ~1
    modules = "".join(f"module {name}.so\n" for name in MODULES)
    ca = f"sip_cafile {cafile}\n" if cafile else ""
    (config_dir / "config").write_text(
        f"sip_listen {HOST}:{sip_port}\n{ca}net_interface {HOST}\naudio_source aufile,{tmp_path / 'caller.wav'}\n"
        f"audio_player aufile,{tmp_path / 'unused.wav'}\naudio_alert aufile,{tmp_path / 'unused.wav'}\n"
        f"rtp_ports {rtp_port}-{rtp_port + 20}\nmodule_path /usr/lib/baresip/modules\n{modules}"
        f"module aufile.so\nmodule sndfile.so\nmodule_tmp account.so\nmodule_app menu.so\n"
        f"snd_path {tmp_path / 'snd'}\n")
    encryption = f";mediaenc={mediaenc}" if mediaenc else ""
    (config_dir / "accounts").write_text(
        f"<sip:caller@{HOST}:{sip_port}>;regint=0;audio_codecs={codecs};dtmfmode=rtpevent{encryption}\n")
    proc = await asyncio.create_subprocess_exec(
        "baresip", "-f", str(config_dir), "-e", f"/dial {uri}", "-t", str(seconds), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), seconds + 15)
    return output.decode(errors="replace")


async def transcribe_call(call, stt, collector, probe):
    transport = SIPCallTransport(call=call)
    rate = transport.sample_rate  # as apps/phone.py does: the pipeline runs at the codec's rate
    vad = VADProcessor(vad_analyzer=WebRTCVADAnalyzer(params=VADParams(stop_secs=0.3)), audio_idle_timeout=0)
    worker = PipelineWorker(Pipeline([transport.input(), probe, vad, stt, collector, transport.output()]),
                            params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
                            idle_timeout_secs=None, enable_rtvi=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(runner.run(), 40)


async def run_call(tmp_path, utterance, *, tls: bool, codecs: str, rate: int, channels: int, mediaenc=None,
                   spy=False):
    text, samples = utterance
    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=2)
    await engine.ready()
    utterances = UtteranceSpy(engine) if spy else None
    collector, probe, calls = Collector(), Collector(), []  # probe: the frames as the transport made them

    async def on_call(call):
        calls.append(call)
        await transcribe_call(call, NemotronSTTService(engine=engine, language=Language.EN_US), collector, probe)

    config = {}
    ca = None
    if tls:
        ca, cert, key = make_certificates(tmp_path / "tls")
        config = dict(tls_cert=str(cert), tls_key=str(key), tls_port=free_port(socket.SOCK_STREAM))
    server = await start_server(on_call, port=free_port(), **config)
    try:
        uri = (f"sip:bot@{HOST}:{server.wire.tls_address[1]};transport=tls" if tls else
               f"sip:bot@{HOST}:{server.port}")
        output = await baresip_call(tmp_path, uri, codecs=codecs, rate=rate, channels=channels, samples=samples,
                                    cafile=ca, mediaenc=mediaenc)
        await asyncio.sleep(0.5)
    finally:
        await server.stop()
    try:
        finals = collector.of(TranscriptionFrame)
        assert calls and finals, output[-3000:]
        expected = None
        if utterances is not None:
            fed = utterances.utterances[0]
            assert 3.0 < sum(map(len, fed)) / 16000 < 5.0, "the call's speech reached the engine at 16 kHz"
            expected = (await final_of(engine, np.concatenate(fed))).text
        return text, calls[0], server, finals, {f.sample_rate for f in probe.of(InputAudioRawFrame)}, expected
    finally:
        engine.close()


async def test_baresip_over_tls_with_srtp_is_transcribed(tmp_path, utterance):
    text, call, server, finals, rates, _ = await run_call(tmp_path, utterance, tls=True, codecs="pcmu", rate=8000,
                                                          channels=1, mediaenc="srtp-mand")
    assert call.negotiated.srtp and call.rtp.srtp  # RTP/SAVP with AES_CM_128_HMAC_SHA1_80 keys both ways
    assert call.negotiated.remote_crypto.suite == "AES_CM_128_HMAC_SHA1_80"
    assert call.rtp.stats.packets_in > 200 and call.rtp.stats.srtp_dropped == 0 and call.rtp.stats.packets_out > 200
    assert call.outcome == "caller hung up" and server.wire.tls_failures == 0
    assert normalise(finals[0].text) == normalise(text) and finals[0].language == Language.EN_US


@pytest.mark.parametrize("codecs, rate, channels, name", [
    ("G722/16000/1,pcmu", 16000, 1, "G722"),
    ("opus/48000/2,pcmu", 48000, 2, "OPUS"),
])
async def test_wideband_call_is_transcribed_like_the_engine(tmp_path, utterance, codecs, rate, channels, name):
    """The caller's first choice wins over G.711; the audio reaches the STT at the codec's rate (16 kHz G.722,
    48 kHz Opus), never narrowed to 8 kHz, and the final equals the engine's own on what the service fed it."""
    text, call, _, finals, rates, expected = await run_call(tmp_path, utterance, tls=False, codecs=codecs, rate=rate,
                                                            channels=channels, spy=True)
    assert call.negotiated.codec == name and not call.negotiated.srtp
    assert rates == {rate} and call.rtp.stats.undecodable == 0
    assert len(finals) == 1 and finals[0].text == expected and expected
    assert normalise(finals[0].text) == normalise(text)

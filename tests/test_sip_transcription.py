"""A real SIP phone (baresip) calls the bot and is transcribed through the whole path:
SIP/RTP/G.711 -> VAD -> NemotronSTTService -> engine. The final text equals the engine's own on
the audio the service handed it (the G.711-decoded call resampled to 16 kHz)."""

import asyncio
import shutil

import numpy as np
import pytest
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import TranscriptionFrame
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
from engine_support import final_of
from test_sip_peers import HOST, Collector, network, start_server, write_baresip_config, write_wav  # noqa: F401
from tiny import speechlike

pytestmark = pytest.mark.skipif(shutil.which("baresip") is None,
                                reason="baresip is not installed: run scripts/setup-system.sh (CI does)")


class UtteranceSpy:
    """Records the 16 kHz audio the service feeds its engine stream, split at each finalize."""

    def __init__(self, engine):
        self.utterances = [[]]
        original = engine.open_stream

        def open_stream(**kwargs):
            stream = original(**kwargs)
            feed, finalize = stream.feed, stream.finalize

            def spy_feed(audio):
                self.utterances[-1].append(np.frombuffer(bytes(audio), dtype="<i2").copy())
                feed(audio)

            def spy_finalize():
                self.utterances.append([])
                finalize()

            stream.feed, stream.finalize = spy_feed, spy_finalize
            return stream

        engine.open_stream = open_stream


async def baresip_call(tmp_path, server_port, caller_audio, seconds=5):
    write_wav(tmp_path / "caller.wav", caller_audio)
    config_dir, _ = write_baresip_config(tmp_path, codecs="pcmu")
    proc = await asyncio.create_subprocess_exec(
        "baresip", "-f", str(config_dir), "-e", f"/dial sip:bot@{HOST}:{server_port}", "-t", str(seconds),
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), seconds + 10)
    return output.decode(errors="replace")


async def transcribe_call(call, stt, collector):
    transport = SIPCallTransport(call=call)
    vad = VADProcessor(vad_analyzer=WebRTCVADAnalyzer(params=VADParams(stop_secs=0.3)), audio_idle_timeout=0)
    worker = PipelineWorker(Pipeline([transport.input(), vad, stt, collector, transport.output()]),
                            params=PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000),
                            idle_timeout_secs=None, enable_rtvi=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(runner.run(), 30)


async def engine_tokens(engine, pieces):
    return await final_of(engine, np.concatenate(pieces), language="en-US")


async def test_baresip_call_is_transcribed_like_the_engine(tmp_path, network, tiny_model):
    speech = resample_poly(speechlike(1.6, seed=61), 1, 2)
    caller_audio = (np.concatenate([np.zeros(4000), speech, np.zeros(12000)]) * 32767).astype("<i2")
    engine = Engine(model=tiny_model, chunk_ms=160, device="cpu", max_streams=2)
    await engine.ready()
    spy = UtteranceSpy(engine)
    collector = Collector()

    async def on_call(call):
        await transcribe_call(call, NemotronSTTService(engine=engine, language=Language.EN_US), collector)

    server = await start_server(on_call)
    try:
        output = await baresip_call(tmp_path, server.port, caller_audio)
        await asyncio.sleep(0.5)
    finally:
        await server.stop()
    finals = collector.of(TranscriptionFrame)
    assert len(finals) == 1, output[-2000:]
    assert finals[0].finalized and finals[0].language == Language.EN_US
    fed = spy.utterances[0]
    assert 1.4 < sum(map(len, fed)) / 16000 < 2.6, "the call's speech reached the engine at 16 kHz"
    expected = await engine_tokens(engine, fed)
    assert finals[0].text == expected.text and expected.text
    engine.close()


async def test_baresip_call_with_the_demo_model_gets_the_words_and_language(tmp_path, network):
    import json
    from pathlib import Path

    from pipecat_nemotron.wav import read_wav
    from test_demo_model import normalise

    heldout = Path(__file__).parent / "data" / "demo_heldout"
    row = next(json.loads(line) for line in (heldout / "manifest.jsonl").read_text().splitlines()
               if json.loads(line)["file"] == "en-US_00001.wav")
    wav = read_wav(heldout / row["file"])
    caller_audio = np.concatenate([np.zeros(2400, dtype=np.int16), wav.samples, np.zeros(8000, dtype=np.int16)])
    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=2)
    await engine.ready()
    collector = Collector()

    async def on_call(call):
        await transcribe_call(call, NemotronSTTService(engine=engine), collector)  # auto-detect

    server = await start_server(on_call)
    try:
        output = await baresip_call(tmp_path, server.port, caller_audio.astype("<i2"), seconds=6)
        await asyncio.sleep(0.5)
    finally:
        await server.stop()
        engine.close()
    finals = collector.of(TranscriptionFrame)
    assert finals, output[-2000:]
    assert normalise(finals[0].text) == normalise(row["text"])
    assert finals[0].language == Language.EN_US

"""The Riva-compatible server (`pipecat_nemotron.apps.riva`) with the clients that already speak the Riva API:
`riva.client` and Pipecat's own `NvidiaSTTService`, on the demo model."""

import asyncio
import json
import re
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
import riva.client
from riva.client.proto import riva_asr_pb2, riva_asr_pb2_grpc

from pipecat_nemotron.apps.riva.server import start_riva_server
from pipecat_nemotron.engine import Engine

HELDOUT = Path(__file__).resolve().parent / "data" / "demo_heldout"
ROWS = {json.loads(line)["file"]: json.loads(line) for line in (HELDOUT / "manifest.jsonl").read_text().splitlines()}


def words(text: str) -> list[str]:
    return re.sub(r"[¿?¡!.,;:]|<[a-z]{2}-[A-Z]{2}>", " ", text).lower().split()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def demo_engine_fixture(max_streams: int):
    """A module-scoped demo-model engine with `max_streams` slots that admits however far behind (test feeds)."""
    @pytest.fixture(scope="module")
    def demo_engine():
        engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=max_streams, max_admission_lag_s=None)
        engine.wait_ready()
        yield engine
        engine.close()
    return demo_engine


demo_engine = demo_engine_fixture(3)


@pytest.fixture
async def riva_server(demo_engine):
    server, port, servicer = await start_riva_server(engine=demo_engine, port=0)
    yield f"127.0.0.1:{port}", servicer
    await server.stop(grace=None)


def stream_file(address: str, path: Path, *, language: str = "", interim: bool = False) -> list:
    """What riva.client's file scripts do: encoding/rate 0, the RIFF header in the first chunk, half-close."""
    service = riva.client.ASRService(riva.client.Auth(uri=address))
    config = riva.client.StreamingRecognitionConfig(
        config=riva.client.RecognitionConfig(language_code=language, max_alternatives=1,
                                             enable_automatic_punctuation=True),
        interim_results=interim)
    with riva.client.AudioChunkFileIterator(str(path), 1600) as chunks:
        return list(service.streaming_response_generator(audio_chunks=chunks, streaming_config=config))


async def test_riva_client_streams_a_wav_file_and_gets_the_words_and_the_language(riva_server):
    address, _ = riva_server
    for name in ("en-US_00001.wav", "es-ES_00000.wav", "de-DE_00002.wav"):
        responses = await asyncio.to_thread(stream_file, address, HELDOUT / name)
        finals = [r.alternatives[0] for response in responses for r in response.results if r.is_final]
        assert finals, name
        assert words(" ".join(f.transcript for f in finals)) == words(ROWS[name]["text"]), (name, finals)
        assert list(finals[-1].language_code) == [ROWS[name]["lang"]]


async def test_bad_requests_get_the_right_status_and_the_server_goes_on(riva_server):
    address, _ = riva_server

    def call(requests):
        with grpc.insecure_channel(address) as channel:
            stub = riva_asr_pb2_grpc.RivaSpeechRecognitionStub(channel)
            try:
                list(stub.StreamingRecognize(iter(requests)))
            except grpc.RpcError as error:
                return error.code(), error.details()
            return grpc.StatusCode.OK, ""

    def config(**fields):
        return riva_asr_pb2.StreamingRecognizeRequest(streaming_config=riva_asr_pb2.StreamingRecognitionConfig(
            config=riva_asr_pb2.RecognitionConfig(**fields)))

    audio = riva_asr_pb2.StreamingRecognizeRequest(audio_content=b"\x00\x01" * 800)
    cases = [
        ([audio], grpc.StatusCode.INVALID_ARGUMENT, "first message"),
        ([config(encoding=4, sample_rate_hertz=16000), audio], grpc.StatusCode.INVALID_ARGUMENT, "LINEAR_PCM"),
        ([config(encoding=1, sample_rate_hertz=3), audio], grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        ([config(encoding=1, sample_rate_hertz=16000, language_code="xx-XX"), audio],
         grpc.StatusCode.INVALID_ARGUMENT, "en-US"),
        ([config(encoding=1, sample_rate_hertz=16000), audio, config(encoding=1, sample_rate_hertz=16000)],
         grpc.StatusCode.INVALID_ARGUMENT, "only come first"),
        ([config(encoding=1, sample_rate_hertz=16000),
          riva_asr_pb2.StreamingRecognizeRequest(audio_content=b"\x00" * (5 * 1024 * 1024))],
         grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ([], grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ]
    for requests, code, text in cases:
        got, details = await asyncio.to_thread(call, requests)
        assert got == code and text in details, (code, got, details)
    responses = await asyncio.to_thread(stream_file, address, HELDOUT / "en-US_00001.wav")  # still serving
    assert any(r.is_final for response in responses for r in response.results)


def heldout_16k(name: str, *, silence_s: float = 1.0) -> np.ndarray:
    from scipy.signal import resample_poly

    from pipecat_nemotron.wav import read_wav
    wav = read_wav(HELDOUT / name)
    audio = resample_poly(wav.samples.astype(np.float32), 16000, wav.sample_rate)
    audio = np.concatenate([np.zeros(3200), audio, np.zeros(int(silence_s * 16000))])
    return np.clip(audio, -32768, 32767).astype(np.int16)


async def test_pipecats_own_nvidia_stt_service_transcribes_through_this_server(riva_server):
    """Pipecat's NvidiaSTTService, pointed at a self-hosted server as its docs say, unchanged: the server finds the
    end of each utterance itself (the service never says) and sends interim and final results."""
    from pipecat.frames.frames import InputAudioRawFrame, InterimTranscriptionFrame, TranscriptionFrame
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.services.nvidia.stt import NvidiaSTTService
    from pipecat.tests.utils import SleepFrame, run_test
    from pipecat.transcriptions.language import Language

    address, servicer = riva_server
    name = "es-ES_00000.wav"
    pcm = heldout_16k(name)
    frames = [InputAudioRawFrame(audio=pcm[i:i + 320].tobytes(), sample_rate=16000, num_channels=1)
              for i in range(0, len(pcm), 320)]
    stt = NvidiaSTTService(server=address, use_ssl=False, model_function_map={"function_id": "", "model_name": "demo"},
                           settings=NvidiaSTTService.Settings(language=Language.ES_ES))
    opened = servicer.streams_opened
    down, _ = await run_test(stt, frames_to_send=[*frames, SleepFrame(sleep=3.0)],
                             pipeline_params=PipelineParams(audio_in_sample_rate=16000))
    finals = [f for f in down if isinstance(f, TranscriptionFrame)]
    assert finals and words(" ".join(f.text for f in finals)) == words(ROWS[name]["text"]), finals
    assert any(isinstance(f, InterimTranscriptionFrame) for f in down)
    assert servicer.streams_opened > opened


async def test_concurrent_streams_share_engine_steps_and_one_beyond_capacity_is_refused_at_once(riva_server,
                                                                                               demo_engine):
    address, _ = riva_server
    names = ["en-US_00001.wav", "es-ES_00000.wav", "de-DE_00002.wav"]  # the engine has 3 slots
    deadline = asyncio.get_running_loop().time() + 20
    while demo_engine.open_streams and asyncio.get_running_loop().time() < deadline:  # earlier tests' clients
        await asyncio.sleep(0.05)
    before = len(demo_engine.stats.batch_sizes)

    def held_open(stub_holder):
        """A stream that sends its config and one chunk, then waits: it holds a slot."""
        import threading
        gate = threading.Event()
        stub_holder.append(gate)

        def requests():
            yield riva_asr_pb2.StreamingRecognizeRequest(streaming_config=riva_asr_pb2.StreamingRecognitionConfig(
                config=riva_asr_pb2.RecognitionConfig(encoding=1, sample_rate_hertz=16000)))
            yield riva_asr_pb2.StreamingRecognizeRequest(audio_content=b"\x00\x00" * 1600)
            gate.wait(30)

        with grpc.insecure_channel(address) as channel:
            list(riva_asr_pb2_grpc.RivaSpeechRecognitionStub(channel).StreamingRecognize(requests()))

    results = await asyncio.gather(*(asyncio.to_thread(stream_file, address, HELDOUT / n) for n in names))
    for name, responses in zip(names, results):
        finals = [r.alternatives[0].transcript for response in responses for r in response.results if r.is_final]
        assert words(" ".join(finals)) == words(ROWS[name]["text"]), name
    assert max(list(demo_engine.stats.batch_sizes)[before:]) > 1, "concurrent streams should share steps"

    gates = []
    holders = [asyncio.ensure_future(asyncio.to_thread(held_open, gates)) for _ in range(3)]
    deadline = asyncio.get_running_loop().time() + 20
    while demo_engine.open_streams < 3 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert demo_engine.open_streams == 3
    try:
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(stream_file, address, HELDOUT / names[0])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for gate in gates:
            gate.set()
        await asyncio.gather(*holders, return_exceptions=True)
    deadline = asyncio.get_running_loop().time() + 10
    while demo_engine.open_streams and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert demo_engine.open_streams == 0, "every finished stream frees its slot"
    assert demo_engine.free_slots == 3


def test_serve_riva_command_serves_riva_client(tmp_path):
    """`pipecat-nemotron serve-riva` as a user runs it; riva.client's health check and a streamed file."""
    import subprocess
    import sys
    import time

    from riva.client.proto import health_pb2, health_pb2_grpc

    port = free_port()
    exe = Path(sys.executable).with_name("pipecat-nemotron")
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen([str(exe), "serve-riva", "--model", "demo", "--port", str(port), "--max-streams", "2"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    break
            except grpc.RpcError:
                time.sleep(0.5)
        log.seek(0)
        assert status == health_pb2.HealthCheckResponse.SERVING, log.read()[-3000:]
        responses = stream_file(f"127.0.0.1:{port}", HELDOUT / "de-DE_00002.wav")
        finals = [r.alternatives[0] for response in responses for r in response.results if r.is_final]
        assert words(" ".join(f.transcript for f in finals)) == words(ROWS["de-DE_00002.wav"]["text"])
        assert list(finals[-1].language_code) == ["de-DE"]
        service = riva.client.ASRService(riva.client.Auth(uri=f"127.0.0.1:{port}"))
        config = service.stub.GetRivaSpeechRecognitionConfig(riva_asr_pb2.RivaSpeechRecognitionConfigRequest())
        assert {c.parameters["language_code"] for c in config.model_config} == {"en-US", "es-ES", "de-DE"}
        assert all(c.parameters["type"] == "online" for c in config.model_config)
    finally:
        server.terminate()
        server.wait(30)


async def test_nemotron_stt_service_on_a_remote_server_gives_the_in_process_text(riva_server, demo_engine):
    """NemotronSTTService(server=...) keeps its VAD-driven finalize over the network: the same frames give the same
    finals (text and language) as the service with the engine in process."""
    from pipecat.frames.frames import (InputAudioRawFrame, TranscriptionFrame, VADUserStartedSpeakingFrame,
                                       VADUserStoppedSpeakingFrame)
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.tests.utils import SleepFrame, run_test

    from pipecat_nemotron.stt import NemotronSTTService

    address, servicer = riva_server
    frames = []
    for name in ("en-US_00001.wav", "es-ES_00000.wav"):
        pcm = heldout_16k(name, silence_s=0.2)
        frames += [VADUserStartedSpeakingFrame(start_secs=0.2),
                   *[InputAudioRawFrame(audio=pcm[i:i + 320].tobytes(), sample_rate=16000, num_channels=1)
                     for i in range(0, len(pcm), 320)],
                   VADUserStoppedSpeakingFrame(stop_secs=0.2), SleepFrame(sleep=1.0)]
    finals = {}
    for where, stt in (("local", NemotronSTTService(engine=demo_engine)), ("remote", NemotronSTTService(server=address))):
        down, _ = await run_test(stt, frames_to_send=frames, pipeline_params=PipelineParams(audio_in_sample_rate=16000))
        finals[where] = [(f.text, f.language) for f in down if isinstance(f, TranscriptionFrame)]
    assert len(finals["local"]) == 2 and finals["remote"] == finals["local"], finals
    assert servicer.streams_opened >= 2


async def test_a_remote_server_that_is_down_gives_an_error_not_a_hang():
    from pipecat.frames.frames import (ErrorFrame, InputAudioRawFrame, TranscriptionFrame, VADUserStartedSpeakingFrame,
                                       VADUserStoppedSpeakingFrame)
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.tests.utils import SleepFrame, run_test

    from pipecat_nemotron.stt import NemotronSTTService

    stt = NemotronSTTService(server=f"127.0.0.1:{free_port()}")  # nothing listens there
    pcm = heldout_16k("en-US_00001.wav", silence_s=0.2)
    utterance = [VADUserStartedSpeakingFrame(start_secs=0.2),
                 *[InputAudioRawFrame(audio=pcm[i:i + 320].tobytes(), sample_rate=16000, num_channels=1)
                   for i in range(0, len(pcm), 320)],
                 VADUserStoppedSpeakingFrame(stop_secs=0.2), SleepFrame(sleep=1.0)]
    down, up = await asyncio.wait_for(run_test(stt, frames_to_send=utterance, expected_up_frames=None,
                                               pipeline_params=PipelineParams(audio_in_sample_rate=16000)), 60)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert errors and "UNAVAILABLE" in errors[0].error, up
    assert not [f for f in down if isinstance(f, TranscriptionFrame)]



def test_serve_riva_drains_on_sigterm_finalizing_live_streams_and_counts_them(tmp_path):
    """SIGTERM: new streams UNAVAILABLE and health NOT_SERVING at once; a stream still talking at the bound gets the
    final of what it said and ends OK; the process exits 0; /metrics counted it all."""
    import signal
    import subprocess
    import sys
    import threading
    import time
    import urllib.error
    import urllib.request

    from riva.client.proto import health_pb2, health_pb2_grpc

    port, metrics_port = free_port(), free_port()
    exe = Path(sys.executable).with_name("pipecat-nemotron")
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen([str(exe), "serve-riva", "--model", "demo", "--port", str(port), "--drain-timeout", "3",
                               "--metrics-port", str(metrics_port)], stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"

    def health():
        with grpc.insecure_channel(address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status

    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if health() == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                time.sleep(0.5)
        name = "es-ES_00000.wav"
        speech = heldout_16k(name, silence_s=0.0)
        held = {"finals": [], "error": None}
        sent = threading.Event()

        def talking():  # speech, then the line stays open (no half-close): only the server can end it
            def requests():
                yield riva_asr_pb2.StreamingRecognizeRequest(streaming_config=riva_asr_pb2.StreamingRecognitionConfig(
                    config=riva_asr_pb2.RecognitionConfig(encoding=1, sample_rate_hertz=16000)))
                for i in range(0, len(speech), 1600):
                    yield riva_asr_pb2.StreamingRecognizeRequest(audio_content=speech[i:i + 1600].tobytes())
                sent.set()
                time.sleep(60)
            try:
                with grpc.insecure_channel(address) as channel:
                    for response in riva_asr_pb2_grpc.RivaSpeechRecognitionStub(channel).StreamingRecognize(requests()):
                        held["finals"] += [r.alternatives[0].transcript for r in response.results if r.is_final]
            except grpc.RpcError as error:
                held["error"] = error.code()

        thread = threading.Thread(target=talking, daemon=True)
        thread.start()
        assert sent.wait(30)
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stream_file(address, HELDOUT / "en-US_00001.wav")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
        with pytest.raises(urllib.error.HTTPError) as healthz:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5)
        assert healthz.value.code == 503
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        thread.join(30)
        assert held["error"] is None and words(" ".join(held["finals"])) == words(ROWS[name]["text"]), held
        assert server.wait(30) == 0
        assert 'nemotron_calls_refused_total{reason="draining"} 1.0' in metrics
        assert "nemotron_calls_answered_total 1.0" in metrics  # the warm-up is not a call; health checks neither
        log.seek(0)
        assert "start-up objects frozen" in log.read()  # full collections skip the model's heap
    finally:
        if server.poll() is None:
            server.kill()
        log.seek(0)
        print(log.read()[-3000:])


async def test_tls_streams_to_a_client_that_trusts_the_certificate(demo_engine, tmp_path):
    import subprocess

    from pipecat_nemotron.apps.riva.server import read_tls

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server, port, _ = await start_riva_server(engine=demo_engine, host="localhost", port=0,
                                              tls=read_tls(str(cert), str(key)))
    try:
        def stream(ssl: bool):
            auth = riva.client.Auth(ssl_root_cert=str(cert) if ssl else None, use_ssl=ssl, uri=f"localhost:{port}")
            service = riva.client.ASRService(auth)
            config = riva.client.StreamingRecognitionConfig(config=riva.client.RecognitionConfig(max_alternatives=1))
            with riva.client.AudioChunkFileIterator(str(HELDOUT / "en-US_00001.wav"), 1600) as chunks:
                return list(service.streaming_response_generator(audio_chunks=chunks, streaming_config=config))
        responses = await asyncio.to_thread(stream, True)
        finals = [r.alternatives[0].transcript for response in responses for r in response.results if r.is_final]
        assert words(" ".join(finals)) == words(ROWS["en-US_00001.wav"]["text"])
        with pytest.raises(grpc.RpcError):  # plaintext to a TLS port
            await asyncio.wait_for(asyncio.to_thread(stream, False), 30)
    finally:
        await server.stop(grace=None)
    with pytest.raises(ValueError, match="both"):
        read_tls(str(cert), None)


async def test_streams_from_several_client_processes_share_engine_steps(riva_server, demo_engine):
    import subprocess
    import sys

    address, _ = riva_server
    deadline = asyncio.get_running_loop().time() + 20
    while demo_engine.open_streams and asyncio.get_running_loop().time() < deadline:  # earlier tests' clients
        await asyncio.sleep(0.05)
    before = len(demo_engine.stats.batch_sizes)
    script = ("import sys, riva.client\n"
              "service = riva.client.ASRService(riva.client.Auth(uri=sys.argv[1]))\n"
              "config = riva.client.StreamingRecognitionConfig(config=riva.client.RecognitionConfig())\n"
              "with riva.client.AudioChunkFileIterator(sys.argv[2], 800, delay_callback=riva.client.sleep_audio_length)"
              " as chunks:\n"
              "    for response in service.streaming_response_generator(audio_chunks=chunks, streaming_config=config):\n"
              "        for result in response.results:\n"
              "            if result.is_final: print(result.alternatives[0].transcript, flush=True)\n")
    names = ["en-US_00001.wav", "es-ES_00000.wav", "de-DE_00002.wav"]
    clients = [await asyncio.create_subprocess_exec(sys.executable, "-c", script, address, str(HELDOUT / name),
                                                    stdout=asyncio.subprocess.PIPE) for name in names]
    outputs = [(await client.communicate())[0].decode() for client in clients]
    for name, output, client in zip(names, outputs, clients):
        assert client.returncode == 0 and words(output) == words(ROWS[name]["text"]), (name, output)
    assert max(list(demo_engine.stats.batch_sizes)[before:]) > 1, "three processes' streams should share steps"

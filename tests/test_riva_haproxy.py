"""Riva streams from ONE client process balanced over three serve-riva nodes by HAProxy (deploy/haproxy/haproxy.cfg,
as shipped): `mode http` with HTTP/2 spreads the streams of one shared gRPC connection over the nodes, `mode tcp`
(the negative control) puts them all on one; a stopped node leaves the rotation; long streams pass the proxy."""

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from riva.client.proto import riva_asr_pb2, riva_asr_pb2_grpc

from pipecat_nemotron.apps.riva.server import start_riva_server
from test_riva_server import ROWS, demo_engine_fixture, free_port, heldout_16k, words

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"
pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is installed by scripts/setup-system.sh")


demo_engine = demo_engine_fixture(12)


@pytest.fixture
async def nodes(demo_engine):
    started = [await start_riva_server(engine=demo_engine, port=0) for _ in range(3)]
    yield started
    for server, _, _ in started:
        await server.stop(grace=None)


async def proxy(nodes, tmp_path, *, mode: str):
    """HAProxy on the shipped config (or its `mode tcp` control) in front of the nodes; returns (process, address)."""
    text = CONFIG.read_text()
    if mode == "tcp":
        text = text.replace("mode http", "mode tcp").replace(" proto h2", "")
    config = tmp_path / f"haproxy-{mode}.cfg"
    config.write_text(text)
    frontend = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RIVA_FRONTEND": frontend,
           **{f"RIVA_NODE{i + 1}": f"127.0.0.1:{port}" for i, (_, port, _) in enumerate(nodes)}}
    process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    await asyncio.sleep(2.5)  # listening, and the health checks' `rise 2` at 1 s intervals
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    return process, frontend


async def recognize(stub, pcm: np.ndarray) -> list[str]:
    """One stream: config, the audio in 100 ms messages, half-close; the final transcripts."""
    async def requests():
        yield riva_asr_pb2.StreamingRecognizeRequest(streaming_config=riva_asr_pb2.StreamingRecognitionConfig(
            config=riva_asr_pb2.RecognitionConfig(encoding=1, sample_rate_hertz=16000)))
        for i in range(0, len(pcm), 1600):
            yield riva_asr_pb2.StreamingRecognizeRequest(audio_content=pcm[i:i + 1600].tobytes())
    finals = []
    async for response in stub.StreamingRecognize(requests()):
        finals += [r.alternatives[0].transcript for r in response.results if r.is_final]
    return finals


def opened(nodes) -> list[int]:
    return [servicer.streams_opened for _, _, servicer in nodes]


@pytest.mark.parametrize("mode", ["http", "tcp"])
async def test_streams_of_one_client_process_spread_over_the_nodes_only_in_http2_mode(nodes, tmp_path, mode):
    process, frontend = await proxy(nodes, tmp_path, mode=mode)
    name = "en-US_00001.wav"
    try:
        before = opened(nodes)
        async with grpc.aio.insecure_channel(frontend) as channel:  # ONE connection for all streams
            stub = riva_asr_pb2_grpc.RivaSpeechRecognitionStub(channel)
            results = await asyncio.gather(*(recognize(stub, heldout_16k(name)) for _ in range(6)))
        assert all(words(" ".join(r)) == words(ROWS[name]["text"]) for r in results)
        per_node = [after - b for after, b in zip(opened(nodes), before)]
        assert sum(per_node) == 6
        if mode == "http":
            assert sum(1 for n in per_node if n) >= 2, per_node
        else:
            assert sorted(per_node) == [0, 0, 6], per_node
    finally:
        process.terminate()
        process.wait(10)


async def test_a_stopped_node_leaves_the_rotation_and_long_streams_pass(nodes, tmp_path):
    process, frontend = await proxy(nodes, tmp_path, mode="http")
    try:
        await nodes[0][0].stop(grace=None)
        await asyncio.sleep(3.0)  # `fall 2` at 1 s
        before = opened(nodes)
        name = "de-DE_00002.wav"
        async with grpc.aio.insecure_channel(frontend) as channel:
            stub = riva_asr_pb2_grpc.RivaSpeechRecognitionStub(channel)
            results = await asyncio.gather(*(recognize(stub, heldout_16k(name)) for _ in range(4)))
            # 90 s of silence between two utterances: 3 MB of audio in one stream
            long = np.concatenate([heldout_16k(name), np.zeros(90 * 16000, np.int16), heldout_16k(name)])
            long_finals = await recognize(stub, long)
        assert all(words(" ".join(r)) == words(ROWS[name]["text"]) for r in results)
        per_node = [after - b for after, b in zip(opened(nodes), before)]
        assert per_node[0] == 0 and sum(per_node) == 5, per_node
        assert words(" ".join(long_finals)) == words(ROWS[name]["text"]) * 2
    finally:
        process.terminate()
        process.wait(10)

"""`pipecat-nemotron transcribe` end to end on a tiny .nemo (the demo model gets its own tests)."""

import json
import sys

import numpy as np
import pytest
from loguru import logger
from scipy.signal import resample_poly
from typer.testing import CliRunner

from pipecat_nemotron.apps.cli import app
from pipecat_nemotron.wav import write_wav
from tiny import speechlike


@pytest.fixture(autouse=True)
def loguru_back_on_stderr():
    """The CLI points loguru at the sys.stderr of the moment, which CliRunner closes after the run: point it back,
    or every later log line (aiortc's threads, other tests) fails with 'I/O operation on closed file'."""
    yield
    logger.remove()
    logger.add(sys.stderr)


@pytest.fixture(scope="module")
def tiny_nemo(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("nemo") / "tiny.nemo"
    tiny_model.save_to(str(path))
    return path


@pytest.fixture
def mulaw_call(tmp_path):
    audio = np.concatenate([np.zeros(8000), speechlike(1.5, seed=1), np.zeros(12000), speechlike(1.2, seed=2)])
    path = tmp_path / "call.wav"
    write_wav(path, (resample_poly(audio, 1, 2) * 32767).astype(np.int16), 8000, encoding="mulaw")
    return path


def test_transcribe_json_lines(tiny_nemo, mulaw_call):
    result = CliRunner().invoke(app, ["transcribe", str(mulaw_call), "--model", str(tiny_nemo), "--fast", "--json",
                                      "--language", "en-US"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2, result.output
    assert all(line["language"] == "en-US" and line["text"] for line in lines)
    assert lines[0]["start_s"] == 0 and lines[0]["end_s"] <= lines[1]["start_s"] < lines[1]["end_s"] <= 4.2 + 0.6


def test_unloadable_model_points_to_demo(mulaw_call, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["transcribe", str(mulaw_call), "--fast"])
    assert result.exit_code == 2
    assert "--model demo" in result.output


def test_bad_wav_is_reported(tmp_path, tiny_nemo):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"\x00" * 100)
    result = CliRunner().invoke(app, ["transcribe", str(junk), "--model", str(tiny_nemo)])
    assert result.exit_code == 2 and "cannot decode as audio" in result.output and "accepted: WAV" in result.output

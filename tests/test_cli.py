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


# ---- options: listed with defaults, checked before any model load ------------------------------------------------
COMMANDS = ["transcribe", "serve-sip", "serve-webrtc", "serve-riva", "languages"]


def flat(output: str) -> str:
    """Rich's boxed, wrapped output as one line of words."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def _command(name):
    import typer.main

    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_lists_its_options_with_defaults(name):
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for param in _command(name).params:
        if param.param_type_name == "option":
            assert param.opts[0] in result.output, (name, param.opts)
    if name != "languages":
        assert "[default: 160]" in result.output and "[default: auto]" in result.output
    if name == "serve-sip":
        assert "[default: 5060]" in result.output and "--max-calls" in result.output
        assert "loopback and private networks only" in flat(result.output) and "--help-sip" not in result.output


def test_serve_sip_options_match_phone_argparse_defaults():
    """serve-sip's typer options build phone.main's argv; their defaults must be phone.parse_args' defaults."""
    from pipecat_nemotron.apps import phone

    expected = vars(phone.parse_args([]))
    typer_defaults = {p.name: p.default for p in _command("serve-sip").params}
    assert set(typer_defaults) == set(expected)
    for name, value in expected.items():
        assert typer_defaults[name] == value or (value == [] and not typer_defaults[name]), name


def test_serve_sip_builds_phone_args(monkeypatch, tmp_path):
    from pipecat_nemotron.apps import phone

    seen = []
    monkeypatch.setattr(phone, "main", lambda argv: seen.append(phone.parse_args(argv)))
    greeting = tmp_path / "hello.wav"
    write_wav(greeting, np.zeros(800, np.int16), 8000)
    result = CliRunner().invoke(app, ["serve-sip", "--model", "demo", "--port", "5070", "--allow", "10.0.0.0/8",
                                      "--allow", "192.0.2.7", "--max-calls", "3", "--language", "de",
                                      "--greeting", str(greeting), "--chunk-ms", "320", "--threads", "2",
                                      "--precision", "int8"])
    assert result.exit_code == 0, result.output
    args = seen[0]
    assert (args.port, args.allow, args.max_calls, args.language, args.chunk_ms, args.threads, args.precision) == \
        (5070, ["10.0.0.0/8", "192.0.2.7"], 3, "de-DE", 320, 2, "int8")
    assert args.greeting == str(greeting) and args.host == "0.0.0.0" and args.advertise is None


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load, engine, SIP server or WebRTC server start fails the test loudly."""
    from pipecat_nemotron.apps import phone, webrtc_server
    from pipecat_nemotron.engine import loader, scheduler

    def explode(*args, **kwargs):
        raise AssertionError("the model was loaded (or a server started) before the options were checked")

    monkeypatch.setattr(loader, "load_model", explode)
    monkeypatch.setattr(scheduler.Engine, "shared", explode)
    monkeypatch.setattr(phone, "main", explode)
    monkeypatch.setattr(webrtc_server, "run_webrtc_server", explode)


BAD_OPTIONS = [
    (["transcribe", "--chunk-ms", "100"], "80, 160, 320, 560, 1120"),
    (["transcribe", "--model", "demo", "--language", "fr-FR"], "demo has no prompt for it; it knows de-DE, en-US"),
    (["transcribe", "--model", "demo", "--language", "english!"], "is not a locale"),
    (["transcribe", "--language", "sw-KE"], "is not a nemotron-3.5-asr-streaming locale"),
    (["transcribe", "--device", "gpu"], "auto, cpu, cuda or cuda:N"),
    (["transcribe", "--model", "/no/such/model.nemo"], "no such .nemo file"),
    (["serve-sip", "--model", "demo", "--language", "fr-FR"], "demo has no prompt for it"),
    (["serve-sip", "--chunk-ms", "200"], "80, 160, 320, 560, 1120"),
    (["serve-sip", "--allow", "everyone"], "not an IP address or network"),
    (["serve-webrtc", "--model", "demo", "--language", "ja-JP"], "demo has no prompt for it"),
    (["serve-webrtc", "--model", "demo", "--host", "0.0.0.0"], "--allow-remote"),
    (["serve-webrtc", "--device", "tpu"], "auto, cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_fail_before_the_model_loads(argv, message, mulaw_call, no_model_load):
    if argv[0] == "transcribe":
        argv = argv + [str(mulaw_call)]
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in flat(result.output), result.output


def test_a_bad_option_never_imports_nemo(mulaw_call):
    """In a fresh interpreter: the demo model's languages come from its .nemo's config, not from NeMo."""
    import subprocess

    probe = ("import sys; from typer.testing import CliRunner; from pipecat_nemotron.apps.cli import app; "
             "r = CliRunner().invoke(app, ['transcribe', '--model', 'demo', '--language', 'fr-FR', sys.argv[1]]); "
             "print(r.exit_code, 'nemo' in sys.modules, 'no prompt for it' in r.output)")
    result = subprocess.run([sys.executable, "-c", probe, str(mulaw_call)], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.split() == ["2", "False", "True"], result.stdout + result.stderr


def test_options_agree_with_the_engine():
    from pipecat_nemotron.apps import cli, options
    from pipecat_nemotron.engine import CHUNK_MS_TO_RIGHT_CONTEXT, DEFAULT_MODEL

    assert options.CHUNK_SIZES_MS == tuple(CHUNK_MS_TO_RIGHT_CONTEXT)
    assert cli.DEFAULT_MODEL == DEFAULT_MODEL
    assert options.model_languages("demo") == {"en-US", "es-ES", "de-DE", "auto"}
    assert options.model_languages(DEFAULT_MODEL) is None  # a Hugging Face id: known only once loaded
    assert options.normalize_locale("de_de") == "de-DE" and options.normalize_locale("es") == "es-ES"
    assert options.normalize_locale("AUTO") == "auto"


def test_model_languages_of_any_local_nemo(tiny_nemo):
    from pipecat_nemotron.apps.options import check_language, model_languages

    known = model_languages(str(tiny_nemo))
    assert known and "en-US" in known
    assert check_language("en-US", str(tiny_nemo)) == "en-US"


def test_serve_webrtc_hands_its_threads_to_the_engine(monkeypatch):
    from pipecat_nemotron.apps import webrtc_server

    seen = {}
    monkeypatch.setattr(webrtc_server, "run_webrtc_server", lambda **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(app, ["serve-webrtc", "--model", "demo", "--threads", "1", "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert seen["threads"] == 1 and seen["model"] == "demo" and seen["precision"] == "int8"
    server = webrtc_server.WebRTCServer(model="demo", threads=1, precision="int8")
    assert server.threads == 1 and server.precision == "int8"
    result = CliRunner().invoke(app, ["serve-riva", "--model", "demo", "--precision", "fp16"])
    assert result.exit_code == 2 and "--precision must be fp32 or int8" in flat(result.output)


def test_transcribe_into_a_closed_pipe_ends_at_once(mulaw_call, tmp_path):
    """`transcribe … | head -1`: once the reader has gone the command ends cleanly, instead of stalling its pipeline."""
    import subprocess
    from pathlib import Path

    exe = Path(sys.executable).with_name("pipecat-nemotron")
    files = " ".join([str(mulaw_call)] * 6)
    result = subprocess.run(f"'{exe}' transcribe --model demo --fast --json {files} | head -1", shell=True,
                            capture_output=True, text=True, timeout=100, executable="/bin/bash")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("{")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr

"""`pipecat-nemotron call` end to end, in a loopback-only network namespace: it dials a baresip that auto-answers
and plays held-out speech, prints the callee's words as a JSON line (demo model) and exits 0, over UDP and over TLS
with SRTP (``sips:``, the callee's certificate verified against ``--tls-ca``); a busy callee (sipp, 486) makes it
exit 3 with the outcome on stderr."""

import asyncio
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipecat_nemotron.apps.dial import EXIT_CODES
from sip_support import HOST, loopback_namespace
from test_sip_outbound import HELDOUT, Sipp, heldout_row, write_callee_config

needs = pytest.mark.skipif(shutil.which("baresip") is None or shutil.which("sipp") is None,
                           reason="baresip/sipp missing: run scripts/setup-system.sh")


@pytest.fixture(scope="module", autouse=True)
def network():
    with loopback_namespace() as where:
        yield where


async def run_cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipecat_nemotron.apps.cli", "call", *args, "--host", HOST, "--device", "cpu",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@needs
@pytest.mark.parametrize("secure", [False, True], ids=["udp", "tls-srtp"])
async def test_call_transcribes_the_callee_and_exits_0(tmp_path, secure):
    from pipecat_nemotron.wav import read_wav
    from test_demo_model import normalise
    from test_sip_peers import write_wav
    from tls_support import make_certificates

    row = heldout_row("en-US_00001.wav")
    wav = read_wav(HELDOUT / row["file"])
    # 0.5 s + the utterance + 10 s of silence: longer than --max-call-secs 9, so our hang-up always comes first (a 5 s
    # tail ended the file at ~9.04 s, racing the 9 s bound: baresip's own hang-up won once)
    write_wav(tmp_path / "callee.wav", np.concatenate([np.zeros(4000, dtype=np.int16), wav.samples,
                                                       np.zeros(80000, dtype=np.int16)]).astype("<i2"))
    config_dir, sip_port = write_callee_config(tmp_path, tmp_path / "callee.wav")
    target, extra = f"sip:callee@{HOST}:{sip_port}", []
    if secure:  # baresip listens for TLS on its SIP port + 1 and, with srtp-mand, takes RTP/SAVP only
        ca, cert, key = make_certificates(tmp_path / "pki")
        (tmp_path / "pki" / "both.pem").write_bytes(cert.read_bytes() + key.read_bytes())
        config = config_dir / "config"
        config.write_text(config.read_text() + f"sip_certificate {tmp_path / 'pki' / 'both.pem'}\nmodule srtp.so\n")
        accounts = config_dir / "accounts"
        accounts.write_text(accounts.read_text().rstrip("\n") + ";mediaenc=srtp-mand\n")
        target, extra = f"sips:callee@{HOST}:{sip_port + 1}", ["--tls-ca", str(ca)]
    baresip = await asyncio.create_subprocess_exec("baresip", "-f", str(config_dir), "-t", "40", cwd=tmp_path,
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await asyncio.sleep(0.5)  # baresip's listeners up
        code, out, err = await run_cli(target, "--model", "demo", "--max-call-secs", "9", *extra)
    finally:
        baresip.kill()
        await baresip.wait()
    assert code == 0, err[-3000:]
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines and normalise(lines[0]["text"]) == normalise(row["text"]), (out, err[-2000:])
    assert lines[0]["language"] == "en-US"
    assert "answered (200 " in err and "max call length" in err
    assert ("PCMU SRTP (0 dropped)" in err) == secure, err[-2000:]  # the call's log line: media encrypted or not


@needs
async def test_busy_callee_exits_3_with_the_outcome(tmp_path):
    callee = await Sipp("uas_final", tmp_path, status="486", reason="Busy Here").start()
    code, _, err = await run_cli(f"sip:callee@{HOST}:{callee.port}", "--model", "demo")
    status, log = await callee.finished()
    assert status == 0, log
    assert code == EXIT_CODES["busy"] == 3, err[-2000:]
    assert "busy (486 Busy Here)" in err


def test_call_lists_its_options_and_refuses_a_bad_uri_before_loading_a_model():
    from typer.testing import CliRunner

    from pipecat_nemotron.apps.cli import app

    result = CliRunner().invoke(app, ["call", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for option in ("--ring-timeout", "--greeting", "--proxy", "--from", "--password-env", "--max-call-secs"):
        assert option in result.output
    assert "[default: demo]" in result.output and "SIP_PASSWORD" in result.output
    assert "--tls-ca" in result.output and "--tls-no-verify" in result.output
    result = CliRunner().invoke(app, ["call", "sip:<alice>@example.com"])
    assert result.exit_code == 2

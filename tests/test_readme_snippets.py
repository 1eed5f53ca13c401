"""Every ```python and ```bash block of README.md and transports/sip/README.md runs as written, from the repository
root, with the bundled demo model where the block names it.

A block runs to completion (exit status 0), or, when it starts a server (`SERVERS`), until the server answers; then
it is stopped. A block preceded by `<!-- not run ... -->` is not run; the test pins how many there are.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ["README.md", "transports/sip/README.md"]
NOT_RUN = {"README.md": 1, "transports/sip/README.md": 0}  # README: the test-suite command (it would run this test)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>python|bash)\s*$")
# A block that serves until stopped, by what it contains -> how to tell it is up: ("log", text it prints) or
# ("http", port, path) answering below 500.
SERVERS = {
    "pipecat-nemotron serve-sip": ("log", "phone transcriber on sip:"),
    "pipecat-nemotron serve-webrtc": ("http", 7860, "/api/health"),
    "pipecat-nemotron serve-riva": ("log", "serve-riva: listening on"),
    "python examples/twilio_agent.py": ("http", 8765, "/twiml"),
    "python examples/bot.py": ("http", 7860, "/client/"),
    "SIPServer(": ("log", "SIP server listening"),
    "kamailio -DD": ("log", "dispatch: proxy ready"),  # deploy/kamailio/kamailio.cfg logs it once its workers run
}
pytestmark = pytest.mark.timeout(300)


@dataclass
class Snippet:
    doc: str
    line: int
    lang: str
    code: str
    run: bool

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.lang}"


def snippets(doc: str) -> list[Snippet]:
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, start = match["indent"], index
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index][len(indent):] if lines[index].startswith(indent) else lines[index].lstrip())
            index += 1
        previous = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        found.append(Snippet(doc, start + 1, match["lang"], "\n".join(body) + "\n",
                             run=not previous.startswith("<!-- not run")))
        index += 1
    return found


ALL = [snippet for doc in DOCS for snippet in snippets(doc)]


def test_the_docs_have_the_expected_blocks():
    for doc in DOCS:
        mine = [s for s in ALL if s.doc == doc]
        assert sum(not s.run for s in mine) == NOT_RUN[doc], [s.id for s in mine if not s.run]
    assert sum(s.doc == "README.md" for s in ALL) >= 8 and any(s.doc != "README.md" for s in ALL)


def _command(snippet: Snippet, workdir: Path) -> list[str]:
    if snippet.lang == "python":
        script = workdir / "snippet.py"
        script.write_text(snippet.code)
        return [sys.executable, str(script)]
    return ["bash", "-euo", "pipefail", "-c", snippet.code]


def _server_kind(snippet: Snippet):
    kinds = [check for marker, check in SERVERS.items() if marker in snippet.code]
    return kinds[0] if kinds else None


def _answers(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status < 500
    except urllib.error.HTTPError as error:
        return error.code < 500
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("snippet", [s for s in ALL if s.run], ids=lambda s: s.id)
def test_snippet_runs_as_written(snippet, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    for key in list(env):  # no real LLM/TTS calls from a snippet
        if key.startswith(("NEMOTRON_LLM_", "OPENAI_", "NEMOTRON_TTS_")):
            del env[key]
    log_path = tmp_path / "out.log"
    created_before = {p.name for p in ROOT.iterdir()}
    kind = _server_kind(snippet)
    if kind and kind[0] == "http":
        assert _port_free(kind[1]), f"port {kind[1]} is busy: the snippet cannot run as written"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(_command(snippet, tmp_path), cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if kind is None:
                status = process.wait(timeout=240)
                assert status == 0, f"{snippet.id} exited {status}:\n{log_path.read_text()[-4000:]}"
            else:
                deadline = time.monotonic() + 150
                while True:
                    output = log_path.read_text(errors="replace")
                    up = kind[1] in output if kind[0] == "log" else _answers(kind[1], kind[2])
                    if up:
                        break
                    assert process.poll() is None, f"{snippet.id} exited {process.returncode}:\n{output[-4000:]}"
                    assert time.monotonic() < deadline, f"{snippet.id} did not come up:\n{output[-4000:]}"
                    time.sleep(0.5)
                assert process.poll() is None
                output_before_stop = len(output)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(5)
            for name in {p.name for p in ROOT.iterdir()} - created_before:  # e.g. serve-sip's calls.jsonl
                if name.endswith((".jsonl",)):
                    (ROOT / name).unlink()
    output = log_path.read_text(errors="replace")
    if kind is not None:  # what a server printed while we stopped it (a script's KeyboardInterrupt) is not its fault
        output = output[:output_before_stop]
    assert "Traceback" not in output, output[-4000:]
    if "pipecat-nemotron transcribe" in snippet.code:  # the README's main command: the sample call's words
        assert "I want to cancel my order." in output and "es-ES" in output, output[-3000:]
    if "Engine.shared" in snippet.code:
        assert "en-US No, thank you. I need one hundred minutes." in output, output[-3000:]

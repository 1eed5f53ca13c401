"""`pipecat-nemotron serve-sip` / `serve-webrtc` as a real subprocess (the demo model) for the drain and metrics
tests: started on free ports with `--metrics-port`, its admin HTTP endpoints read, signals sent, its JSON lines
and log read back; plus a SIP OPTIONS probe like a Kamailio dispatcher's."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parent.parent
CLI = [sys.executable, "-m", "pipecat_nemotron.apps.cli"]
HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def free_sip_port() -> int:
    """A port free for both UDP and TCP (serve-sip listens on both)."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


class ServerProcess:
    """One server process; `start()` returns once /healthz answers 200."""

    def __init__(self, command: str, *args: str, tmp_path: Path, env: dict | None = None):
        self.metrics_port = free_port(socket.SOCK_STREAM)
        self.command = command
        self.args = [*args, "--metrics-port", str(self.metrics_port)]
        self.tmp_path = tmp_path
        self.log_path = tmp_path / f"{command}.log"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def launch(self) -> "ServerProcess":
        """Start the process without waiting for it."""
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([*CLI, self.command, *self.args], cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=self.env)
        return self

    def start(self) -> "ServerProcess":
        self.launch()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.command} exited {self.process.returncode}:\n{self.log()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.command} did not become healthy:\n{self.log()}")

    def get(self, path: str) -> tuple[int, str]:
        """(status, body) of GET http://127.0.0.1:METRICS_PORT/path."""
        return self._request(urllib.request.Request(f"http://{HOST}:{self.metrics_port}{path}"))

    def post(self, path: str) -> tuple[int, str]:
        return self._request(urllib.request.Request(f"http://{HOST}:{self.metrics_port}{path}", data=b"",
                                                    method="POST"))

    @staticmethod
    def _request(request) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def health(self) -> tuple[int, dict]:
        status, body = self.get("/healthz")
        return status, json.loads(body)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: {'name{labels}': value}."""
        return parse_metrics(self.get("/metrics")[1])

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    async def exited(self, timeout: float) -> int:
        """The exit status, awaited without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.process.poll() is None:
            if loop.time() > deadline:
                raise AssertionError(f"{self.command} still running after {timeout} s:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()


def parse_metrics(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def transcripts(path: Path) -> dict[str, list[str]]:
    """Final texts by call id from a serve-sip --output file."""
    by_call: dict[str, list[str]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_call.setdefault(record["call_id"], []).append(record["text"])
    return by_call


async def options(server: tuple[str, int], *, timeout: float = 3.0) -> tuple[int, str | None]:
    """Send one out-of-dialog OPTIONS (as a dispatcher's probe); (status, Retry-After)."""
    from pipecat_nemotron.transports.sip.message import SIPResponse, parse_message

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    class Inbox(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            queue.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Inbox, local_addr=(HOST, 0))
    port = transport.get_extra_info("sockname")[1]
    tag = os.urandom(4).hex()
    request = (f"OPTIONS sip:{server[0]}:{server[1]} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bK{tag};rport\r\nMax-Forwards: 70\r\n"
               f"From: <sip:probe@{HOST}>;tag={tag}\r\nTo: <sip:{server[0]}:{server[1]}>\r\n"
               f"Call-ID: probe-{tag}@{HOST}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
    try:
        transport.sendto(request, server)
        while True:
            message = parse_message(await asyncio.wait_for(queue.get(), timeout))
            if isinstance(message, SIPResponse) and message.status >= 200:
                return message.status, message.get("Retry-After")
    finally:
        transport.close()

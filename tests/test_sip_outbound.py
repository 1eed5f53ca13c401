"""Outbound calls (`transports/sip/uac.py`) against real callees in a loopback-only network namespace: sipp UAS
scenarios (busy, rejected, no answer → CANCEL, answered through Kamailio with digest auth on the INVITE) and a
baresip that auto-answers and plays held-out speech, transcribed with the demo model."""

import asyncio
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

import sip_support
from pipecat_nemotron.transports.sip.digest import Credentials
from pipecat_nemotron.transports.sip.uac import SIPUserAgentClient
from sip_support import HOST, free_port, loopback_namespace

SCENARIOS = Path(__file__).parent / "sip"
HELDOUT = Path(__file__).parent / "data" / "demo_heldout"
needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing: run scripts/setup-system.sh")
needs_kamailio = pytest.mark.skipif(not Path("/usr/sbin/kamailio").exists() and shutil.which("kamailio") is None,
                                    reason="kamailio missing: run scripts/setup-system.sh")
needs_baresip = pytest.mark.skipif(shutil.which("baresip") is None, reason="baresip missing: run "
                                   "scripts/setup-system.sh")


@pytest.fixture(scope="module", autouse=True)
def network():
    with loopback_namespace() as where:
        yield where


class Sipp:
    """A sipp UAS scenario on a free port, as a callee: ``port``, then ``await finished()`` → (status, log)."""

    def __init__(self, scenario: str, tmp_path: Path, *, timeout: float = 20.0, **replace: str):
        self.scenario, self.tmp_path, self.timeout = scenario, tmp_path, timeout
        text = (SCENARIOS / f"{scenario}.xml").read_text()
        for key, value in replace.items():  # sipp checks status lines before any [keyword] is substituted
            text = text.replace(key.upper(), value)
        self.file = tmp_path / f"{scenario}.xml"
        self.file.write_text(text)
        self.port = free_port()
        self.proc = None

    async def start(self) -> "Sipp":
        self.errors = self.tmp_path / f"{self.scenario}-errors.log"
        self.proc = await asyncio.create_subprocess_exec(
            "sipp", "-sf", str(self.file), "-i", HOST, "-p", str(self.port), "-mi", HOST,
            "-mp", str(free_port() & ~1), "-m", "1", "-nostdin", "-trace_err", "-error_file", str(self.errors),
            "-timeout", f"{int(self.timeout)}s", "-timeout_error", cwd=self.tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await asyncio.sleep(0.3)  # sipp binds its socket
        return self

    async def finished(self) -> tuple[int, str]:
        try:
            _, stderr = await asyncio.wait_for(self.proc.communicate(), self.timeout + 5)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return -1, "sipp did not finish"
        log = self.errors.read_text(errors="replace") if self.errors.exists() else ""
        return self.proc.returncode, log + stderr.decode(errors="replace")


@needs_sipp
@pytest.mark.parametrize("status,reason,outcome", [(486, "Busy Here", "busy"), (600, "Busy Everywhere", "busy"),
                                                   (403, "Forbidden", "rejected"), (480, "Temporarily Unavailable",
                                                                                   "no_answer")])
async def test_refused_calls_report_their_outcome_and_ack_the_final_response(tmp_path, status, reason, outcome):
    callee = await Sipp("uas_final", tmp_path, status=str(status), reason=reason).start()
    async with sip_support.serving(port=free_port()) as server:
        result = await SIPUserAgentClient(uas=server).dial(f"sip:callee@{HOST}:{callee.port}", ring_timeout=5)
    code, log = await callee.finished()
    assert code == 0, log  # sipp got our ACK of its non-2xx final response
    assert (result.outcome, result.status, result.call) == (outcome, status, None)
    assert str(status) in str(result)


@needs_sipp
async def test_no_answer_is_cancelled_after_the_ring_timeout(tmp_path):
    callee = await Sipp("uas_no_answer", tmp_path).start()
    loop = asyncio.get_running_loop()
    async with sip_support.serving(port=free_port()) as server:
        started = loop.time()
        result = await SIPUserAgentClient(uas=server).dial(f"sip:callee@{HOST}:{callee.port}", ring_timeout=1.0)
        took = loop.time() - started
        code, log = await callee.finished()
        assert len(server.client) == 1  # the INVITE transaction lingers for retransmitted finals, nothing else
    assert code == 0, log  # sipp saw CANCEL, answered 200 + 487 and got the ACK of the 487
    assert result.outcome == "no_answer" and result.call is None
    assert 1.0 <= took < 3.0, took


async def test_no_response_at_all_is_a_failure_after_timer_b():
    silent = free_port()  # nothing listens there: ICMP unreachable, no SIP response
    async with sip_support.serving(port=free_port(), t1=0.05) as server:  # timer B = 64·T1 = 3.2 s
        result = await SIPUserAgentClient(uas=server).dial(f"sip:nobody@{HOST}:{silent}", ring_timeout=10)
    assert result.outcome == "failed" and "no response" in result.reason


async def test_a_name_that_does_not_resolve_fails_without_blocking():
    async with sip_support.serving(port=free_port()) as server:
        result = await SIPUserAgentClient(uas=server).dial("sip:bob@no-such-host.invalid", ring_timeout=1)
    assert result.outcome == "failed" and "does not resolve" in result.reason


def kamailio_config(tmp_path: Path, *, proxy_port: int, callee_port: int, users: dict[str, str], realm: str,
                    min_expires: int = 5) -> Path:
    """The test registrar/proxy config (tests/sip/kamailio-registrar.cfg) and its db_text subscriber table."""
    module_dirs = sorted(Path("/usr/lib").glob("*/kamailio/modules")) + [Path("/usr/lib/kamailio/modules")]
    module_path = next(d for d in module_dirs if (d / "tm.so").exists())
    db = tmp_path / "db"
    db.mkdir(exist_ok=True)
    (db / "version").write_text("id(int,auto) table_name(string) table_version(int) \n1:subscriber:7\n"
                                "2:location:9\n3:location_attrs:1\n")
    rows = "".join(f"{i}:{user}:{HOST}:{password}:unused:unused\n"  # ha1 columns: computed (calculate_ha1)
                   for i, (user, password) in enumerate(users.items(), 1))
    (db / "subscriber").write_text("id(int,auto) username(string) domain(string) password(string) ha1(string) "
                                   "ha1b(string) \n" + rows)
    config = (SCENARIOS / "kamailio-registrar.cfg").read_text()
    for key, value in (("PROXY_PORT", proxy_port), ("CALLEE_PORT", callee_port), ("MODULE_PATH", module_path),
                       ("DB_DIR", db), ("REALM", realm), ("MIN_EXPIRES", min_expires)):
        config = config.replace(key, str(value))
    path = tmp_path / "kamailio.cfg"
    path.write_text(config)
    return path


class Kamailio:
    """Kamailio running a config in the foreground; its log (stderr) is collected in ``log``."""

    def __init__(self, config: Path, tmp_path: Path):
        self.config, self.tmp_path, self.log = config, tmp_path, ""
        self.proc = self._reader = None

    async def __aenter__(self) -> "Kamailio":
        kamailio = shutil.which("kamailio") or "/usr/sbin/kamailio"
        self.proc = await asyncio.create_subprocess_exec(
            kamailio, "-f", str(self.config), "-DD", "-E", "-w", str(self.tmp_path), "-Y", str(self.tmp_path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.ensure_future(self._read())
        ready = await asyncio.get_running_loop().run_in_executor(None, self._probe)
        assert self.proc.returncode is None and ready, self.log[-3000:]
        return self

    def _probe(self) -> bool:
        """An OPTIONS until Kamailio answers it (405), for at most 5 s."""
        port = int(self.config.read_text().split("listen=udp:127.0.0.1:")[1].split()[0])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((HOST, 0))
            probe.settimeout(0.1)
            me = probe.getsockname()[1]
            options = (f"OPTIONS sip:{HOST}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{me};branch=z9hG4bKprobe\r\n"
                       f"From: <sip:probe@{HOST}>;tag=1\r\nTo: <sip:{HOST}>\r\nCall-ID: probe\r\nCSeq: 1 OPTIONS\r\n"
                       "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
            for _ in range(50):
                probe.sendto(options, (HOST, port))
                try:
                    return probe.recv(4096).startswith(b"SIP/2.0")
                except OSError:
                    continue
        return False

    async def _read(self) -> None:
        async for line in self.proc.stderr:
            self.log += line.decode(errors="replace")

    def count(self, marker: str) -> int:
        return self.log.count(marker)

    async def __aexit__(self, *exc) -> None:
        self.proc.terminate()
        await self.proc.wait()
        self._reader.cancel()
        (self.tmp_path / "kamailio.log").write_text(self.log)


@needs_sipp
@needs_kamailio
async def test_call_through_kamailio_answers_the_407_digest_challenge(tmp_path):
    """bot → Kamailio (proxy_authorize, record_route) → sipp callee: 407 answered with digest, the 2xx ACKed and
    the BYE sent along the route set through the proxy."""
    callee = await Sipp("uas_answer", tmp_path).start()
    proxy_port = free_port()
    config = kamailio_config(tmp_path, proxy_port=proxy_port, callee_port=callee.port, users={"bot": "s3cret"},
                             realm="test.example")
    async with Kamailio(config, tmp_path) as kamailio:
        async with sip_support.serving(port=free_port()) as server:
            client = SIPUserAgentClient(uas=server, credentials=Credentials("bot", "s3cret"),
                                        outbound_proxy=f"{HOST}:{proxy_port}", from_uri=f"sip:bot@{HOST}")
            result = await client.dial(f"sip:callee@{HOST}:{proxy_port}", ring_timeout=5)
            assert result.outcome == "answered", (str(result), kamailio.log[-2000:])
            call = result.call
            assert call.route_set and str(proxy_port) in call.route_set[0]
            assert call.negotiated.codec == "PCMU"
            await call.hangup("done")
            code, log = await callee.finished()
        assert code == 0, log  # the callee got the ACK and our BYE through the proxy
        assert kamailio.count("INVITE-CHALLENGED") == 1 and kamailio.count("INVITE-AUTHORIZED") == 1
    # wrong password: refused clearly, one retry only
    callee = await Sipp("uas_answer", tmp_path, timeout=3).start()
    async with Kamailio(config, tmp_path) as kamailio:
        async with sip_support.serving(port=free_port()) as server:
            client = SIPUserAgentClient(uas=server, credentials=Credentials("bot", "wrong"),
                                        outbound_proxy=f"{HOST}:{proxy_port}", from_uri=f"sip:bot@{HOST}")
            result = await client.dial(f"sip:callee@{HOST}:{proxy_port}", ring_timeout=5)
        assert result.outcome == "rejected" and result.status == 407
        assert "refused" in result.reason and "wrong" not in repr(client.credentials)
        assert kamailio.count("INVITE-CHALLENGED") == 2
    callee.proc.kill()
    await callee.proc.wait()


def heldout_row(name: str) -> dict:
    return next(json.loads(line) for line in (HELDOUT / "manifest.jsonl").read_text().splitlines()
                if json.loads(line)["file"] == name)


def write_callee_config(tmp_path: Path, wav: Path) -> tuple[Path, int]:
    """A baresip that auto-answers on a free port and plays ``wav`` into the call."""
    config_dir = tmp_path / "baresip"
    config_dir.mkdir()
    sip_port, rtp_port = free_port(), free_port() & ~1
    (config_dir / "config").write_text(
        f"sip_listen {HOST}:{sip_port}\nnet_interface {HOST}\naudio_source aufile,{wav}\n"
        f"audio_player aufile,{tmp_path / 'heard.wav'}\naudio_alert aufile,{tmp_path / 'alert.wav'}\n"
        f"rtp_ports {rtp_port}-{rtp_port + 20}\nmodule_path /usr/lib/baresip/modules\nmodule g711.so\n"
        "module aufile.so\nmodule sndfile.so\nmodule_tmp account.so\nmodule_app menu.so\n")
    (config_dir / "accounts").write_text(
        f"<sip:callee@{HOST}:{sip_port}>;regint=0;answermode=auto;audio_codecs=pcmu;dtmfmode=rtpevent\n")
    return config_dir, sip_port


@needs_baresip
async def test_we_call_baresip_and_transcribe_what_it_says_with_the_demo_model(tmp_path):
    from pipecat.frames.frames import TranscriptionFrame
    from pipecat.transcriptions.language import Language

    from pipecat_nemotron.engine import Engine
    from pipecat_nemotron.stt import NemotronSTTService
    from pipecat_nemotron.wav import read_wav
    from test_demo_model import normalise
    from test_sip_peers import write_wav
    from test_sip_transcription import Collector, transcribe_call

    row = heldout_row("en-US_00001.wav")
    wav = read_wav(HELDOUT / row["file"])
    speech = np.concatenate([np.zeros(4000, dtype=np.int16), wav.samples, np.zeros(40000, dtype=np.int16)])
    write_wav(tmp_path / "callee.wav", speech.astype("<i2"))
    config_dir, sip_port = write_callee_config(tmp_path, tmp_path / "callee.wav")
    engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=2)
    baresip = await asyncio.create_subprocess_exec(
        "baresip", "-f", str(config_dir), "-t", "25", cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    collector = Collector()
    try:
        await engine.ready()
        async with sip_support.serving(port=free_port()) as server:
            await asyncio.sleep(0.5)  # baresip listening
            result = await SIPUserAgentClient(uas=server).dial(f"sip:callee@{HOST}:{sip_port}", ring_timeout=5)
            assert result.outcome == "answered", str(result)
            pipeline = asyncio.ensure_future(
                transcribe_call(result.call, NemotronSTTService(engine=engine), collector))
            for _ in range(200):
                if collector.of(TranscriptionFrame):
                    break
                await asyncio.sleep(0.1)
            await result.call.hangup("transcribed")
            await asyncio.wait_for(pipeline, 10)
    finally:
        engine.close()
        baresip.kill()
        output, _ = await baresip.communicate()
    finals = collector.of(TranscriptionFrame)
    assert finals, output.decode(errors="replace")[-2000:]
    assert normalise(finals[0].text) == normalise(row["text"])
    assert finals[0].language == Language.EN_US
    assert result.call.outcome == "transcribed" and result.call.direction == "outbound"

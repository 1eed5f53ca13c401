"""deploy/kamailio/ as shipped: Kamailio's dispatcher in front of three ``pipecat-nemotron serve-sip --model demo``
nodes, with real calls (benchmarks/sip_caller.py: INVITE through the proxy, held-out speech as PCMU RTP in real
time, ACK and BYE along the Record-Route set) as the carrier.

Everything runs in a private network namespace with only loopback up (as tests/test_sip_peers.py), or on host
loopback where namespaces are not permitted. The proxy is ``deploy/kamailio/kamailio.cfg`` itself, with its
``#!define``s overridden on the command line (``-A``): the test's address and list file, OPTIONS every second.

Capacity here: the shipped ``maxload`` (24) is what one 2-core node holds alone; here three nodes, Kamailio and
all the callers share the same 2 cores, so each node gets ``--max-calls`` and ``maxload`` ``NODE_CALLS`` = 6
(roughly a third of 24, less the callers' own CPU).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from sip_caller import call_audio, place_call  # noqa: E402
from sip_support import free_port, loopback_namespace  # noqa: E402

HOST = "127.0.0.1"
HELDOUT = Path(__file__).parent / "data" / "demo_heldout"
KNOWN = {"en-US_00001.wav": "No, thank you. I need one hundred minutes.",  # the demo model's words (README)
         "es-ES_00000.wav": "Quiero hablar con un agente."}
NODE_CALLS = 6          # --max-calls and maxload of each node on this shared 2-core machine (see above)
PING_INTERVAL = 1       # s between OPTIONS probes
PROBING_THRESHOLD = 2   # failed probes before a node leaves the rotation (so a node that just became full is
                        # still tried once: the failover path is exercised deterministically)
FR_TIMER_MS = 1500      # a node that sends nothing for this long is skipped (dead node)
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"

pytestmark = [
    pytest.mark.skipif(not Path(KAMAILIO).exists(), reason="kamailio missing; run scripts/setup-system.sh"),
    pytest.mark.timeout(240),
]


@pytest.fixture(scope="module")
def network():
    """A private network namespace with only lo up (`sip_support.loopback_namespace`)."""
    with loopback_namespace() as where:
        yield where


class Node:
    """One ``pipecat-nemotron serve-sip --model demo`` process; its log and JSON lines in files."""

    def __init__(self, name: str, directory: Path):
        self.name, self.port, self.metrics_port = name, free_port(), free_port(socket.SOCK_STREAM)
        self.log, self.output = directory / f"{name}.log", directory / f"{name}.jsonl"
        self.proc: subprocess.Popen | None = None
        self._log_start = 0

    @property
    def uri(self) -> str:
        return f"sip:{HOST}:{self.port}"

    def start(self) -> None:
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(ROOT / ".venv" / "bin" / "pipecat-nemotron"), "serve-sip", "--model", "demo", "--device", "cpu",
                 "--threads", "1", "--host", HOST, "--port", str(self.port), "--max-calls", str(NODE_CALLS),
                 "--retry-after", "1", "--sip-rate", "5000", "--output", str(self.output),
                 "--metrics-port", str(self.metrics_port)],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "phone transcriber on sip:" not in self.log_text()[self._log_start:]:
            assert self.proc.poll() is None, f"{self.name} exited {self.proc.returncode}:\n{self.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name} did not start:\n{self.log_text()[-3000:]}"
            time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def reached(self, call_id: str) -> bool:
        """Whether this node saw the call's INVITE (answered or refused: either logs the Call-ID)."""
        return f"call {call_id} " in self.log_text()

    def answered(self, call_id: str) -> bool:
        return any(f"call {call_id} from" in line and "transcribing" in line for line in self.log_text().splitlines())

    def refused(self, call_id: str) -> bool:
        return any(f"call {call_id} " in line and "rejected 503" in line for line in self.log_text().splitlines())

    def transcripts(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        if self.output.exists():
            for line in self.output.read_text().splitlines():
                record = json.loads(line)
                found.setdefault(record["call_id"], []).append(record["text"])
        return found

    def scrape(self) -> dict[str, float]:
        """``GET /metrics`` over HTTP: {'name{label="value"}': value} of every nemotron_ sample."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return samples

    def healthz(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/healthz", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


class Proxy:
    """deploy/kamailio/kamailio.cfg as shipped, its #!defines set with -A for this test."""

    def __init__(self, nodes: list[Node], directory: Path):
        self.port, self.directory = free_port(), directory
        self.log = directory / "kamailio.log"
        self.list_file = directory / "dispatcher.list"
        # the shipped list's form, with this test's addresses and capacity
        self.list_file.write_text("".join(f"1 {node.uri} 0 0 duid={node.name};maxload={NODE_CALLS}\n"
                                          for node in nodes))
        module_dirs = sorted(Path("/usr/lib").glob("*/kamailio/modules")) + [Path("/usr/lib/kamailio/modules")]
        self.module_path = next(d for d in module_dirs if (d / "dispatcher.so").exists())
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    def start(self) -> None:
        defines = [f"LISTEN=udp:{HOST}:{self.port}", f'DISPATCHER_LIST="{self.list_file}"',
                   f"DS_PING_INTERVAL={PING_INTERVAL}", f"DS_PROBING_THRESHOLD={PROBING_THRESHOLD}",
                   f"FR_TIMER={FR_TIMER_MS}", "CHILDREN=2"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [KAMAILIO, "-f", str(ROOT / "deploy" / "kamailio" / "kamailio.cfg"), "-L", str(self.module_path),
                 "-DD", "-E", "-w", str(self.directory), "-Y", str(self.directory),
                 *[arg for define in defines for arg in ("-A", define)]],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while "dispatch: proxy ready" not in self.log_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log_text()[-3000:]
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.log_text().splitlines() if "dispatch:" in line and needle in line]


class Cluster:
    def __init__(self, nodes: list[Node], proxy: Proxy):
        self.nodes, self.proxy = nodes, proxy

    def node_of(self, call_id: str) -> Node | None:
        """The node that answered the call."""
        answered = [node for node in self.nodes if node.answered(call_id)]
        assert len(answered) <= 1, (call_id, [node.name for node in answered])
        return answered[0] if answered else None

    def routed_to(self, count: int) -> list[Node]:
        """The nodes the proxy sent its last ``count`` INVITEs to."""
        uris = [line.rsplit(" to ", 1)[1].strip() for line in self.proxy.lines(" to sip:")][-count:]
        return [next(node for node in self.nodes if node.uri == uri) for uri in uris]

    def transcripts(self) -> dict[str, list[str]]:
        merged: dict[str, list[str]] = {}
        for node in self.nodes:
            merged.update(node.transcripts())
        return merged

    async def wait_for_transcripts(self, call_ids, timeout: float = 30.0) -> dict[str, list[str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.transcripts()
            if all(call_id in found for call_id in call_ids):
                await asyncio.sleep(1.0)  # a second final of the same call may be on its way
                return self.transcripts()
            await asyncio.sleep(0.2)
        return self.transcripts()

    def reports(self, node: Node) -> list[str]:
        """The proxy's "up"/"down" reports of the node so far, oldest first."""
        lines = self.proxy.lines(f"node {node.uri} ")
        return ["up" if line.endswith(" up") else "down" for line in lines if line.endswith((" up", " down"))]

    async def wait_until_in_rotation(self, node: Node, timeout: float = 10.0) -> None:
        """Until the proxy's latest report of the node is "up" (it answers OPTIONS 200 again). The latest report,
        not a count of them: the node can come back, or flap out and back in, before this wait starts."""
        deadline = time.monotonic() + timeout
        while self.reports(node)[-1:] != ["up"]:
            assert time.monotonic() < deadline, f"{node.name} not back in rotation:\n{self.proxy.log_text()[-3000:]}"
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(network, tmp_path_factory):
    directory = tmp_path_factory.mktemp("kamailio-dispatch")
    nodes = [Node(f"node{i}", directory) for i in (1, 2, 3)]
    proxy = Proxy(nodes, directory)
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready()
        proxy.start()
        time.sleep(2 * PING_INTERVAL)  # the first probes
        yield Cluster(nodes, proxy)
    finally:
        proxy.stop()
        for node in nodes:  # all at once, then wait for each
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in nodes:
            node.stop()


def audio_of(name: str, *, tail_s: float = 1.5) -> bytes:
    return call_audio(HELDOUT / name, tail_s=tail_s)


def short_files(count: int) -> list[str]:
    """``count`` held-out utterances, the two with known words first."""
    others = sorted(p.name for p in HELDOUT.glob("*.wav") if p.name not in KNOWN)
    return (list(KNOWN) + others)[:count]


async def calls_at_once(address, audios, gap: float = 0.05):
    tasks = []
    for audio in audios:
        tasks.append(asyncio.ensure_future(place_call(address, audio, timeout=10.0)))
        await asyncio.sleep(gap)
    return tasks


async def test_calls_spread_over_the_nodes_by_load_and_are_all_transcribed(cluster):
    files = short_files(6)
    tasks = await calls_at_once(cluster.proxy.address, [audio_of(name) for name in files])
    results = await asyncio.gather(*tasks)
    assert all(r.answered and r.bye_status == 200 and not r.dropped_by_server for r in results), results
    per_node = {node.name: sum(node.answered(r.call_id) for r in results) for node in cluster.nodes}
    # algorithm 10: each INVITE goes to the node with the fewest calls in progress, so 6 calls at once are 2+2+2
    assert sorted(per_node.values()) == [2, 2, 2], per_node
    transcripts = await cluster.wait_for_transcripts([r.call_id for r in results])
    for name, result in zip(files, results):
        assert transcripts.get(result.call_id), (name, result.call_id)
        if name in KNOWN:
            assert transcripts[result.call_id] == [KNOWN[name]], name
    # the BYEs went through the proxy (record_route), so every node's call load is back to 0: again 2+2+2
    tasks = await calls_at_once(cluster.proxy.address, [audio_of(name, tail_s=0.5) for name in files])
    results = await asyncio.gather(*tasks)
    per_node = {node.name: sum(node.answered(r.call_id) for r in results) for node in cluster.nodes}
    assert all(r.answered for r in results) and sorted(per_node.values()) == [2, 2, 2], per_node


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing (Debian sip-tester); run scripts/setup-system.sh")
async def test_sipp_as_the_carrier_six_calls_through_the_proxy(cluster, tmp_path):
    """A third-party UA (sipp, tests/sip/uac_dtmf.xml: ACK and BYE along [routes]) through the proxy: every call
    completes and the nodes share them by load."""
    answered_before = {node.name: _answered_count(node) for node in cluster.nodes}
    proc = await asyncio.create_subprocess_exec(
        "sipp", "-sf", str(Path(__file__).parent / "sip" / "uac_dtmf.xml"), "-s", "bot",
        f"{HOST}:{cluster.proxy.port}", "-i", HOST, "-p", str(free_port()), "-mi", HOST,
        "-mp", str(free_port() & ~1), "-m", "6", "-l", "6", "-r", "20", "-nostdin", "-trace_err",
        "-error_file", str(tmp_path / "sipp-errors.log"), "-timeout", "30s", "-timeout_error",
        cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 40)
    errors = (tmp_path / "sipp-errors.log").read_text(errors="replace") if (tmp_path / "sipp-errors.log").exists() else ""
    assert proc.returncode == 0, errors[-3000:] + stderr.decode(errors="replace")[-2000:]
    per_node = {node.name: _answered_count(node) - answered_before[node.name] for node in cluster.nodes}
    assert sorted(per_node.values()) == [2, 2, 2], per_node


def _answered_count(node: Node) -> int:
    return sum("transcribing" in line for line in node.log_text().splitlines())


async def test_a_full_node_is_skipped_and_an_invite_that_reaches_it_fails_over(cluster):
    proxy = cluster.proxy.address
    hold = audio_of("en-US_00001.wav", tail_s=5.0)  # ~9 s: long enough to keep nodes busy through the test
    # two long calls through the proxy land on two nodes; the third ("full") has no call from the proxy
    busy = await calls_at_once(proxy, [hold, hold], gap=0.3)
    await asyncio.sleep(0.3)
    loaded = cluster.routed_to(2)
    full = next(node for node in cluster.nodes if node not in loaded)
    # fill it with calls straight to the node (another proxy, a PBX): at its --max-calls it answers OPTIONS 503
    direct = await calls_at_once((HOST, full.port), [audio_of("es-ES_00000.wav", tail_s=1.0)] * NODE_CALLS, 0.02)
    await until_full(full)
    # at once (before two probes can fail): the proxy still believes it has room and it has the least load
    first = await place_call(proxy, audio_of("es-ES_00000.wav", tail_s=0.5))
    assert first.answered and first.bye_status == 200, first
    assert full.refused(first.call_id), "the INVITE did not reach the full node: nothing was tested"
    assert cluster.node_of(first.call_id) not in (None, full)
    assert cluster.proxy.lines(f"{first.call_id} failed on {full.uri} (503)")
    # the direct calls end; the node answers OPTIONS 200 again and is back in rotation
    assert all(r.answered for r in await asyncio.gather(*direct))
    await cluster.wait_until_in_rotation(full, timeout=90)
    # full again, this time the probes notice before any INVITE comes: no INVITE reaches it at all
    direct = await calls_at_once((HOST, full.port), [audio_of("es-ES_00000.wav", tail_s=3.0)] * NODE_CALLS, 0.02)
    await until_full(full)
    await asyncio.sleep((PROBING_THRESHOLD + 0.5) * PING_INTERVAL)
    later = await asyncio.gather(*await calls_at_once(proxy, [audio_of("es-ES_00000.wav", tail_s=0.3)] * 3, 0.2))
    assert all(r.answered for r in later), later
    assert not any(full.reached(r.call_id) for r in later), "an INVITE reached the node that answers OPTIONS 503"
    assert not any(cluster.proxy.lines(f"{r.call_id} failed") for r in later)
    assert all(r.answered for r in await asyncio.gather(*direct))
    assert all(r.answered and r.bye_status == 200 for r in await asyncio.gather(*busy))
    await cluster.wait_until_in_rotation(full, timeout=90)


async def options_status(node: Node) -> int:
    """The status of the node's answer to an OPTIONS (what the proxy's probes get)."""
    loop = asyncio.get_running_loop()
    answer = loop.create_future()

    class Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            if not answer.done():
                answer.set_result(int(data.split(b" ", 2)[1]))

    transport, _ = await loop.create_datagram_endpoint(Probe, local_addr=(HOST, 0))
    port, tag = transport.get_extra_info("sockname")[1], time.monotonic_ns()
    try:
        transport.sendto((f"OPTIONS sip:{HOST}:{node.port} SIP/2.0\r\n"
                          f"Via: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bKo{tag}\r\nMax-Forwards: 70\r\n"
                          f"From: <sip:test@{HOST}>;tag=t{tag}\r\nTo: <sip:{HOST}:{node.port}>\r\n"
                          f"Call-ID: probe-{tag}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode(),
                         (HOST, node.port))
        return await asyncio.wait_for(answer, 2)
    finally:
        transport.close()


async def until_full(node: Node, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while await options_status(node) != 503:
        assert time.monotonic() < deadline, f"{node.name} never answered OPTIONS 503"
        await asyncio.sleep(0.02)


async def test_a_killed_node_loses_only_its_calls_new_calls_go_elsewhere_and_it_comes_back(cluster):
    proxy = cluster.proxy.address
    live = await calls_at_once(proxy, [audio_of("en-US_00001.wav", tail_s=4.0)] * 3, gap=0.2)  # one per node
    await asyncio.sleep(0.5)
    victim = cluster.routed_to(3)[1]
    victim.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    # at once: an INVITE may still be sent to the dead node; the proxy times it out (FR_TIMER) and fails over
    soon = await asyncio.gather(*await calls_at_once(proxy, [audio_of("es-ES_00000.wav", tail_s=0.3)] * 2, 0.1))
    assert all(r.answered and r.bye_status == 200 for r in soon), soon
    # within the probing interval the proxy knows: new calls go to the others without delay
    await asyncio.sleep(max(0.0, killed_at + (PROBING_THRESHOLD + 0.5) * PING_INTERVAL - time.monotonic()))
    later = await asyncio.gather(*await calls_at_once(proxy, [audio_of("es-ES_00000.wav", tail_s=0.3)] * 4, 0.1))
    assert all(r.answered and r.bye_status == 200 and r.setup_s < 1.0 for r in later), later
    assert not any(victim.reached(r.call_id) for r in soon + later)
    # the calls on the live nodes went on and were transcribed; the dead node's call got no BYE answer
    results = await asyncio.gather(*live)
    on_victim = [r for r in results if victim.answered(r.call_id)]
    assert len(on_victim) == 1 and on_victim[0].bye_status != 200, results
    survivors = [r.call_id for r in results if r not in on_victim]
    transcripts = await cluster.wait_for_transcripts(survivors + [r.call_id for r in soon + later])
    assert all(transcripts.get(call_id) == [KNOWN["en-US_00001.wav"]] for call_id in survivors), transcripts
    # restarted on the same port, it is probed up and takes its share of the next calls again
    victim.start()
    victim.wait_ready()
    await cluster.wait_until_in_rotation(victim, timeout=60)
    again = await asyncio.gather(*await calls_at_once(proxy, [audio_of("es-ES_00000.wav", tail_s=0.3)] * 3, 0.1))
    assert all(r.answered for r in again) and sum(victim.answered(r.call_id) for r in again) == 1, again
    transcripts = await cluster.wait_for_transcripts([r.call_id for r in again])
    assert all(transcripts.get(r.call_id) == [KNOWN["es-ES_00000.wav"]] for r in again)


async def test_a_node_drained_with_sigterm_takes_no_new_calls_finishes_its_own_and_exits_0(cluster):
    proxy = cluster.proxy.address
    live = await calls_at_once(proxy, [audio_of("en-US_00001.wav", tail_s=3.0)] * 3, gap=0.2)  # one per node
    await asyncio.sleep(0.5)
    drained = cluster.routed_to(3)[0]
    drained.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    status, health = drained.healthz()
    assert status == 503 and health["draining"], (status, health)
    # new calls while it drains: at once (an INVITE that still reaches it gets 503 and fails over) and after
    # the probes have seen its OPTIONS 503; none is answered by it
    new = await asyncio.gather(*await calls_at_once(proxy, [audio_of("es-ES_00000.wav", tail_s=0.3)] * 3, 0.1))
    await asyncio.sleep((PROBING_THRESHOLD + 0.5) * PING_INTERVAL)
    new += await asyncio.gather(*await calls_at_once(proxy, [audio_of("es-ES_00000.wav", tail_s=0.3)] * 3, 0.1))
    assert all(r.answered and r.bye_status == 200 for r in new), new
    assert not any(drained.answered(r.call_id) for r in new)
    # its live call goes on to the end (the caller hangs up), with its transcript; then it exits 0
    results = await asyncio.gather(*live)
    assert all(r.answered and r.bye_status == 200 and not r.dropped_by_server for r in results), results
    mine = [r for r in results if drained.answered(r.call_id)]
    assert len(mine) == 1
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, drained.proc.wait, 20) == 0, drained.log_text()[-3000:]
    transcripts = cluster.transcripts()
    assert transcripts.get(mine[0].call_id) == [KNOWN["en-US_00001.wav"]], transcripts.get(mine[0].call_id)
    assert "Traceback" not in drained.log_text()
    # back for the tests that follow
    drained.start()
    drained.wait_ready()
    await cluster.wait_until_in_rotation(drained, timeout=60)


async def test_metrics_scraped_over_http_agree_with_what_the_carrier_saw(cluster):
    before = {node.name: node.scrape() for node in cluster.nodes}
    # through the proxy: six calls (two per node); straight to one node: more than it takes
    target = cluster.nodes[0]
    direct = await calls_at_once((HOST, target.port), [audio_of("es-ES_00000.wav", tail_s=0.5)] * (NODE_CALLS + 3),
                                 0.01)
    routed = await calls_at_once(cluster.proxy.address, [audio_of("es-ES_00000.wav", tail_s=0.5)] * 6, 0.05)
    direct, routed = await asyncio.gather(*direct), await asyncio.gather(*routed)
    await cluster.wait_for_transcripts([r.call_id for r in direct + routed if r.answered])
    await asyncio.sleep(1.0)
    after = {node.name: node.scrape() for node in cluster.nodes}

    def delta(node, name):
        return after[node.name].get(name, 0.0) - before[node.name].get(name, 0.0)

    def refused(node):
        return sum(value - before[node.name].get(key, 0.0) for key, value in after[node.name].items()
                   if key.startswith("nemotron_calls_refused_total"))

    carrier_answered = sum(r.answered for r in direct + routed)
    direct_refused = sum(r.status == 503 for r in direct)
    assert sum(r.answered for r in direct) + direct_refused == len(direct) and direct_refused >= 3, direct
    # every call the carrier saw answered is one answered and one ended on some node, and none is active now
    assert sum(delta(node, "nemotron_calls_answered_total") for node in cluster.nodes) == carrier_answered
    assert sum(sum(after[node.name].get(key, 0) - before[node.name].get(key, 0)
                   for key in after[node.name] if key.startswith("nemotron_calls_ended_total"))
               for node in cluster.nodes) == carrier_answered
    assert all(after[node.name]["nemotron_calls_active"] == 0 for node in cluster.nodes)
    # every 503 the carrier got from the node is one refusal there; a routed call refused by a node on the way
    # (then failed over) is one too, and shows in the proxy's log
    failed_over = sum(len(cluster.proxy.lines(f"{r.call_id} failed on {node.uri} (503)"))
                      for r in routed for node in cluster.nodes)
    assert sum(refused(node) for node in cluster.nodes) == direct_refused + failed_over
    assert all(r.answered for r in routed)
    assert all(after[node.name]["nemotron_engine_max_streams"] == NODE_CALLS for node in cluster.nodes)
    assert all(node.healthz()[0] == 200 for node in cluster.nodes)


async def test_fifty_calls_at_once_are_answered_and_transcribed_or_refused_before_answer(cluster):
    proxy = cluster.proxy.address
    files = short_files(10)
    audios = [audio_of(name, tail_s=1.0) for name in files]
    rss_before = {node.name: node.rss_mb() for node in cluster.nodes}
    answered_before = {node.name: node.scrape()["nemotron_calls_answered_total"] for node in cluster.nodes}
    tasks = await calls_at_once(proxy, [audios[i % len(audios)] for i in range(50)], gap=0.01)
    results = await asyncio.gather(*tasks)
    answered = [r for r in results if r.answered]
    refused = [r for r in results if not r.answered]
    # no node gets more than its maxload; with 50 callers every node is filled and the rest are refused by the
    # proxy (503, nothing answered) — none is answered and then dropped
    per_node = {node.name: sum(node.answered(r.call_id) for r in answered) for node in cluster.nodes}
    assert len(answered) == 3 * NODE_CALLS and all(n == NODE_CALLS for n in per_node.values()), per_node
    assert all(r.status == 503 and r.retry_after for r in refused), [r.status for r in refused]
    assert not any(r.dropped_by_server for r in results), "a call was answered and then dropped"
    assert all(r.bye_status == 200 for r in answered), [r.bye_status for r in answered]
    assert not any(node.reached(r.call_id) for r in refused for node in cluster.nodes)
    transcripts = await cluster.wait_for_transcripts([r.call_id for r in answered])
    for index, result in enumerate(results):
        if result.answered:
            assert transcripts.get(result.call_id), (files[index % len(files)], result.call_id)
            if files[index % len(files)] in KNOWN:
                assert transcripts[result.call_id] == [KNOWN[files[index % len(files)]]]
    scraped = {node.name: node.scrape()["nemotron_calls_answered_total"] for node in cluster.nodes}
    assert sum(scraped[node.name] - answered_before[node.name] for node in cluster.nodes) == len(answered)
    # the same again: all slots were freed by the BYEs, and memory stays where it was
    await asyncio.sleep(2.0)  # the nodes release a call's slot once its pipeline has ended, after the BYE
    results = await asyncio.gather(*await calls_at_once(proxy, [audios[i % len(audios)] for i in range(50)], 0.01))
    assert sum(r.answered for r in results) == 3 * NODE_CALLS and not any(r.dropped_by_server for r in results)
    await asyncio.sleep(1.0)
    growth = {node.name: node.rss_mb() - rss_before[node.name] for node in cluster.nodes}
    assert all(mb < 60 for mb in growth.values()), growth


class RefusingNode(asyncio.DatagramProtocol):
    """A stand-in node that answers OPTIONS 200 (so it stays in rotation) and every INVITE 503, as a serve-sip
    whose engine just started lagging does."""

    def __init__(self):
        self.invites = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        from pipecat_nemotron.transports.sip.message import SIPRequest, parse_message

        message = parse_message(data)
        if not isinstance(message, SIPRequest) or message.method == "ACK":
            return
        status = "200 OK" if message.method == "OPTIONS" else "503 Service Unavailable"
        self.invites += message.method == "INVITE"
        lines = [f"SIP/2.0 {status}"] + [f"Via: {via}" for via in message.get_all("Via")]
        lines += [f"{name}: {message.get(name)}" for name in ("From", "Call-ID", "CSeq")]
        lines += [f"To: {message.get('To')};tag=refuser", "Retry-After: 1", "Content-Length: 0", "", ""]
        self.transport.sendto("\r\n".join(lines).encode(), addr)


async def test_when_every_node_refuses_the_caller_gets_503_with_retry_after(network, tmp_path):
    """Each node answers the INVITE 503 although the proxy counted room on it: after trying them all the proxy
    answers 503 + Retry-After itself (not the 500 tm would make of a relayed 503)."""
    loop = asyncio.get_running_loop()
    endpoints = [await loop.create_datagram_endpoint(RefusingNode, local_addr=(HOST, 0)) for _ in range(2)]
    nodes = [Node(f"refuser{i}", tmp_path) for i in range(2)]
    for node, (transport, _) in zip(nodes, endpoints):
        node.port = transport.get_extra_info("sockname")[1]
    proxy = Proxy(nodes, tmp_path)
    proxy.start()
    try:
        result = await place_call(proxy.address, audio_of("es-ES_00000.wav", tail_s=0.1), timeout=10)
        assert result.status == 503 and result.retry_after and not result.answered, result
        assert [protocol.invites for _, protocol in endpoints] == [1, 1]  # both tried, each once
        assert proxy.lines(f"{result.call_id}: no node left, 503")
    finally:
        proxy.stop()
        for transport, _ in endpoints:
            transport.close()


def test_isolation_mode(network):
    print(f"Kamailio dispatch tests ran on: {network}")
    if network.startswith("private"):
        assert [name for _, name in socket.if_nameindex()] == ["lo"]

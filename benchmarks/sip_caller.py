"""A scripted SIP caller (UAC over UDP) for load tests and the capacity benchmark: INVITE with a PCMU offer,
ACK, the caller's audio as RTP in real time, BYE — and what happened (status, Retry-After, whether the server
hung up on us first)."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"
_numbers = itertools.count(1)


def call_audio(wav: Path, *, lead_s: float = 0.3, tail_s: float = 1.5) -> bytes:
    """8 kHz PCM16 of a WAV with silence around it (the tail lets the VAD see the end of speech)."""
    from scipy.signal import resample_poly

    from pipecat_nemotron.wav import read_wav

    audio = read_wav(wav)
    samples = audio.samples.astype(np.float64)
    if audio.sample_rate != 8000:
        samples = resample_poly(samples, 8000, audio.sample_rate)
    pcm = np.clip(samples, -32768, 32767).astype("<i2").tobytes()
    return bytes(int(lead_s * 8000) * 2) + pcm + bytes(int(tail_s * 8000) * 2)


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.count = 0

    def datagram_received(self, data, addr):
        self.count += 1
        self.queue.put_nowait(data)


@dataclass
class CallResult:
    """What one call saw."""

    call_id: str
    status: int | str | None = None
    retry_after: str | None = None
    answered: bool = False
    dropped_by_server: bool = False  # a BYE from the server before the caller hung up
    bye_status: int | str | None = None
    rtp_sent: int = 0
    rtp_received: int = 0
    setup_s: float = 0.0
    notes: list[str] = field(default_factory=list)


async def place_call(server: tuple[str, int], audio: bytes, *, timeout: float = 10.0) -> CallResult:
    """Call ``server`` and play ``audio`` (8 kHz PCM16) in real time, then hang up."""
    from aiortc.rtp import RtpPacket

    from pipecat_nemotron.transports.g711 import encode
    from pipecat_nemotron.transports.sip.message import SIPRequest, SIPResponse, parse_address, parse_message
    from pipecat_nemotron.transports.sip.sdp import parse_sdp

    loop = asyncio.get_running_loop()
    sip_t, sip = await loop.create_datagram_endpoint(_Inbox, local_addr=(HOST, 0))
    rtp_t, rtp = await loop.create_datagram_endpoint(_Inbox, local_addr=(HOST, 0))
    sip_port, rtp_port = sip_t.get_extra_info("sockname")[1], rtp_t.get_extra_info("sockname")[1]
    number = next(_numbers)
    result = CallResult(call_id=f"load-{number}-{time.monotonic_ns()}@{HOST}")
    server_bye = asyncio.Event()
    # In-dialog requests go to the answer's Contact along the Record-Route set (through a proxy such as
    # Kamailio); every datagram still goes to ``server`` (a proxy is the first hop, a lone server the only one).
    dialog = {"uri": f"sip:bot@{server[0]}:{server[1]}", "routes": []}

    def request(method: str, cseq: int, to: str, body: str = "") -> bytes:
        content = "Content-Type: application/sdp\r\n" if body else ""
        routes = "".join(f"Route: {route}\r\n" for route in dialog["routes"])
        return (f"{method} {dialog['uri']} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {HOST}:{sip_port};branch=z9hG4bK{number}x{cseq}{method};rport\r\n"
                f"{routes}Max-Forwards: 70\r\nFrom: <sip:caller{number}@{HOST}>;tag=c{number}\r\nTo: {to}\r\n"
                f"Call-ID: {result.call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sip:caller@{HOST}:{sip_port}>\r\n"
                f"{content}Content-Length: {len(body.encode())}\r\n\r\n{body}").encode()

    async def final_response(method: str) -> SIPResponse:
        deadline = loop.time() + timeout
        while True:
            data = await asyncio.wait_for(sip.queue.get(), max(0.01, deadline - loop.time()))
            message = parse_message(data)
            if isinstance(message, SIPRequest) and message.method == "BYE":
                server_bye.set()
                continue
            if isinstance(message, SIPResponse) and message.status >= 200 and message.cseq[1] == method:
                return message

    async def watch_for_server_bye():
        while True:
            message = parse_message(await sip.queue.get())
            if isinstance(message, SIPRequest) and message.method == "BYE":
                server_bye.set()
                sip_t.sendto(_ok(message), (HOST, server[1]))

    sdp = (f"v=0\r\no=caller {number} 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
           f"m=audio {rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendrecv\r\n")
    to = f"<sip:bot@{server[0]}:{server[1]}>"
    watcher = None
    try:
        started = loop.time()
        sip_t.sendto(request("INVITE", 1, to, sdp), server)
        try:
            response = await final_response("INVITE")
        except asyncio.TimeoutError:
            result.status = "timeout"
            return result
        result.status, result.setup_s = response.status, loop.time() - started
        result.retry_after = response.get("Retry-After")
        if response.status != 200:
            sip_t.sendto(request("ACK", 1, response.get("To")), server)
            return result
        result.answered = True
        to = response.get("To")
        if response.get_all("Record-Route"):
            dialog["routes"] = list(reversed(response.get_all("Record-Route")))
            dialog["uri"] = parse_address(response.get("Contact")).uri
        sip_t.sendto(request("ACK", 1, to), server)
        watcher = asyncio.ensure_future(watch_for_server_bye())
        answer = parse_sdp(response.body)
        target = (answer.media[0].connection or answer.connection, answer.media[0].port)
        start = loop.time()
        for index, offset in enumerate(range(0, len(audio), 320)):
            if server_bye.is_set():
                result.dropped_by_server = True
                return result
            payload = encode(audio[offset:offset + 320].ljust(320, b"\0"), "PCMU")
            rtp_t.sendto(RtpPacket(payload_type=0, sequence_number=index & 0xFFFF, timestamp=index * 160,
                                   ssrc=0x5000 + number, marker=int(index == 0), payload=payload).serialize(), target)
            result.rtp_sent += 1
            delay = start + (index + 1) * 0.02 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        watcher.cancel()
        result.rtp_received = rtp.count
        sip_t.sendto(request("BYE", 2, to), server)
        try:
            result.bye_status = (await final_response("BYE")).status
        except asyncio.TimeoutError:
            result.bye_status = "timeout"
        return result
    finally:
        if watcher is not None:
            watcher.cancel()
        sip_t.close()
        rtp_t.close()


def _ok(request) -> bytes:
    lines = [f"SIP/2.0 200 OK"] + [f"Via: {via}" for via in request.get_all("Via")]
    for name in ("From", "To", "Call-ID", "CSeq"):
        lines.append(f"{name}: {request.get(name)}")
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()

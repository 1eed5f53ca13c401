"""The SIP user-agent server driven by a small in-test UDP client on 127.0.0.1 (random free ports)."""

import asyncio
import secrets
import struct
from contextlib import closing

import pytest
from aiortc.rtp import RtpPacket
from pipecat.frames.frames import InputAudioRawFrame, InputDTMFFrame

from pipecat_nemotron.transports.sip.message import SIPParseError, SIPRequest, SIPResponse, parse_address, parse_message, parse_via
from pipecat_nemotron.transports.sip.sdp import parse_sdp
from sip_support import HOST, Collector, calls_recorder, run_call_pipeline, serving, until


def parse_well_formed(data: bytes):
    """The server only ever sends well-formed SIP, except a 400 that echoes a request's own malformed
    Via/From/To/CSeq values (RFC 3261 §8.2.6.2 copies them): None for such a 400 and for keep-alives."""
    try:
        return parse_message(data)
    except SIPParseError:
        if data.startswith(b"SIP/2.0 400 "):
            return None
        raise


class Peer(asyncio.DatagramProtocol):
    """A bare UDP endpoint that records what it receives (SIP parsed, RTP raw)."""

    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.transport = None

    @classmethod
    async def open(cls):
        peer = cls()
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: peer, local_addr=(HOST, 0))
        return peer

    def connection_made(self, transport):
        self.transport = transport

    @property
    def port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]

    def datagram_received(self, data, addr):
        self.inbox.put_nowait((data, addr))

    def send(self, data, port: int):
        self.transport.sendto(data if isinstance(data, bytes) else data.encode(), (HOST, port))

    async def expect(self, *, status=None, method=None, timeout=3.0):
        """The next SIP message matching status/method (others are skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            data, _ = await asyncio.wait_for(self.inbox.get(), max(0.01, deadline - loop.time()))
            message = parse_well_formed(data)
            if message is None:
                continue
            if status is not None and isinstance(message, SIPResponse) and message.status == status:
                return message
            if method is not None and isinstance(message, SIPRequest) and message.method == method:
                return message

    async def count(self, status, seconds):
        found = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            try:
                data, _ = await asyncio.wait_for(self.inbox.get(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
            message = parse_well_formed(data)
            found += isinstance(message, SIPResponse) and message.status == status
        return found

    def close(self):
        self.transport.close()


def media_port(response: SIPResponse) -> int:
    """Our RTP port, from the SDP of a 200."""
    return parse_sdp(response.body).media[0].port


def offer(rtp_port, direction="sendrecv"):
    return (f"v=0\r\no=peer 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio {rtp_port} RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na={direction}\r\n")


class Dialog:
    """Client side of one call: builds the requests an ordinary UAC would send."""

    def __init__(self, peer: Peer, server_port: int, *, rtp_port: int = 0, record_route: str | None = None):
        self.peer, self.server_port, self.rtp_port = peer, server_port, rtp_port
        self.call_id = secrets.token_hex(8) + "@test"
        self.from_tag = secrets.token_hex(4)
        self.to = "<sip:bot@127.0.0.1>"
        self.cseq = 1
        self.invite_branch = ""
        self.record_route = record_route

    def request(self, method, *, body="", branch=None, cseq=None, compact=False, extra=""):
        branch = branch or "z9hG4bK" + secrets.token_hex(6)
        cseq = cseq or self.cseq
        names = ("v", "f", "t", "i", "m", "l") if compact else ("Via", "From", "To", "Call-ID", "Contact",
                                                                 "Content-Length")
        ctype = "Content-Type: application/sdp\r\n" if body else ""
        rr = f"Record-Route: {self.record_route}\r\n" if self.record_route and method == "INVITE" else ""
        return (f"{method} sip:bot@{HOST}:{self.server_port} SIP/2.0\r\n"
                f"{names[0]}: SIP/2.0/UDP {HOST}:{self.peer.port};branch={branch};rport\r\n"
                f"Max-Forwards: 70\r\n{names[1]}: \"Test Caller\" <sip:caller@example.com>;tag={self.from_tag}\r\n"
                f"{names[2]}: {self.to}\r\n{names[3]}: {self.call_id}\r\nCSeq: {cseq} {method}\r\n"
                f"{names[4]}: <sip:caller@{HOST}:{self.peer.port}>\r\n{rr}{extra}{ctype}"
                f"{names[5]}: {len(body.encode())}\r\n\r\n{body}")

    def invite(self, *, with_sdp=True, compact=False, direction="sendrecv"):
        self.invite_branch = "z9hG4bK" + secrets.token_hex(6)
        body = offer(self.rtp_port, direction) if with_sdp else ""
        self.peer.send(self.request("INVITE", body=body, branch=self.invite_branch, compact=compact), self.server_port)

    async def connect(self, **invite) -> SIPResponse:
        """INVITE, take the To-tag of the 200 and ACK it (an answered call); returns the 200."""
        self.invite(**invite)
        ok = await self.peer.expect(status=200)
        self.take_tag(ok)
        self.ack()
        return ok

    def take_tag(self, response: SIPResponse):
        self.to = response.get("To")

    def ack(self, body=""):
        self.peer.send(self.request("ACK", body=body, cseq=self.cseq), self.server_port)

    def send(self, method, **kwargs):
        self.cseq += 1
        self.peer.send(self.request(method, **kwargs), self.server_port)


@pytest.fixture
async def peer():
    p = await Peer.open()
    yield p
    p.close()


@pytest.fixture
async def rtp_peer():
    p = await Peer.open()
    yield p
    p.close()


async def test_invite_answer_ack_then_caller_bye(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        dialog.invite_branch = "z9hG4bKpai"
        peer.send(dialog.request("INVITE", body=offer(rtp_peer.port), branch=dialog.invite_branch,
                                 extra='P-Asserted-Identity: "Alice" <sip:+15551234@example.com>\r\n'), server.port)
        trying = await peer.expect(status=100)
        assert parse_address(trying.get("To")).tag is None  # no To-tag on 100
        ringing = await peer.expect(status=180)
        ok = await peer.expect(status=200)
        tag = parse_address(ok.get("To")).tag
        assert tag and parse_address(ringing.get("To")).tag == tag
        via = parse_via(ok.get_all("Via")[0])
        assert via.params["rport"] == str(peer.port) and via.params["received"] == HOST  # RFC 3581
        assert ok.get("Contact") and "INVITE" in ok.get("Allow")
        answer = parse_sdp(ok.body)
        assert answer.media[0].formats == ["0", "101"]
        dialog.take_tag(ok)
        dialog.ack()
        await until(lambda: calls and calls[0].state == "confirmed")
        call = calls[0]
        assert call.identity["caller"] == "sip:caller@example.com" and call.caller_name == "Test Caller"
        assert call.identity["asserted_identity"] == "sip:+15551234@example.com"
        await asyncio.sleep(0.1)
        assert rtp_peer.inbox.empty()  # nothing sent before the caller's RTP arrives (no reflection)
        rtp_peer.send(rtp(1), media_port(ok))
        data, _ = await asyncio.wait_for(rtp_peer.inbox.get(), 1)  # then our continuous RTP reaches the caller
        assert RtpPacket.parse(data).payload_type == 0
        dialog.send("BYE")
        bye_ok = await peer.expect(status=200)
        assert bye_ok.cseq == (dialog.cseq, "BYE")
        await until(lambda: call.outcome == "caller hung up")
        dialog.send("BYE")
        assert (await peer.expect(status=481)).cseq[1] == "BYE"  # that dialog is gone


async def test_200_retransmitted_until_ack_then_bye(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call, t1=0.02, t2=0.08) as server:  # 64·T1 = 1.28 s
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        dialog.invite()
        await peer.expect(status=200)
        assert await peer.count(200, 0.3) >= 3
        bye = await peer.expect(method="BYE", timeout=3)
        assert parse_address(bye.get("To")).tag == dialog.from_tag
        await until(lambda: calls and calls[0].outcome == "no ACK")


async def test_ack_stops_retransmissions(peer, rtp_peer):
    async with serving(None, t1=0.02, t2=0.08) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        await dialog.connect()
        await asyncio.sleep(0.1)
        while not peer.inbox.empty():
            peer.inbox.get_nowait()
        assert await peer.count(200, 0.4) == 0


async def test_invite_retransmission_absorbed(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call, ring_secs=0.3) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        dialog.invite()
        await peer.expect(status=180)
        again = dialog.request("INVITE", body=offer(rtp_peer.port), branch=dialog.invite_branch)
        peer.send(again, server.port)
        await peer.expect(status=180)  # the last response, re-sent
        await peer.expect(status=200)
        await asyncio.sleep(0.1)
        assert len(calls) == 1 and len(server.calls) == 1


async def test_cancel_gives_200_and_487(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call, ring_secs=5) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        dialog.invite()
        await peer.expect(status=180)
        peer.send(dialog.request("CANCEL", branch=dialog.invite_branch), server.port)
        cancel_ok = await peer.expect(status=200)
        assert cancel_ok.cseq[1] == "CANCEL"
        terminated = await peer.expect(status=487)
        assert terminated.cseq[1] == "INVITE"
        dialog.take_tag(terminated)
        dialog.ack()
        await asyncio.sleep(0.1)
        assert calls == [] and server.active_calls == 0
        peer.send(dialog.request("CANCEL", branch="z9hG4bKnope"), server.port)
        assert (await peer.expect(status=481)).cseq[1] == "CANCEL"


async def test_options_info_unknown_methods_and_unknown_dialogs(peer):
    async with serving() as server:
        dialog = Dialog(peer, server.port)
        dialog.send("OPTIONS", compact=True)
        ok = await peer.expect(status=200)
        assert parse_address(ok.get("To")).tag and "OPTIONS" in ok.get("Allow")
        dialog.send("SUBSCRIBE")
        assert (await peer.expect(status=405)).get("Allow")
        dialog.send("FROBNICATE")
        assert (await peer.expect(status=501)).cseq[1] == "FROBNICATE"
        dialog.to = "<sip:bot@127.0.0.1>;tag=unknown"
        for method in ("BYE", "INFO", "UPDATE", "INVITE"):
            dialog.send(method)
            response = await peer.expect(status=481)
            assert response.cseq[1] == method and parse_address(response.get("To")).tag == "unknown"


async def test_reinvite_hold_update_and_info(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        dialog.invite()
        first = await peer.expect(status=200)
        dialog.take_tag(first)
        dialog.ack()
        await until(lambda: calls and calls[0].state == "confirmed")
        dialog.send("INVITE", body=offer(rtp_peer.port, "sendonly"))  # the caller puts us on hold
        held = await peer.expect(status=200)
        assert held.cseq == (dialog.cseq, "INVITE") and "a=recvonly" in held.body.decode()
        assert parse_sdp(held.body).origin.split()[1] == parse_sdp(first.body).origin.split()[1]
        dialog.ack()
        assert not calls[0].negotiated.we_send
        dialog.send("INVITE")  # no offer: the current SDP again
        assert (await peer.expect(status=200)).body == held.body
        dialog.ack()
        dialog.send("UPDATE")
        assert (await peer.expect(status=200)).cseq[1] == "UPDATE"
        dialog.send("INFO", body="Signal=7\r\nDuration=160\r\n",
                    extra="Content-Type: application/dtmf-relay\r\n")
        assert (await peer.expect(status=200)).cseq[1] == "INFO"
        assert calls[0].rtp.stats.dtmf_digits == "7"
        assert calls[0].active


async def test_required_extension_420_and_rtp_port_range(peer, rtp_peer):
    async with serving(rtp_ports=(40000, 40100)) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        peer.send(dialog.request("INVITE", body=offer(rtp_peer.port), extra="Require: 100rel\r\n"), server.port)
        rejected = await peer.expect(status=420)
        assert rejected.get("Unsupported") == "100rel"
        dialog.send("INVITE", body=offer(rtp_peer.port), extra="Require: timer\r\nSession-Expires: 1800\r\n")
        ok = await peer.expect(status=200)
        port = parse_sdp(ok.body).media[0].port
        assert 40000 <= port <= 40100 and port % 2 == 0


async def test_reinvite_to_new_media_address_relatches(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call) as server:
        with closing(await Peer.open()) as moved:
            dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
            server_rtp = media_port(await dialog.connect())
            rtp_peer.send(rtp(1), server_rtp)
            await until(lambda: calls and calls[0].rtp.latched == (HOST, rtp_peer.port))
            dialog.send("INVITE", body=offer(moved.port))  # e.g. the PBX moved the media to another endpoint
            await peer.expect(status=200)
            dialog.ack()
            await until(lambda: calls[0].rtp.latched is None)  # the latch is released ...
            moved.send(rtp(2), server_rtp)
            await until(lambda: calls[0].rtp.latched == (HOST, moved.port))  # ... and taken by the new endpoint
            await asyncio.wait_for(moved.inbox.get(), 1)  # our RTP now goes to the new address


async def test_call_limit_503_before_application_work(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call, max_calls=1) as server:
        first = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        await first.connect()
        second = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        second.invite()
        busy = await peer.expect(status=503)
        assert busy.call_id == second.call_id and parse_address(busy.get("To")).tag
        await asyncio.sleep(0.1)
        assert len(calls) == 1


async def test_peer_not_allowed_403(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call, allowed_peers=("10.0.0.0/8", "192.0.2.1")) as server:
        Dialog(peer, server.port, rtp_port=rtp_peer.port).invite()
        await peer.expect(status=403)
        await asyncio.sleep(0.1)
        assert calls == [] and not server.calls
    async with serving(on_call, allowed_peers=("127.0.0.0/8",)) as server:
        Dialog(peer, server.port, rtp_port=rtp_peer.port).invite()
        await peer.expect(status=200)


async def test_bot_hangup_uses_route_set_and_swapped_from_to(peer, rtp_peer):
    async def on_call(call):
        await call.confirmed.wait()
        await call.hangup("bot done")

    async with serving(on_call) as server:
        route = f"<sip:{HOST}:{peer.port};lr>"
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port, record_route=route)
        dialog.invite()
        ok = await peer.expect(status=200)
        assert ok.get_all("Record-Route") == [route]
        dialog.take_tag(ok)
        dialog.ack()
        bye = await peer.expect(method="BYE")
        assert bye.get_all("Route") == [route] and bye.uri == f"sip:caller@{HOST}:{peer.port}"
        assert parse_address(bye.get("To")).tag == dialog.from_tag
        assert parse_address(bye.get("From")).tag == parse_address(ok.get("To")).tag
        response = SIPResponse(status=200, reason="OK", headers=[(k, v) for k, v in bye.headers
                                                                 if k in ("Via", "From", "To", "Call-ID", "CSeq")])
        peer.send(response.to_bytes(), server.port)
        call = next(iter(server.calls.values()))
        await until(lambda: call.outcome == "bot done")


async def test_max_call_length(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call, max_call_secs=0.3) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        await dialog.connect()
        await peer.expect(method="BYE", timeout=2)
        assert calls[0].outcome == "max call length"


async def test_rtp_timeout_hangs_up_unless_on_hold(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call, rtp_timeout_secs=0.4) as server:
        held = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        await held.connect(direction="inactive")
        silent = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        await silent.connect()
        bye = await peer.expect(method="BYE", timeout=3)
        assert bye.call_id == silent.call_id
        by_id = {call.call_id: call for call in calls}
        assert by_id[silent.call_id].outcome.startswith("RTP timeout") and by_id[held.call_id].active


async def test_delayed_offer_answer_in_ack(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call) as server:
        dialog = Dialog(peer, server.port)
        dialog.invite(with_sdp=False)
        ok = await peer.expect(status=200)
        assert parse_sdp(ok.body).media[0].formats == ["0", "8", "9", "111", "101"]  # SIPConfig.codecs, then DTMF
        dialog.take_tag(ok)
        answer = offer(rtp_peer.port).replace("RTP/AVP 0 8 101", "RTP/AVP 8 101")
        dialog.ack(body=answer)
        await until(lambda: calls and calls[0].negotiated is not None)
        assert calls[0].negotiated.codec == "PCMA"
        rtp_peer.send(rtp(1, pt=8), media_port(ok))
        data, _ = await asyncio.wait_for(rtp_peer.inbox.get(), 1)
        assert RtpPacket.parse(data).payload_type == 8


async def test_488_when_no_g711(peer):
    async with serving() as server:
        dialog = Dialog(peer, server.port, rtp_port=4000)
        bad = offer(4000).replace("RTP/AVP 0 8 101", "RTP/AVP 96").replace("telephone-event", "opus")
        peer.send(dialog.request("INVITE", body=bad), server.port)
        await peer.expect(status=488)
        assert server.active_calls == 0


@pytest.mark.parametrize("junk", [
    b"\x00\x01\x02\xff" * 50,
    b"INVITE sip:bot@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:1",
    b"OPTIONS sip:x SIP/2.0\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\n",
    b"\r\n\r\n",
])
async def test_malformed_input_never_breaks_the_server(peer, junk):
    async with serving() as server:
        peer.send(junk, server.port)
        dialog = Dialog(peer, server.port)
        dialog.send("OPTIONS")
        assert (await peer.expect(status=200)).call_id == dialog.call_id


async def test_mutated_messages_fuzz(peer):
    """Hundreds of randomly corrupted requests: answered or dropped, never an error inside the server."""
    import random

    from loguru import logger

    errors = []
    sink = logger.add(lambda message: errors.append(message), level="ERROR")
    try:
        async with serving(t1=0.05) as server:
            rng = random.Random(5)
            for i in range(300):
                dialog = Dialog(peer, server.port, rtp_port=4000)
                method = rng.choice(["INVITE", "OPTIONS", "BYE", "CANCEL", "ACK", "INFO"])
                data = bytearray(dialog.request(method, body=offer(4000) if method == "INVITE" else "").encode())
                for _ in range(rng.randint(1, 4)):
                    pos = rng.randrange(len(data))
                    if rng.random() < 0.5:
                        data[pos] = rng.randrange(256)
                    else:
                        data[pos:pos] = rng.choice([b":", b";", b"<", b"\r\n", b" ", b"\x00", b";tag=x", b","])
                peer.send(bytes(data), server.port)
                if i % 50 == 0:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            dialog = Dialog(peer, server.port)
            dialog.send("OPTIONS")
            while (await peer.expect(status=200, timeout=5)).call_id != dialog.call_id:
                pass  # 200s to fuzzed requests that were still valid
            assert errors == []
    finally:
        logger.remove(sink)


async def test_wrong_content_length_gets_400(peer):
    async with serving() as server:
        dialog = Dialog(peer, server.port)
        text = dialog.request("OPTIONS").replace("Content-Length: 0", "Content-Length: 50")
        peer.send(text, server.port)
        bad = await peer.expect(status=400)
        assert bad.call_id == dialog.call_id and "Content-Length" in bad.reason


def rtp(seq, *, pt=0, payload=b"\x7f" * 160, ts=None, marker=0):
    return RtpPacket(payload_type=pt, sequence_number=seq, timestamp=seq * 160 if ts is None else ts, ssrc=77,
                     marker=marker, payload=payload).serialize()


async def test_transport_frames_dtmf_and_caller_hangup_ends_pipeline(peer, rtp_peer):
    collector = Collector()
    results = {}

    async def on_call(call):
        results["events"] = await run_call_pipeline(call, collector)

    async with serving(on_call) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        server_rtp = media_port(await dialog.connect())
        for seq in range(1, 11):
            rtp_peer.send(rtp(seq), server_rtp)
        for end in (False, True, True, True):  # digit 9, end packet three times
            rtp_peer.send(rtp(11, pt=101, ts=2000, payload=struct.pack("!BBH", 9, 0x8A if end else 0x0A, 400)),
                          server_rtp)
        injected = await Peer.open()  # another port: ignored (symmetric RTP latching)
        injected.send(rtp(12, payload=b"\x00" * 160), server_rtp)
        await asyncio.sleep(0.3)
        dialog.send("BYE")
        await peer.expect(status=200)
        await until(lambda: "events" in results, timeout=10)
        injected.close()
        audio = [f for f in collector.frames if isinstance(f, InputAudioRawFrame)]
        dtmf = [f for f in collector.frames if isinstance(f, InputDTMFFrame)]
        assert len(audio) == 10 and all(f.sample_rate == 8000 and len(f.audio) == 320 for f in audio)
        assert [f.button.value for f in dtmf] == ["9"]
        assert results["events"] == [("started", "sip:caller@example.com"), ("ended", "caller hung up")]
        assert next(iter(server.calls.values())).rtp.stats.ignored >= 1


async def test_bot_audio_reaches_caller_and_endframe_hangs_up(peer, rtp_peer):
    collector = Collector()
    tone = struct.pack("<h", 12000) * 800  # 100 ms of a constant non-silent level
    done = asyncio.Event()

    async def on_call(call):
        await call.confirmed.wait()
        await until(lambda: call.rtp.latched is not None)  # we send once the caller's RTP has arrived
        await run_call_pipeline(call, collector, bot_audio=tone, bot_hangs_up_after=0)
        done.set()

    async with serving(on_call) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        rtp_peer.send(rtp(1), media_port(await dialog.connect()))
        bye = await peer.expect(method="BYE", timeout=10)
        assert bye.call_id == dialog.call_id
        await asyncio.wait_for(done.wait(), 5)
        payloads = []
        while not rtp_peer.inbox.empty():
            payloads.append(RtpPacket.parse(rtp_peer.inbox.get_nowait()[0]).payload)
        loud = [p for p in payloads if p != b"\xff" * 160]
        assert len(loud) >= 4  # the 100 ms tone went out as RTP before the BYE


async def test_sip_over_tcp(rtp_peer):
    """INVITE/ACK over TCP, OPTIONS in between, and our BYE comes back on the same connection."""
    async def on_call(call):
        await call.confirmed.wait()
        await call.hangup("bot done")

    async with serving(on_call) as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        with closing(writer):
            local_port = writer.get_extra_info("sockname")[1]
            peer = Peer()  # only used for building requests

            class FakeTransport:
                def get_extra_info(self, _):
                    return (HOST, local_port)

            peer.transport = FakeTransport()
            dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)

            async def read_message():
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                return parse_message(head + await reader.readexactly(length))

            def send(text):
                writer.write(b"\r\n\r\n" + text.replace("SIP/2.0/UDP", "SIP/2.0/TCP").encode())  # with a keep-alive

            send(dialog.request("OPTIONS"))
            assert (await read_message()).status == 200
            dialog.invite_branch = "z9hG4bKtcp1"
            send(dialog.request("INVITE", body=offer(rtp_peer.port), branch=dialog.invite_branch))
            statuses = []
            while 200 not in statuses:
                response = await read_message()
                statuses.append(response.status)
            assert statuses == [100, 180, 200] and ";transport=tcp" in response.get("Contact")
            dialog.take_tag(response)
            send(dialog.request("ACK"))
            bye = await read_message()
            assert isinstance(bye, SIPRequest) and bye.method == "BYE"
            assert parse_via(bye.get_all("Via")[0]).transport == "TCP"


async def test_bot_dtmf_goes_out_as_rfc4733_events(peer, rtp_peer):
    from pipecat.audio.dtmf.types import KeypadEntry
    from pipecat.frames.frames import OutputDTMFFrame

    from pipecat_nemotron.transports.sip.rtp import DTMFDecoder

    done = asyncio.Event()

    async def on_call(call):
        await call.confirmed.wait()
        await until(lambda: call.rtp.latched is not None)
        await run_call_pipeline(call, Collector(), bot_hangs_up_after=0,
                                bot_frames=[OutputDTMFFrame(buttons=[KeypadEntry.ONE, KeypadEntry.POUND])])
        done.set()

    async with serving(on_call) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        rtp_peer.send(rtp(1), media_port(await dialog.connect()))
        await peer.expect(method="BYE", timeout=10)
        await asyncio.wait_for(done.wait(), 5)
        decoder, digits = DTMFDecoder(), []
        while not rtp_peer.inbox.empty():
            packet = RtpPacket.parse(rtp_peer.inbox.get_nowait()[0])
            if packet.payload_type == 101:
                digits += decoder.feed(packet.payload, packet.timestamp)
        assert digits == ["1", "#"]

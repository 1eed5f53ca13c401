"""Transactions (RFC 3261 §17.2.3) with the wire faked out: no sockets, the server's sends recorded."""

import asyncio

from pipecat_nemotron.transports.sip import SIPConfig, SIPUserAgentServer
from pipecat_nemotron.transports.sip.message import parse_message
from pipecat_nemotron.transports.sip.transaction import server_key

SOURCE = ("192.0.2.10", 5070)


def request(method, *, branch="z9hG4bKone", sent_by="192.0.2.10:5070", cseq=1, call_id="c1", to_tag="", body=""):
    to = "<sip:bot@192.0.2.1>" + (f";tag={to_tag}" if to_tag else "")
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    text = (f"{method} sip:bot@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP {sent_by};branch={branch};rport\r\n"
            f"From: <sip:a@192.0.2.10>;tag=f1\r\nTo: {to}\r\nCall-ID: {call_id}\r\n"
            f"CSeq: {cseq} {'INVITE' if method == 'ACK' else method}\r\nContact: <sip:a@192.0.2.10:5070>\r\n"
            f"{ctype}Content-Length: {len(body)}\r\n\r\n{body}")
    return parse_message(text.encode())


class FakeWire:
    """Records what the server sends; nothing touches the network."""

    def __init__(self):
        self.sent = []
        self.address = ("127.0.0.1", 5060)  # RTP sockets bind there
        self.on_message = self.in_use = None

    def send(self, data, destination):
        self.sent.append((parse_message(data), destination))

    def is_stream(self, peer):
        return False

    async def start(self):
        return self.address

    async def close(self):
        pass


def test_keys_per_rfc3261_17_2_3():
    invite = request("INVITE")
    assert server_key(request("ACK")) == server_key(invite)  # ACK of a non-2xx matches its INVITE
    assert server_key(request("CANCEL")) != server_key(invite)
    assert server_key(request("CANCEL"), method="INVITE") == server_key(invite)  # what CANCEL names
    assert server_key(request("INVITE", sent_by="192.0.2.11:5070")) != server_key(invite)  # sent-by counts
    old = request("INVITE", branch="1234")  # RFC 2543 peer: no magic cookie
    assert server_key(old)[0] == "2543"
    assert server_key(request("INVITE", branch="1234", cseq=2)) != server_key(old)


async def test_retransmission_replayed_and_ack_of_488_absorbed():
    wire = FakeWire()
    server = SIPUserAgentServer(config=SIPConfig(host="127.0.0.1"), wire=wire)
    bad = "v=0\r\no=a 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\nm=audio 4000 RTP/AVP 96\r\n"
    wire.on_message(request("INVITE", body=bad), SOURCE)
    await asyncio.sleep(0.05)  # the set-up task answers
    statuses = [m.status for m, _ in wire.sent]
    assert statuses == [100, 488]
    count = len(wire.sent)
    wire.on_message(request("INVITE", body=bad), SOURCE)  # retransmitted: the final response again, no new call
    assert len(wire.sent) == count + 1 and wire.sent[-1][0].status == statuses[-1]
    wire.on_message(request("ACK", to_tag=wire.sent[-1][0].get("To").split("tag=")[1]), SOURCE)
    assert len(wire.sent) == count + 1 and server.active_calls == 0  # absorbed
    wire.on_message(request("OPTIONS", branch="z9hG4bKone", call_id="c2"), SOURCE)  # same branch, other method
    assert wire.sent[-1][0].status == 200 and wire.sent[-1][0].cseq[1] == "OPTIONS"
    await server.stop()

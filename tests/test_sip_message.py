"""SIP message parsing and serialisation, including malformed input."""

import pytest

from pipecat_nemotron.transports.sip.message import (SIPParseError, SIPRequest, SIPResponse, parse_address,
                                                     parse_message, parse_stream, parse_via, uri_host_port)

INVITE = (
    "INVITE sip:bot@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 10.0.0.2:5070;branch=z9hG4bK1;rport\r\n"
    "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK0, SIP/2.0/TCP [2001:db8::1]:5080;branch=z9hG4bKx\r\n"
    "Max-Forwards: 70\r\n"
    'From: "Alice, A." <sip:alice@example.com>;tag=aa\r\n'
    "To: <sip:bot@127.0.0.1>\r\n"
    "Call-ID: abc@host\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:alice@10.0.0.2:5070>\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: 4\r\n\r\n"
    "v=0\n"
)


def test_request_round_trip():
    message = parse_message(INVITE.encode())
    assert isinstance(message, SIPRequest)
    assert (message.method, message.uri) == ("INVITE", "sip:bot@127.0.0.1:5060")
    assert message.cseq == (1, "INVITE")
    assert len(message.get_all("Via")) == 3  # comma-joined elements split, order kept
    assert message.body == b"v=0\n"
    again = parse_message(message.to_bytes())
    assert again.headers == message.headers and again.body == message.body


def test_compact_forms_and_case_insensitive_names():
    text = ("OPTIONS sip:bot@h SIP/2.0\r\nv: SIP/2.0/UDP h:1;branch=z9hG4bKa\r\nf: <sip:a@h>;tag=1\r\n"
            "t: <sip:b@h>\r\ni: x\r\nCSEQ: 7 OPTIONS\r\nl: 0\r\n\r\n")
    message = parse_message(text.encode())
    assert message.get("via") == message.get("V") == "SIP/2.0/UDP h:1;branch=z9hG4bKa"
    assert message.call_id == "x" and message.cseq == (7, "OPTIONS")


def test_response_and_folding():
    text = ("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKa\r\nFrom: <sip:a@h>;tag=1\r\n"
            "To: <sip:b@h>\r\n ;tag=2\r\nCall-ID: x\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
    message = parse_message(text.encode())
    assert isinstance(message, SIPResponse) and message.status == 200
    assert parse_address(message.get("To")).tag == "2"


def test_content_length_is_exact_and_body_beyond_it_ignored():
    text = INVITE.replace("Content-Length: 4", "Content-Length: 2")
    assert parse_message(text.encode()).body == b"v="
    request = SIPRequest(method="BYE", uri="sip:a@h")
    request.body = b"\xc3\xa9"
    assert b"Content-Length: 2\r\n\r\n" in request.to_bytes()


def test_keepalive_is_none():
    assert parse_message(b"\r\n\r\n") is None
    assert parse_message(b"\r\n") is None


@pytest.mark.parametrize("data, why", [
    (INVITE[:60].encode(), "truncated"),
    (INVITE.replace("Content-Length: 4", "Content-Length: 400").encode(), "Content-Length"),
    (INVITE.replace("Content-Length: 4", "Content-Length: -1").encode(), "Content-Length"),
    (INVITE.encode() + b"x" * 70000, "oversized"),
    (bytes(range(256)) * 4, "truncated|UTF-8|control"),
    (b"\xff\xfe\x00junk\r\n\r\n", "UTF-8|control"),
    (b"HELLO\r\n\r\n", "start line"),
    (INVITE.replace("CSeq: 1 INVITE", "CSeq: one INVITE").encode(), "CSeq"),
    (INVITE.replace("CSeq: 1 INVITE", "CSeq: 1 BYE").encode(), "CSeq"),
    (INVITE.replace("Call-ID: abc@host\r\n", "").encode(), "Call-ID"),
    (INVITE.replace("Max-Forwards: 70", "Max Forwards 70").encode(), "header line"),
    (INVITE.replace("SIP/2.0\r\n", "SIP/3.0\r\n", 1).encode(), "start line"),
])
def test_malformed_raise_clear_errors(data, why):
    with pytest.raises(SIPParseError, match=why):
        parse_message(data)


def test_stream_parsing_waits_for_the_whole_body():
    data = b"\r\n\r\n" + INVITE.encode()
    assert parse_stream(data[:-2]) == (None, 4)
    message, used = parse_stream(data + b"OPTIONS")
    assert message.method == "INVITE" and used == len(data)


def test_header_values():
    via = parse_via("SIP/2.0/UDP 10.0.0.2:5070;branch=z9hG4bK1;rport")
    assert (via.transport, via.host, via.port, via.branch, via.params["rport"]) == ("UDP", "10.0.0.2", 5070,
                                                                                   "z9hG4bK1", None)
    address = parse_address('"Bob" <sip:bob@h:5062;transport=udp>;tag=9')
    assert (address.display_name, address.uri, address.tag) == ("Bob", "sip:bob@h:5062;transport=udp", "9")
    assert uri_host_port("sip:bob@h:5062;transport=udp") == ("h", 5062)
    assert uri_host_port("sip:[2001:db8::1]:5080;lr") == ("2001:db8::1", 5080)
    assert uri_host_port("sip:proxy.example.com;lr") == ("proxy.example.com", None)

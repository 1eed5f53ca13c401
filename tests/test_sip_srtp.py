"""SDES-SRTP (RFC 4568 a=crypto, RFC 3711) and SIP over TLS: strict a=crypto parsing, protect/unprotect with
tampering and replays dropped and counted, SRTP offer/answer and policy, the RTP session encrypting and
authenticating, and the TLS listener (488 for plain RTP when SRTP is required, garbage and slow handshakes closed
and counted, client contexts verifying the peer)."""

import asyncio
import base64
import secrets
import ssl

import numpy as np
import pytest
from aiortc.rtp import RtpPacket

from pipecat_nemotron.transports.sip.message import parse_message, parse_via
from pipecat_nemotron.transports.sip.rtp import g711_encode
from pipecat_nemotron.transports.sip.sdp import SDPBuilder, SDPError, parse_sdp
from pipecat_nemotron.transports.sip.srtp import (Crypto, CryptoError, SrtpContext, SrtpError, new_crypto,
                                                  parse_crypto)
from pipecat_nemotron.transports.sip.tls import TLSConfigError, client_context, server_context
from sip_support import HOST, calls_recorder, rtp_session_and_peer, serving, until
from tls_support import make_certificates

KEY = base64.b64encode(bytes(range(30))).decode()  # 40 characters


@pytest.mark.parametrize("value, reason", [
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY[:-1]}!", "not 40 characters of base64"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY[:-4]}", "not 40 characters"),  # 27 bytes
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{base64.b64encode(bytes(31)).decode()}", "not 40 characters"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY[:-2]}==", "not 40 characters of base64"),  # padding inside
    (f"1 AES_256_CM_HMAC_SHA1_80 inline:{KEY}", "unsupported suite"),
    (f"1 F8_128_HMAC_SHA1_80 inline:{KEY}", "unsupported suite"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|2^49", "beyond 2^48"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|2^10", "too short"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|2^x", "bad lifetime"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|{'9' * 16}", "bad lifetime"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|1:0", "MKI length 0"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|1:5", "MKI length 5"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|256:1", "does not fit"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|1:1|2^31", "before the MKI"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|1:1;inline:{KEY}|2:1", "more than one key"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY} UNENCRYPTED_SRTP", "session parameter"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY} KDR=1", "session parameter"),
    (f"1234567890 AES_CM_128_HMAC_SHA1_80 inline:{KEY}", "bad tag"),
    (f"x AES_CM_128_HMAC_SHA1_80 inline:{KEY}", "bad tag"),
    (f"1 AES_CM_128_HMAC_SHA1_80 uri:{KEY}", "key method"),
    ("1 AES_CM_128_HMAC_SHA1_80", "needs a tag"),
    (f"1  AES_CM_128_HMAC_SHA1_80 inline:{KEY}", "needs a tag"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}\x00", "non-ASCII"),
    ("1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 600, "over-long"),
])
def test_bad_crypto_lines_are_refused_with_a_reason(value, reason):
    with pytest.raises(CryptoError, match=reason.replace("^", r"\^")):
        parse_crypto(value)


def test_good_crypto_lines():
    crypto = parse_crypto(f"7 AES_CM_128_HMAC_SHA1_32 inline:{KEY}|2^31|1:4 WSH=64")
    assert (crypto.tag, crypto.suite, crypto.key, crypto.lifetime, crypto.mki) == \
        (7, "AES_CM_128_HMAC_SHA1_32", bytes(range(30)), 2**31, (1, 4))
    assert parse_crypto(crypto.attribute()) == crypto
    assert KEY not in repr(crypto)  # keys never reach a log line


def rtp_packet(seq, *, ssrc=0x1234, payload=b"\xff" * 160, pt=0):
    return RtpPacket(payload_type=pt, sequence_number=seq, timestamp=seq * 160, ssrc=ssrc, payload=payload).serialize()


@pytest.mark.parametrize("suite, tag_bytes", [("AES_CM_128_HMAC_SHA1_80", 10), ("AES_CM_128_HMAC_SHA1_32", 4)])
def test_protect_unprotect_tampered_replayed_and_mki(suite, tag_bytes):
    ours, theirs = new_crypto(1, suite), new_crypto(1, suite)
    sender, receiver = SrtpContext(local=theirs, remote=ours), SrtpContext(local=ours, remote=theirs)
    plain = rtp_packet(1)
    secret = sender.protect(plain)
    assert len(secret) == len(plain) + tag_bytes and secret[12:] != plain[12:]
    assert receiver.unprotect(secret) == plain
    with pytest.raises(SrtpError, match="replay"):
        receiver.unprotect(secret)
    for position in (2, 20, len(secret) - 1):  # header, payload, tag
        tampered = bytearray(sender.protect(rtp_packet(10 + position)))
        tampered[position] ^= 0x01
        with pytest.raises(SrtpError):
            receiver.unprotect(bytes(tampered))
    with pytest.raises(SrtpError):
        receiver.unprotect(rtp_packet(50))  # plain RTP is not SRTP
    with pytest.raises(SrtpError):
        receiver.unprotect(b"\x80" * 8)
    wrong_key = SrtpContext(local=ours, remote=new_crypto(1, suite))
    with pytest.raises(SrtpError):
        wrong_key.unprotect(sender.protect(rtp_packet(260)))
    # a peer with an MKI puts it between the payload and the tag; we check and strip it
    with_mki = Crypto(tag=1, suite=suite, key=theirs.key, mki=(5, 2))
    receiver = SrtpContext(local=ours, remote=with_mki)
    secret = sender.protect(rtp_packet(270))
    assert receiver.unprotect(secret[:-tag_bytes] + b"\x00\x05" + secret[-tag_bytes:]) == rtp_packet(270)
    secret = sender.protect(rtp_packet(271))
    with pytest.raises(SrtpError, match="MKI"):
        receiver.unprotect(secret[:-tag_bytes] + b"\x00\x06" + secret[-tag_bytes:])


def savp_offer(crypto_lines, proto="RTP/SAVP"):
    lines = "".join(f"a=crypto:{line}\r\n" for line in crypto_lines)
    return (f"v=0\r\no=- 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio 5004 {proto} 0 101\r\na=rtpmap:101 telephone-event/8000\r\n{lines}")


def test_srtp_offer_answer_and_policy():
    lines = [f"1 AES_256_CM_HMAC_SHA1_80 inline:{KEY}", f"2 AES_CM_128_HMAC_SHA1_32 inline:{KEY}|2^31",
             f"3 AES_CM_128_HMAC_SHA1_80 inline:{KEY}"]
    builder = SDPBuilder(address=HOST, srtp="required")
    answer, negotiated = builder.answer(parse_sdp(savp_offer(lines)), port=4000)
    media = parse_sdp(answer).media[0]
    assert media.proto == "RTP/SAVP" and len(media.crypto) == 1
    ours = parse_crypto(media.crypto[0])
    assert (ours.tag, ours.suite) == (2, "AES_CM_128_HMAC_SHA1_32")  # the first usable line, offerer's order
    assert ours.key != bytes(range(30)) and negotiated.srtp
    assert negotiated.remote_crypto.key == bytes(range(30)) and negotiated.local_crypto.key == ours.key
    again, _ = builder.answer(parse_sdp(savp_offer(lines)), port=4000)  # a re-INVITE keeps our key
    assert parse_crypto(parse_sdp(again).media[0].crypto[0]).key == ours.key

    plain = savp_offer([], proto="RTP/AVP")
    with pytest.raises(SDPError, match="SRTP required but plain RTP/AVP offered"):
        builder.answer(parse_sdp(plain), port=4000)
    with pytest.raises(SDPError, match="no usable a=crypto .unsupported suite"):
        builder.answer(parse_sdp(savp_offer(lines[:1])), port=4000)
    with pytest.raises(SDPError, match="SRTP offered but disabled"):
        SDPBuilder(address=HOST, srtp="off").answer(parse_sdp(savp_offer(lines)), port=4000)
    # optional: plain stays plain; best-effort SRTP (RTP/AVP with a=crypto, baresip's "mediaenc srtp") is SRTP
    optional = SDPBuilder(address=HOST, srtp="optional")
    answer, negotiated = optional.answer(parse_sdp(plain), port=4000)
    assert "a=crypto" not in answer and not negotiated.srtp
    answer, negotiated = optional.answer(parse_sdp(savp_offer(lines, proto="RTP/AVP")), port=4000)
    assert "m=audio 4000 RTP/AVP 0 101" in answer and "a=crypto:2 AES_CM_128_HMAC_SHA1_32" in answer
    assert negotiated.srtp


def test_our_srtp_offer_and_reading_the_answer():
    offerer, answerer = SDPBuilder(address=HOST, srtp="required"), SDPBuilder(address=HOST, srtp="required")
    offer = offerer.offer(port=4000)
    assert "m=audio 4000 RTP/SAVP" in offer and offer.count("a=crypto:") == 2
    answer, theirs = answerer.answer(parse_sdp(offer), port=6000)
    ours = offerer.read_answer(parse_sdp(answer))
    assert ours.srtp and theirs.srtp
    assert (ours.local_crypto.key, ours.remote_crypto.key) == (theirs.remote_crypto.key, theirs.local_crypto.key)


def negotiated_srtp(peer_port):
    """(what the session is configured with, the peer's SrtpContext)."""
    builder = SDPBuilder(address=HOST, srtp="required")
    peer_key = new_crypto(1)
    offer = savp_offer([peer_key.attribute()]).replace("5004", str(peer_port))
    _, negotiated = builder.answer(parse_sdp(offer), port=4000)
    return negotiated, SrtpContext(local=peer_key, remote=negotiated.local_crypto)


async def test_rtp_session_drops_and_counts_tampered_replayed_and_plain_packets():
    session, port, peer = await rtp_session_and_peer()
    loop = asyncio.get_running_loop()
    try:
        negotiated, context = negotiated_srtp(peer.getsockname()[1])
        session.configure(negotiated)
        session.start()
        tone = (np.sin(np.arange(160) / 3) * 8000).astype("<i2").tobytes()
        good = context.protect(rtp_packet(1, payload=g711_encode(tone, "PCMU")))
        tampered = bytearray(good)
        tampered[30] ^= 0x40
        await loop.sock_sendto(peer, bytes(tampered), (HOST, port))  # a forgery cannot latch
        await loop.sock_sendto(peer, rtp_packet(1), (HOST, port))  # nor can plain RTP
        await asyncio.sleep(0.05)
        assert session.latched is None and session.stats.srtp_dropped == 2 and session.stats.packets_in == 0
        await loop.sock_sendto(peer, good, (HOST, port))
        await loop.sock_sendto(peer, good, (HOST, port))  # replayed
        await until(lambda: session.stats.packets_in == 1 and session.stats.srtp_dropped == 3)
        kind, pcm = session.events.get_nowait()
        assert kind == "audio" and np.corrcoef(np.frombuffer(pcm, "<i2"), np.frombuffer(tone, "<i2"))[0, 1] > 0.99
        assert session.latched == peer.getsockname() and session.events.empty()
        await asyncio.sleep(0.1)  # what we send is SRTP the peer can authenticate
        sent = [peer.recv(2048) for _ in range(3)]
        assert all(len(data) == 12 + 160 + 10 for data in sent)
        assert all(RtpPacket.parse(context.unprotect(data)).payload == b"\xff" * 160 for data in sent)
    finally:
        session.close()
        peer.close()


# --- SIP over TLS --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


def tls_request(method, *, tls_port, local_port, body="", call_id=None, uri=None, from_tag="caller1",
                to=f"<sip:bot@{HOST}>"):
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    return (f"{method} {uri or f'sip:bot@{HOST}:{tls_port};transport=tls'} SIP/2.0\r\n"
            f"Via: SIP/2.0/TLS {HOST}:{local_port};branch=z9hG4bK{secrets.token_hex(6)};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:caller@example.com>;tag={from_tag}\r\n"
            f"To: {to}\r\nCall-ID: {call_id or secrets.token_hex(8)}\r\nCSeq: 1 {method}\r\n"
            f"Contact: <sip:caller@{HOST}:{local_port};transport=tls>\r\n{ctype}"
            f"Content-Length: {len(body.encode())}\r\n\r\n{body}").encode()


async def read_message(reader):
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return parse_message(head + await reader.readexactly(length))


async def final_response(reader):
    while True:
        response = await read_message(reader)
        if response.status >= 200:
            return response


async def test_tls_call_needs_srtp_and_answers_it(certificates):
    ca, cert, key = certificates
    calls, on_call = calls_recorder()
    async with serving(on_call, tls_cert=str(cert), tls_key=str(key), tls_port=0) as server:
        tls_port = server.wire.tls_address[1]
        reader, writer = await asyncio.open_connection(HOST, tls_port, ssl=client_context(ca=ca),
                                                       server_hostname=HOST)
        local_port = writer.get_extra_info("sockname")[1]
        try:
            plain = savp_offer([], proto="RTP/AVP")
            writer.write(tls_request("INVITE", tls_port=tls_port, local_port=local_port, body=plain))
            refused = await final_response(reader)
            assert refused.status == 488 and not calls  # plain RTP over TLS: refused, SRTP is required there
            peer_key = new_crypto(1)
            writer.write(tls_request("INVITE", tls_port=tls_port, local_port=local_port,
                                     body=savp_offer([peer_key.attribute()]), uri=f"sips:bot@{HOST}:{tls_port}"))
            ok = await final_response(reader)
            assert ok.status == 200 and ok.get("Contact") == f"<sips:pipecat@{HOST}:{tls_port}>"
            media = parse_sdp(ok.body).media[0]
            assert media.proto == "RTP/SAVP" and parse_crypto(media.crypto[0]).suite == "AES_CM_128_HMAC_SHA1_80"
            await until(lambda: calls)
            assert calls[0].rtp.srtp and calls[0].negotiated.remote_crypto.key == peer_key.key
            writer.write(tls_request("ACK", tls_port=tls_port, local_port=local_port, call_id=ok.call_id,
                                     to=ok.get("To")))
            await calls[0].hangup("bot done")  # our BYE goes back on the TLS connection, with a TLS Via
            bye = await read_message(reader)
            assert bye.method == "BYE" and parse_via(bye.get_all("Via")[0]).transport == "TLS"
            assert f":{tls_port};" in bye.get_all("Via")[0]
        finally:
            writer.close()
    # over UDP/TCP SRTP stays optional by default: the plain offer gets a call (test_sip_uas covers it)


async def test_tls_garbage_and_slow_handshakes_are_closed_and_counted(certificates):
    ca, cert, key = certificates
    async with serving(tls_cert=str(cert), tls_key=str(key), tls_port=0, tls_handshake_secs=0.5) as server:
        tls_port = server.wire.tls_address[1]
        for junk in (b"OPTIONS sip:bot@127.0.0.1 SIP/2.0\r\n\r\n", b"\x16\x03\x01\x00\x05hello" + bytes(100),
                     secrets.token_bytes(3000)):
            reader, writer = await asyncio.open_connection(HOST, tls_port)
            writer.write(junk)
            await asyncio.wait_for(reader.read(), 3)  # the server closes it (what it says first is TLS alert)
            assert reader.at_eof()
            writer.close()
        reader, writer = await asyncio.open_connection(HOST, tls_port)  # connects and says nothing
        await asyncio.wait_for(reader.read(), 3)
        assert reader.at_eof()
        writer.close()
        await until(lambda: server.wire.tls_failures == 4 and server.wire.connections == 0)
        # a client that does not trust our certificate fails its side; the server counts it and goes on
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(HOST, tls_port, ssl=client_context(), server_hostname=HOST)
        with pytest.raises(ssl.SSLCertVerificationError):  # right CA, wrong name
            await asyncio.open_connection(HOST, tls_port, ssl=client_context(ca=ca), server_hostname="example.com")
        await until(lambda: server.wire.tls_failures == 6)
        reader, writer = await asyncio.open_connection(HOST, tls_port, ssl=client_context(ca=ca),
                                                       server_hostname="localhost")
        writer.write(tls_request("OPTIONS", tls_port=tls_port, local_port=writer.get_extra_info("sockname")[1]))
        assert (await read_message(reader)).status == 200
        writer.close()


def test_tls_contexts(certificates, tmp_path):
    ca, cert, key = certificates
    assert server_context(cert=cert, key=key).minimum_version == ssl.TLSVersion.TLSv1_2
    context = client_context(ca=ca)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname  # verification on by default
    assert client_context(verify=False).verify_mode == ssl.CERT_NONE
    assert server_context(cert=cert, key=key, client_ca=ca).verify_mode == ssl.CERT_REQUIRED
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TLSConfigError, match="junk.pem"):
        server_context(cert=tmp_path / "junk.pem", key=key)
    with pytest.raises(TLSConfigError):
        client_context(ca=tmp_path / "missing.pem")


def test_config_and_serve_sip_options(certificates, tmp_path):
    from pipecat_nemotron.apps import options, phone
    from pipecat_nemotron.transports.sip import SIPConfig

    ca, cert, key = certificates
    assert SIPConfig().srtp_policy(True) == "required" and SIPConfig().srtp_policy(False) == "optional"
    assert SIPConfig(srtp="off").srtp_policy(True) == "off"
    with pytest.raises(ValueError, match="srtp="):
        SIPConfig(srtp="maybe")
    with pytest.raises(ValueError, match="SPEEX"):
        SIPConfig(codecs=("SPEEX",))
    assert SIPConfig(codecs=("g722", "pcmu")).codecs == ("G722", "PCMU")
    args = phone.parse_args(["--tls-cert", str(cert), "--tls-key", str(key), "--tls-port", "5071", "--srtp", "off"])
    assert (args.tls_cert, args.tls_key, args.tls_port, args.srtp) == (str(cert), str(key), 5071, "off")
    options.check_tls(str(cert), str(key), 5061)  # loads: no error
    (tmp_path / "junk.pem").write_text("junk")
    for cert_path, key_path, message in ((tmp_path / "junk.pem", key, "junk.pem"), (None, key, "needs --tls-cert")):
        with pytest.raises(options.OptionError, match=message):
            options.check_tls(cert_path and str(cert_path), str(key_path), 5061)


async def test_tls_connections_count_against_the_tcp_caps_before_the_handshake(certificates):
    ca, cert, key = certificates
    async with serving(tls_cert=str(cert), tls_key=str(key), tls_port=0, tcp_max_per_source=2) as server:
        tls_port = server.wire.tls_address[1]
        held = [await asyncio.open_connection(HOST, tls_port) for _ in range(2)]  # no handshake yet: still counted
        await until(lambda: server.wire.connections == 2)
        reader, writer = await asyncio.open_connection(HOST, tls_port)
        assert await asyncio.wait_for(reader.read(), 3) == b"" and server.wire.tls_failures == 0  # refused at once
        writer.close()
        for _, w in held:
            w.close()
        await until(lambda: server.wire.connections == 0)
        reader, writer = await asyncio.open_connection(HOST, tls_port, ssl=client_context(ca=ca), server_hostname=HOST)
        writer.write(tls_request("OPTIONS", tls_port=tls_port, local_port=writer.get_extra_info("sockname")[1]))
        assert (await read_message(reader)).status == 200
        writer.close()

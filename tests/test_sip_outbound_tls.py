"""Outbound calls over TLS (issue 17 item 3, the client side): ``dial("sips:...")`` opens a verified TLS
connection, offers SDES-SRTP, and keeps every request of the call (INVITE, ACK, BYE) on that connection; a
certificate that does not verify fails the call with a clear reason and nothing is sent in clear.

The callee is our own SIP server with a TLS listener (a real TLS peer: Python's ssl, SRTP required on TLS)."""

import asyncio
import socket

import pytest
from aiortc.rtp import RtpPacket

from pipecat_nemotron.transports.sip.srtp import SrtpContext
from pipecat_nemotron.transports.sip.uac import SIPUserAgentClient
from sip_support import HOST, calls_recorder, serving, until
from tls_support import make_certificates


def _rtp(seq: int) -> bytes:
    return RtpPacket(payload_type=0, sequence_number=seq, timestamp=seq * 160, ssrc=0x4242,
                     payload=b"\xff" * 160).serialize()


async def test_sips_call_is_verified_srtp_and_stays_on_the_tls_connection(tmp_path):
    ca, cert, key = make_certificates(tmp_path / "pki")
    calls, on_call = calls_recorder()
    # The callee advertises another address in its Contact (as one behind NAT does): only our pinning of the
    # call to the TLS connection gets the BYE there; UDP to the Contact would be clear text, and lost.
    async with serving(on_call, tls_cert=str(cert), tls_key=str(key), tls_port=0,
                       advertised_host="127.0.0.3") as callee, serving() as caller:
        tls_port = callee.wire.tls_address[1]
        client = SIPUserAgentClient(uas=caller, tls_ca=str(ca))
        result = await client.dial(f"sips:bob@{HOST}:{tls_port}", ring_timeout=5)
        assert result.answered, result
        await until(lambda: calls and calls[0].state == "confirmed")  # our ACK came over TLS too
        ours, theirs = result.call, calls[0]
        assert caller.wire.is_secure(ours.remote_address) and callee.wire.is_secure(theirs.remote_address)
        assert theirs.invite.get_all("Via")[0].startswith("SIP/2.0/TLS ")
        assert theirs.remote_target.startswith("sips:")
        assert ours.remote_target.startswith("sips:pipecat@127.0.0.3:"), ours.remote_target  # its Contact
        assert ours.negotiated.srtp and theirs.negotiated.srtp  # RTP/SAVP offered and accepted
        assert ours.negotiated.local_crypto.key == theirs.negotiated.remote_crypto.key
        assert ours.negotiated.remote_crypto.key == theirs.negotiated.local_crypto.key
        # SRTP made with the callee's key reaches our session; what we send back opens with the callee's view
        far_end = SrtpContext(local=theirs.negotiated.local_crypto, remote=theirs.negotiated.remote_crypto)
        media = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        media.bind((HOST, 0))
        media.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            for seq in range(1, 4):
                await loop.sock_sendto(media, far_end.protect(_rtp(seq)), ours.rtp.local_address)
            await until(lambda: ours.rtp.stats.packets_in == 3)
            back = await asyncio.wait_for(loop.sock_recv(media, 2048), 2)
            assert len(far_end.unprotect(back)) == 12 + 160
            assert ours.rtp.stats.srtp_dropped == 0
        finally:
            media.close()
        await ours.hangup("test done")
        await until(lambda: theirs.ended.is_set())
        assert theirs.outcome == "caller hung up", theirs.outcome  # the BYE came on the TLS connection


@pytest.mark.parametrize("case", ["another CA", "another name"])
async def test_a_certificate_that_does_not_verify_fails_the_call_and_sends_nothing(tmp_path, case):
    """A certificate from a CA we do not trust, or one of our CA's for another name (it names 127.0.0.2 and
    localhost; we dial 127.0.0.1): refused in the handshake, the call fails saying why, the callee sees no SIP."""
    ca, cert, key = make_certificates(tmp_path / "server", host="127.0.0.2" if case == "another name" else HOST)
    trusted = make_certificates(tmp_path / "other")[0] if case == "another CA" else ca
    why = "certificate signature failure" if case == "another CA" else "IP address mismatch"
    calls, on_call = calls_recorder()
    async with serving(on_call, tls_cert=str(cert), tls_key=str(key), tls_port=0) as callee, serving() as caller:
        result = await SIPUserAgentClient(uas=caller, tls_ca=str(trusted)).dial(
            f"sips:bob@{HOST}:{callee.wire.tls_address[1]}")
        assert result.outcome == "failed" and f"certificate was refused ({why}" in result.reason, result
        await until(lambda: callee.wire.tls_failures == 1)
        assert not calls and not caller.wire.connections  # nothing answered, no connection left open


async def test_an_unreadable_ca_file_fails_the_dial_with_the_reason(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate")
    async with serving() as caller:
        result = await SIPUserAgentClient(uas=caller, tls_ca=str(tmp_path / "ca.pem")).dial(f"sips:bob@{HOST}:5061")
    assert result.outcome == "failed" and "TLS CA" in result.reason and "ca.pem" in result.reason, result


@pytest.mark.parametrize("peer", ["silent", "garbage"])
async def test_a_peer_that_is_not_a_tls_server_fails_the_dial_in_bounded_time(peer):
    """A port that accepts and says nothing (the handshake times out) or answers with plain junk: the dial fails
    with the reason within the handshake bound, and no connection is left behind."""
    async def accept(reader, writer):
        if peer == "garbage":
            writer.write(b"SIP/2.0 200 OK\r\n\r\n" + bytes(range(256)) * 4)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(accept, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with serving(tls_handshake_secs=0.5) as caller:
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = await SIPUserAgentClient(uas=caller).dial(f"sips:bob@{HOST}:{port}")
            assert result.outcome == "failed" and f"TLS to {HOST}:{port}: " in result.reason, result
            assert ("no TLS handshake in time" in result.reason) == (peer == "silent"), result.reason
            assert loop.time() - started < 2.0 and not caller.wire.connections
    finally:
        server.close()


async def test_calls_placed_at_once_to_one_peer_share_one_tls_connection(tmp_path):
    """Three dials at the same moment: one handshake, one connection, three calls on it, each hung up on it."""
    ca, cert, key = make_certificates(tmp_path / "pki")
    calls, on_call = calls_recorder()
    async with serving(on_call, tls_cert=str(cert), tls_key=str(key), tls_port=0) as callee, serving() as caller:
        client = SIPUserAgentClient(uas=caller, tls_ca=str(ca))
        target = f"sips:bob@{HOST}:{callee.wire.tls_address[1]}"
        results = await asyncio.gather(*(client.dial(target, ring_timeout=5) for _ in range(3)))
        assert all(r.answered for r in results), results
        assert caller.wire.connections == 1 and callee.wire.connections == 1
        assert len({r.call.remote_address for r in results}) == 1
        await asyncio.gather(*(r.call.hangup("test done") for r in results))
        await until(lambda: len(calls) == 3 and all(c.outcome == "caller hung up" for c in calls))

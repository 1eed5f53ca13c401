"""RTP: G.711, reordering, RFC 4733 DTMF, symmetric RTP and continuous sending."""

import asyncio
import socket
import struct

import numpy as np
from aiortc.rtp import RtpPacket

from pipecat_nemotron.transports.sip.rtp import (DTMFDecoder, ReorderBuffer, RtpSession, g711_decode,
                                                 g711_encode)
from pipecat_nemotron.transports.sip.sdp import Negotiated


def packet(seq, payload=b"\xff" * 160, pt=0, ts=None, ssrc=1):
    return RtpPacket(payload_type=pt, sequence_number=seq & 0xFFFF, timestamp=ts if ts is not None else seq * 160,
                     ssrc=ssrc, payload=payload)


def test_g711_round_trip_both_laws():
    tone = (np.sin(np.arange(160) / 8000 * 2 * np.pi * 440) * 8000).astype("<i2").tobytes()
    for codec in ("PCMU", "PCMA"):
        encoded = g711_encode(tone, codec)
        assert len(encoded) == 160
        decoded = np.frombuffer(g711_decode(encoded, codec), dtype="<i2")
        assert np.max(np.abs(decoded - np.frombuffer(tone, dtype="<i2"))) < 300


def test_reorder_in_order_passes_at_once_and_wraps():
    buffer = ReorderBuffer(depth=3)
    out = [buffer.push(packet(s)) for s in (65534, 65535, 0, 1)]
    assert [[p.sequence_number for p in o] for o in out] == [[65534], [65535], [0], [1]]


def test_reorder_swaps_drops_duplicates_and_conceals_loss():
    buffer = ReorderBuffer(depth=2)
    assert [p.sequence_number for p in buffer.push(packet(10))] == [10]
    assert buffer.push(packet(12)) == []
    assert [p.sequence_number for p in buffer.push(packet(11))] == [11, 12]
    assert buffer.push(packet(11)) == [] and buffer.late == 1
    assert buffer.push(packet(14)) == [] and buffer.push(packet(15)) == []
    out = buffer.push(packet(16))  # 13 is given up once 3 packets wait behind it
    assert [None if p is None else p.sequence_number for p in out] == [None, 14, 15, 16]
    assert buffer.lost == 1


def event(digit, end, duration=800):
    return struct.pack("!BBH", digit, (0x80 if end else 0) | 10, duration)


def test_dtmf_end_packets_deduplicated():
    decoder = DTMFDecoder()
    digits = []
    for payload in [event(5, False), event(5, False), event(5, True), event(5, True), event(5, True)]:
        digits += decoder.feed(payload, 1000)
    assert digits == ["5"]
    # the same digit again is a new event (new timestamp); 11 is '#'
    assert decoder.feed(event(5, True), 2000) == ["5"]
    assert decoder.feed(event(11, True), 3000) == ["#"]


def test_dtmf_replayed_events_with_one_timestamp_are_distinct_digits():
    decoder = DTMFDecoder()  # sipp's stock pcaps all carry timestamp 13280
    digits = []
    for digit in (1, 5, 11):
        for end in (False, True, True, True):
            digits += decoder.feed(event(digit, end), 13280)
    assert digits == ["1", "5", "#"]


def test_dtmf_without_end_packets_reported_at_next_event():
    decoder = DTMFDecoder()
    assert decoder.feed(event(1, False), 1000) == []
    assert decoder.feed(event(2, False), 2000) == ["1"]
    assert decoder.feed(event(2, True), 2000) == ["2"]


async def test_symmetric_rtp_latching_and_continuous_sending():
    session = RtpSession()
    _, port = await session.open(host="127.0.0.1")
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (peer, other):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        session.configure(Negotiated(codec="PCMU", payload_type=0, dtmf_payload_type=101, remote_host="127.0.0.1",
                                     remote_port=peer.getsockname()[1], direction="sendrecv"))
        session.start()
        await asyncio.sleep(0.1)
        assert session.stats.packets_out == 0  # nothing goes out before the peer's first packet
        await loop.sock_sendto(peer, packet(1).serialize(), ("127.0.0.1", port))  # latches
        await asyncio.sleep(0.25)  # then silence flows, though nothing was written
        received = []
        while True:
            try:
                received.append(RtpPacket.parse(peer.recv(2048)))
            except BlockingIOError:
                break
        assert len(received) >= 8
        assert received[0].marker == 1 and all(p.payload == b"\xff" * 160 for p in received)
        assert [(p.sequence_number - received[0].sequence_number) & 0xFFFF for p in received] == \
            list(range(len(received)))
        assert (received[1].timestamp - received[0].timestamp) & 0xFFFFFFFF == 160

        await loop.sock_sendto(other, packet(2, ssrc=9).serialize(), ("127.0.0.1", port))  # injected: ignored
        await loop.sock_sendto(peer, packet(3, pt=96).serialize(), ("127.0.0.1", port))  # not negotiated
        await loop.sock_sendto(peer, b"\x80\xc8junk", ("127.0.0.1", port))  # RTCP-ish / junk
        huge = RtpPacket(payload_type=0, sequence_number=4, timestamp=480, ssrc=0x1234, payload=b"\xff" * 60000)
        await loop.sock_sendto(peer, huge.serialize(), ("127.0.0.1", port))  # 7.5 s of "audio" in one packet
        await asyncio.sleep(0.1)
        assert session.latched == peer.getsockname()
        assert session.stats.packets_in == 1 and session.stats.ignored == 4
        kind, pcm = session.events.get_nowait()
        assert kind == "audio" and len(pcm) == 320 and session.events.empty()
    finally:
        session.close()
        peer.close()
        other.close()


async def test_rfc4733_sending_round_trips_through_the_decoder():
    session = RtpSession()
    _, port = await session.open(host="127.0.0.1")
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    try:
        session.configure(Negotiated(codec="PCMA", payload_type=8, dtmf_payload_type=96, remote_host="127.0.0.1",
                                     remote_port=peer.getsockname()[1], direction="sendrecv"))
        await asyncio.get_running_loop().sock_sendto(peer, packet(1, pt=8).serialize(), ("127.0.0.1", port))
        await asyncio.sleep(0.05)
        assert session.latched == peer.getsockname()
        assert session.send_dtmf("5", duration_ms=60) and session.send_dtmf("#", duration_ms=40)
        for _ in range(12):
            session.send_packet()
        packets = [RtpPacket.parse(peer.recv(2048)) for _ in range(12)]
        events = [p for p in packets if p.payload_type == 96]
        assert len(events) == 3 + 3 + 2 + 3  # per digit: duration packets, then three end packets
        assert events[0].marker == 1 and len({p.timestamp for p in events[:6]}) == 1
        assert events[0].timestamp != events[6].timestamp
        decoder = DTMFDecoder()
        digits = [d for p in events for d in decoder.feed(p.payload, p.timestamp)]
        assert digits == ["5", "#"]
        assert [p.payload_type for p in packets[11:]] == [8]  # audio (silence) resumes
        assert not session.dtmf_pending
        session.configure(Negotiated(codec="PCMU", payload_type=0, dtmf_payload_type=None,
                                     remote_host="127.0.0.1", remote_port=peer.getsockname()[1],
                                     direction="sendrecv"))
        assert not session.send_dtmf("1")  # no telephone-event offered
    finally:
        session.close()
        peer.close()

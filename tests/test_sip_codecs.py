"""Wideband calls: G.722 (16 kHz audio on an 8000 Hz RTP clock) and Opus (48 kHz, opus/48000/2) through PyAV,
chosen in the caller's order alongside G.711, with the decoded audio reaching the pipeline at its real rate."""

import asyncio

import numpy as np
import pytest
from aiortc.rtp import RtpPacket
from pipecat.frames.frames import InputAudioRawFrame

from pipecat_nemotron.transports.codecs import SPECS, MediaCodec
from pipecat_nemotron.transports.g722 import G722Decoder
from pipecat_nemotron.transports.pyav_audio import CodecError
from pipecat_nemotron.transports.sip.sdp import SDPBuilder, SDPError, parse_sdp
from sip_support import HOST, Collector, rtp_session_and_peer, run_call_pipeline, serving, until
from test_sip_uas import Dialog, Peer, media_port


def tone(frequency, rate, seconds=1.0, amplitude=8000):
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * frequency * t) * amplitude).astype("<i2")


def best_correlation(received, sent, max_lag=2000):
    scores = []
    for lag in range(max_lag):
        a = received[lag:lag + len(sent) // 2].astype(float)
        b = sent[:len(a)].astype(float)
        scores.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
    return max(scores)


def peak_hz(samples, rate):
    spectrum = np.abs(np.fft.rfft(samples.astype(float) * np.hanning(len(samples))))
    return np.argmax(spectrum) * rate / len(samples)


@pytest.mark.parametrize("name, packet_bytes", [("G722", 160), ("OPUS", None), ("PCMU", 160)])
def test_codec_round_trip_keeps_the_band(name, packet_bytes):
    codec, peer = MediaCodec(name), MediaCodec(name)
    rate = codec.sample_rate
    frequency = 300 if name == "PCMU" else 6000  # above G.711's 4 kHz: only a wideband codec carries it
    sent = tone(frequency, rate)
    step = codec.spec.samples(20)
    payloads = [codec.encode(sent[i:i + step].tobytes()) for i in range(0, len(sent), step)]
    if packet_bytes:
        assert {len(p) for p in payloads} == {packet_bytes}
    received = np.frombuffer(b"".join(peer.decode(p) for p in payloads), dtype="<i2")
    assert len(received) == len(sent)
    assert best_correlation(received, sent) > (0.9 if name == "OPUS" else 0.98)  # Opus is perceptual, not waveform
    assert abs(peak_hz(received[rate // 10:], rate) - frequency) < 20


def test_rates_and_clocks():
    assert (SPECS["G722"].sample_rate, SPECS["G722"].clock_rate, SPECS["G722"].rtpmap) == (16000, 8000, "G722/8000")
    assert (SPECS["G722"].samples(20), SPECS["G722"].ticks(20)) == (320, 160)
    assert (SPECS["OPUS"].samples(20), SPECS["OPUS"].ticks(20), SPECS["OPUS"].rtpmap) == (960, 960, "opus/48000/2")


def test_corrupt_packets_raise_codec_error():
    with pytest.raises(CodecError):
        MediaCodec("OPUS").decode(b"\xff" * 3)
    assert len(G722Decoder().decode(b"\x00" * 160)) == 640  # any bytes are G.722: 320 samples


def offer(formats, rtpmaps):
    lines = "".join(f"a=rtpmap:{m}\r\n" for m in rtpmaps)
    return (f"v=0\r\no=- 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\nm=audio 5004 RTP/AVP {formats}\r\n"
            f"{lines}")


@pytest.mark.parametrize("formats, rtpmaps, codec, pt", [
    ("9 0 8 101", ["101 telephone-event/8000"], "G722", 9),
    ("0 9 8", [], "PCMU", 0),  # the caller prefers G.711: so do we
    ("96 9 0", ["96 opus/48000/2"], "OPUS", 96),
    ("97 9", ["97 G722/16000"], "G722", 9),  # G722 at a 16000 clock is not RFC 3551's: skipped
    ("98 0", ["98 OPUS/48000/2"], "OPUS", 98),  # encoding names are case-insensitive
])
def test_caller_preference_among_g711_g722_opus(formats, rtpmaps, codec, pt):
    answer, negotiated = SDPBuilder(address=HOST).answer(parse_sdp(offer(formats, rtpmaps)), port=4000)
    assert (negotiated.codec, negotiated.payload_type) == (codec, pt)
    assert f"a=rtpmap:{pt} {SPECS[codec].rtpmap}" in answer
    if codec == "OPUS":
        assert f"a=fmtp:{pt} minptime=10;useinbandfec=1;stereo=0" in answer


def test_codecs_policy_limits_the_choice():
    with pytest.raises(SDPError, match="none of PCMU/PCMA"):
        SDPBuilder(address=HOST, codecs=("PCMU", "PCMA")).answer(parse_sdp(offer("9", [])), port=4000)
    with pytest.raises(ValueError):
        SDPBuilder(address=HOST, codecs=("SPEEX",))



@pytest.mark.parametrize("name, pt, ticks, pcm_bytes", [("G722", 9, 160, 640), ("OPUS", 111, 960, 1920)])
async def test_rtp_session_clock_and_rate(name, pt, ticks, pcm_bytes):
    from pipecat_nemotron.transports.sip.sdp import Negotiated

    session, port, peer = await rtp_session_and_peer()
    try:
        session.configure(Negotiated(codec=name, payload_type=pt, dtmf_payload_type=None, remote_host=HOST,
                                     remote_port=peer.getsockname()[1], direction="sendrecv"))
        assert session.sample_rate == SPECS[name].sample_rate
        encoder = MediaCodec(name)
        payload = encoder.encode(tone(1000, session.sample_rate, 0.02).tobytes())
        packet = RtpPacket(payload_type=pt, sequence_number=1, timestamp=0, ssrc=5, payload=payload)
        await asyncio.get_running_loop().sock_sendto(peer, packet.serialize(), (HOST, port))
        await until(lambda: not session.events.empty())
        kind, pcm = session.events.get_nowait()
        assert kind == "audio" and len(pcm) == pcm_bytes  # 20 ms at the codec's own rate
        session.write(tone(1000, session.sample_rate, 0.06).tobytes())
        for _ in range(3):
            session.send_packet()
        sent = [RtpPacket.parse(peer.recv(2048)) for _ in range(3)]
        assert [(p.timestamp - sent[0].timestamp) & 0xFFFFFFFF for p in sent] == [0, ticks, 2 * ticks]
        assert all(p.payload_type == pt for p in sent) and not session.buffered_seconds
    finally:
        session.close()
        peer.close()


def g722_offer(rtp_port):
    return (f"v=0\r\no=peer 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio {rtp_port} RTP/AVP 9 0 101\r\na=rtpmap:101 telephone-event/8000\r\n")


async def test_g722_call_reaches_the_pipeline_at_16_khz():
    """A 6 kHz tone over G.722 arrives as 16 kHz InputAudioRawFrames with the tone in them (not narrowed)."""
    collector, done = Collector(), asyncio.Event()
    rates = []

    async def on_call(call):
        from pipecat_nemotron.transports.sip import SIPCallTransport
        rates.append(SIPCallTransport(call=call).sample_rate)
        await run_call_pipeline(call, collector)
        done.set()

    peer, rtp_peer = Peer(), Peer()
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: peer, local_addr=(HOST, 0))
    await loop.create_datagram_endpoint(lambda: rtp_peer, local_addr=(HOST, 0))
    try:
        async with serving(on_call) as server:
            dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
            dialog.invite_branch = "z9hG4bKg722"
            peer.send(dialog.request("INVITE", body=g722_offer(rtp_peer.port), branch=dialog.invite_branch),
                      server.port)
            ok = await peer.expect(status=200)
            dialog.take_tag(ok)
            dialog.ack()
            assert "a=rtpmap:9 G722/8000" in ok.body.decode()
            encoder, sent = MediaCodec("G722"), tone(6000, 16000, 0.6)
            for i, start in enumerate(range(0, len(sent), 320)):
                packet = RtpPacket(payload_type=9, sequence_number=i, timestamp=i * 160, ssrc=7,
                                   payload=encoder.encode(sent[start:start + 320].tobytes()))
                rtp_peer.send(packet.serialize(), media_port(ok))
                await asyncio.sleep(0.005)
            await until(lambda: len(collector.of(InputAudioRawFrame)) >= 25, timeout=5)
            dialog.send("BYE")
            await asyncio.wait_for(done.wait(), 10)
    finally:
        peer.transport.close()
        rtp_peer.transport.close()
    frames = collector.of(InputAudioRawFrame)
    assert rates == [16000] and {f.sample_rate for f in frames} == {16000}
    audio = np.frombuffer(b"".join(f.audio for f in frames), dtype="<i2")
    assert len(audio) >= 0.5 * 16000 and abs(peak_hz(audio[1600:], 16000) - 6000) < 20


def test_telephone_event_at_the_codec_clock():
    """RFC 4733 events count the audio's RTP clock: an Opus call takes telephone-event/48000 when offered."""
    opus = offer("96 101 102", ["96 opus/48000/2", "101 telephone-event/8000", "102 telephone-event/48000"])
    answer, negotiated = SDPBuilder(address=HOST).answer(parse_sdp(opus), port=4000)
    assert (negotiated.dtmf_payload_type, negotiated.dtmf_clock_rate) == (102, 48000)
    assert "a=rtpmap:102 telephone-event/48000" in answer and "m=audio 4000 RTP/AVP 96 102" in answer
    only_8k = offer("96 101", ["96 opus/48000/2", "101 telephone-event/8000"])
    assert SDPBuilder(address=HOST).answer(parse_sdp(only_8k), port=4000)[1].dtmf_clock_rate == 8000
    g722 = offer("9 101 102", ["101 telephone-event/16000", "102 telephone-event/8000"])
    assert SDPBuilder(address=HOST).answer(parse_sdp(g722), port=4000)[1].dtmf_payload_type == 102  # G.722: 8000


async def test_dtmf_durations_count_the_event_clock():
    from pipecat_nemotron.transports.sip.rtp import DTMFDecoder

    session, port, peer = await rtp_session_and_peer()
    try:
        opus = offer("96 102", ["96 opus/48000/2", "102 telephone-event/48000"]).replace("5004",
                                                                                         str(peer.getsockname()[1]))
        session.configure(SDPBuilder(address=HOST).answer(parse_sdp(opus), port=4000)[1])
        packet = RtpPacket(payload_type=96, sequence_number=1, timestamp=0, ssrc=5,
                           payload=MediaCodec("OPUS").encode(bytes(1920)))
        await asyncio.get_running_loop().sock_sendto(peer, packet.serialize(), (HOST, port))
        await until(lambda: session.latched is not None)
        assert session.send_dtmf("7", duration_ms=60)
        for _ in range(6):
            session.send_packet()
        events = [RtpPacket.parse(peer.recv(2048)) for _ in range(6)]
        durations = [int.from_bytes(p.payload[2:4], "big") for p in events]
        assert all(p.payload_type == 102 for p in events) and durations == [960, 1920, 2880, 2880, 2880, 2880]
        decoder = DTMFDecoder()
        assert [d for p in events for d in decoder.feed(p.payload, p.timestamp)] == ["7"]
    finally:
        session.close()
        peer.close()

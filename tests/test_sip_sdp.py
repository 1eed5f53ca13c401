"""SDP offer/answer (RFC 3264): G.711, G.722 and Opus in the caller's order, SDES-SRTP (RFC 4568)."""

import pytest

from pipecat_nemotron.transports.sip.sdp import SDPBuilder, SDPError, parse_sdp, read_answer

LINPHONE_LIKE = """v=0
o=alice 1 1 IN IP4 10.254.0.1
s=Talk
c=IN IP4 10.254.0.1
t=0 0
m=audio 7078 RTP/AVP 96 97 98 8 0 18 99 100 101
a=rtpmap:96 opus/48000/2
a=rtpmap:97 speex/16000
a=rtpmap:98 speex/8000
a=rtpmap:99 telephone-event/48000
a=rtpmap:100 telephone-event/16000
a=rtpmap:101 telephone-event/8000
m=video 9078 RTP/AVP 102
a=rtpmap:102 VP8/90000
"""


def answer_lines(text):
    return [line for line in text.split("\r\n") if line]


def test_caller_preference_payload_numbers_and_video_rejected():
    builder = SDPBuilder(address="127.0.0.1", codecs=("PCMU", "PCMA"))  # G.711 only: the first one offered is PCMA
    answer, negotiated = builder.answer(parse_sdp(LINPHONE_LIKE), port=4000)
    lines = answer_lines(answer)
    media = [line for line in lines if line.startswith("m=")]
    assert media == ["m=audio 4000 RTP/AVP 8 101", "m=video 0 RTP/AVP 102"]  # same m-lines, same order
    assert "a=rtpmap:101 telephone-event/8000" in lines and "a=rtpmap:8 PCMA/8000" in lines
    assert (negotiated.codec, negotiated.payload_type, negotiated.dtmf_payload_type) == ("PCMA", 8, 101)
    assert negotiated.remote == ("10.254.0.1", 7078) and negotiated.direction == "sendrecv"


def test_dynamic_telephone_event_and_media_level_connection():
    offer = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 5004 RTP/AVP 0 13 118\r\n"
             "c=IN IP4 192.0.2.7\r\na=rtpmap:118 telephone-event/8000\r\na=fmtp:118 0-15\r\n")
    answer, negotiated = SDPBuilder(address="127.0.0.1").answer(parse_sdp(offer), port=4000)
    assert "m=audio 4000 RTP/AVP 0 118" in answer
    assert negotiated.remote == ("192.0.2.7", 5004) and negotiated.dtmf_payload_type == 118


@pytest.mark.parametrize("offered, answered, we_send", [
    ("sendonly", "recvonly", False), ("inactive", "inactive", False), ("recvonly", "sendonly", True),
    ("sendrecv", "sendrecv", True),
])
def test_hold_directions(offered, answered, we_send):
    offer = LINPHONE_LIKE.replace("m=video", f"a={offered}\nm=video")
    answer, negotiated = SDPBuilder(address="127.0.0.1").answer(parse_sdp(offer), port=4000)
    assert f"a={answered}" in answer
    assert negotiated.direction == answered and negotiated.we_send is we_send


def test_session_level_direction_applies():
    offer = LINPHONE_LIKE.replace("t=0 0", "t=0 0\na=sendonly")
    _, negotiated = SDPBuilder(address="127.0.0.1").answer(parse_sdp(offer), port=4000)
    assert negotiated.direction == "recvonly"


def test_no_codec_of_ours_is_an_error():
    offer = "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5004 RTP/AVP 96\na=rtpmap:96 opus/48000/2\n"
    with pytest.raises(SDPError, match="none of PCMU/PCMA offered"):
        SDPBuilder(address="127.0.0.1", codecs=("PCMU", "PCMA")).answer(parse_sdp(offer), port=4000)
    speex = offer.replace("opus/48000/2", "speex/16000")
    with pytest.raises(SDPError, match="none of PCMU/PCMA/G722/OPUS offered"):
        SDPBuilder(address="127.0.0.1").answer(parse_sdp(speex), port=4000)
    with pytest.raises(SDPError):
        parse_sdp("hello")


def test_version_bumps_only_when_changed():
    builder = SDPBuilder(address="127.0.0.1")
    first, _ = builder.answer(parse_sdp(LINPHONE_LIKE), port=4000)
    same, _ = builder.answer(parse_sdp(LINPHONE_LIKE), port=4000)
    held, _ = builder.answer(parse_sdp(LINPHONE_LIKE.replace("m=video", "a=sendonly\nm=video")), port=4000)
    origin = [next(line for line in body.split("\r\n") if line.startswith("o=")) for body in (first, same, held)]
    assert origin[0] == origin[1] != origin[2]
    assert builder.repeat() == held


def test_our_offer_and_reading_the_answer():
    builder = SDPBuilder(address="127.0.0.1")
    offer = builder.offer(port=4000)
    assert "m=audio 4000 RTP/AVP 0 8 9 111 101" in offer and "a=rtpmap:111 opus/48000/2" in offer
    answer = "v=0\no=- 2 2 IN IP4 h\ns=-\nc=IN IP4 10.0.0.9\nt=0 0\nm=audio 6000 RTP/AVP 8 101\n" \
             "a=rtpmap:101 telephone-event/8000\n"
    negotiated = read_answer(parse_sdp(answer))
    assert (negotiated.codec, negotiated.payload_type, negotiated.remote) == ("PCMA", 8, ("10.0.0.9", 6000))

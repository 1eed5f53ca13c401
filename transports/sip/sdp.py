"""SDP (RFC 4566) and the offer/answer model (RFC 3264) for one G.711 audio stream.

The answer keeps the offer's m-lines in order: the first audio m-line we can serve is accepted with
PCMU or PCMA in the caller's preference and the caller's payload numbers (plus telephone-event on the
caller's dynamic payload type); every other m-line (video, a second audio, an unknown codec) is
rejected with port 0. When an INVITE carries no SDP we make the offer and read the answer from the ACK.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field

STATIC_PAYLOADS = {0: ("PCMU", 8000), 8: ("PCMA", 8000), 13: ("CN", 8000)}
SUPPORTED_CODECS = ("PCMU", "PCMA")
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
MAX_LINES = 512
MAX_MEDIA = 16
MAX_FORMATS = 64
_PORT = re.compile(r"^([0-9]{1,5})(?:/([0-9]{1,3}))?$")  # ASCII digits only, never str.isdigit()
_PAYLOAD_TYPE = re.compile(r"^[0-9]{1,3}$")
_ANSWER_DIRECTION = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}


class SDPError(ValueError):
    """The SDP is malformed or offers nothing we can answer; the message says which."""


@dataclass
class Media:
    """One m-line with the attributes we need."""

    kind: str
    port: int
    proto: str
    formats: list[str]
    connection: str | None = None
    rtpmap: dict[int, tuple[str, int]] = field(default_factory=dict)
    fmtp: dict[int, str] = field(default_factory=dict)
    direction: str | None = None
    ptime: int | None = None

    def codec(self, pt: int) -> tuple[str, int] | None:
        """(encoding name upper-case, clock rate) of a payload type, static or from a=rtpmap."""
        if pt in self.rtpmap:
            return self.rtpmap[pt]
        return STATIC_PAYLOADS.get(pt)


@dataclass
class Session:
    """A parsed session description."""

    origin: str = ""
    connection: str | None = None
    direction: str = "sendrecv"
    media: list[Media] = field(default_factory=list)


@dataclass(frozen=True)
class Negotiated:
    """What the offer/answer agreed for the audio stream."""

    codec: str  # "PCMU" or "PCMA"
    payload_type: int
    dtmf_payload_type: int | None
    remote_host: str
    remote_port: int
    direction: str  # our direction: sendrecv, sendonly (caller holds), recvonly, inactive

    @property
    def we_send(self) -> bool:
        return self.direction in ("sendrecv", "sendonly") and self.remote_port != 0

    @property
    def remote(self) -> tuple[str, int]:
        return self.remote_host, self.remote_port


def payload_type(text: str) -> int | None:
    """An RTP payload type 0..127 written in ASCII digits, else None."""
    if not _PAYLOAD_TYPE.match(text):
        return None
    number = int(text)
    return number if number <= 127 else None


def _connection_address(value: str) -> str:
    """The address of a c= line: an IPv4/IPv6 literal of the stated family (never a name: no DNS, RFC 3264
    callers send literals), not multicast. ``0.0.0.0`` (old-style hold) is allowed."""
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SDPError(f"bad c= line {value[:60]!r}")
    text = parts[2].split("/")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise SDPError(f"c= address is not an IP literal: {text[:60]!r}") from None
    if address.version != (4 if parts[1] == "IP4" else 6) or address.is_multicast:
        raise SDPError(f"c= address not usable: {text[:60]!r}")
    return str(address)


def _media_line(value: str) -> Media:
    parts = value.split()
    port = _PORT.match(parts[1]) if len(parts) >= 4 else None
    if port is None or int(port.group(1)) > 65535 or len(parts) - 3 > MAX_FORMATS:
        raise SDPError(f"bad m= line {value[:60]!r}")
    media = Media(kind=parts[0], port=int(port.group(1)), proto=parts[2], formats=parts[3:])
    if "RTP/" in media.proto and any(payload_type(fmt) is None for fmt in media.formats):
        raise SDPError(f"bad payload type in m= line {value[:60]!r}")
    return media


def _attribute(media: Media | None, session: Session, value: str) -> None:
    name, _, rest = value.partition(":")
    if name in DIRECTIONS:
        if media is None:
            session.direction = name
        else:
            media.direction = name
    elif media is None:
        return
    elif name == "rtpmap":  # attributes we cannot read are ignored, as RFC 4566 §5.13 allows
        pt, _, encoding = rest.partition(" ")
        enc = encoding.strip().split("/")
        if payload_type(pt) is not None and len(enc) >= 2 and re.fullmatch("[0-9]{1,6}", enc[1]):
            media.rtpmap[payload_type(pt)] = (enc[0].upper(), int(enc[1]))
    elif name == "fmtp":
        pt, _, params = rest.partition(" ")
        if payload_type(pt) is not None:
            media.fmtp[payload_type(pt)] = params.strip()
    elif name == "ptime" and re.fullmatch("[0-9]{1,4}", rest.strip()) and 1 <= int(rest.strip()) <= 1000:
        media.ptime = int(rest.strip())


def parse_sdp(text: str | bytes) -> Session:
    """Parse an SDP body; SDPError when it is not SDP."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    session, media = Session(), None
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or not lines[0].startswith("v="):
        raise SDPError("SDP does not start with v=")
    if len(lines) > MAX_LINES:
        raise SDPError(f"SDP has {len(lines)} lines (> {MAX_LINES})")
    for line in lines:
        if len(line) < 2 or line[1] != "=":
            raise SDPError(f"bad SDP line {line[:60]!r}")
        key, value = line[0], line[2:]
        if key == "o":
            session.origin = value
        elif key == "c":
            if media is None:
                session.connection = _connection_address(value)
            else:
                media.connection = _connection_address(value)
        elif key == "m":
            if len(session.media) >= MAX_MEDIA:
                raise SDPError(f"more than {MAX_MEDIA} m= lines")
            media = _media_line(value)
            session.media.append(media)
        elif key == "a":
            _attribute(media, session, value)
    return session


def _pick_codec(media: Media, codecs: tuple[str, ...]) -> tuple[int, str] | None:
    for pt in filter(lambda p: p is not None, map(payload_type, media.formats)):
        codec = media.codec(pt)
        if codec and codec[0] in codecs and codec[1] == 8000:
            return pt, codec[0]
    return None


def _dtmf_payload(media: Media) -> int | None:
    for pt in filter(lambda p: p is not None, map(payload_type, media.formats)):
        if media.rtpmap.get(pt, ("", 0)) == ("TELEPHONE-EVENT", 8000):
            return pt
    return None


def _audio_match(media: Media, codecs: tuple[str, ...]) -> tuple[int, str] | None:
    if media.kind != "audio" or media.port == 0 or "RTP/AVP" not in media.proto or "SAVP" in media.proto:
        return None
    return _pick_codec(media, codecs)


class SDPBuilder:
    """Builds our SDP bodies: one origin (session id, version bumped when the content changes)."""

    def __init__(self, *, address: str, user: str = "pipecat"):
        self.address = address
        self.user = user
        self.session_id = int(time.time() * 1000) % (2**31)
        self.version = self.session_id
        self._last_body: str | None = None

    def _family(self) -> str:
        return "IP6" if ":" in self.address else "IP4"

    def _head(self) -> list[str]:
        fam = self._family()
        return [
            "v=0",
            f"o={self.user} {self.session_id} {self.version} IN {fam} {self.address}",
            "s=pipecat",
            f"c=IN {fam} {self.address}",
            "t=0 0",
        ]

    def _finish(self, media_lines: list[str]) -> str:
        body_media = "\r\n".join(media_lines)
        if self._last_body is not None and self._last_body != body_media:
            self.version += 1
        self._last_body = body_media
        return "\r\n".join(self._head() + media_lines) + "\r\n"

    def answer(self, offer: Session, *, port: int, codecs: tuple[str, ...] = SUPPORTED_CODECS,
               hold: bool = False) -> tuple[str, Negotiated]:
        """The answer to an offer and what it agrees; SDPError when no audio m-line is acceptable."""
        lines, chosen = [], None
        for media in offer.media:
            match = _audio_match(media, codecs) if chosen is None else None
            if match is None:
                fmt = " ".join(media.formats)
                lines.append(f"m={media.kind} 0 {media.proto} {fmt}")
                continue
            pt, codec = match
            dtmf = _dtmf_payload(media)
            offered_dir = media.direction or offer.direction
            direction = "inactive" if hold else _ANSWER_DIRECTION[offered_dir]
            host = media.connection or offer.connection
            if host is None:
                raise SDPError("no c= line for the audio stream")
            chosen = Negotiated(codec=codec, payload_type=pt, dtmf_payload_type=dtmf, remote_host=host,
                                remote_port=media.port, direction=direction)
            lines += self._audio_lines(port, pt, codec, dtmf, direction)
        if chosen is None:
            raise SDPError("no audio stream with PCMU or PCMA offered")
        return self._finish(lines), chosen

    @staticmethod
    def _audio_lines(port: int, pt: int, codec: str, dtmf: int | None, direction: str) -> list[str]:
        fmts = f"{pt} {dtmf}" if dtmf is not None else f"{pt}"
        lines = [f"m=audio {port} RTP/AVP {fmts}", f"a=rtpmap:{pt} {codec}/8000"]
        if dtmf is not None:
            lines += [f"a=rtpmap:{dtmf} telephone-event/8000", f"a=fmtp:{dtmf} 0-16"]
        return lines + ["a=ptime:20", f"a={direction}"]

    def offer(self, *, port: int, dtmf_payload_type: int = 101) -> str:
        """Our offer (for an INVITE without SDP): PCMU, PCMA and telephone-event."""
        dt = dtmf_payload_type
        lines = [
            f"m=audio {port} RTP/AVP 0 8 {dt}", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000",
            f"a=rtpmap:{dt} telephone-event/8000", f"a=fmtp:{dt} 0-16", "a=ptime:20", "a=sendrecv",
        ]
        return self._finish(lines)

    def repeat(self) -> str | None:
        """The last body sent, unchanged (for a re-INVITE or UPDATE without an offer)."""
        if self._last_body is None:
            return None
        return "\r\n".join(self._head()) + "\r\n" + self._last_body + "\r\n"


def read_answer(answer: Session, *, codecs: tuple[str, ...] = SUPPORTED_CODECS) -> Negotiated:
    """What an answer to our offer agrees (the first accepted audio m-line)."""
    for media in answer.media:
        match = _audio_match(media, codecs)
        if match is None:
            continue
        host = media.connection or answer.connection
        if host is None:
            raise SDPError("no c= line for the audio stream")
        offered_dir = media.direction or answer.direction
        return Negotiated(codec=match[1], payload_type=match[0], dtmf_payload_type=_dtmf_payload(media),
                          remote_host=host, remote_port=media.port, direction=_ANSWER_DIRECTION[offered_dir])
    raise SDPError("the answer accepts no PCMU/PCMA audio stream")

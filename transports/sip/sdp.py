"""SDP (RFC 4566) and the offer/answer model (RFC 3264) for one G.711 audio stream.

The answer keeps the offer's m-lines in order: the first audio m-line we can serve is accepted with
PCMU or PCMA in the caller's preference and the caller's payload numbers (plus telephone-event on the
caller's dynamic payload type); every other m-line (video, a second audio, an unknown codec) is
rejected with port 0. When an INVITE carries no SDP we make the offer and read the answer from the ACK.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STATIC_PAYLOADS = {0: ("PCMU", 8000), 8: ("PCMA", 8000), 13: ("CN", 8000)}
SUPPORTED_CODECS = ("PCMU", "PCMA")
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
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


def _connection_address(value: str) -> str:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SDPError(f"bad c= line {value!r}")
    return parts[2].split("/")[0]


def _media_line(value: str) -> Media:
    parts = value.split()
    if len(parts) < 4 or not parts[1].split("/")[0].isdigit():
        raise SDPError(f"bad m= line {value!r}")
    return Media(kind=parts[0], port=int(parts[1].split("/")[0]), proto=parts[2], formats=parts[3:])


def _attribute(media: Media | None, session: Session, value: str) -> None:
    name, _, rest = value.partition(":")
    if name in DIRECTIONS:
        if media is None:
            session.direction = name
        else:
            media.direction = name
    elif media is None:
        return
    elif name == "rtpmap":
        pt, _, encoding = rest.partition(" ")
        enc = encoding.split("/")
        if pt.isdigit() and len(enc) >= 2 and enc[1].isdigit():
            media.rtpmap[int(pt)] = (enc[0].upper(), int(enc[1]))
    elif name == "fmtp":
        pt, _, params = rest.partition(" ")
        if pt.isdigit():
            media.fmtp[int(pt)] = params.strip()
    elif name == "ptime" and rest.strip().isdigit():
        media.ptime = int(rest.strip())


def parse_sdp(text: str | bytes) -> Session:
    """Parse an SDP body; SDPError when it is not SDP."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    session, media = Session(), None
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or not lines[0].startswith("v="):
        raise SDPError("SDP does not start with v=")
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
            media = _media_line(value)
            session.media.append(media)
        elif key == "a":
            _attribute(media, session, value)
    return session


def _pick_codec(media: Media, codecs: tuple[str, ...]) -> tuple[int, str] | None:
    for fmt in media.formats:
        if fmt.isdigit():
            codec = media.codec(int(fmt))
            if codec and codec[0] in codecs and codec[1] == 8000:
                return int(fmt), codec[0]
    return None


def _dtmf_payload(media: Media) -> int | None:
    for fmt in media.formats:
        if fmt.isdigit() and media.rtpmap.get(int(fmt), ("", 0)) == ("TELEPHONE-EVENT", 8000):
            return int(fmt)
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

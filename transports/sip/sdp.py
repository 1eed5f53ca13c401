"""SDP (RFC 4566) and the offer/answer model (RFC 3264) for one audio stream, plain or SDES-SRTP.

The answer keeps the offer's m-lines in order: the first audio m-line we can serve is accepted with the first
codec of the caller's list that we support (PCMU, PCMA, G722, opus: ``transports/codecs.py``), with the caller's
payload numbers (plus telephone-event on the caller's dynamic payload type); every other m-line (video, a second
audio, an unknown codec) is rejected with port 0. When an INVITE carries no SDP we make the offer and read the
answer from the ACK.

SRTP (RFC 4568 SDES, ``srtp.py``) follows a policy: ``"required"`` accepts only ``RTP/SAVP`` with a usable
``a=crypto`` (a plain offer is refused: 488), ``"optional"`` accepts both (and answers best-effort SRTP: an
``RTP/AVP`` offer that carries ``a=crypto``, as baresip's ``mediaenc srtp`` sends), ``"off"`` only plain RTP.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field

from ..codecs import DEFAULT_CODECS, OPUS_DYNAMIC_PAYLOAD_TYPE, SPECS, CodecSpec
from .srtp import SUITES, Crypto, new_crypto, select_crypto

STATIC_PAYLOADS = {0: ("PCMU", 8000), 8: ("PCMA", 8000), 9: ("G722", 8000), 13: ("CN", 8000)}
SUPPORTED_CODECS = DEFAULT_CODECS
SRTP_POLICIES = ("required", "optional", "off")
MAX_CRYPTO = 32  # a=crypto lines kept per m-line
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
    crypto: list[str] = field(default_factory=list)

    @property
    def secure(self) -> bool:
        """SDES-SRTP profile (RTP/SAVP, RTP/SAVPF); DTLS-SRTP (UDP/TLS/RTP/SAVP) is not ours."""
        return self.proto.startswith("RTP/SAVP")

    @property
    def plain(self) -> bool:
        return self.proto.startswith("RTP/AVP")

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

    codec: str  # "PCMU", "PCMA", "G722" or "OPUS"
    payload_type: int
    dtmf_payload_type: int | None
    remote_host: str
    remote_port: int
    direction: str  # our direction: sendrecv, sendonly (caller holds), recvonly, inactive
    dtmf_clock_rate: int = 8000  # telephone-event/<clock>: what event durations count
    local_crypto: Crypto | None = None  # SRTP: our key (what we send) ...
    remote_crypto: Crypto | None = None  # ... and the peer's (what we receive)

    @property
    def spec(self) -> CodecSpec:
        return SPECS[self.codec]

    @property
    def srtp(self) -> bool:
        return self.local_crypto is not None and self.remote_crypto is not None

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
    elif name == "crypto":
        if len(media.crypto) < MAX_CRYPTO:
            media.crypto.append(rest.strip())
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
    """The first payload type of the caller's list that is a codec of ours at its RTP clock rate."""
    for pt in filter(lambda p: p is not None, map(payload_type, media.formats)):
        codec = media.codec(pt)
        if codec and codec[0] in codecs and codec[0] in SPECS and codec[1] == SPECS[codec[0]].clock_rate:
            return pt, codec[0]
    return None


def _dtmf_payload(media: Media, codec: str | None = None) -> int | None:
    """The telephone-event payload type at the audio codec's RTP clock (RFC 4733 §2.1: an Opus call's events count
    48 kHz ticks), else at 8000 Hz (what most peers offer beside any codec)."""
    clocks = [SPECS[codec].clock_rate] if codec in SPECS else []
    for clock in dict.fromkeys(clocks + [8000]):
        for pt in filter(lambda p: p is not None, map(payload_type, media.formats)):
            if media.rtpmap.get(pt, ("", 0)) == ("TELEPHONE-EVENT", clock):
                return pt
    return None


def _dtmf_clock(media: Media, pt: int | None) -> int:
    return media.rtpmap[pt][1] if pt is not None else 8000


@dataclass(frozen=True)
class _Match:
    payload_type: int
    codec: str
    remote_crypto: Crypto | None


def _audio_match(media: Media, codecs: tuple[str, ...], srtp: str) -> tuple[_Match | None, str]:
    """What we accept of one m-line under the SRTP policy, else None and why not."""
    if media.kind != "audio" or media.port == 0:
        return None, "no audio stream"
    if not (media.plain or media.secure):
        return None, f"transport {media.proto[:30]} not supported"
    if media.secure and srtp == "off":
        return None, "SRTP offered but disabled"
    if media.plain and srtp == "required":
        return None, "SRTP required but plain RTP/AVP offered"
    picked = _pick_codec(media, codecs)
    if picked is None:
        return None, f"none of {'/'.join(codecs)} offered"
    remote = None
    if media.secure or (media.crypto and srtp != "off"):  # SAVP, or best-effort SRTP on an AVP line
        remote, why = select_crypto(media.crypto)
        if remote is None and media.secure:
            return None, f"no usable a=crypto ({why})"
    return _Match(picked[0], picked[1], remote), ""


class SDPBuilder:
    """Builds our SDP bodies: one origin (session id, version bumped when the content changes)."""

    def __init__(self, *, address: str, user: str = "pipecat", codecs: tuple[str, ...] = SUPPORTED_CODECS,
                 srtp: str = "optional"):
        if srtp not in SRTP_POLICIES:
            raise ValueError(f"srtp policy {srtp!r} is not one of {SRTP_POLICIES}")
        unknown = [c for c in codecs if c not in SPECS]
        if unknown or not codecs:
            raise ValueError(f"unsupported codecs {unknown} (known: {', '.join(SPECS)})")
        self.address = address
        self.user = user
        self.codecs = tuple(codecs)
        self.srtp = srtp
        self._keys: dict[str, Crypto] = {}  # our master key per suite, one per call (kept over re-INVITEs)
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

    def local_crypto(self, tag: int, suite: str) -> Crypto:
        """Our key for ``suite`` (made once per call), with the tag of the line it answers."""
        if suite not in self._keys:
            self._keys[suite] = new_crypto(tag, suite)
        key = self._keys[suite]
        return Crypto(tag=tag, suite=suite, key=key.key)

    def answer(self, offer: Session, *, port: int, codecs: tuple[str, ...] | None = None,
               hold: bool = False) -> tuple[str, Negotiated]:
        """The answer to an offer and what it agrees; SDPError when no audio m-line is acceptable."""
        codecs = codecs or self.codecs
        lines, chosen, why = [], None, None
        for media in offer.media:
            match, reason = _audio_match(media, codecs, self.srtp) if chosen is None else (None, "")
            if match is None:
                why = why or (reason if media.kind == "audio" else None)
                fmt = " ".join(media.formats)
                lines.append(f"m={media.kind} 0 {media.proto} {fmt}")
                continue
            dtmf = _dtmf_payload(media, match.codec)
            offered_dir = media.direction or offer.direction
            direction = "inactive" if hold else _ANSWER_DIRECTION[offered_dir]
            host = media.connection or offer.connection
            if host is None:
                raise SDPError("no c= line for the audio stream")
            remote = match.remote_crypto
            local = self.local_crypto(remote.tag, remote.suite) if remote is not None else None
            chosen = Negotiated(codec=match.codec, payload_type=match.payload_type, dtmf_payload_type=dtmf,
                                remote_host=host, remote_port=media.port, direction=direction,
                                dtmf_clock_rate=_dtmf_clock(media, dtmf),
                                local_crypto=local, remote_crypto=remote)
            lines += self._audio_lines(port, match.payload_type, match.codec, dtmf, direction,
                                       dtmf_clock=_dtmf_clock(media, dtmf),
                                       proto=media.proto if local is not None else "RTP/AVP",
                                       crypto=[local] if local is not None else [])
        if chosen is None:
            raise SDPError(why or "no audio stream offered")
        return self._finish(lines), chosen

    @staticmethod
    def _audio_lines(port: int, pt: int, codec: str, dtmf: int | None, direction: str, *, proto: str = "RTP/AVP",
                     crypto: list[Crypto] = (), dtmf_clock: int = 8000) -> list[str]:
        spec = SPECS[codec]
        fmts = f"{pt} {dtmf}" if dtmf is not None else f"{pt}"
        lines = [f"m=audio {port} {proto} {fmts}", f"a=rtpmap:{pt} {spec.rtpmap}"]
        if spec.fmtp:
            lines.append(f"a=fmtp:{pt} {spec.fmtp}")
        if dtmf is not None:
            lines += [f"a=rtpmap:{dtmf} telephone-event/{dtmf_clock}", f"a=fmtp:{dtmf} 0-16"]
        lines += [f"a=crypto:{c.attribute()}" for c in crypto]
        return lines + ["a=ptime:20", f"a={direction}"]

    def offer(self, *, port: int, dtmf_payload_type: int = 101) -> str:
        """Our offer (for an INVITE without SDP, or an outbound call): our codecs in order, telephone-event,
        and with SRTP required an RTP/SAVP line with a key per suite (else plain RTP/AVP)."""
        dt = dtmf_payload_type
        pts = [OPUS_DYNAMIC_PAYLOAD_TYPE if SPECS[c].static_payload_type is None else SPECS[c].static_payload_type
               for c in self.codecs]
        proto = "RTP/SAVP" if self.srtp == "required" else "RTP/AVP"
        lines = [f"m=audio {port} {proto} {' '.join(map(str, pts))} {dt}"]
        for pt, codec in zip(pts, self.codecs):
            lines.append(f"a=rtpmap:{pt} {SPECS[codec].rtpmap}")
            if SPECS[codec].fmtp:
                lines.append(f"a=fmtp:{pt} {SPECS[codec].fmtp}")
        lines += [f"a=rtpmap:{dt} telephone-event/8000", f"a=fmtp:{dt} 0-16"]
        if self.srtp == "required":
            lines += [f"a=crypto:{self.local_crypto(tag, suite).attribute()}"
                      for tag, suite in enumerate(SUITES, start=1)]
        lines += ["a=ptime:20", "a=sendrecv"]
        return self._finish(lines)

    def read_answer(self, answer: Session) -> Negotiated:
        """What an answer to our :meth:`offer` agrees, with the SRTP keys of both sides when it accepted SRTP."""
        return read_answer(answer, codecs=self.codecs, local_keys=self._keys, srtp=self.srtp)

    def repeat(self) -> str | None:
        """The last body sent, unchanged (for a re-INVITE or UPDATE without an offer)."""
        if self._last_body is None:
            return None
        return "\r\n".join(self._head()) + "\r\n" + self._last_body + "\r\n"


def read_answer(answer: Session, *, codecs: tuple[str, ...] = SUPPORTED_CODECS,
                local_keys: dict[str, Crypto] | None = None, srtp: str = "optional") -> Negotiated:
    """What an answer to our offer agrees (the first accepted audio m-line).

    ``local_keys``: our offer's keys by suite (``SDPBuilder.read_answer`` passes them); an answer with a=crypto
    is SRTP with our key of the suite it chose and its own key.
    """
    why = "the answer accepts no audio stream of ours"
    for media in answer.media:
        match, reason = _audio_match(media, codecs, srtp)
        if match is None:
            why = reason if media.kind == "audio" and media.port else why
            continue
        host = media.connection or answer.connection
        if host is None:
            raise SDPError("no c= line for the audio stream")
        remote = match.remote_crypto
        local = (local_keys or {}).get(remote.suite) if remote is not None else None
        if remote is not None and local is None:
            if media.secure:
                raise SDPError(f"the answer chose SRTP suite {remote.suite} that we did not offer")
            remote = None
        offered_dir = media.direction or answer.direction
        dtmf = _dtmf_payload(media, match.codec)
        return Negotiated(codec=match.codec, payload_type=match.payload_type, dtmf_payload_type=dtmf,
                          remote_host=host, remote_port=media.port, direction=_ANSWER_DIRECTION[offered_dir],
                          dtmf_clock_rate=_dtmf_clock(media, dtmf),
                          local_crypto=local, remote_crypto=remote)
    raise SDPError(why)

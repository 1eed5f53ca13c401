"""SIP messages (RFC 3261 §7): parse and serialise requests and responses.

Header names are case-insensitive and compact forms (``v``, ``i``, ``f`` …) are expanded to their full
names. The body is exactly ``Content-Length`` bytes. Anything malformed raises :class:`SIPParseError`
with a message saying what was wrong; a bare CRLF keep-alive parses to ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_MESSAGE_SIZE = 65_535
MAX_HEADERS = 256  # header lines per message
MAX_LIST_ELEMENTS = 64  # Vias, routes, contacts per message
MAX_CALL_ID = 256  # characters
SIP_VERSION = "SIP/2.0"

COMPACT_FORMS = {
    "a": "Accept-Contact", "b": "Referred-By", "c": "Content-Type", "d": "Request-Disposition",
    "e": "Content-Encoding", "f": "From", "i": "Call-ID", "j": "Reject-Contact", "k": "Supported",
    "l": "Content-Length", "m": "Contact", "n": "Identity-Info", "o": "Event", "r": "Refer-To",
    "s": "Subject", "t": "To", "u": "Allow-Events", "v": "Via", "x": "Session-Expires", "y": "Identity",
}
_CANONICAL = {
    name.lower(): name
    for name in [
        *COMPACT_FORMS.values(), "Accept", "Allow", "Call-Info", "CSeq", "Max-Forwards", "Record-Route",
        "Route", "Server", "User-Agent", "Retry-After", "Min-SE", "Require", "Unsupported", "WWW-Authenticate",
        "Content-Disposition", "Reason", "Warning", "Expires", "P-Asserted-Identity", "Remote-Party-ID",
        "Date", "Organization", "Timestamp", "Alert-Info", "Privacy", "RSeq", "RAck", "Accept-Language",
    ]
}
_CANONICAL["call-id"] = "Call-ID"
_CANONICAL["cseq"] = "CSeq"
_TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")
_STATUS_LINE = re.compile(r"^SIP/2\.0 ([1-6][0-9]{2}) ?(.*)$")
# Numbers are ASCII digits only ([0-9], not \d or str.isdigit(), which accept superscripts and other scripts),
# capped in length before int() sees them and range-checked after.
_CSEQ = re.compile(r"^([0-9]{1,10})[ \t]+([A-Za-z0-9.!%*_+`'~-]+)$")
_HOST = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]{2,45}$")
# Headers that may be joined with commas in one line (RFC 3261 §7.3.1); Via and routes matter to us.
_LIST_HEADERS = {"Via", "Route", "Record-Route", "Contact", "Allow", "Supported", "Require"}

REASONS = {
    100: "Trying", 180: "Ringing", 183: "Session Progress", 200: "OK", 400: "Bad Request",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Request Entity Too Large", 415: "Unsupported Media Type", 420: "Bad Extension",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist", 482: "Loop Detected",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here", 491: "Request Pending",
    500: "Server Internal Error", 501: "Not Implemented", 503: "Service Unavailable", 513: "Message Too Large",
}


class SIPParseError(ValueError):
    """The bytes are not a well-formed SIP message; the message says what is wrong."""


def parse_number(text: str, *, what: str, maximum: int, minimum: int = 0, digits: int = 10) -> int:
    """An ASCII decimal of at most ``digits`` digits within [minimum, maximum]; SIPParseError otherwise."""
    text = text.strip()
    if not re.fullmatch(f"[0-9]{{1,{digits}}}", text):
        raise SIPParseError(f"bad {what} {text[:40]!r}")
    number = int(text)
    if not minimum <= number <= maximum:
        raise SIPParseError(f"{what} out of range: {number}")
    return number


def canonical_name(name: str) -> str:
    """Full, conventionally capitalised header name for any spelling or compact form."""
    lower = name.strip().lower()
    if len(lower) == 1 and lower in COMPACT_FORMS:
        return COMPACT_FORMS[lower]
    if lower in _CANONICAL:
        return _CANONICAL[lower]
    return "-".join(part.capitalize() for part in lower.split("-"))


def split_list(value: str) -> list[str]:
    """Split a comma-joined header value, ignoring commas inside quotes and angle brackets."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(value):
        if ch == '"' and (i == 0 or value[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and not quoted and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


@dataclass
class SIPMessage:
    """Common part of requests and responses: ordered headers and a body."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header (any spelling), or ``default``."""
        wanted = canonical_name(name)
        for key, value in self.headers:
            if key == wanted:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of a header, comma-joined list headers split into their elements."""
        wanted = canonical_name(name)
        values = []
        for key, value in self.headers:
            if key == wanted:
                values.extend(split_list(value) if wanted in _LIST_HEADERS else [value])
        return values

    def set(self, name: str, value: str) -> None:
        """Replace every value of a header with one value (appended if absent)."""
        wanted = canonical_name(name)
        kept = [(k, v) for k, v in self.headers if k != wanted]
        self.headers = kept + [(wanted, value)]

    def add(self, name: str, value: str) -> None:
        """Append one header line."""
        self.headers.append((canonical_name(name), value))

    def remove(self, name: str) -> None:
        """Remove every line of a header."""
        wanted = canonical_name(name)
        self.headers = [(k, v) for k, v in self.headers if k != wanted]

    @property
    def call_id(self) -> str:
        return self.get("Call-ID") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        """(number, method) of the CSeq header."""
        return parse_cseq(self.get("CSeq") or "")

    def _first_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Wire form with an exact Content-Length."""
        lines = [self._first_line()]
        lines += [f"{k}: {v}" for k, v in self.headers if k != "Content-Length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + self.body


@dataclass
class SIPRequest(SIPMessage):
    """A SIP request: method, Request-URI, headers, body."""

    method: str = ""
    uri: str = ""

    def _first_line(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"


@dataclass
class SIPResponse(SIPMessage):
    """A SIP response: status code, reason phrase, headers, body."""

    status: int = 200
    reason: str = "OK"

    def _first_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"


def parse_cseq(value: str) -> tuple[int, str]:
    """Parse ``"314159 INVITE"``; raise SIPParseError when it is not that shape."""
    match = _CSEQ.match(value.strip())
    if match is None:
        raise SIPParseError(f"bad CSeq {value[:40]!r}")
    number = int(match.group(1))
    if number >= 2**31:
        raise SIPParseError(f"CSeq number out of range: {number}")
    return number, match.group(2).upper()


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        index = data.find(sep)
        if index >= 0:
            return data[:index], data[index + len(sep):]
    raise SIPParseError("truncated: no blank line after the headers")


def _decode_head(head: bytes) -> list[str]:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SIPParseError(f"headers are not UTF-8 (binary junk?) at byte {exc.start}") from None
    if any(ord(c) < 32 and c not in "\t\r\n" for c in text):
        raise SIPParseError("control characters in the headers")
    text = text.replace("\r\n", "\n")
    if "\r" in text:
        raise SIPParseError("bare CR in the headers")
    lines: list[str] = []
    for line in text.split("\n"):
        if line[:1] in (" ", "\t") and lines:  # header folding (RFC 3261 §7.3.1)
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines


def _start(line: str) -> SIPMessage:
    status = _STATUS_LINE.match(line)
    if status:
        return SIPResponse(status=int(status.group(1)), reason=status.group(2))
    parts = line.split(" ")
    if len(parts) != 3 or parts[2] != SIP_VERSION or not _TOKEN.match(parts[0]) or not parts[1]:
        raise SIPParseError(f"bad start line {line[:80]!r}")
    if ":" not in parts[1]:
        raise SIPParseError(f"bad Request-URI {parts[1][:80]!r}")
    return SIPRequest(method=parts[0].upper(), uri=parts[1])


def _headers(lines: list[str]) -> list[tuple[str, str]]:
    if len(lines) > MAX_HEADERS:
        raise SIPParseError(f"too many header lines ({len(lines)} > {MAX_HEADERS})")
    headers = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or not _TOKEN.match(name.strip()):
            raise SIPParseError(f"bad header line {line[:80]!r}")
        headers.append((canonical_name(name), value.strip()))
    return headers


def _content_length(message: SIPMessage, available: int, *, stream: bool) -> int:
    value = message.get("Content-Length")
    if value is None:
        if stream:
            raise SIPParseError("no Content-Length on a stream transport")
        return available  # UDP: the body is the rest of the datagram (RFC 3261 §18.3)
    length = parse_number(value, what="Content-Length", maximum=MAX_MESSAGE_SIZE)
    if length > available and not stream:
        raise SIPParseError(f"Content-Length {length} but only {available} body bytes")
    return length


def _check_mandatory(message: SIPMessage) -> None:
    """Every header the server reads is checked here, so handlers can rely on it (RFC 3261 §8.1.1)."""
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        if not message.get(name):
            raise SIPParseError(f"missing {name} header")
    number, method = message.cseq
    if isinstance(message, SIPRequest) and method != message.method and message.method != "ACK":
        raise SIPParseError(f"CSeq method {method} does not match {message.method}")
    call_id = message.call_id
    if len(call_id) > MAX_CALL_ID or any(c.isspace() for c in call_id):
        raise SIPParseError(f"bad Call-ID {call_id[:40]!r}")
    vias = message.get_all("Via")
    if not vias or len(vias) > MAX_LIST_ELEMENTS:
        raise SIPParseError(f"{len(vias)} Via elements")
    for via in vias:
        parse_via(via)
    for name in ("From", "To"):
        parse_address(message.get(name), need_uri=True)
    for name in ("Contact", "Record-Route", "Route", "P-Asserted-Identity"):
        values = message.get_all(name)
        if message.get(name) is not None and not values:
            raise SIPParseError(f"empty {name}")
        if len(values) > MAX_LIST_ELEMENTS:
            raise SIPParseError(f"{len(values)} {name} elements")
        for value in values:
            if not (name == "Contact" and value == "*"):
                parse_address(value, need_uri=True)
    if message.get("Max-Forwards") is not None:
        parse_number(message.get("Max-Forwards"), what="Max-Forwards", maximum=255, digits=3)
    if message.get("Expires") is not None:
        parse_number(message.get("Expires"), what="Expires", maximum=2**32 - 1)


def parse_message(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> SIPMessage | None:
    """Parse one datagram. ``None`` for a CRLF keep-alive; SIPParseError when malformed."""
    if len(data) > max_size:
        raise SIPParseError(f"oversized: {len(data)} bytes > {max_size}")
    if not data.strip(b"\r\n"):
        return None
    head, rest = _split_head(data.lstrip(b"\r\n"))
    lines = _decode_head(head)
    message = _start(lines[0])
    message.headers = _headers(lines[1:])
    length = _content_length(message, len(rest), stream=False)
    message.body = rest[:length]
    _check_mandatory(message)
    return message


def parse_stream(buffer: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> tuple[SIPMessage | None, int]:
    """Parse the first message of a TCP byte stream: (message or None if incomplete, bytes consumed).

    Leading CRLFs (keep-alives) are consumed. SIPParseError when the head is malformed or too large.
    """
    stripped = buffer.lstrip(b"\r\n")
    skipped = len(buffer) - len(stripped)
    end = stripped.find(b"\r\n\r\n")
    if end < 0:
        if len(stripped) > max_size:
            raise SIPParseError(f"oversized: headers exceed {max_size} bytes")
        return None, skipped
    lines = _decode_head(stripped[:end])
    message = _start(lines[0])
    message.headers = _headers(lines[1:])
    length = _content_length(message, len(stripped) - end - 4, stream=True)
    if end + 4 + length > max_size:
        raise SIPParseError(f"oversized: {end + 4 + length} bytes > {max_size}")
    if len(stripped) < end + 4 + length:
        return None, skipped
    message.body = stripped[end + 4:end + 4 + length]
    _check_mandatory(message)
    return message, skipped + end + 4 + length


# --- header values ---------------------------------------------------------------------------


@dataclass
class Address:
    """A name-addr / addr-spec header value (From, To, Contact, Route): display name, URI, parameters."""

    uri: str
    display_name: str = ""
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        name = f'"{self.display_name}" ' if self.display_name else ""
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params.items())
        return f"{name}<{self.uri}>{params}"


def _params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in text.split(";"):
        item = item.strip()
        if item:
            key, sep, value = item.partition("=")
            params[key.strip().lower()] = value.strip() if sep else None
    return params


def parse_address(value: str | None, *, need_uri: bool = False) -> Address:
    """Parse ``"Alice" <sip:alice@host>;tag=x`` or ``sip:alice@host;tag=x``.

    ``need_uri``: also require ``scheme:`` in the URI (what the header check asks of every address).
    """
    value = (value or "").strip()
    if "<" in value:
        lt, gt = value.find("<"), value.find(">")
        if gt < lt:
            raise SIPParseError(f"bad address {value[:80]!r}")
        uri = value[lt + 1:gt].strip()
        if need_uri and ":" not in uri:
            raise SIPParseError(f"bad address {value[:80]!r}")
        display = value[:lt].strip().strip('"').strip()
        return Address(uri=uri, display_name=display, params=_params(value[gt + 1:]))
    uri, _, params = value.partition(";")
    if ":" not in uri:
        raise SIPParseError(f"bad address {value[:80]!r}")
    return Address(uri=uri.strip(), params=_params(params))


@dataclass
class Via:
    """One Via element: transport, sent-by host and port, parameters (branch, rport, received)."""

    transport: str
    host: str
    port: int | None
    params: dict[str, str | None]

    @property
    def branch(self) -> str:
        return self.params.get("branch") or ""

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params.items())
        return f"SIP/2.0/{self.transport} {host}{port}{params}"


def parse_via(value: str) -> Via:
    """Parse one Via element."""
    protocol, _, rest = value.strip().partition(" ")
    parts = [part.strip() for part in protocol.split("/")]
    if len(parts) != 3 or parts[0].upper() != "SIP" or not _TOKEN.match(parts[2]):
        raise SIPParseError(f"bad Via {value[:80]!r}")
    sent_by, _, params = rest.strip().partition(";")
    host, port = split_host_port(sent_by.strip())
    return Via(transport=parts[2].upper(), host=host, port=port, params=_params(params))


def split_host_port(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` → (host, port or None); SIPParseError for anything else."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SIPParseError(f"bad host in {text[:80]!r}")
        host, rest = text[1:end], text[end + 1:]
        if not _IPV6.match(host):
            raise SIPParseError(f"bad IPv6 host in {text[:80]!r}")
        if rest and not rest.startswith(":"):
            raise SIPParseError(f"bad host in {text[:80]!r}")
        port_text, has_port = rest[1:], rest.startswith(":")
    else:
        host, has_port, port_text = text.partition(":")
        if not _HOST.match(host):
            raise SIPParseError(f"bad host in {text[:80]!r}")
    port = parse_number(port_text, what="port", minimum=1, maximum=65535, digits=5) if has_port else None
    return host, port


def uri_host_port(uri: str) -> tuple[str, int | None]:
    """Host and port of a ``sip:`` URI (user part, parameters and headers skipped)."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split("@", 1)[-1]
    rest = re.split(r"[;?>]", rest, maxsplit=1)[0]
    return split_host_port(rest)

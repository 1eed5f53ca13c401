"""A grammar-aware SIP fuzzer for ``pipecat-nemotron serve-sip`` (issue 11, item 5).

    .venv/bin/python -m tools.sip_fuzz --inputs 200000 --seed 1                 # spawn serve-sip --model demo
    .venv/bin/python -m tools.sip_fuzz --inputs 5000 --seed 1 --in-process      # SIPUserAgentServer in this process
    .venv/bin/python -m tools.sip_fuzz --inputs 20000 --target 127.0.0.1:5060   # a server someone else started
    .venv/bin/python -m tools.sip_fuzz --inputs 0 --recheck                     # replay the findings file's inputs
    .venv/bin/python -m tools.sip_fuzz --dump 20 --seed 1                       # print the first generated inputs

Every input starts as a well-formed request built from a small grammar (INVITE with an SDP offer, OPTIONS, BYE,
CANCEL, ACK, REGISTER, INFO, UPDATE, and in-dialog requests — re-INVITE, BYE, ACK, CANCEL, INFO, UPDATE — for
dialogs learnt from the server's own 100/200 responses), then 0-3 mutators are stacked on it: structural ones on the
parsed form (missing/duplicated mandatory headers, 64 KB headers and thousands of header lines, Unicode digits,
absurd numbers, wrong Content-Length, NUL bytes, header-specific junk, start-line junk, SDP junk, compact
forms/folding/line endings) and byte-level ones on the wire form (bit flips, truncation at every structural
boundary, garbage, splicing). Some inputs are earlier ones sent again (retransmissions, a branch reused with another
Call-ID/method/CSeq) or not requests at all. They go out over UDP (16 source ports) or TCP (persistent, fresh,
chunked, pipelined, half-sent and CRLF-flooded connections). Answered calls also get RTP junk at their media port
(from the SDP address and from a third one), an SDP answer (sometimes broken) in the ACK when the INVITE had no
offer, and broken responses to the server's own BYEs. The generated stream is a function of the seed; only the
Call-ID/tags of in-dialog requests come from what the server answered.

The oracle, after the run (and settling until the server's short timers have passed):
  * the server is alive and answers a plain OPTIONS (also probed every 1,000 inputs);
  * zero tracebacks and ERROR records in its log (loguru ``logger.exception``, asyncio "Task exception was never
    retrieved", "Exception in callback", anything with "Traceback"); no event-loop stall over 0.75 s (in-process);
  * RSS and the open-fd count back within bounds (RSS sampled after warm-up, fds before the first input);
  * active calls, remembered calls, TCP streams and server transactions back to 0;
  * every request whose Via/CSeq/From/To are readable got a response (UDP, and TCP when a shadow of the server's
    stream framing says it arrived as one message), every INVITE that got 100 got a final response;
  * slow TCP connections (a head cut short, a short body, a CRLF flood, a byte a second) are closed by the server;
  * a normal call (a scripted UAC: INVITE/ACK, G.711 RTP of a held-out WAV in real time, BYE) is answered and
    transcribed.

The fuzzer and the server run in a private network namespace with only loopback up when the kernel allows it
(``unshare(CLONE_NEWNET)``, as tests/test_sip_peers.py does), so neither RTP sent to a fuzzed ``c=`` address nor a
DNS lookup for a fuzzed host name can leave the machine. Where namespaces are not permitted, ``c=``/Route/
Record-Route lines are forced to loopback literals after mutation (less coverage, same safety).

Findings (one per crash class: traceback signature, no response, INVITE without final, stuck call, stall, slow TCP
connection kept open) are appended to ``--findings`` (default /tmp/sip_fuzz_findings.md) with a reproducing input
as a Python bytes literal (found by replaying the inputs before it on a fresh in-process server).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import fcntl
import gc
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "tests" / "data" / "demo_heldout"
DEFAULT_WAV = HELDOUT / "en-US_00001.wav"
MAX_UDP = 65_507
MANDATORY = ("Via", "From", "To", "Call-ID", "CSeq", "Max-Forwards", "Content-Length")
COMPACT = {"Via": "v", "From": "f", "To": "t", "Call-ID": "i", "Contact": "m", "Content-Length": "l",
           "Content-Type": "c", "Supported": "k", "Session-Expires": "x"}

# Short timers for the server under test: un-ACKed calls end after 64·T1 = 1.3 s, silent ones after 1.5 s, calls
# on hold (no RTP expected) after 8 s (longer than the normal call at the end).
SHORT_TIMERS = dict(t1=0.02, t2=0.08, rtp_timeout_secs=1.5, max_call_secs=8.0, ring_secs=0.0)
SHORT_CACHE_SECS = 2.0  # the server's response/call memory (32 s in production), patched where it exists
# The per-source limits are raised for the run: from one address at hundreds of inputs/s the rate limiter would
# drop most of them (that is its job; here every input should reach the parser). Fields a tree lacks are skipped.
FUZZ_LIMITS = dict(udp_rate_per_source=1e6, udp_burst_per_source=1e6, tcp_max_per_source=512,
                   tcp_max_connections=1024, tcp_idle_secs=5.0, tcp_message_secs=3.0)


# --- the loopback-only network namespace -----------------------------------------------------------------------

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def enter_loopback_namespace():
    """Move the calling thread into a new network namespace with only ``lo`` up.

    Returns a ``leave()`` callable (back to the original namespace), or None where namespaces are not permitted.
    Threads and processes started from this thread afterwards share the namespace.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    except OSError:
        return None
    if libc.unshare(CLONE_NEWNET) != 0:
        os.close(original)
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0))[:18])[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))

    def leave():
        libc.setns(original, CLONE_NEWNET)
        os.close(original)

    return leave


_ADDRESS_LINE = re.compile(rb"(?im)^[ \t]*(c[ \t]*=|(record-)?route[ \t]*:)[^\n]*(\n[ \t][^\n]*)*")
_SAFE_ADDRESS_LINE = re.compile(
    rb"(?i)^(c=IN IP4 127\.0\.0\.1|c=IN IP6 ::1|(record-)?route: *<sip:127\.0\.0\.1(:\d{1,5})?;lr>)\r?$")


def loopback_only(data: bytes) -> bytes:
    """Without a private namespace: every ``c=``/Route/Record-Route line that is not a loopback literal becomes one."""
    def fix(match: re.Match) -> bytes:
        line = match.group(0)
        if _SAFE_ADDRESS_LINE.match(line):
            return line
        end = b"\r" if line.endswith(b"\r") else b""
        return (b"c=IN IP4 127.0.0.1" if line.lstrip()[:1] in b"cC" else b"X-Route-Removed: 1") + end
    return _ADDRESS_LINE.sub(fix, data)


# --- the grammar ------------------------------------------------------------------------------------------------

UNICODE_DIGITS = {
    "superscript": "⁰¹²³⁴⁵⁶⁷⁸⁹", "arabic-indic": "٠١٢٣٤٥٦٧٨٩", "extended-arabic": "۰۱۲۳۴۵۶۷۸۹",
    "fullwidth": "０１２３４５６７８９", "devanagari": "०१२३४५६७८९", "subscript": "₀₁₂₃₄₅₆₇₈₉",
    "circled": "⓪①②③④⑤⑥⑦⑧⑨", "mathematical": "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗",
}


def absurd_number(rng: random.Random) -> str:
    return rng.choice([
        "9" * rng.choice([20, 309, 1000, 4301, 5000, 20000]), "1" + "0" * rng.choice([19, 100, 4300]),
        "-1", "-0", "-" + "9" * 40, str(2**64), str(2**64 - 1), str(2**63), str(2**32), str(2**31), str(2**31 - 1),
        "0", "0" * 500 + "1", "65536", "70000", "99999", "1e9", "0x1F", "+1", " 1", "1 ", "1.5", "NaN", "inf",
        "1_000", "١٢", "²", "", "-", "00", str(rng.randrange(-2**70, 2**70)),
    ])


@dataclass
class Dialog:
    """A dialog learnt from the server's responses (for in-dialog requests)."""

    call_id: str
    from_header: str
    to_header: str  # with the server's tag once answered
    invite_branch: str
    cseq: int
    transport: str
    answered: bool = False
    born: float = 0.0
    rtp: tuple | None = None  # the server's RTP address from its SDP answer


@dataclass
class Template:
    """One request before it is put on the wire; headers keep their order."""

    method: str
    uri: str
    headers: list[list]  # [name, value]; Content-Length value None: computed
    sdp: list[str] | None = None
    raw_body: bytes | None = None
    version: str = "SIP/2.0"
    eol: str = "\r\n"
    start: str | None = None  # a whole replacement start line

    def body(self) -> bytes:
        if self.raw_body is not None:
            return self.raw_body
        if self.sdp is None:
            return b""
        return ("\r\n".join(self.sdp) + "\r\n").encode("utf-8", errors="surrogatepass")

    def serialize(self) -> tuple[bytes, list[int]]:
        """Wire bytes and the offsets of every structural boundary (lines, blank line, body, SDP lines)."""
        body = self.body()
        eol = self.eol.encode()
        out, bounds = bytearray(), [0]
        start = self.start if self.start is not None else f"{self.method} {self.uri} {self.version}"
        out += start.encode("utf-8", errors="surrogatepass") + eol
        bounds.append(len(out))
        for name, value in self.headers:
            if value is None:
                value = str(len(body))
            out += f"{name}: {value}".encode("utf-8", errors="surrogatepass") if name is not None else \
                str(value).encode("utf-8", errors="surrogatepass")
            out += eol
            bounds.append(len(out))
        out += eol
        bounds.append(len(out))
        head = len(out)
        out += body
        for i in range(len(body)):
            if body[i:i + 1] == b"\n":
                bounds.append(head + i + 1)
        bounds.append(len(out))
        return bytes(out), sorted(set(bounds))

    def find(self, name: str) -> list[int]:
        lower = name.lower()
        compact = COMPACT.get(name, "").lower()
        return [i for i, (n, _) in enumerate(self.headers) if n is not None and n.lower() in (lower, compact)]


class Grammar:
    """Builds well-formed requests for the server at ``port`` from the fuzzer's point of view."""

    def __init__(self, rng: random.Random, server: tuple[str, int], sink_port: int):
        self.rng = rng
        self.server = server
        self.sink_port = sink_port
        self.counter = 0

    def token(self, prefix: str = "") -> str:
        self.counter += 1
        return f"{prefix}{self.counter:x}{self.rng.getrandbits(32):08x}"

    def sdp(self, direction: str | None = None) -> list[str]:
        rng = self.rng
        sid = rng.randrange(1, 2**31)
        codecs = rng.choice([["0", "8", "101"], ["8", "0", "101"], ["0"], ["8"], ["0", "8"], ["18", "0", "101"]])
        lines = ["v=0", f"o=fuzz {sid} {sid} IN IP4 {HOST}", "s=-", f"c=IN IP4 {HOST}", "t=0 0"]
        if rng.random() < 0.1:
            lines.append(f"m=video {self.sink_port + 2} RTP/AVP 96")
            lines.append("a=rtpmap:96 H264/90000")
        lines.append(f"m=audio {self.sink_port} RTP/AVP {' '.join(codecs)}")
        if "0" in codecs:
            lines.append("a=rtpmap:0 PCMU/8000")
        if "8" in codecs:
            lines.append("a=rtpmap:8 PCMA/8000")
        if "101" in codecs:
            lines += ["a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-16"]
        lines.append("a=ptime:20")
        lines.append(f"a={direction or rng.choice(['sendrecv', 'sendrecv', 'sendrecv', 'sendonly', 'recvonly', 'inactive'])}")
        return lines

    def request(self, method: str, *, local_port: int, transport: str, dialog: Dialog | None = None,
                cseq: int | None = None, branch: str | None = None, body: list[str] | None = None) -> Template:
        rng = self.rng
        host, port = self.server
        branch = branch or self.token("z9hG4bK")
        rport = ";rport" if rng.random() < 0.9 else ""
        if dialog is not None:
            from_h, to_h, call_id = dialog.from_header, dialog.to_header, dialog.call_id
        else:
            from_h = f'"Fuzz" <sip:fuzz@{HOST}>;tag={self.token()}'
            to_h = f"<sip:bot@{host}:{port}>"
            if method in ("BYE", "ACK", "INFO", "UPDATE") or (method == "INVITE" and rng.random() < 0.03):
                to_h += f";tag={self.token()}"  # an unknown dialog
            call_id = self.token() + "@fuzz"
        number = cseq if cseq is not None else rng.randrange(1, 1000)
        headers = [
            ["Via", f"SIP/2.0/{transport} {HOST}:{local_port};branch={branch}{rport}"],
            ["Max-Forwards", "70"],
            ["From", from_h],
            ["To", to_h],
            ["Call-ID", call_id],
            ["CSeq", f"{number} {method}"],
            ["Contact", f"<sip:fuzz@{HOST}:{local_port}>"],
        ]
        if method == "INVITE" and rng.random() < 0.2:
            headers.append(["Record-Route", f"<sip:{HOST}:{local_port};lr>"])
        if method == "INVITE" and rng.random() < 0.2:
            headers.append(["P-Asserted-Identity", '"Fuzz" <sip:+15551234@127.0.0.1>'])
        if rng.random() < 0.1:
            headers.append(["Supported", rng.choice(["timer", "100rel", "replaces, timer"])])
        if method == "REGISTER":
            headers.append(["Expires", str(rng.choice([0, 60, 3600]))])
        headers.append(["User-Agent", "sip-fuzz"])
        sdp = body
        raw = None
        if sdp is None and method in ("INVITE", "UPDATE") and rng.random() < 0.9:
            sdp = self.sdp()
        if method == "INFO":
            raw = f"Signal={rng.choice('0123456789*#')}\r\nDuration=160\r\n".encode()
            headers.append(["Content-Type", "application/dtmf-relay"])
        elif sdp is not None:
            headers.append(["Content-Type", "application/sdp"])
        headers.append(["Content-Length", None])
        uri = f"sip:bot@{host}:{port}"
        if method == "REGISTER":
            uri = f"sip:{host}:{port}"
        return Template(method=method, uri=uri, headers=headers, sdp=sdp, raw_body=raw)


# --- mutators -----------------------------------------------------------------------------------------------------

NUMERIC_HEADERS = ("CSeq", "Content-Length", "Max-Forwards", "Via", "Expires", "Contact", "Record-Route",
                   "Session-Expires")
NUMERIC_SDP = ("m=", "a=rtpmap", "a=ptime", "o=", "c=", "a=fmtp", "b=", "t=")

HEADER_JUNK = {
    "Via": ["SIP/2.0/UDP", "SIP/2.0/UDP {h}:99999;branch={b}", "SIP/2.0/UDP [::1;branch={b}",
            "SIP/2.0/UDP :5060;branch=", "SIP/2.0/FOO {h};branch={b}", "SIP/3.0/UDP {h};branch={b}",
            "SIP/2.0/UDP {h}:²;rport;branch={b}", "SIP/2.0/UDP {h}:-1;branch={b}", "SIP/2.0/UDP {h};rport=99999999999",
            "SIP/2.0/UDP {h};branch=a;branch=b", ",,,", "SIP/2.0/UDP {h};received=junk;rport;branch={b}",
            "SIP/2.0/UDP []:5060;branch={b}", "SIP/2.0/UDP [::1]:5060;branch={b}", "SIP/2.0/UDP {h}:0;branch={b}",
            "SIP/2.0/UDP {h};branch={b};rport=", "SIP/2.0/UDP {h}:5060;branch={b}, SIP/2.0/UDP [", "SIP/2.0",
            "SIP/2.0/UDP {h}:٥٠٦٠;branch={b}", "SIP/2.0/TCP {h};branch={b};maddr=fuzz.invalid", " ", "SIP//UDP x"],
    "From": ["", "<", ">", "<sip:a@b", "sip:a@b>", '"unterminated <sip:a@b>;tag=1', "<>;tag=", ";tag=x",
             "<sip:a@b>;tag=;tag=x", "<sip:a@b>;tag", "<tel:+1555>;tag=1", "*", '"" <sip:>;tag=1', "<sip:[::1>;tag=2",
             "a", ">junk<;tag=3", '"\\"" <sip:a@b>;tag=4'],
    "To": ["", "<", ">", "<sip:bot@b", "sip:bot@b>", "<sip:bot@b>;tag=", "<sip:bot@b>;tag;tag=x", "*",
           "<sip:bot@[::1>", ">x<", "<sip:bot@b>;tag=\t"],
    "Call-ID": ["", " ", "@", "x y z", "\t", "a" * 300, ",", "<>"],
    "CSeq": ["", "1", "INVITE", "1 INVITE 2", "-1 INVITE", "1 invite", "1 BYE", "4294967296 INVITE",
             "² INVITE", "1\tINVITE", "1  INVITE", "0 INVITE", "99999999999999999999999 INVITE", "١ INVITE",
             "2147483648 INVITE", "1 ÍNVITE", "01 INVITE", "1 INVITE\t"],
    "Max-Forwards": ["0", "-1", "abc", "999999999999", "", "٣", "²", "1.5"],
    "Contact": ["*", "", "<", "<sip:x@[::1>", "sip:a@b;expires=abc", "<sip:a@b>;expires=²",
                '"a" <sip:a@127.0.0.1:99999>', "<tel:1>", ",", "<sip:a@127.0.0.1:0>"],
    "Record-Route": ["<sip:127.0.0.1:99999;lr>", "<sip:127.0.0.1:²;lr>", "<>", "<sip:;lr>", "garbage",
                     "<sip:fuzz.invalid;lr>", "<sip:[::1]:5060;lr>", "<sip:127.0.0.1:-1;lr>",
                     "<sip:127.0.0.1:0;lr>", "<sip:127.0.0.1;lr>, <", "<sip:[::1;lr>"],
    "P-Asserted-Identity": ["", "<", '"x"', ",", "<sip:a@b>,", "tel:+1", "<sip:a@b", "junk", ", ,", '"a" <>'],
    "Require": ["100rel", "timer", "", ",", "a" * 1000, "foo, bar", "\t"],
    "Content-Type": ["", "text/plain", "application/sdp;charset=x", "multipart/mixed;boundary=x", "application/"],
    "Expires": ["-1", "99999999999999999", "²", ""],
    "Session-Expires": ["0", "-1", "90;refresher=uac", "²", "99999999999999999999"],
    "Route": ["<sip:127.0.0.1;lr>", "<>", "garbage", "<sip:[::1]:5060;lr>"],
}
METHOD_JUNK = ["invite", "", "I" * 1000, "FOO", "PRACK", "SUBSCRIBE", "NOTIFY", "MESSAGE", "REFER", "PUBLISH",
               "INFO", "UPDATE", "ÍNVITE", "INVITE ", "INV ITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER"]
URI_JUNK = ["", "sip:", "bot@127.0.0.1", "sip:bot@[::1", "sip:bot@127.0.0.1:99999", "sips:bot@127.0.0.1",
            "tel:+15551234", "sip:" + "a" * 5000 + "@x", "sip:bot@127.0.0.1;transport=tcp", "<sip:bot@x>", "*",
            "sip:bot@127.0.0.1:²", "sip:bot@:5060", "sip:@", ":"]
VERSION_JUNK = ["SIP/2.1", "SIP/3.0", "sip/2.0", "SIP/2.0 ", "SIP/2", "", "HTTP/1.1", "SIP/2.0\x00"]
START_JUNK = ["SIP/2.0 200 OK", "SIP/2.0 999 X", "SIP/2.0 2000 OK", "SIP/2.0 ²00 OK", "SIP/2.0 100 Trying",
              "SIP/2.0 487 Request Terminated", "SIP/2.0 200", "SIP/2.0  200 OK", "GET / HTTP/1.1", "", " ", "\t"]
C_JUNK = ["IN IP4 localhost", "IN IP4 fuzz.invalid", "IN IP4 " + "a" * 300 + ".invalid", "IN IP4 127.0.0.1\x00evil",
          "IN IP4 \x00", "", "IN IP4 ::1", "IN IP6 ::1", "IN IP6 ::::::", "IN IP6 [::1]", "IN IP6 fe80::1%lo",
          "IN IP6 ::ffff:127.0.0.1", "IN IP4 127.0.0.1/127", "IN IP4 127.0.0.1/2/3", "IN IP4 256.1.1.1",
          "IN IP4 127.1", "IN IP4 0.0.0.0", "IN IP4 1.2.3", "IN IP4 127.0.0.1 extra", "IN IP4", "IP4 127.0.0.1",
          "IN IP4 ١٢٧.٠.٠.١", "IN IP6 127.0.0.1", "IN IP4 127.0.0.1\t", "IN IP6 ::", "IN IP4 -1.0.0.0",
          "IN IP4 127.0.0.1:5060", "IN IP4 [127.0.0.1]", "IN IP4 0", "IN IP4 2130706433", "IN IP6 1:2:3:4:5:6:7:8:9"]
C_HOSTNAMES = {0, 1, 2}  # the entries above that are host names (need the namespace)
PORT_JUNK = ["70000", "65536", "99999999999999999999", "-1", "0", "1/2", "5004/0", "²", "٤٠٠٠", "4000/-1",
             "65535", "1", "00004000", "+4000", "4000/99999999999999999999", " "]


class Mutator:
    """Named mutations over a Template (structural) or the wire bytes (byte-level)."""

    def __init__(self, rng: random.Random, namespace: bool):
        self.rng = rng
        self.namespace = namespace
        self.sink_port = 4000  # set to the fuzzer's RTP sink once it is bound
        self.structural = [
            ("drop-mandatory", 6, self.drop_mandatory), ("dup-mandatory", 6, self.dup_mandatory),
            ("huge-header", 2, self.huge_header), ("unicode-digits", 6, self.unicode_digits),
            ("absurd-number", 8, self.absurd), ("content-length", 6, self.content_length),
            ("nul", 4, self.nul), ("header-junk", 10, self.header_junk), ("start-line", 5, self.start_line),
            ("sdp", 14, self.sdp), ("format", 6, self.format),
        ]
        self.byte_level = [
            ("bitflip", 8, self.bitflip), ("truncate", 8, self.truncate), ("garbage", 3, self.garbage),
            ("nul-byte", 2, self.nul_byte), ("splice", 2, self.splice),
        ]

    def _pick(self, table):
        total = sum(w for _, w, _ in table)
        x = self.rng.random() * total
        for name, weight, fn in table:
            x -= weight
            if x < 0:
                return name, fn
        return table[-1][0], table[-1][2]

    def mutate(self, t: Template, extra: bytes | None = None) -> tuple[bytes, list[str]]:
        rng = self.rng
        n = rng.choices([0, 1, 2, 3], weights=[5, 55, 25, 15])[0]
        names: list[str] = []
        byte_ops = []
        for _ in range(n):
            if rng.random() < 0.7:
                name, fn = self._pick(self.structural)
                names.append(f"{name}:{fn(t)}")
            else:
                byte_ops.append(self._pick(self.byte_level))
        data, bounds = t.serialize()
        for name, fn in byte_ops:
            data, what = fn(data, bounds, extra)
            names.append(f"{name}:{what}")
        if not self.namespace:
            data = loopback_only(data)
        return data, names

    # -- structural ------------------------------------------------------------------------------

    def drop_mandatory(self, t: Template) -> str:
        name = self.rng.choice(MANDATORY)
        drop = set(t.find(name))
        t.headers = [h for i, h in enumerate(t.headers) if i not in drop]
        return name

    def dup_mandatory(self, t: Template) -> str:
        rng = self.rng
        name = rng.choice(MANDATORY)
        found = t.find(name)
        value = t.headers[found[0]][1] if found else "x"
        if rng.random() < 0.5:  # a different value
            value = {"CSeq": f"{rng.randrange(1, 9999)} {t.method}", "Content-Length": str(rng.randrange(0, 500)),
                     "Call-ID": "dup" + str(rng.getrandbits(24)), "Max-Forwards": "69",
                     "Via": f"SIP/2.0/UDP {HOST}:5999;branch=z9hG4bKdup{rng.getrandbits(24)}",
                     "From": f"<sip:other@{HOST}>;tag=dup", "To": "<sip:other@127.0.0.1>;tag=dup"}[name]
        t.headers.insert(rng.randrange(len(t.headers) + 1), [name, value])
        return name

    def huge_header(self, t: Template) -> str:
        rng = self.rng
        size = rng.choice([8192, 65_000, 65_535, 65_536, 70_000, 200_000])
        kind = rng.choice(["value", "new", "many", "via-params", "name", "pathological"])
        if kind == "pathological" and t.headers:  # what a list/param/quote scanner might go quadratic on
            h = rng.choice(t.headers)
            unit = rng.choice(["<", ">", ",", ";", '"', '\\"', "a=", ";a", "<sip:a@b>,", '"x",', "[", "::", "%"])
            h[1] = (h[1] or "") + unit * (size // len(unit))
        elif kind == "value" and t.headers:
            h = rng.choice(t.headers)
            h[1] = (h[1] or "") + "a" * size
        elif kind == "new":
            t.headers.insert(1, ["X-Fuzz", "b" * size])
        elif kind == "many":
            t.headers[1:1] = [[f"X-F{i}", "v"] for i in range(size // 20)]
        elif kind == "via-params":
            vias = t.find("Via")
            if vias:
                t.headers[vias[0]][1] += "".join(f";p{i}=v" for i in range(size // 6))
        else:
            t.headers.insert(1, ["N" * size, "x"])
        return f"{kind}:{size}"

    def _sites(self, t: Template) -> list[tuple[str, int]]:
        sites = []
        for i, (name, value) in enumerate(t.headers):
            if name is not None and (name in NUMERIC_HEADERS or name in COMPACT.values()) and \
                    (value is None or re.search(r"[0-9]", str(value))):
                sites.append(("h", i))
        for i, line in enumerate(t.sdp or []):
            if line.startswith(NUMERIC_SDP) and re.search(r"[0-9]", line):
                sites.append(("s", i))
        sites.append(("u", 0))
        return sites

    def _replace_number(self, t: Template, make) -> str:
        rng = self.rng
        where, i = rng.choice(self._sites(t))
        if where == "h":
            value = t.headers[i][1]
            if value is None:
                value = str(len(t.body()))
            label = t.headers[i][0]
        elif where == "s":
            value, label = t.sdp[i], t.sdp[i][:8]
        else:
            value, label = t.uri, "uri"
        runs = list(re.finditer(r"[0-9]+", value))
        if not runs:
            value, span = value + "0", (len(value), len(value) + 1)
        else:
            run = rng.choice(runs)
            span = run.span()
        new = value[:span[0]] + make(value[span[0]:span[1]]) + value[span[1]:]
        if where == "h":
            t.headers[i][1] = new
        elif where == "s":
            t.sdp[i] = new
        else:
            t.uri = new
        return label

    def unicode_digits(self, t: Template) -> str:
        script = self.rng.choice(sorted(UNICODE_DIGITS))
        digits = UNICODE_DIGITS[script]
        whole = self.rng.random() < 0.6

        def make(number: str) -> str:
            if whole:
                return "".join(digits[int(c)] for c in number)
            k = self.rng.randrange(len(number))
            return number[:k] + digits[int(number[k])] + number[k + 1:]
        return f"{script}:{self._replace_number(t, make)}"

    def absurd(self, t: Template) -> str:
        value = absurd_number(self.rng)
        return f"{self._replace_number(t, lambda _: value)}={value[:12]}{'…' if len(value) > 12 else ''}"

    def content_length(self, t: Template) -> str:
        rng = self.rng
        length = len(t.body())
        value = rng.choice([str(length + 1), str(length + 1000), str(length - 1), "0", "-1", str(2**31), str(2**64),
                            "9" * 1000, "²", "", "abc", f" {length}", f"{length} ", str(max(0, length // 2)),
                            str(65_536), "٣"])
        found = t.find("Content-Length")
        if found:
            t.headers[found[0]][1] = value
        else:
            t.headers.append(["Content-Length", value])
        return value[:12]

    def nul(self, t: Template) -> str:
        rng = self.rng
        choice = rng.choice(["header", "sdp", "uri", "method"])
        if choice == "sdp" and t.sdp:
            i = rng.randrange(len(t.sdp))
            k = rng.randrange(len(t.sdp[i]) + 1)
            t.sdp[i] = t.sdp[i][:k] + "\x00" + t.sdp[i][k:]
            return f"sdp:{t.sdp[i][:2]}"
        if choice == "uri":
            t.uri = t.uri + "\x00"
            return "uri"
        if choice == "method":
            t.method = t.method + "\x00"
            return "method"
        h = rng.choice(t.headers)
        value = str(h[1]) if h[1] is not None else str(len(t.body()))
        k = rng.randrange(len(value) + 1)
        h[1] = value[:k] + "\x00" + value[k:]
        return f"header:{h[0]}"

    def header_junk(self, t: Template) -> str:
        rng = self.rng
        name = rng.choice(sorted(HEADER_JUNK))
        value = rng.choice(HEADER_JUNK[name]).format(h=HOST, b="z9hG4bK" + str(rng.getrandbits(32)))
        if not self.namespace and name in ("Record-Route", "Route", "Via"):
            value = value.replace("fuzz.invalid", "127.0.0.1")
        found = t.find(name)
        if found and rng.random() < 0.8:
            t.headers[rng.choice(found)][1] = value
        else:
            t.headers.insert(rng.randrange(1, len(t.headers) + 1), [name, value])
        if rng.random() < 0.1:  # and a header line that is no header line at all
            t.headers.insert(rng.randrange(len(t.headers) + 1),
                             [None, rng.choice([": x", "NoColon", "Via : x", "X-Ü: 1", " : ", "Bad Name: 1"])])
        return f"{name}={value[:20]!r}"

    def start_line(self, t: Template) -> str:
        rng = self.rng
        kind = rng.choice(["method", "uri", "version", "whole"])
        if kind == "method":
            t.method = rng.choice(METHOD_JUNK)
            return f"method={t.method[:12]!r}"
        if kind == "uri":
            t.uri = rng.choice(URI_JUNK)
            return f"uri={t.uri[:20]!r}"
        if kind == "version":
            t.version = rng.choice(VERSION_JUNK)
            return f"version={t.version!r}"
        t.start = rng.choice(START_JUNK)
        return f"start={t.start!r}"

    def sdp(self, t: Template) -> str:
        rng = self.rng
        if t.sdp is None:
            if rng.random() < 0.5:
                return "none"
            t.sdp = Grammar(rng, ("127.0.0.1", 5060), self.sink_port).sdp()
            if not t.find("Content-Type"):
                t.headers.insert(len(t.headers) - 1, ["Content-Type", "application/sdp"])
        lines = t.sdp
        m_index = next((i for i, line in enumerate(lines) if line.startswith("m=audio") and len(line.split(" ")) >= 4),
                       None)  # a whole m-line (junk lines may start with "m=audio" too)
        kinds = ["m-port", "c", "rtpmap", "formats", "ptime", "direction", "v", "many-m", "c-dup", "c-missing",
                 "line-junk", "drop-line", "dup-line", "proto", "bandwidth", "long-line", "binary", "shuffle",
                 "rtpmap-clock", "fmtp", "c-media"]
        kind = rng.choice(kinds)
        if kind == "m-port" and m_index is not None:
            parts = lines[m_index].split(" ")
            parts[1] = rng.choice(PORT_JUNK)
            lines[m_index] = " ".join(parts)
            return f"m-port={parts[1][:12]}"
        if kind in ("c", "c-media"):
            choices = [c for i, c in enumerate(C_JUNK) if self.namespace or i not in C_HOSTNAMES]
            value = rng.choice(choices)
            line = f"c={value}"
            if kind == "c-media" and m_index is not None:
                lines.insert(m_index + 1, line)
            else:
                for i, existing in enumerate(lines):
                    if existing.startswith("c="):
                        lines[i] = line
                        break
            return f"{kind}={value[:20]!r}"
        if kind == "rtpmap":
            pt = rng.choice(["999", "-1", "128", "99999999999999999999", "²", "", "0", "101"])
            enc = rng.choice(["PCMU/8000", "telephone-event/8000", "PCMA/8000/1", "PCMU", "/", "X/Y", "PCMU/²"])
            lines.append(f"a=rtpmap:{pt} {enc}")
            if m_index is not None and rng.random() < 0.5:
                lines[m_index] += f" {pt}"
            return f"rtpmap={pt}"
        if kind == "rtpmap-clock":
            lines.append(f"a=rtpmap:0 PCMU/{rng.choice(['0', '-8000', '99999999999999999999', '8000.0', '８000'])}")
            return "clock"
        if kind == "formats" and m_index is not None:
            parts = lines[m_index].split(" ")[:3]
            fmts = rng.choice([["999"], ["128"], ["-1"], ["00000"], [], [str(i) for i in range(2000)], ["0"] * 50,
                               ["²"], ["0", "abc"], ["1" * 400]])
            lines[m_index] = " ".join(parts + fmts)
            return f"formats={len(fmts)}"
        if kind == "ptime":
            value = rng.choice(["0", "-20", "99999999999999999999", "²", "20.5", "", "1000000"])
            lines.append(f"a={rng.choice(['ptime', 'maxptime'])}:{value}")
            return f"ptime={value[:12]}"
        if kind == "direction":
            lines += [f"a={d}" for d in rng.sample(["sendrecv", "sendonly", "recvonly", "inactive", "bogus"], 2)]
            return "direction"
        if kind == "v":
            lines[0] = rng.choice(["v=1", "v=", "x=0", "v=²", "v=0\x00"])
            if rng.random() < 0.3:
                lines.pop(0)
            return "v"
        if kind == "many-m":
            count = rng.choice([2, 20, 200, 2000])
            lines += [f"m=audio {4000 + 2 * i} RTP/AVP 0" for i in range(count)]
            return f"many-m={count}"
        if kind == "c-dup":
            lines.insert(4, f"c=IN IP4 {HOST}")
            return "c-dup"
        if kind == "c-missing":
            t.sdp = [line for line in lines if not line.startswith("c=")]
            return "c-missing"
        if kind == "line-junk":
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(["=", "x", "==", "a", "m=", "c=", "m=audio",
                                                                    "a=rtpmap:", "a=", "é=1", " "]))
            return "line-junk"
        if kind == "drop-line" and lines:
            lines.pop(rng.randrange(len(lines)))
            return "drop-line"
        if kind == "dup-line" and lines:
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            return f"dup-line={lines[i][:2]}"
        if kind == "proto" and m_index is not None:
            parts = lines[m_index].split(" ")
            parts[2] = rng.choice(["RTP/SAVP", "UDP/TLS/RTP/SAVPF", "RTP/AVPF", "TCP", "", "RTP/AVP/TCP"])
            lines[m_index] = " ".join(parts)
            return "proto"
        if kind == "bandwidth":
            lines.insert(4, f"b=AS:{absurd_number(rng)}")
            return "bandwidth"
        if kind == "long-line":
            lines.append("a=x-long:" + "z" * rng.choice([1000, 30000, 64000]))
            return "long-line"
        if kind == "binary":
            t.raw_body = t.body() + rng.randbytes(rng.randrange(1, 200))
            return "binary"
        if kind == "shuffle":
            rng.shuffle(lines)
            return "shuffle"
        if kind == "fmtp":
            lines.append(f"a=fmtp:{rng.choice(['101', '²', '-1', '', '999'])} {rng.choice(['0-16', '', '0-99999999999'])}")
            return "fmtp"
        return f"{kind}:skipped"

    def format(self, t: Template) -> str:
        rng = self.rng
        kind = rng.choice(["compact", "case", "space-colon", "no-space", "fold", "lf", "cr", "mixed-eol",
                           "leading-crlf", "tabs"])
        if kind == "compact":
            for h in t.headers:
                if h[0] in COMPACT and rng.random() < 0.7:
                    h[0] = COMPACT[h[0]]
        elif kind == "case":
            for h in t.headers:
                if h[0] is not None:
                    h[0] = "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in h[0])
        elif kind == "space-colon":
            h = rng.choice(t.headers)
            if h[0] is not None:
                h[0] = h[0] + rng.choice([" ", "\t", "  "])
        elif kind == "no-space":
            t.headers = [[None, f"{n}:{v if v is not None else len(t.body())}"] if n is not None else [n, v]
                         for n, v in t.headers]
        elif kind == "fold":
            h = rng.choice(t.headers)
            if h[1]:
                value = str(h[1])
                k = rng.randrange(len(value) + 1)
                h[1] = value[:k] + t.eol + rng.choice([" ", "\t", "   "]) + value[k:]
        elif kind == "lf":
            t.eol = "\n"
        elif kind == "cr":
            t.eol = "\r"
        elif kind == "mixed-eol":
            h = rng.choice(t.headers)
            h[1] = f"{h[1] if h[1] is not None else len(t.body())}\n"
        elif kind == "leading-crlf":
            t.start = "\r\n" * rng.randrange(1, 50) + f"{t.method} {t.uri} {t.version}"
        else:
            h = rng.choice(t.headers)
            if h[1] is not None:
                h[1] = "\t" + str(h[1]) + " \t"
        return kind

    # -- byte level --------------------------------------------------------------------------------

    def bitflip(self, data: bytes, bounds, extra) -> tuple[bytes, str]:
        rng = self.rng
        if not data:
            return data, "empty"
        out = bytearray(data)
        n = rng.choice([1, 1, 2, 4, 8, 32])
        head = data.find(b"\r\n\r\n")
        for _ in range(n):
            limit = head if head > 0 and rng.random() < 0.6 else len(out)
            i = rng.randrange(max(1, limit))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out), str(n)

    def truncate(self, data: bytes, bounds, extra) -> tuple[bytes, str]:
        rng = self.rng
        if rng.random() < 0.85 and bounds:
            cut = rng.choice(bounds) + rng.choice([0, 0, 0, -1, -2, 1, 2])
        else:
            cut = rng.randrange(len(data) + 1)
        cut = max(0, min(len(data), cut))
        return data[:cut], str(cut)

    def garbage(self, data: bytes, bounds, extra) -> tuple[bytes, str]:
        rng = self.rng
        junk = rng.randbytes(rng.choice([1, 8, 64, 512]))
        kind = rng.choice(["insert", "replace-tail", "prefix"])
        if kind == "insert":
            i = rng.randrange(len(data) + 1)
            return data[:i] + junk + data[i:], f"insert:{len(junk)}"
        if kind == "prefix":
            return junk + data, f"prefix:{len(junk)}"
        i = rng.randrange(len(data) + 1)
        return data[:i] + junk, f"tail:{len(junk)}"

    def nul_byte(self, data: bytes, bounds, extra) -> tuple[bytes, str]:
        i = self.rng.randrange(len(data) + 1)
        return data[:i] + b"\x00" * self.rng.choice([1, 1, 4, 100]) + data[i:], str(i)

    def splice(self, data: bytes, bounds, extra) -> tuple[bytes, str]:
        if extra and self.rng.random() < 0.7:
            return data + extra, "append"
        return data + data, "twice"


def garbage_input(rng: random.Random) -> tuple[bytes, str]:
    """A whole input that is not a request at all."""
    kind = rng.choice(["random", "printable", "crlf", "keepalive", "soup", "empty", "rtp", "stun", "http"])
    if kind == "random":
        return rng.randbytes(rng.choice([1, 12, 100, 1400, 8000])), kind
    if kind == "printable":
        return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.choice([10, 300, 3000]))).encode(), kind
    if kind == "crlf":
        return b"\r\n" * rng.choice([1, 2, 3, 100, 5000]), kind
    if kind == "keepalive":
        return rng.choice([b"\r\n\r\n", b"\r\n", b"\n", b"\r\n\r\n\r\n\r\n", b"\x00\x00\x00\x00", b"jaK\n"]), kind
    if kind == "soup":
        heads = ["Via", "From", "To", "Call-ID", "CSeq", "Content-Length", "v", "f", "t", "i", "l"]
        lines = [f"{rng.choice(heads)}: {rng.choice(['1', 'x', '', '<sip:a@b>', '1 INVITE', '²'])}"
                 for _ in range(rng.randrange(1, 20))]
        return ("\r\n".join([rng.choice(["INVITE sip:x@y SIP/2.0", "SIP/2.0 200 OK", "X"])] + lines) + "\r\n\r\n"
                ).encode(), kind
    if kind == "empty":
        return b"", kind
    if kind == "rtp":
        return bytes([0x80, rng.randrange(128)]) + rng.randbytes(170), kind
    if kind == "stun":
        return struct.pack("!HHI12s", 1, 0, 0x2112A442, bytes(12)), kind
    return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", kind


def rtp_junk(rng: random.Random) -> tuple[str, list[bytes]]:
    """(kind, packets): RTP for a live call, from plausible to broken."""
    def header(v=2, p=0, x=0, cc=0, m=0, pt=0, seq=None, ts=None, ssrc=None):
        return struct.pack("!BBHII", (v << 6) | (p << 5) | (x << 4) | cc, (m << 7) | pt,
                           rng.randrange(65536) if seq is None else seq, rng.getrandbits(32) if ts is None else ts,
                           rng.getrandbits(32) if ssrc is None else ssrc)
    kind = rng.choice(["audio", "audio-burst", "version", "csrc", "extension", "padding", "short", "rtcp", "dtmf",
                       "dtmf-short", "huge", "empty", "pt", "seq-jump", "cn"])
    if kind == "audio":
        return kind, [header(pt=rng.choice([0, 8])) + rng.randbytes(160)]
    if kind == "audio-burst":
        seq, ts, ssrc = rng.randrange(65536), rng.getrandbits(32), rng.getrandbits(32)
        return kind, [header(pt=0, seq=(seq + i) & 0xFFFF, ts=(ts + 160 * i) & 0xFFFFFFFF, ssrc=ssrc)
                      + rng.randbytes(160) for i in rng.sample(range(20), 20)]
    if kind == "version":
        return kind, [header(v=rng.choice([0, 1, 3])) + rng.randbytes(160)]
    if kind == "csrc":
        return kind, [header(cc=15) + rng.randbytes(rng.choice([0, 4, 59, 60, 61]))]
    if kind == "extension":
        return kind, [header(x=1) + struct.pack("!HH", 0xBEDE, rng.choice([0, 1, 0xFFFF])) + rng.randbytes(8)]
    if kind == "padding":
        body = rng.randbytes(rng.choice([0, 1, 10, 160]))
        return kind, [header(p=1) + body + bytes([rng.choice([0, 1, 200, 255])])]
    if kind == "short":
        return kind, [header()[:rng.randrange(12)]]
    if kind == "rtcp":
        return kind, [bytes([0x80, rng.randrange(200, 205)]) + rng.randbytes(30)]
    if kind == "dtmf":
        return kind, [header(pt=101) + bytes([rng.randrange(256), rng.choice([0x0A, 0x8A]), 0, 160])
                      for _ in range(3)]
    if kind == "dtmf-short":
        return kind, [header(pt=101) + rng.randbytes(rng.randrange(4))]
    if kind == "huge":
        return kind, [header(pt=0) + rng.randbytes(rng.choice([1400, 8000, 60000]))]
    if kind == "empty":
        return kind, [b""]
    if kind == "pt":
        return kind, [header(pt=rng.randrange(128)) + rng.randbytes(rng.choice([0, 1, 160]))]
    if kind == "seq-jump":
        ssrc = rng.getrandbits(32)
        return kind, [header(pt=0, seq=s, ssrc=ssrc) + rng.randbytes(160) for s in (0, 65535, 32768, 1, 40000)]
    return kind, [header(pt=13) + rng.randbytes(rng.choice([0, 1, 10]))]


# --- findings -------------------------------------------------------------------------------------------------------

def bytes_literal(data: bytes, limit: int = 4000) -> str:
    """A Python expression for ``data``: long runs as ``b'x' * n``, long inputs cut with a note."""
    parts, i = [], 0
    pattern = re.compile(rb"(.)\1{63,}", re.S)
    for m in pattern.finditer(data):
        if m.start() > i:
            parts.append(repr(data[i:m.start()]))
        parts.append(f"{data[m.start():m.start() + 1]!r} * {m.end() - m.start()}")
        i = m.end()
    if i < len(data):
        parts.append(repr(data[i:]))
    text = " + ".join(parts) if parts else "b''"
    if len(text) > limit:
        text = text[:limit] + f"  # … cut, {len(data)} bytes in all"
    return text


@dataclass
class Finding:
    signature: str
    what: str
    detail: str
    inputs: list  # [(index, transport, data, mutators)]
    first_index: int
    count: int = 1
    repro: tuple | None = None  # (transport, data) that reproduces alone, when one did


class Findings:
    def __init__(self, path: Path | None, command: str, label: str = ""):
        self.path = path
        self.command = command
        self.label = label
        self.by_signature: dict[str, Finding] = {}

    def add(self, signature: str, what: str, detail: str, inputs: list, index: int) -> bool:
        existing = self.by_signature.get(signature)
        if existing is not None:
            existing.count += 1
            return False
        self.by_signature[signature] = Finding(signature, what, detail, list(inputs), index)
        return True

    def write(self) -> int:
        """Append the findings whose signature the file does not have yet; returns how many."""
        if self.path is None:
            return 0
        known = self.path.read_text(errors="replace") if self.path.exists() else ""
        new = [f for f in self.by_signature.values() if f"`{f.signature}`" not in known]
        if not new:
            return 0
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        chunks = []
        if not known:
            chunks.append("# SIP fuzzer findings (tools/sip_fuzz.py)\n\nOne entry per crash class; the signature in "
                          "backticks is what the fuzzer dedupes on.\n")
        for f in new:
            if f.repro is not None:
                transport, data = f.repro
                how = f"reproduces alone over {transport}"
            elif f.inputs:
                _, transport, data, _ = f.inputs[-1]
                how = f"the last of {len(f.inputs)} inputs before it (did not reproduce alone; see the window)"
            else:
                transport, data, how = "-", b"", "no single input (an end-of-run check)"
            chunks.append(
                f"\n## `{f.signature}`\n\n- found {stamp}, input #{f.first_index}, seen {f.count}x, by "
                f"`{self.command}` against {self.label}\n- what: {f.what}\n- input ({how}):\n\n```python\n{bytes_literal(data)}\n```\n")
            if f.repro is None and len(f.inputs) > 1:
                window = "\n".join(f"# #{i} {tr} {', '.join(m)}\n{bytes_literal(d, 600)}"
                                   for i, tr, d, m in f.inputs[-6:])
                chunks.append(f"\n- the inputs just before it:\n\n```python\n{window}\n```\n")
            if f.detail:
                chunks.append(f"\n- detail:\n\n```\n{f.detail.strip()[-2500:]}\n```\n")
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(chunks))
        return len(new)


def traceback_signature(text: str) -> str:
    """``ExceptionType at file:line in function`` of the innermost project frame of a traceback text."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
    record = re.match(r"^\S+ \S+ \| (\w+) +\| ([\w.]+):(\w+):\d+ - (.*)", text)
    if not frames and record:  # an ERROR record without a traceback: where it was logged and what it says
        level, module, function, message = record.groups()
        message = re.sub(r"#\d+|\d+", "N", message)[:90]
        return f"{level} from {module.rsplit('.', 1)[-1]}.{function}: {message}"
    ours = [f for f in frames if "/transports/" in f[0] or "/plugin/" in f[0] or "pipecat_nemotron" in f[0]]
    frame = (ours or frames or [("?", "?", "?")])[-1]
    if not frames:  # a message without a traceback: its first line, numbers blanked
        return re.sub(r"#\d+|\d+", "N", text.strip().splitlines()[0] if text.strip() else "?")[:120]
    lines = [line for line in text.strip().splitlines() if line and not line.startswith(" ")]
    last = lines[-1] if lines else "?"
    exc = re.split(r"[:\s]", last.strip(), maxsplit=1)[0] if last else "?"
    return f"{exc} at {Path(frame[0]).parent.name}/{Path(frame[0]).name} in {frame[2]}"  # no line: code moves


# --- the network side of the fuzzer -----------------------------------------------------------------------------

class UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, owner: "Fuzzer"):
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport):
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data, addr):
        self.owner.on_message(data, "UDP", self, addr)

    def error_received(self, exc):
        pass


class RtpSink(asyncio.DatagramProtocol):
    """Where the fuzzer's SDP points the server's RTP: counts what arrives."""

    def __init__(self):
        self.packets = 0

    def datagram_received(self, data, addr):
        self.packets += 1


class TcpConn:
    def __init__(self, owner: "Fuzzer", reader, writer):
        self.owner, self.reader, self.writer = owner, reader, writer
        self.port = writer.get_extra_info("sockname")[1]
        self.closed = False
        self.shadow = b""  # what the server has received but not framed yet (as far as our parser can tell)
        self.broken = False
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self):
        from pipecat_nemotron.transports.sip.message import parse_stream
        buffer = b""
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                buffer += data
                while buffer:
                    try:
                        message, used = parse_stream(buffer)
                    except Exception:
                        self.owner.bad_responses += 1
                        buffer = b""
                        break
                    if message is None:
                        buffer = buffer[used:]
                        break
                    raw, buffer = buffer[:used], buffer[used:]
                    self.owner.on_message(raw, "TCP", self, None, parsed=message)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self.closed = True
            self.writer.close()
            self.owner.connection_closed(self)

    def write(self, data: bytes) -> bool:
        """Send; True when the server will frame ``data`` as exactly one message of its own (a shadow of its
        stream parser says nothing was pending before it and nothing broke the framing)."""
        from pipecat_nemotron.transports.sip.message import parse_stream
        if self.closed or self.writer.is_closing():
            return False
        self.writer.write(data)
        if self.broken:
            return False
        clean = not self.shadow
        self.shadow += data
        exact = False
        while self.shadow:
            try:
                message, used = parse_stream(self.shadow)
            except Exception:  # the server closes the connection here: nothing after it is answered
                self.broken, self.shadow = True, b""
                return False
            if message is None:
                self.shadow = self.shadow[used:]
                break
            exact = exact or (clean and used == len(data) and len(self.shadow) == len(data))
            self.shadow = self.shadow[used:]
        return exact

    def close(self):
        self.closed = True
        self.writer.close()
        self.task.cancel()
        self.owner.connection_closed(self)


@dataclass
class Sent:
    index: int
    transport: str
    data: bytes
    mutators: list[str]


class Fuzzer:
    """Generates, sends and tracks inputs against one server."""

    def __init__(self, *, server: tuple[str, int], seed: int, namespace: bool, udp_sockets: int = 16,
                 tcp_share: float = 0.25, window: int = 512, findings: Findings | None = None):
        self.server = server
        self.seed = seed
        self.rng = random.Random(seed)
        self.ack_rng = random.Random(seed ^ 0x5EED)
        self.namespace = namespace
        self.tcp_share = tcp_share
        self.mutator = Mutator(self.rng, namespace)
        self.findings = findings
        self.udp: list[UdpEndpoint] = []
        self.n_udp = udp_sockets
        self.tcp: list[TcpConn] = []
        self.held: deque[tuple[float, TcpConn]] = deque()  # half-sent connections held open for a while
        self.sink = RtpSink()
        self.grammar: Grammar | None = None
        self.dialogs: dict[str, Dialog] = {}
        self.pending_invites: dict[str, Dialog] = {}
        self.window: deque[Sent] = deque(maxlen=window)
        self.generated: deque[bytes] = deque(maxlen=64)  # for retransmissions (generated inputs only: seed-stable)
        self.due: dict[str, tuple[float, Sent, str]] = {}  # branch → (sent at, input, method)
        self.final_due: dict[str, list] = {}  # INVITE branch → [sent at, input, provisional seen]
        self.invites: dict[str, Sent] = {}  # Call-ID → the last few thousand INVITEs (to name a stuck call's input)
        self.stats = {"inputs": 0, "udp": 0, "tcp": 0, "responses": 0, "no_response": 0, "stuck_invites": 0,
                      "dialogs_learnt": 0, "in_dialog": 0, "server_requests": 0}
        self.mutator_counts: dict[str, int] = {}
        self.status_counts: dict[int, int] = {}
        self.bad_responses = 0
        self.index = 0
        self._closing = False

    async def open(self):
        loop = asyncio.get_running_loop()
        for _ in range(self.n_udp):
            transport, ep = await loop.create_datagram_endpoint(lambda: UdpEndpoint(self), local_addr=(HOST, 0))
            big_receive_buffer(transport)  # 400/513 answers echo 64 KB headers: a default buffer drops them
            self.udp.append(ep)
        sink_transport, _ = await loop.create_datagram_endpoint(lambda: self.sink, local_addr=(HOST, 0))
        self._sink_transport = sink_transport
        sink_port = sink_transport.get_extra_info("sockname")[1]
        self.grammar = Grammar(self.rng, self.server, sink_port)
        self.ack_grammar = Grammar(self.ack_rng, self.server, sink_port)  # answers to the server: own stream
        self.ack_mutator = Mutator(self.ack_rng, self.namespace)
        self.ack_mutator.sink_port = sink_port
        self.mutator.sink_port = sink_port

    async def close(self):
        self._closing = True
        for conn in self.tcp:
            conn.close()
        for _, conn in self.held:
            conn.close()
        self.held.clear()
        self.tcp.clear()
        for ep in self.udp:
            ep.transport.close()
        self._sink_transport.close()
        await asyncio.sleep(0.05)

    # -- what comes back ----------------------------------------------------------------------------

    def on_message(self, data: bytes, transport: str, endpoint, addr, parsed=None):
        from pipecat_nemotron.transports.sip.message import (SIPRequest, SIPResponse, parse_address, parse_message,
                                                            parse_via)
        try:
            message = parsed if parsed is not None else parse_message(data)
        except Exception:  # e.g. a 400 that echoes the request's own broken CSeq: still an answer to it
            self.bad_responses += 1
            branch = re.search(rb"branch=([^;\r\n, ]+)", data)
            method = re.search(rb"\n(?:CSeq|cseq): *\S+ +([A-Za-z]+)", data)
            status = re.match(rb"SIP/2\.0 (\d{3}) ", data)
            if branch and method and status:
                self._answered(branch.group(1).decode(errors="replace"), method.group(1).decode().upper(),
                               int(status.group(1)))
            return
        if message is None:
            return
        if isinstance(message, SIPRequest):  # the server's BYE (no ACK, timers, max call length): answer 200
            self.stats["server_requests"] += 1
            self.dialogs.pop(message.call_id, None)
            if message.method != "ACK":
                self._send_back(self._reply(message), transport, endpoint, addr)
            return
        assert isinstance(message, SIPResponse)
        self.stats["responses"] += 1
        self.status_counts[message.status] = self.status_counts.get(message.status, 0) + 1
        try:
            branch = parse_via(message.get_all("Via")[0]).branch
            number, method = message.cseq
        except Exception:
            self.bad_responses += 1
            return
        self._answered(branch, method, message.status)
        if message.status == 481:  # that dialog is gone on the server's side: stop aiming at it
            self.dialogs.pop(message.call_id, None)
            self.pending_invites.pop(message.call_id, None)
        if method != "INVITE":
            return
        call_id = message.call_id
        try:  # whatever INVITE got this answer (mutated or not), its dialog is learnt from the response
            to_tag = parse_address(message.get("To")).tag
            info = Dialog(call_id=call_id, from_header=message.get("From"), to_header=message.get("To"),
                          invite_branch=branch, cseq=number, transport=transport, born=time.monotonic())
        except Exception:
            return
        if message.status < 200:
            if call_id not in self.pending_invites and call_id not in self.dialogs:
                self.pending_invites[call_id] = info
                while len(self.pending_invites) > 64:
                    self.pending_invites.pop(next(iter(self.pending_invites)))
            return
        self.pending_invites.pop(call_id, None)
        if 200 <= message.status < 300 and to_tag and call_id not in self.dialogs:
            try:
                from pipecat_nemotron.transports.sip.sdp import parse_sdp
                answer = parse_sdp(message.body)
                media = next(m for m in answer.media if m.port)
                info.rtp = (media.connection or answer.connection, media.port)
            except Exception:
                pass
            info.answered = True
            self.dialogs[call_id] = info
            self.stats["dialogs_learnt"] += 1
            if self.ack_rng.random() < 0.7:  # most answered calls get their ACK, and most of those a BYE soon:
                self._ack(info, endpoint, transport)  # call slots free up for the next INVITEs' SDP to be read
                if self.ack_rng.random() < 0.8:
                    asyncio.get_running_loop().call_later(self.ack_rng.choice([0.05, 0.2, 0.6]), self._bye, info,
                                                          endpoint, transport)
            while len(self.dialogs) > 64:
                self.dialogs.pop(next(iter(self.dialogs)))

    def _reply(self, request) -> bytes:
        """Our answer to the server's own request (its BYE): mostly a 200, sometimes a broken response, which
        exercises the server's response path (client transactions)."""
        rng = self.ack_rng
        rng_status = rng.choice(["200 OK"] * 6 + ["100 Trying", "481 Gone", "999 Odd", "2000 X", "²00 OK", "200"])
        headers = [[k, v] for k, v in request.headers if k in ("Via", "From", "To", "Call-ID", "CSeq")]
        self.stats["responses_fuzzed"] = self.stats.get("responses_fuzzed", 0) + 1
        if rng.random() < 0.4 and headers:
            h = rng.choice(headers)
            h[1] = rng.choice(["", "²", absurd_number(rng), h[1] + "\x00", "1 BYE", f"{absurd_number(rng)} BYE",
                               "SIP/2.0/UDP [::1", h[1] + "a" * 2000])
        if rng.random() < 0.2 and headers:
            headers.pop(rng.randrange(len(headers)))
        text = f"SIP/2.0 {rng_status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        return (text + "Content-Length: 0\r\n\r\n").encode("utf-8", errors="surrogatepass")

    def _answered(self, branch: str, method: str, status: int):
        self.due.pop((branch, method), None)
        if method == "INVITE":
            if status >= 200:
                self.final_due.pop(branch, None)
            elif branch in self.final_due:
                self.final_due[branch][2] = True

    def _send_back(self, data: bytes, transport: str, endpoint, addr):
        try:
            if transport == "UDP":
                endpoint.transport.sendto(data, addr)
            else:
                endpoint.write(data)
        except Exception:
            pass

    def _ack(self, dialog: Dialog, endpoint, transport: str, method: str = "ACK"):
        if self._closing or (transport == "TCP" and endpoint.closed):
            return
        g = self.ack_grammar
        if method == "BYE":
            dialog.cseq += 1
        body = None
        invite = self.invites.get(dialog.call_id)
        if method == "ACK" and invite is not None and b"\nv=0" not in invite.data:
            body = g.sdp()  # the INVITE had no offer: the server offered in its 200 and the answer goes here
        t = g.request(method, local_port=endpoint.port, transport=transport, dialog=dialog, cseq=dialog.cseq,
                      body=body)
        if body is not None and self.ack_rng.random() < 0.5:
            self.ack_mutator.sdp(t)  # and sometimes a broken one
        data, _ = t.serialize()
        try:
            if transport == "UDP":
                endpoint.transport.sendto(data, self.server)
            else:
                endpoint.write(data)
        except Exception:
            pass

    def _bye(self, dialog: Dialog, endpoint, transport: str):
        if self.dialogs.pop(dialog.call_id, None) is not None:
            self._ack(dialog, endpoint, transport, "BYE")

    # -- inputs -------------------------------------------------------------------------------------

    def _pick_method(self) -> tuple[str, Dialog | None]:
        # The same draws whatever the server answered, so the generated stream is a function of the seed; only
        # the Call-ID/tags of in-dialog requests come from the dialogs learnt so far.
        rng = self.rng
        x, pick = rng.random(), rng.random()
        in_dialog = rng.choice(["INVITE", "INVITE", "BYE", "ACK", "OPTIONS", "INFO", "UPDATE", "CANCEL"])
        if self.dialogs and x < 0.25:
            dialog = list(self.dialogs.values())[int(pick * len(self.dialogs))]
            return in_dialog, dialog
        if self.pending_invites and x < 0.30:
            dialog = list(self.pending_invites.values())[int(pick * len(self.pending_invites))]
            return "CANCEL", dialog
        method = rng.choices(["INVITE", "OPTIONS", "BYE", "CANCEL", "ACK", "REGISTER", "INFO", "UPDATE"],
                             weights=[40, 15, 10, 8, 8, 10, 4, 5])[0]
        return method, None

    def _again(self, data: bytes) -> tuple[bytes, list[str], str, str]:
        """An earlier input once more: a retransmission, or its branch reused with another Call-ID, method or
        CSeq (transaction matching, RFC 3261 §17.2.3)."""
        rng = self.rng
        kind = rng.choice(["retransmission", "retransmission", "other-call-id", "other-method", "other-cseq"])
        if kind == "other-call-id":
            data = re.sub(rb"(?im)^(call-id|i)[ \t]*:[^\r\n]*", lambda m: m.group(1) + b": again" +
                          str(rng.getrandbits(32)).encode(), data, count=1)
        elif kind == "other-method":
            new = rng.choice([b"OPTIONS", b"INVITE", b"BYE", b"CANCEL", b"ACK", b"INFO"])
            old = data.split(b" ", 1)[0]
            data = new + data[len(old):]
            data = re.sub(rb"(?im)^(cseq[ \t]*:[ \t]*\d+[ \t]+)[A-Za-z]+", lambda m: m.group(1) + new, data, count=1)
        elif kind == "other-cseq":
            data = re.sub(rb"(?im)^(cseq[ \t]*:[ \t]*)\d+", lambda m: m.group(1) + str(rng.randrange(1, 2**31)).encode(),
                          data, count=1)
        method = data.split(b" ", 1)[0].decode("utf-8", errors="replace")[:20]
        branch = re.search(rb"branch=([^;\r\n, ]+)", data)
        if branch:  # the server may now answer the first copy where this one comes from: nothing owed to it
            key = branch.group(1).decode("utf-8", errors="replace")
            self.final_due.pop(key, None)
            for owed in [k for k in self.due if k[0] == key]:
                del self.due[owed]
        return data, [f"again:{kind}"], method, ""

    def build(self, local_port: int, transport: str) -> tuple[bytes, list[str], str, str]:
        """(wire bytes, mutator names, method, Call-ID) of the next input."""
        rng = self.rng
        g = self.grammar
        if rng.random() < 0.05:
            data, kind = garbage_input(rng)
            return data, [f"garbage-input:{kind}"], "-", ""
        if rng.random() < 0.03 and self.generated:
            return self._again(self.generated[int(rng.random() * len(self.generated))])
        method, dialog = self._pick_method()
        cseq = branch = None
        if dialog is not None:
            self.stats["in_dialog"] += 1
            if method == "CANCEL":
                cseq, branch = dialog.cseq, dialog.invite_branch
            elif method == "ACK":
                cseq = dialog.cseq
            else:
                dialog.cseq += 1
                cseq = dialog.cseq
        t = g.request(method, local_port=local_port, transport=transport, dialog=dialog, cseq=cseq, branch=branch)
        extra = None
        if rng.random() < 0.2:
            extra, _ = g.request(rng.choice(["OPTIONS", "INVITE"]), local_port=local_port,
                                 transport=transport).serialize()
        call_id = next((v for n, v in t.headers if n == "Call-ID"), "")
        data, names = self.mutator.mutate(t, extra)
        self.generated.append(data)
        for name in names:
            key = name.split(":", 1)[0]
            self.mutator_counts[key] = self.mutator_counts.get(key, 0) + 1
        return data, names, method, call_id

    def _track_due(self, sent: Sent, port: int, conn: "TcpConn | None" = None):
        """Remember requests that must get a response: readable enough for the server to address a 400. Over TCP
        only a whole single message on a connection we keep open counts (until the server closes it)."""
        from pipecat_nemotron.transports.sip.message import (SIPRequest, parse_address, parse_cseq, parse_message,
                                                            parse_stream, parse_via)
        try:
            if conn is None:
                message = parse_message(sent.data)
            else:
                message, used = parse_stream(sent.data)
                if used != len(sent.data):
                    return
            if not isinstance(message, SIPRequest) or message.method == "ACK":
                return
            via = parse_via(message.get_all("Via")[0])
            parse_cseq(message.get("CSeq"))
            parse_address(message.get("From"))
            parse_address(message.get("To"))
        except Exception:
            return
        if not via.branch or (conn is None and (("rport" not in via.params and via.port != port)
                                                 or via.host != HOST)):
            return
        key = (via.branch, message.method)
        if key in self.due:
            return
        now = time.monotonic()
        self.due[key] = (now, sent, message.method, conn)
        if message.method == "INVITE" and not parse_address(message.get("To")).tag:
            self.final_due[via.branch] = [now, sent, False, conn]

    def connection_closed(self, conn: "TcpConn"):
        """Requests still waiting on a connection the server (or we) closed are not owed an answer any more."""
        for key, entry in list(self.due.items()):
            if entry[3] is conn:
                del self.due[key]
        for key, entry in list(self.final_due.items()):
            if entry[3] is conn:
                del self.final_due[key]

    async def send_one(self) -> Sent:
        rng = self.rng
        self.index += 1
        rtp_draw, rtp_pick = rng.random(), rng.random()
        with_media = [d for d in self.dialogs.values() if d.rtp and d.rtp[0] == HOST]
        if rtp_draw < 0.04 and with_media:
            return self._send_rtp(with_media[int(rtp_pick * len(with_media))])
        use_tcp = rng.random() < self.tcp_share
        if use_tcp:
            return await self._send_tcp()
        ep = self.udp[rng.randrange(len(self.udp))]
        data, names, method, _ = self.build(ep.port, "UDP")
        if len(data) > MAX_UDP:  # does not fit a datagram: the TCP path takes it
            return await self._send_tcp(prebuilt=(data, names))
        sent = Sent(self.index, "UDP", data, names)
        self.window.append(sent)
        self._remember_invite(sent)
        try:
            ep.transport.sendto(data, self.server)
        except OSError:
            pass
        self.stats["udp"] += 1
        self.stats["inputs"] += 1
        if not names or not names[0].startswith("again:"):  # a reused branch may be answered where it first went
            self._track_due(sent, ep.port)
        return sent

    def _send_rtp(self, dialog: Dialog) -> Sent:
        """A burst of RTP, valid and broken, at the server's RTP port of a live call: from the address our SDP
        named (it may be latched) or from a third address (it must be ignored)."""
        rng = self.rng
        kind, packets = rtp_junk(rng)
        third = rng.random() < 0.3
        transport = self.udp[0].transport if third else self._sink_transport
        for packet in packets:
            try:
                transport.sendto(packet, dialog.rtp)
            except OSError:
                pass
        sent = Sent(self.index, "RTP", b"".join(packets[:1]), [f"rtp:{kind}{':third-address' if third else ''}"])
        self.window.append(sent)
        self.stats["rtp"] = self.stats.get("rtp", 0) + 1
        self.stats["inputs"] += 1
        self.mutator_counts["rtp"] = self.mutator_counts.get("rtp", 0) + 1
        return sent

    def _remember_invite(self, sent: Sent):
        if not sent.data.startswith(b"INVITE"):
            return
        match = re.search(rb"\n(?:Call-ID|i) *: *([^\r\n]*)", sent.data, re.I)
        if match:
            self.invites[match.group(1).strip().decode("utf-8", errors="replace")] = sent
            if len(self.invites) > 4000:
                self.invites.pop(next(iter(self.invites)))

    async def _connect(self) -> TcpConn | None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.server, limit=2**20), 2)
        except (OSError, asyncio.TimeoutError):
            return None
        return TcpConn(self, reader, writer)

    async def _send_tcp(self, prebuilt=None) -> Sent:
        rng = self.rng
        style = rng.choices(["persistent", "fresh", "chunked", "crlf-flood", "pipelined", "half"],
                            weights=[40, 15, 10, 10, 10, 15])[0]
        self.tcp = [c for c in self.tcp if not c.closed]
        conn = None
        if style == "persistent" and self.tcp and (len(self.tcp) >= 4 or rng.random() < 0.9):
            conn = rng.choice(self.tcp)
        if conn is None:
            conn = await self._connect()
            if conn is None:
                sent = Sent(self.index, "TCP", b"", ["connect-failed"])
                self.stats["inputs"] += 1
                return sent
            if style == "persistent":
                self.tcp.append(conn)
        if prebuilt is not None:
            data, names = prebuilt
        else:
            data, names, _, _ = self.build(conn.port, "TCP")
        names = names + [f"tcp:{style}"]
        payload = data
        if style == "crlf-flood":
            payload = b"\r\n" * rng.choice([2, 100, 10_000, 100_000]) + data
        elif style == "pipelined":
            for _ in range(rng.choice([1, 1, 4, 40])):
                more, _, _, _ = self.build(conn.port, "TCP")
                payload += more
        sent = Sent(self.index, "TCP", payload, names)
        self.window.append(sent)
        self._remember_invite(sent)
        self.stats["tcp"] += 1
        self.stats["inputs"] += 1
        try:
            if style == "chunked":
                step = rng.choice([1, 7, 64])
                for i in range(0, len(payload), step):
                    conn.write(payload[i:i + step])
                    if i // step % 16 == 0:
                        await asyncio.sleep(0)
            elif style == "half":
                conn.write(payload[:rng.randrange(len(payload) + 1)])
            else:
                exact = conn.write(payload)
                if style == "persistent" and exact and not names[0].startswith("again:"):
                    self._track_due(sent, conn.port, conn)
        except Exception:
            pass
        if style in ("fresh", "chunked", "crlf-flood", "pipelined"):
            asyncio.get_running_loop().call_later(rng.choice([0.05, 0.3, 1.0]), conn.close)
        elif style == "half":
            self.held.append((time.monotonic() + rng.choice([0.2, 1.0, 3.0]), conn))
        self._expire_held()
        return sent

    def _expire_held(self, everything=False):
        now = time.monotonic()
        while self.held and (everything or self.held[0][0] < now or len(self.held) > 40):
            _, conn = self.held.popleft()
            conn.close()

    async def backpressure(self, harvest, *, backlog: int = 24, age: float = 0.25):
        """Wait while many tracked requests have been waiting for their response for a while (the server is
        behind: sending faster would only overflow its socket buffer and look like lost responses)."""
        waited = 0.0
        while self.due and len(self.due) > backlog and waited < 2.5:
            oldest = next(iter(self.due.values()))[0]
            if time.monotonic() - oldest < age:
                return
            await asyncio.sleep(0.01)
            waited += 0.01
            if waited % 0.5 < 0.01:
                harvest()

    def check_due(self, *, deadline: float = 5.0, final_deadline: float = 10.0) -> list[tuple[str, Sent, str]]:
        """Inputs whose response (or INVITE final response) is overdue; removed once reported."""
        now = time.monotonic()
        late = []
        for key, (at, sent, method, _) in list(self.due.items()):
            if now - at > deadline:
                del self.due[key]
                self.final_due.pop(key[0], None)
                late.append(("no response", sent, method))
        for branch, (at, sent, provisional, _) in list(self.final_due.items()):
            if provisional and now - at > final_deadline:
                del self.final_due[branch]
                late.append(("100 Trying but no final response", sent, "INVITE"))
            elif now - at > final_deadline:
                del self.final_due[branch]
        self._expire_held()
        for call_id, dialog in list(self.dialogs.items()):
            if now - dialog.born > 20:
                del self.dialogs[call_id]
        return late


def offline_inputs(seed: int, count: int, *, namespace: bool = True) -> list[tuple[str, bytes, list[str]]]:
    """The first ``count`` generated requests of a seed without any server (fixed ports, no dialogs learnt):
    (transport, bytes, mutators). Two calls with the same seed return the same list."""
    fuzzer = Fuzzer(server=(HOST, 5060), seed=seed, namespace=namespace)
    fuzzer.grammar = Grammar(fuzzer.rng, fuzzer.server, 30000)
    fuzzer.mutator.sink_port = 30000
    out = []
    for i in range(count):
        transport = "TCP" if fuzzer.rng.random() < fuzzer.tcp_share else "UDP"
        data, names, _, _ = fuzzer.build(40000 + i % 16, transport)
        out.append((transport, data, names))
    return out


# --- the normal call ------------------------------------------------------------------------------------------------

def caller_audio(wav_path: Path) -> bytes:
    """8 kHz PCM16: 0.3 s silence, the WAV, 1.5 s silence (so the VAD sees the end)."""
    import numpy as np
    from scipy.signal import resample_poly

    from pipecat_nemotron.wav import read_wav

    wav = read_wav(wav_path)
    samples = wav.samples.astype(np.float64)
    if wav.sample_rate != 8000:
        samples = resample_poly(samples, 8000, wav.sample_rate)
    pcm = np.clip(samples, -32768, 32767).astype("<i2")
    return bytes(4800) + pcm.tobytes() + bytes(24000)


class _Queue(asyncio.DatagramProtocol):
    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.inbox.put_nowait((data, addr))


async def normal_call(server: tuple[str, int], wav_path: Path = DEFAULT_WAV, *, attempts: int = 40,
                      patience: float = 90.0) -> dict:
    """A scripted UAC over UDP: INVITE (PCMU), ACK, the WAV as RTP in real time, BYE. Returns what happened.
    A 503 (call slots still held, or the engine still behind after the fuzz load) is retried for ``patience`` s,
    honouring Retry-After up to 5 s."""
    from aiortc.rtp import RtpPacket

    from pipecat_nemotron.transports.g711 import encode
    from pipecat_nemotron.transports.sip.message import SIPResponse, parse_message

    loop = asyncio.get_running_loop()
    sip_t, sip = await loop.create_datagram_endpoint(_Queue, local_addr=(HOST, 0))
    rtp_t, rtp = await loop.create_datagram_endpoint(_Queue, local_addr=(HOST, 0))
    sip_port, rtp_port = sip_t.get_extra_info("sockname")[1], rtp_t.get_extra_info("sockname")[1]
    call_id = f"normal-{os.getpid()}-{time.monotonic_ns()}@fuzz"
    result = {"call_id": call_id, "answered": False, "status": None, "rtp_sent": 0, "rtp_received": 0,
              "bye_status": None}

    def request(method, cseq, branch, to, body=""):
        ctype = "Content-Type: application/sdp\r\n" if body else ""
        return (f"{method} sip:bot@{server[0]}:{server[1]} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {HOST}:{sip_port};branch={branch};rport\r\nMax-Forwards: 70\r\n"
                f'From: "Normal Caller" <sip:caller@{HOST}>;tag=normal\r\nTo: {to}\r\nCall-ID: {call_id}\r\n'
                f"CSeq: {cseq} {method}\r\nContact: <sip:caller@{HOST}:{sip_port}>\r\n{ctype}"
                f"Content-Length: {len(body.encode())}\r\n\r\n{body}").encode()

    async def final(method, timeout=5.0):
        deadline = loop.time() + timeout
        while True:
            data, _ = await asyncio.wait_for(sip.inbox.get(), max(0.01, deadline - loop.time()))
            message = parse_message(data)
            if isinstance(message, SIPResponse) and message.status >= 200 and message.cseq[1] == method:
                return message

    sdp = (f"v=0\r\no=caller 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
           f"m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
           f"a=ptime:20\r\na=sendrecv\r\n")
    to = f"<sip:bot@{server[0]}:{server[1]}>"
    try:
        ok = None
        give_up = loop.time() + patience
        result["rejections"] = 0
        for attempt in range(attempts):  # call slots may still be held by the fuzz run's calls: 503, retry
            if loop.time() > give_up:
                break
            branch = f"z9hG4bKnormal{attempt}{time.monotonic_ns()}"
            sip_t.sendto(request("INVITE", attempt + 1, branch, to, sdp), server)
            try:
                response = await final("INVITE")
            except asyncio.TimeoutError:
                result["status"] = "timeout"
                continue
            result["status"] = response.status
            if response.status == 200:
                ok, cseq = response, attempt + 1
                break
            sip_t.sendto(request("ACK", attempt + 1, branch, to), server)
            result["rejections"] += 1
            retry_after = response.get("Retry-After") or "1"
            await asyncio.sleep(min(5.0, max(1.0, float(retry_after.split(";")[0]) if retry_after.strip().isdigit()
                                             else 1.0)))
        if ok is None:
            return result
        result["answered"] = True
        to = ok.get("To")
        sip_t.sendto(request("ACK", cseq, f"z9hG4bKack{time.monotonic_ns()}", to), server)
        from pipecat_nemotron.transports.sip.sdp import parse_sdp
        answer = parse_sdp(ok.body)
        media = answer.media[0]
        target = (media.connection or answer.connection, media.port)
        pcm = caller_audio(wav_path)
        start = loop.time()
        seq, ts = 1000, 0
        for i in range(0, len(pcm), 320):
            payload = encode(pcm[i:i + 320].ljust(320, b"\0"), "PCMU")
            rtp_t.sendto(RtpPacket(payload_type=0, sequence_number=seq & 0xFFFF, timestamp=ts, ssrc=0x1234,
                                   marker=int(i == 0), payload=payload).serialize(), target)
            seq, ts = seq + 1, ts + 160
            result["rtp_sent"] += 1
            delay = start + (i // 320 + 1) * 0.02 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        result["rtp_received"] = rtp.inbox.qsize()
        sip_t.sendto(request("BYE", cseq + 1, f"z9hG4bKbye{time.monotonic_ns()}", to), server)
        try:
            result["bye_status"] = (await final("BYE")).status
        except asyncio.TimeoutError:
            result["bye_status"] = "timeout"
        return result
    finally:
        sip_t.close()
        rtp_t.close()


def expected_text(wav_path: Path) -> str | None:
    manifest = wav_path.parent / "manifest.jsonl"
    if not manifest.exists():
        return None
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        if row.get("file") == wav_path.name:
            return row.get("text")
    return None


# --- the server under test -------------------------------------------------------------------------------------

def big_receive_buffer(transport, size: int = 4 * 2**20) -> None:
    """Ask for a 4 MiB receive buffer (the kernel caps it at net.core.rmem_max)."""
    sock = transport.get_extra_info("socket")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except (OSError, AttributeError):
        pass


def udp_receive_errors() -> int:
    """Datagrams the kernel dropped for a full receive buffer in this network namespace (any socket)."""
    try:
        rows = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return -1


def process_usage(pid: int | None = None) -> tuple[int, int]:
    """(RSS in bytes, open fds) of a process (this one by default)."""
    base = f"/proc/{pid or 'self'}"
    rss = 0
    try:
        for line in Path(f"{base}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        fds = len(os.listdir(f"{base}/fd"))
    except OSError:
        return 0, 0
    return rss, fds


def short_config(**overrides):
    """A SIPConfig on 127.0.0.1 with the fuzz run's short timers (fields this tree does not have are skipped)."""
    from pipecat_nemotron.transports.sip import SIPConfig

    names = {f.name for f in dataclasses.fields(SIPConfig)}
    values = dict(host=HOST, port=0, max_calls=32, **SHORT_TIMERS, **FUZZ_LIMITS)
    values.update(overrides)
    return SIPConfig(**{k: v for k, v in values.items() if k in names})


def shorten_server_memory():
    """The server keeps responses and ended calls for 32 s; the fuzz run waits 2 s (where the constant exists).
    Returns a function that puts the original values back (servers started meanwhile keep the short ones)."""
    import importlib
    saved = []
    for module in ("pipecat_nemotron.transports.sip.uas", "pipecat_nemotron.transports.sip.config",
                   "pipecat_nemotron.transports.sip.transaction", "pipecat_nemotron.transports.sip.dialog"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name in ("RESPONSE_CACHE_SECS", "CALL_MEMORY_SECS", "TRANSACTION_SECS"):
            if hasattr(mod, name):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, SHORT_CACHE_SECS)

    def restore():
        for mod, name, value in saved:
            setattr(mod, name, value)
    return restore


def server_state(uas) -> dict:
    """Calls, tasks, TCP streams, cached responses of a SIPUserAgentServer (whatever this tree's layout is)."""
    state = {"active_calls": uas.active_calls, "calls": len(uas.calls)}
    for owner in (uas, getattr(uas, "wire", None), getattr(uas, "transactions", None)):
        for name in ("_tasks", "_streams", "_responses", "_client", "_table", "_per_source"):
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, (dict, set, list)):
                key = name.strip("_")
                state[key] = state.get(key, 0) + len(value)
    return state


class InProcessTarget:
    """``SIPUserAgentServer`` in this process and loop, with a recording on_call; errors captured as they happen."""

    kind = "in-process"

    def __init__(self, *, freeze_heap: bool = True, **config):
        self.config = config
        self.freeze_heap = freeze_heap  # False for the short-lived servers of replays (each freeze collects once)
        self.server = None
        self.errors: list[tuple[float, str]] = []
        self.answered = 0
        self.window_source = lambda: None  # the fuzzer's recent inputs, snapshotted with each new kind of error
        self._signatures: set[str] = set()
        self._sink_id = None
        self._old_handler = None

    async def start(self) -> tuple[str, int]:
        from loguru import logger

        from pipecat_nemotron.apps.heap import freeze_startup_heap
        from pipecat_nemotron.transports.sip import SIPUserAgentServer

        restore = shorten_server_memory()
        loop = asyncio.get_running_loop()
        self._old_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
        self._sink_id = logger.add(self._log_sink, level="DEBUG", format="{message}",
                                   filter=lambda r: r["exception"] is not None or r["level"].no >= 40)

        async def on_call(call):
            self.answered += 1
            await call.ended.wait()

        try:
            self.server = SIPUserAgentServer(config=short_config(**self.config), on_call=on_call)
        finally:
            restore()  # the constants are read when the server is built; other servers in this process keep theirs
        # As serve-sip does before it listens: a full collection must not walk this process's start-up heap (in a
        # test run, also every earlier test's leftovers), which held the loop 0.76 s in one CI run.
        if self.freeze_heap:
            freeze_startup_heap()
        await self.server.start()
        return HOST, self.server.port

    def _log_sink(self, message):
        record = message.record
        text = record["message"]
        if record["exception"] is not None:
            exc = record["exception"]
            text += "\n" + "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
        self._record(text)

    def _loop_error(self, loop, context):
        exc = context.get("exception")
        text = context.get("message", "")
        if exc is not None:
            text += "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self._record(text)

    def _record(self, text: str):
        """Keep every error's tail (the innermost frames name it) and, for a new kind, the inputs just before."""
        signature = traceback_signature(text)
        new = signature not in self._signatures
        self._signatures.add(signature)
        self.errors.append((time.monotonic(), text if new else text[-3000:], self.window_source() if new else None))

    def alive(self) -> bool:
        return self.server is not None and getattr(self.server, "_transport", True) is not None

    def usage(self) -> tuple[int, int]:
        return process_usage()

    def call_state(self) -> dict:
        return server_state(self.server)

    def settled(self) -> bool:
        state = self.call_state()
        return state["active_calls"] == 0 and state["calls"] == 0 and state.get("streams", 0) == 0

    async def stop(self):
        from loguru import logger

        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.stop(), 10)
            except Exception as exc:  # stop() itself failing is a finding too
                self.errors.append((time.monotonic(), "server.stop() failed\n" + "".join(
                    traceback.format_exception(type(exc), exc, exc.__traceback__))))
        await asyncio.sleep(0.1)
        gc.collect()  # "Task exception was never retrieved" is reported when the task is collected
        await asyncio.sleep(0)
        if getattr(self, "engine", None) is not None:
            self.engine.close()
        if self._sink_id is not None:
            logger.remove(self._sink_id)
        asyncio.get_running_loop().set_exception_handler(self._old_handler)
        if self.freeze_heap:
            gc.unfreeze()  # this process goes on (pytest): its objects are collectable again

    def stuck_calls(self) -> list[tuple[str, str]]:
        """(Call-ID, state) of every call still active."""
        return [(cid, getattr(c, "state", "?")) for cid, c in list(self.server.calls.items()) if c.active]

    async def transcribe_next_call(self) -> list[str]:
        """Swap the recording on_call for the demo model's phone pipeline; returns the list that gets the texts."""
        import io

        try:  # pipecat_nemotron.apps.phone since the apps moved; pipecat_nemotron.phone before
            from pipecat_nemotron.apps import phone
        except ImportError:
            from pipecat_nemotron import phone
        from pipecat_nemotron.engine import Engine
        from pipecat_nemotron.stt import NemotronSTTService

        self.engine = Engine(model="demo", chunk_ms=160, device="cpu", max_streams=2)
        await self.engine.ready()
        texts: list[str] = []

        class Out(io.StringIO):
            def write(self, s):
                for line in s.splitlines():
                    if line.strip():
                        texts.append(json.loads(line)["text"])
                return len(s)

        out = Out()

        async def on_call(call):
            await phone.run_call(call, stt=NemotronSTTService(engine=self.engine), out=out)

        self.server.on_call = on_call
        return texts


class SubprocessTarget:
    """``serve-sip --model demo`` in a child process: through ``--serve-child`` (the same ``phone.serve`` with the
    fuzz run's short timers, plus a stats file with the server's call counts), or with ``plain`` the unmodified
    ``pipecat-nemotron serve-sip`` CLI (its own timers; call counts not observable)."""

    kind = "subprocess"

    def __init__(self, workdir: Path, *, model: str = "demo", extra: list[str] | None = None, plain: bool = False):
        self.plain = plain
        if plain:
            self.kind = "subprocess (plain serve-sip)"
        self.workdir = workdir
        self.model = model
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "server.log"
        self.out_path = workdir / "transcripts.jsonl"
        self.stats_path = workdir / "stats.json"
        self._log_offset = 0
        self._pending = ""
        self.errors: list[tuple[float, str]] = []

    async def start(self) -> tuple[str, int]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        for p in (self.log_path, self.out_path, self.stats_path):
            p.unlink(missing_ok=True)
        serve = ["--host", HOST, "--port", str(port), "--model", self.model, "--device", "cpu",
                 "--output", str(self.out_path), *self.extra]
        if self.plain:
            cli = Path(sys.executable).parent / "pipecat-nemotron"
            head = [str(cli)] if cli.exists() else [sys.executable, "-c", "try:\n from pipecat_nemotron.apps.cli import app"
                                                    "\nexcept ImportError:\n from pipecat_nemotron.cli import app\napp()"]
            limits = [("--sip-rate", FUZZ_LIMITS["udp_rate_per_source"]),
                      ("--tcp-max-connections", FUZZ_LIMITS["tcp_max_connections"]),
                      ("--tcp-max-per-source", FUZZ_LIMITS["tcp_max_per_source"]),
                      ("--tcp-idle-secs", FUZZ_LIMITS["tcp_idle_secs"]),
                      ("--max-call-secs", SHORT_TIMERS["max_call_secs"])]
            serve += [str(x) for flag, value in limits if flag not in self.extra for x in (flag, value)]
            cmd = [*head, "serve-sip", *serve]
        else:
            cmd = [sys.executable, "-m", "tools.sip_fuzz", "--serve-child", str(self.stats_path), "--", *serve]
        self.command = " ".join(cmd)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve-sip exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            if self.stats_path.exists() or (self.plain and b"phone transcriber on sip:" in self.log_path.read_bytes()):
                break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError("serve-sip did not start within 180 s")
        return HOST, port

    def poll_log(self, final: bool = False):
        """Error records in the server's log since the last call: a record starts at a loguru timestamp line or at
        asyncio's "Task exception was never retrieved"/"Exception in callback" lines (a traceback belongs to the
        record above it); it is an error when it holds a traceback or is logged at ERROR/CRITICAL."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                chunk = fh.read()
        except OSError:
            return
        self._log_offset += len(chunk)
        text = self._pending + chunk.decode("utf-8", errors="replace")
        records, current = [], []
        for line in text.split("\n"):
            if _RECORD_START.match(line) and current:
                records.append(current)
                current = []
            current.append(line)
        if final:
            records.append(current)
            current = []
        self._pending = "\n".join(current)
        for record in records:
            body = "\n".join(record)
            if _ERROR_RECORD.search(body):
                self.errors.append((time.monotonic(), body))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def usage(self) -> tuple[int, int]:
        return process_usage(self.proc.pid) if self.proc else (0, 0)

    def call_state(self) -> dict:
        if self.plain:
            return {"calls": "not observable (plain serve-sip)"}
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {"active_calls": -1, "calls": -1}

    def settled(self) -> bool:
        if self.plain:
            return True  # not observable: the run waits --settle seconds instead
        state = self.call_state()
        return state.get("active_calls") == 0 and state.get("calls") == 0 and state.get("streams", 0) == 0

    async def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def transcripts(self, call_id: str) -> list[str]:
        texts = []
        if self.out_path.exists():
            for line in self.out_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("call_id") == call_id:
                    texts.append(row.get("text", ""))
        return texts


_RECORD_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|Task exception was never retrieved|"
                           r"Exception in callback|Unhandled exception|Fatal error)")
_ERROR_RECORD = re.compile(r"Traceback \(most recent call last\)|^Task exception was never retrieved|"
                           r"^Exception in callback|^\S+ \S+ \| (ERROR|CRITICAL) ", re.M)


class RemoteTarget:
    """A server someone else started: liveness, the probe and the normal call are checked, plus RSS/fds when
    ``--target-pid`` says which process it is and tracebacks when ``--target-log`` names its log file."""

    kind = "target"

    def __init__(self, address: tuple[str, int], pid: int | None, log: str | None = None):
        self.address, self.pid = address, pid
        self.errors: list[tuple[float, str]] = []
        self.log_path = Path(log) if log else None
        self._pending = ""
        self._log_offset = self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0

    async def start(self):
        return self.address

    def poll_log(self, final: bool = False):
        if self.log_path is not None:
            SubprocessTarget.poll_log(self, final)

    def alive(self) -> bool:
        return self.pid is None or Path(f"/proc/{self.pid}").exists()

    def usage(self):
        return process_usage(self.pid) if self.pid else (0, 0)

    def call_state(self):
        return {}

    def settled(self):
        return True

    async def stop(self):
        pass


def serve_child(stats_path: str, argv: list[str]) -> None:
    """``--serve-child``: run phone.serve (what ``pipecat-nemotron serve-sip`` runs) with short timers and write
    the server's call counts to ``stats_path`` twice a second."""
    from loguru import logger

    try:  # pipecat_nemotron.apps.phone since the apps moved; pipecat_nemotron.phone before
        from pipecat_nemotron.apps import phone
    except ImportError:
        from pipecat_nemotron import phone

    shorten_server_memory()
    base_config = phone.SIPConfig
    names = {f.name for f in dataclasses.fields(base_config)}
    phone.SIPConfig = dataclasses.make_dataclass(
        "ShortTimersSIPConfig", [(k, type(v), dataclasses.field(default=v))
                                 for k, v in {**SHORT_TIMERS, **FUZZ_LIMITS}.items()
                                 if k in names and k != "max_call_secs"], bases=(base_config,))
    servers = []
    base = phone.SIPServer

    class Recorded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)

    phone.SIPServer = Recorded
    args = phone.parse_args(argv + ["--max-call-secs", str(SHORT_TIMERS["max_call_secs"])])
    # serve-sip's own flags for the limits (where this tree has them) win over SIPConfig's defaults: set them too,
    # unless the caller passed one with --server-arg
    for flag, attr, value in (("--sip-rate", "sip_rate", FUZZ_LIMITS["udp_rate_per_source"]),
                              ("--tcp-max-connections", "tcp_max_connections", FUZZ_LIMITS["tcp_max_connections"]),
                              ("--tcp-max-per-source", "tcp_max_per_source", FUZZ_LIMITS["tcp_max_per_source"]),
                              ("--tcp-idle-secs", "tcp_idle_secs", FUZZ_LIMITS["tcp_idle_secs"])):
        if hasattr(args, attr) and not any(a == flag or a.startswith(flag + "=") for a in argv):
            setattr(args, attr, value)
    logger.remove()
    logger.add(sys.stderr, level="INFO",
               filter=lambda record: not record["name"].startswith("pipecat.") or record["level"].no >= 30)

    async def report():
        while True:
            await asyncio.sleep(0.5)
            if not servers:
                continue
            state = server_state(getattr(servers[0], "uas", servers[0]))
            tmp = stats_path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(state, fh)
            os.replace(tmp, stats_path)

    async def main():
        reporter = asyncio.get_running_loop().create_task(report())
        try:
            await phone.serve(args)
        finally:
            reporter.cancel()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


# --- a run -------------------------------------------------------------------------------------------------------

@dataclass
class Report:
    seed: int
    inputs: int = 0
    seconds: float = 0.0
    mode: str = ""
    namespace: bool = False
    alive: bool = False
    tracebacks: int = 0
    error_signatures: dict = field(default_factory=dict)
    rss_before: int = 0
    rss_after: int = 0
    rss_peak: int = 0
    fds_before: int = 0
    fds_after: int = 0
    state_after: dict = field(default_factory=dict)
    settled: bool = False
    no_response: int = 0
    stuck_invites: int = 0
    probe_failures: int = 0
    stalls: int = 0
    stall_sites: list = field(default_factory=list)  # "1.02 s in rtp.py:120 send" + the innermost frames
    fuzzer_stalls: int = 0
    slow_kept_open: int = 0
    udp_drops: int = 0
    bad_responses: int = 0
    rtp_reflected: int = 0
    normal_call: dict = field(default_factory=dict)
    transcript: list = field(default_factory=list)
    expected: str | None = None
    fuzz_stats: dict = field(default_factory=dict)
    statuses: dict = field(default_factory=dict)
    mutators: dict = field(default_factory=dict)
    new_findings: int = 0
    server_log: str = ""
    recheck: list = field(default_factory=list)
    challenges: str = ""  # --challenges: hostile registrars answering our REGISTER (tools/sip_fuzz_challenges.py)
    challenge_failures: list = field(default_factory=list)
    tls: str = ""  # --tls: garbage TLS handshakes, a=crypto offers and SRTP junk (tools/sip_fuzz_tls.py)
    tls_failures: list = field(default_factory=list)

    rss_margin: int = 64 * 2**20
    fd_margin: int = 8

    def failures(self) -> list[str]:
        out = []
        if not self.alive:
            out.append("server not alive")
        if self.tracebacks:
            out.append(f"{self.tracebacks} tracebacks: {sorted(self.error_signatures)[:8]}")
        if self.rss_after and self.rss_after > self.rss_before * 1.25 + self.rss_margin:
            out.append(f"RSS {self.rss_before / 2**20:.0f} → {self.rss_after / 2**20:.0f} MiB")
        if self.fds_after and self.fds_after > self.fds_before + self.fd_margin:
            out.append(f"open fds {self.fds_before} → {self.fds_after}")
        if not self.settled:
            out.append(f"calls/streams did not return to 0: {self.state_after}")
        if self.udp_drops <= 0:  # with kernel buffer drops a lost answer is load, not a server bug (see summary)
            if self.no_response:
                out.append(f"{self.no_response} requests without a response")
            if self.stuck_invites:
                out.append(f"{self.stuck_invites} INVITEs with 100 but no final response")
        if self.probe_failures:
            out.append(f"{self.probe_failures} OPTIONS probes unanswered")
        if self.stalls:
            out.append(f"{self.stalls} event-loop stalls: " + " | ".join(self.stall_sites[:3]))
        if self.slow_kept_open:
            out.append(f"{self.slow_kept_open} slow TCP connections not timed out")
        if self.normal_call and not (self.normal_call.get("answered") and self.transcript):
            out.append(f"normal call not completed/transcribed: {self.normal_call} {self.transcript}")
        out += [f"registration challenge: {failure}" for failure in self.challenge_failures[:8]]
        out += [f"TLS/SRTP: {failure}" for failure in self.tls_failures[:8]]
        return out

    def summary(self) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0
        lines = [
            f"sip_fuzz: {self.inputs} inputs in {self.seconds:.1f} s ({rate:.0f}/s), seed {self.seed}, {self.mode}, "
            f"{'private loopback-only namespace' if self.namespace else 'host loopback (addresses forced to 127.0.0.1)'}",
            f"  server alive: {self.alive}; tracebacks/ERROR records: {self.tracebacks} "
            f"({len(self.error_signatures)} kinds); event-loop stalls: {self.stalls}; probes unanswered: "
            f"{self.probe_failures}",
            f"  RSS {self.rss_before / 2**20:.1f} → {self.rss_after / 2**20:.1f} MiB (peak {self.rss_peak / 2**20:.1f});"
            f" fds {self.fds_before} → {self.fds_after}; after settling: {self.state_after}",
            f"  datagrams the kernel dropped for a full receive buffer (server or fuzzer): {self.udp_drops}; "
            f"slow TCP connections still open at the end: {self.slow_kept_open}; "
            f"no response: {self.no_response}; INVITE without final: {self.stuck_invites}; unparsable responses: "
            f"{self.bad_responses}; RTP packets from the server at our SDP address: {self.rtp_reflected}",
            f"  fuzz: {self.fuzz_stats}",
            f"  responses: {dict(sorted(self.statuses.items()))}",
            f"  mutators: {dict(sorted(self.mutators.items()))}",
        ]
        if self.server_log:
            lines.append(f"  server log: {self.server_log}")
        if self.normal_call:
            lines.append(f"  normal call: {self.normal_call}; transcript {self.transcript!r} "
                         f"(expected {self.expected!r})")
        for sig, count in sorted(self.error_signatures.items(), key=lambda kv: -kv[1]):
            lines.append(f"  traceback x{count}: {sig}")
        if self.udp_drops > 0 and (self.no_response or self.stuck_invites):
            lines.append(f"  (the {self.no_response + self.stuck_invites} unanswered requests are not counted against "
                         f"the server: the kernel dropped {self.udp_drops} datagrams for full receive buffers)")
        if self.challenges:
            lines.append(f"  {self.challenges}")
        if self.tls:
            lines.append(f"  {self.tls}")
        failures = self.failures()
        lines.append("  ORACLE: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
        return "\n".join(lines)


async def _probe(server: tuple[str, int], timeout: float = 3.0) -> int | None:
    """A plain OPTIONS over UDP; the status of its response or None."""
    from pipecat_nemotron.transports.sip.message import SIPResponse, parse_message

    loop = asyncio.get_running_loop()
    t, q = await loop.create_datagram_endpoint(_Queue, local_addr=(HOST, 0))
    port = t.get_extra_info("sockname")[1]
    branch = f"z9hG4bKprobe{time.monotonic_ns()}"
    data = (f"OPTIONS sip:bot@{server[0]}:{server[1]} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{port};branch={branch};"
            f"rport\r\nMax-Forwards: 70\r\nFrom: <sip:probe@{HOST}>;tag=probe\r\nTo: <sip:bot@{server[0]}>\r\n"
            f"Call-ID: probe{time.monotonic_ns()}@fuzz\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
    try:
        deadline = loop.time() + timeout
        next_send = 0.0
        while loop.time() < deadline:
            if loop.time() >= next_send:
                t.sendto(data, server)
                next_send = loop.time() + 0.5
            try:
                raw, _ = await asyncio.wait_for(q.inbox.get(), 0.1)
            except asyncio.TimeoutError:
                continue
            try:
                message = parse_message(raw)
            except Exception:
                continue
            if isinstance(message, SIPResponse):
                return message.status
        return None
    finally:
        t.close()


async def _stall_watch(stalls: list, interval: float = 0.05, threshold: float = 0.75):
    """Record every time the event loop was blocked longer than ``threshold``: (when, seconds late, the stack that
    blocked it (sampled by a watchdog thread while the loop is stuck), seconds of it spent in garbage collections)."""
    import threading

    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    beat = [time.monotonic()]
    stacks: list[str] = []
    done = threading.Event()

    def watchdog():
        sampled_for = None
        while not done.wait(0.1):
            if time.monotonic() - beat[0] > threshold / 2 and sampled_for != beat[0]:
                frame = sys._current_frames().get(loop_thread)
                if frame is not None:
                    sampled_for = beat[0]
                    stacks.append("".join(traceback.format_stack(frame)))

    collections: list[tuple[float, float]] = []  # (start, seconds) of each collection, any thread
    started = [0.0]

    def timed_collection(phase, _info):
        if phase == "start":
            started[0] = time.monotonic()
        else:
            collections.append((started[0], time.monotonic() - started[0]))

    thread = threading.Thread(target=watchdog, name="sip-fuzz-watchdog", daemon=True)
    thread.start()
    gc.callbacks.append(timed_collection)
    try:
        while True:
            before = loop.time()
            beat[0] = time.monotonic()
            stacks.clear()
            del collections[:-50]
            await asyncio.sleep(interval)
            late = loop.time() - before - interval
            if late > threshold:
                in_gc = sum(seconds for start, seconds in collections if start >= beat[0])
                stalls.append((time.monotonic(), late, stacks[-1] if stacks else "", in_gc))
    finally:
        gc.callbacks.remove(timed_collection)
        done.set()


async def replay_alone(transport: str, data: bytes, signature: str, wait: float = 0.3) -> bool:
    """Send one input to a fresh in-process server; whether it produces an error with ``signature``."""
    target = InProcessTarget(freeze_heap=False)
    address = await target.start()
    try:
        if transport == "UDP" and len(data) <= MAX_UDP:
            loop = asyncio.get_running_loop()
            t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(HOST, 0))
            t.sendto(data, address)
            await asyncio.sleep(wait)
            t.close()
        else:
            try:
                reader, writer = await asyncio.open_connection(*address)
            except OSError:
                return False
            writer.write(data)
            await asyncio.sleep(wait)
            writer.close()
        await asyncio.sleep(0.05)
        return any(traceback_signature(text) == signature for _, text, *_ in target.errors)
    finally:
        await target.stop()


SLOW_KINDS = ("a request head cut short", "a head without its blank line", "a body short of its Content-Length",
              "a flood of CRLF keep-alives (50/s)", "one CRLF every 0.1 s", "a request head one byte a second")


async def slow_connections_check(address: tuple[str, int], seconds: float) -> list[str]:
    """Open 6 slow TCP connections the server should time out or close (see SLOW_KINDS) and return the kinds it
    still holds open after ``seconds``. (A CRLF keep-alive every few seconds is legitimate and not tried.)"""
    head = (f"OPTIONS sip:bot@{address[0]} SIP/2.0\r\nVia: SIP/2.0/TCP {HOST}:9;branch=z9hG4bKslow\r\n"
            f"From: <sip:slow@{HOST}>;tag=1\r\nTo: <sip:bot@{HOST}>\r\nCall-ID: slow@fuzz\r\nCSeq: 1 OPTIONS\r\n")
    feeds = [head[:40].encode(), head[:-2].encode(), (head + "Content-Length: 100\r\n\r\nv=0\r\n").encode(),
             b"\r\n\r\n", b"\r\n", head.encode()[:1]]
    conns = []
    for feed in feeds:
        try:
            reader, writer = await asyncio.open_connection(*address)
        except OSError:
            continue
        writer.write(feed)
        conns.append((reader, writer))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    trickle = 0
    while loop.time() < deadline:  # keep the CRLF and one-byte connections trickling
        await asyncio.sleep(0.1)
        trickle += 1
        for i, (reader, writer) in enumerate(conns):
            if writer.is_closing():
                continue
            try:
                if i == 3:
                    writer.write(b"\r\n\r\n" * 5)
                elif i == 4:
                    writer.write(b"\r\n")
                elif i == 5 and trickle % 10 == 0:
                    writer.write(head.encode()[trickle // 10:trickle // 10 + 1])
            except (ConnectionError, OSError):
                pass
    still_open = []
    for kind, (reader, writer) in zip(SLOW_KINDS, conns):
        try:
            data = await asyncio.wait_for(reader.read(65536), 0.05)
            while data:  # a 400/408 may come before the close
                data = await asyncio.wait_for(reader.read(65536), 0.05)
        except asyncio.TimeoutError:
            still_open.append(kind)
        except (ConnectionError, OSError):
            pass
        writer.close()
    return still_open


async def send_input(udp, address: tuple[str, int], transport: str, data: bytes) -> None:
    """Send one input as a replay does: a UDP datagram, or a fresh TCP connection closed 0.5 s later."""
    if transport == "UDP" and len(data) <= MAX_UDP:
        udp.sendto(data, address)
        return
    try:
        _, writer = await asyncio.open_connection(*address)
        writer.write(data)
        asyncio.get_running_loop().call_later(0.5, writer.close)
    except OSError:
        pass


async def replay_window(inputs: list, signature: str, wait: float = 0.05) -> int | None:
    """Replay inputs in order on one fresh in-process server; the position of the one after which an error with
    ``signature`` appeared, or None."""
    target = InProcessTarget()
    address = await target.start()
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(HOST, 0))
    try:
        for position, (_, transport, data, _) in enumerate(inputs):
            await send_input(udp, address, transport, data)
            await asyncio.sleep(wait)
            if any(traceback_signature(text) == signature for _, text, *_ in target.errors):
                return position
        return None
    finally:
        udp.close()
        await target.stop()


async def replay_stuck(transport: str, data: bytes, wait: float = 4.0) -> bool:
    """Whether an INVITE alone leaves a call active on a fresh in-process server after its timers have passed."""
    target = InProcessTarget()
    address = await target.start()
    loop = asyncio.get_running_loop()
    t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(HOST, 0))
    try:
        if transport == "UDP" and len(data) <= MAX_UDP:
            t.sendto(data, address)
        else:
            try:
                _, writer = await asyncio.open_connection(*address)
                writer.write(data)
            except OSError:
                return False
        await asyncio.sleep(wait)
        return bool(target.stuck_calls())
    finally:
        t.close()
        await target.stop()


async def replay_unanswered(data: bytes, wait: float = 1.5, *, final: bool = False) -> bool:
    """Whether a UDP input (with rport in its Via) still gets no response (``final``: no final response) from a
    fresh in-process server."""
    if not re.search(rb"rport[;\r\n]", data[:70000]):
        return False
    target = InProcessTarget()
    address = await target.start()
    loop = asyncio.get_running_loop()
    t, q = await loop.create_datagram_endpoint(_Queue, local_addr=(HOST, 0))
    port = t.get_extra_info("sockname")[1]
    # responses without rport go to the Via's port: point every Via of ours at this socket
    data = re.sub(rb"(?im)^((?:via|v)[ \t]*:[ \t]*SIP/2\.0/\w+ 127\.0\.0\.1:)\d+", lambda m: m.group(1) +
                  str(port).encode(), data)
    try:
        t.sendto(data, address)
        deadline = loop.time() + wait
        while loop.time() < deadline:
            try:
                raw, _ = await asyncio.wait_for(q.inbox.get(), max(0.01, deadline - loop.time()))
            except asyncio.TimeoutError:
                return True
            status = re.match(rb"SIP/2\.0 (\d{3}) ", raw)
            if status and (not final or int(status.group(1)) >= 200):
                return False
        return True
    finally:
        t.close()
        await target.stop()


async def run(args) -> Report:
    namespace = bool(getattr(args, "_namespace", False))
    report = Report(seed=args.seed, namespace=namespace)
    command = getattr(args, "_command", "tools.sip_fuzz")
    findings = Findings(Path(args.findings) if args.findings else None, command, args.label or "this tree")
    if args.target:
        host, _, port = args.target.rpartition(":")
        target = RemoteTarget((host, int(port)), args.target_pid, args.target_log)
    elif args.in_process:
        target = InProcessTarget()
    else:
        import tempfile
        target = SubprocessTarget(Path(tempfile.mkdtemp(prefix="sip_fuzz_")), model=args.model,
                                  extra=args.server_arg, plain=args.plain)
    report.mode = target.kind
    report.server_log = str(getattr(target, "log_path", "") or "")
    if args.target and args.rate is None:
        args.rate = 150.0  # under a production server's per-source UDP rate limit (200/s), which we cannot raise
    args.rate = args.rate or 0
    if args.slow_check is None:  # the fuzz config's tcp_message_secs plus a margin, or production's (10 s)
        args.slow_check = 15.0 if args.target or args.plain else FUZZ_LIMITS["tcp_message_secs"] * 1.5 + 1
    address = await target.start()
    drops_before = udp_receive_errors()
    await asyncio.sleep(0.2)
    _, fds_idle = target.usage()  # the server's own fds before any input (ours are closed again before "after")
    fuzzer = Fuzzer(server=address, seed=args.seed, namespace=namespace, tcp_share=args.tcp_share,
                    findings=findings)
    await fuzzer.open()
    stalls: list = []
    watcher = asyncio.get_running_loop().create_task(_stall_watch(stalls))
    seen_errors = 0
    seen_stalls = 0
    warmup = min(5000, max(1, args.inputs // 10))  # "before" RSS once the first calls' pipelines have warmed up
    started = time.monotonic()
    last_progress = started
    quiet = args.quiet

    def recent(n: int = 512):
        return [(s.index, s.transport, s.data, s.mutators) for s in list(fuzzer.window)[-n:]]

    if isinstance(target, InProcessTarget):
        target.window_source = lambda: recent(64)  # the error is seen as it happens: the last inputs hold it

    def harvest():
        nonlocal seen_errors, seen_stalls
        poll = getattr(target, "poll_log", None)
        if poll:
            poll()
        for error in target.errors[seen_errors:]:
            text = error[1]
            window = error[2] if len(error) > 2 and error[2] is not None else recent()
            sig = traceback_signature(text)
            report.error_signatures[sig] = report.error_signatures.get(sig, 0) + 1
            findings.add(sig, "traceback in the server's log", text, window, fuzzer.index)
        seen_errors = len(target.errors)
        for _, late, stack, in_gc in stalls[seen_stalls:]:
            frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', stack)
            inner = frames[-1] if frames else None
            if inner and "sip_fuzz" in inner[0]:  # the fuzzer's own work: not the server's fault
                report.fuzzer_stalls += 1
                print(f"sip_fuzz: the fuzzer itself blocked the loop {late:.2f} s at {inner[1]} {inner[2]}",
                      file=sys.stderr)
                continue
            report.stalls += 1
            where = f" in {Path(inner[0]).name}:{inner[1]} {inner[2]}" if inner else ""
            if in_gc > late / 2:  # whoever allocated last pays for the collection: name the collector, not them
                where = f" in garbage collection ({in_gc:.2f} s of it){where and ', sampled' + where}"
            innermost = " < ".join(f"{Path(f).name}:{line} {name}" for f, line, name in reversed(frames[-6:]))
            report.stall_sites.append(f"{late:.2f} s{where}; innermost: {innermost}" if frames
                                      else f"{late:.2f} s{where or ' in an unknown place'} (no stack sampled)")
            findings.add(f"event-loop stall{where}", f"the event loop was blocked for {late:.2f} s",
                         "stack while blocked:\n" + stack, recent(64), fuzzer.index)
        seen_stalls = len(stalls)
        for what, sent, method in fuzzer.check_due():
            key = "no_response" if what == "no response" else "stuck_invites"
            setattr(report, key, getattr(report, key) + 1)
            first = sent.mutators[0].split(":")[0] if sent.mutators else "unmutated"
            findings.add(f"{what}: {method} ({first})", f"{what} to a {method} over {sent.transport}", "",
                         [(sent.index, sent.transport, sent.data, sent.mutators)], sent.index)

    try:
        for i in range(args.inputs):
            await fuzzer.send_one()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            await fuzzer.backpressure(harvest)
            if args.rate:
                await asyncio.sleep(1 / args.rate)
            if i == warmup:  # RSS once imports and first calls have warmed up
                report.rss_before, report.fds_before = target.usage()[0], fds_idle
            if i % 200 == 0 or (i % 25 == 0 and isinstance(target, SubprocessTarget)):
                harvest()
                rss, _ = target.usage()
                report.rss_peak = max(report.rss_peak, rss)
                if not target.alive():
                    break
            if args.probe_every and i and i % args.probe_every == 0:
                if await _probe(address) is None:
                    report.probe_failures += 1
                    findings.add("OPTIONS probe unanswered", "a plain OPTIONS got no response within 3 s", "",
                                 recent(), fuzzer.index)
            now = time.monotonic()
            if not quiet and now - last_progress >= args.progress_secs:
                last_progress = now
                done = i + 1
                rate = done / (now - started)
                state = target.call_state()
                rss_now, fds_now = target.usage()
                print(f"[{now - started:7.1f}s] {done}/{args.inputs} inputs {rate:6.0f}/s  udp {fuzzer.stats['udp']}"
                      f" tcp {fuzzer.stats['tcp']}  tracebacks {len(target.errors)}  no-resp {report.no_response}"
                      f"  stuck {report.stuck_invites}  calls {state.get('active_calls', '?')}  server RSS "
                      f"{rss_now / 2**20:.0f} MiB fds {fds_now}", file=sys.stderr,
                      flush=True)
        report.inputs = fuzzer.stats["inputs"]
        report.seconds = time.monotonic() - started
        if not report.rss_before:
            report.rss_before, report.fds_before = target.usage()[0], fds_idle
        # let answers arrive, then close our side and wait for the server's timers
        end = time.monotonic() + 10.5  # until every owed response came or is overdue (5 s; a final 10 s)
        while (fuzzer.due or fuzzer.final_due) and time.monotonic() < end:
            await asyncio.sleep(0.1)
            harvest()  # counts what became overdue
        await asyncio.sleep(0.5)
        harvest()
        if isinstance(target, SubprocessTarget):
            target.poll_log(final=True)
        await fuzzer.close()
        if args.slow_check:
            slow = await slow_connections_check(address, args.slow_check)
            report.slow_kept_open = len(slow)
            for kind in slow:
                findings.add(f"slow TCP connection kept open: {kind}",
                             f"a TCP connection sending {kind} was still open after {args.slow_check:g} s "
                             f"(the fuzz config's tcp_message_secs is {FUZZ_LIMITS['tcp_message_secs']:g} s, "
                             f"tcp_idle_secs {FUZZ_LIMITS['tcp_idle_secs']:g} s)", "", [], fuzzer.index)
        deadline = time.monotonic() + args.settle
        if getattr(target, "plain", False):  # its calls cannot be seen: wait out production timers (no ACK 32 s,
            await asyncio.sleep(args.settle)  # RTP silence 60 s)
        while time.monotonic() < deadline and not target.settled():
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.5)
        harvest()
        report.settled = target.settled()
        report.state_after = target.call_state()
        for call_id, state in getattr(target, "stuck_calls", lambda: [])():
            sent = fuzzer.invites.get(call_id)
            findings.add(f"call stuck in state {state}", f"a call still {state} after settling ({args.settle:g} s;"
                         " every timer had passed)", f"Call-ID {call_id}",
                         [(sent.index, sent.transport, sent.data, sent.mutators)] if sent else [],
                         sent.index if sent else fuzzer.index)
        report.alive = target.alive() and await _probe(address) is not None
        report.rss_after, report.fds_after = target.usage()
        report.rss_peak = max(report.rss_peak, report.rss_after)
        report.bad_responses = fuzzer.bad_responses
        drops_after = udp_receive_errors()
        report.udp_drops = drops_after - drops_before if drops_before >= 0 and drops_after >= 0 else -1
        report.rtp_reflected = fuzzer.sink.packets
        report.fuzz_stats = dict(fuzzer.stats)
        report.statuses = dict(fuzzer.status_counts)
        report.mutators = dict(fuzzer.mutator_counts)
        harvest()
        watcher.cancel()  # loading the model for the normal call may block the loop: not the server's doing
        if not args.no_call and report.alive:
            wav = Path(args.wav)
            report.expected = expected_text(wav)
            if isinstance(target, InProcessTarget):
                texts = await target.transcribe_next_call()
                report.normal_call = await normal_call(address, wav)
                for _ in range(40):
                    if texts:
                        break
                    await asyncio.sleep(0.25)
                report.transcript = list(texts)
            elif isinstance(target, SubprocessTarget):
                report.normal_call = await normal_call(address, wav)
                for _ in range(40):
                    texts = target.transcripts(report.normal_call["call_id"])
                    if texts:
                        break
                    await asyncio.sleep(0.25)
                report.transcript = texts
            else:
                report.normal_call = await normal_call(address, wav)
                report.transcript = ["(remote target: transcript not observable)"] if report.normal_call.get(
                    "answered") else []
            await asyncio.sleep(0.5)
            harvest()
    finally:
        watcher.cancel()
        await target.stop()
    harvest()
    report.tracebacks = len(target.errors)
    if args.repro:
        for finding in findings.by_signature.values():
            if finding.what.startswith("traceback") and finding.inputs:
                window = finding.inputs[-args.repro:]
                culprit = await replay_window(window, finding.signature,
                                              wait=0.05 if len(window) <= 64 else 0.02)
                if culprit is not None:
                    finding.inputs = window[:culprit + 1]
                    _, transport, data, _ = window[culprit]
                    if await replay_alone(transport, data, finding.signature):
                        finding.repro = (transport, data)
            elif finding.inputs and finding.signature.startswith("call stuck"):
                _, transport, data, _ = finding.inputs[-1]
                if await replay_stuck(transport, data):
                    finding.repro = (transport, data)
            elif finding.inputs and finding.what.startswith(("no response", "100 Trying")):
                _, transport, data, _ = finding.inputs[-1]
                if transport == "UDP" and await replay_unanswered(data, final=finding.what.startswith("100")):
                    finding.repro = (transport, data)
    if getattr(args, "challenges", 0):  # the client side: our REGISTER against hostile registrars
        from .sip_fuzz_challenges import fuzz_challenges

        challenge_report = await fuzz_challenges(args.challenges, args.seed)
        report.challenges, report.challenge_failures = challenge_report.summary(), challenge_report.failures
    if getattr(args, "tls", 0):  # SIP over TLS and SDES-SRTP: handshake garbage, a=crypto junk, SRTP junk
        from .sip_fuzz_tls import fuzz_tls

        tls_report = await fuzz_tls(args.tls, args.seed)
        report.tls, report.tls_failures = tls_report.summary(), tls_report.failures
    report.new_findings = findings.write()
    if getattr(args, "recheck", False) and findings.path is not None and findings.path.exists():
        seen = {sig: f.count for sig, f in findings.by_signature.items()}
        desc = f"a {report.inputs}-input run (seed {args.seed}, {report.mode})"
        report.recheck = await recheck(findings.path, args.label or "this tree", seen, desc)
    return report


def eval_bytes_literal(text: str) -> bytes:
    """The inverse of bytes_literal: ``b'..' + b'x' * n + ..`` evaluated without eval()."""
    import ast

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (bytes, int)):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"not a bytes expression: {ast.dump(node)[:80]}")
    return value(ast.parse(text.split("  # …")[0].strip(), mode="eval").body)


async def replay_rtp_junk(seed: int = 1, rounds: int = 300) -> list[str]:
    """Answer one call on a fresh in-process server, throw ``rounds`` bursts of RTP junk (rtp_junk) at its media
    port from the SDP address, and return the signatures of the errors it logged."""
    from pipecat_nemotron.transports.sip.message import SIPResponse, parse_message
    from pipecat_nemotron.transports.sip.sdp import parse_sdp

    target = InProcessTarget()
    address = await target.start()
    loop = asyncio.get_running_loop()
    sip_t, sip = await loop.create_datagram_endpoint(_Queue, local_addr=(HOST, 0))
    rtp_t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(HOST, 0))
    try:
        port, rtp_port = sip_t.get_extra_info("sockname")[1], rtp_t.get_extra_info("sockname")[1]
        grammar = Grammar(random.Random(seed), address, rtp_port)
        invite = grammar.request("INVITE", local_port=port, transport="UDP", body=grammar.sdp("sendrecv"))
        sip_t.sendto(invite.serialize()[0], address)
        ok = None
        deadline = loop.time() + 3
        while ok is None and loop.time() < deadline:
            data, _ = await asyncio.wait_for(sip.inbox.get(), 3)
            message = parse_message(data)
            if isinstance(message, SIPResponse) and message.status == 200:
                ok = message
        answer = parse_sdp(ok.body)
        media = (answer.media[0].connection or answer.connection, answer.media[0].port)
        rng = random.Random(seed)
        for _ in range(rounds):
            for packet in rtp_junk(rng)[1]:
                rtp_t.sendto(packet, media)
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.2)
    finally:
        sip_t.close()
        rtp_t.close()
        await target.stop()
    return sorted({traceback_signature(e[1]) for e in target.errors})


async def recheck(path: Path, label: str, seen: dict | None = None, run_desc: str = "") -> list[tuple[str, str]]:
    """Replay every finding of a findings file that has a reproducing input against this tree's server:
    [(signature, status)]; a status line is appended under each. ``seen``: the signatures a run just saw (those
    without a reproducing input are then judged by whether the run saw them again)."""
    text = path.read_text()
    sections = re.split(r"(?m)^(?=## `)", text)
    results, out = [], [sections[0]]
    stamp = time.strftime("%H:%M UTC", time.gmtime())
    for section in sections[1:]:
        signature = section.split("`")[1]
        match = re.search(r"- input \(reproduces alone over (UDP|TCP)\):\n\n```python\n(.*?)\n```", section, re.S)
        status = "not checkable (no input reproduces it alone)"
        if seen is not None and not match:
            status = (f"seen again ({seen[signature]}x) in {run_desc}" if signature in seen
                      else f"not seen in {run_desc}")
        if "rtp.py" in signature and "_receive" in signature:
            signatures = await replay_rtp_junk()
            status = (f"still: RTP junk at a live call logs {signatures}" if signatures
                      else "fixed (300 bursts of RTP junk at a live call: no traceback)")
        elif match and "cut," not in match.group(2):
            transport, data = match.group(1), eval_bytes_literal(match.group(2))
            if signature.startswith("call stuck"):
                bad = await replay_stuck(transport, data)
            elif signature.startswith(("no response", "100 Trying")):
                bad = await replay_unanswered(data, final=signature.startswith("100"))
            else:
                target = InProcessTarget()
                address = await target.start()
                try:
                    loop = asyncio.get_running_loop()
                    t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(HOST, 0))
                    await send_input(t, address, transport, data)
                    await asyncio.sleep(0.5)
                    t.close()
                finally:
                    await target.stop()
                bad = bool(target.errors)
                if bad:
                    signature_now = traceback_signature(target.errors[0][1])
                    status = f"still gives a traceback ({signature_now})"
            if not bad:
                status = "fixed (the input no longer reproduces it)"
            elif not status.startswith("still"):
                status = "still reproduces"
        results.append((signature, status))
        section = re.sub(r"(?m)^- recheck .*\n?", "", section)  # only the latest status is kept
        section = section.rstrip("\n") + f"\n- recheck {stamp} against {label}: {status}\n\n"
        out.append(section)
    path.write_text("".join(out))
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.sip_fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000, help="how many inputs to send")
    parser.add_argument("--seed", type=int, default=1, help="the run is a function of the seed")
    parser.add_argument("--target", default=None, help="HOST:PORT of a running server (default: spawn one)")
    parser.add_argument("--target-pid", type=int, default=None, help="its process id, for RSS/fd sampling")
    parser.add_argument("--target-log", default=None, help="its log file, for tracebacks (read from its end)")
    parser.add_argument("--in-process", action="store_true",
                        help="SIPUserAgentServer in this process with a recording on_call (what CI runs)")
    parser.add_argument("--model", default="demo", help="the spawned serve-sip's --model")
    parser.add_argument("--plain", action="store_true",
                        help="spawn the unmodified `pipecat-nemotron serve-sip` (production timers, so use --settle 70; "
                        "its call counts cannot be checked)")
    parser.add_argument("--server-arg", action="append", default=[], help="more serve-sip arguments (repeat)")
    parser.add_argument("--tcp-share", type=float, default=0.25, help="share of inputs over TCP")
    parser.add_argument("--rate", type=float, default=None,
                        help="inputs/s cap (default: as fast as the server answers; 150 with --target)")
    parser.add_argument("--probe-every", type=int, default=1000, help="a plain OPTIONS every N inputs (0: never)")
    parser.add_argument("--slow-check", type=float, default=None,
                        help="seconds within which slow TCP connections must be closed by the server (0: skip; "
                        f"default {FUZZ_LIMITS['tcp_message_secs'] + FUZZ_LIMITS['tcp_message_secs'] / 2 + 1:g} for a "
                        "server this script starts, 15 for --target)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="max seconds to wait for calls to end (a lagging engine drains first)")
    parser.add_argument("--wav", default=str(DEFAULT_WAV), help="the normal call's audio")
    parser.add_argument("--no-call", action="store_true", help="skip the normal call at the end")
    parser.add_argument("--findings", default="/tmp/sip_fuzz_findings.md", help="append new crash classes here "
                        "('' for none)")
    parser.add_argument("--repro", type=int, default=512,
                        help="replay up to N inputs before each traceback alone to find one that reproduces it")
    parser.add_argument("--host-network", action="store_true",
                        help="do not enter a private namespace (fuzzed addresses are then forced to loopback)")
    parser.add_argument("--label", default="", help="what server this is (goes into the findings file)")
    parser.add_argument("--recheck", action="store_true",
                        help="replay the findings file's reproducing inputs against this tree, note fixed/still")
    parser.add_argument("--dump", type=int, default=0, help="print the first N generated inputs (no server) and exit")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--tls", type=int, default=0,
                        help="also send N TLS/SRTP inputs to a TLS listener of our own (garbage instead of handshakes, "
                             "fuzzed a=crypto offers over TLS, SRTP junk at answered calls; tools/sip_fuzz_tls.py)")
    parser.add_argument("--challenges", type=int, default=0,
                        help="also answer N of our REGISTERs as hostile registrars (garbage challenges, huge nonces, "
                             "unknown algorithms, missing realm): clear errors, no REGISTER storm, no traceback")
    parser.add_argument("--progress-secs", type=float, default=5.0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-child"]:
        rest = argv[2:]
        serve_child(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
        return
    args = parse_args(argv)
    if args.dump:
        for i, (transport, data, names) in enumerate(offline_inputs(args.seed, args.dump), 1):
            print(f"# {i} {transport} {', '.join(names) or 'unmutated'}\n{bytes_literal(data, 2000)}")
        return
    args._command = "python -m tools.sip_fuzz " + " ".join(argv)
    if not args.label:
        import pipecat_nemotron.transports.sip as sip_package
        where = Path(sip_package.__file__).resolve().parent
        try:
            head = subprocess.run(["git", "-C", str(where), "log", "-1", "--format=%h"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "."], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            head, dirty = "", ""
        args.label = f"{where} ({head or 'no git'}{', with uncommitted changes' if dirty else ''})"
    leave = None if args.host_network else enter_loopback_namespace()
    args._namespace = leave is not None
    if leave is None and not args.host_network:
        print("sip_fuzz: no private network namespace (unshare not permitted): fuzzed c=/Route addresses are "
              "forced to loopback", file=sys.stderr)
    from loguru import logger
    logger.remove()
    logger.add(sys.stderr, level="CRITICAL")  # the server's errors are counted (and summarised), not printed
    if args.recheck and not args.inputs:
        for signature, status in asyncio.run(recheck(Path(args.findings), args.label)):
            print(f"{status:60s} {signature}")
        return
    report = asyncio.run(run(args))
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(report), indent=1, default=str))
    if report.new_findings:
        print(f"  {report.new_findings} new finding(s) appended to {args.findings}")
    for signature, status in report.recheck:
        print(f"  recheck: {status}: {signature}")
    sys.exit(0 if not report.failures() else 1)


if __name__ == "__main__":
    main()

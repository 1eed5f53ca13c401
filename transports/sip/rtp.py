"""RTP media for one call (RFC 3550): G.711, G.722 or Opus in and out (``transports/codecs.py``), SDES-SRTP
(``srtp.py``), reordering, RFC 4733 DTMF, symmetric RTP.

The wire format is aiortc's :class:`aiortc.rtp.RtpPacket` (padding, CSRC and header extensions handled
there). aiortc's own ``JitterBuffer`` assembles video frames and waits for a lost packet until its
capacity overflows, so audio goes through :class:`ReorderBuffer` instead: packets come out in sequence
order at once when they arrive in order, a missing one is given up (and concealed with silence) when
``depth`` later packets are waiting.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiortc.rtp import RtpPacket
from loguru import logger

from ..codecs import CodecError, MediaCodec
from ..g711 import decode as g711_decode  # noqa: F401  (re-exported: tests code G.711 with these)
from ..g711 import encode as g711_encode  # noqa: F401
from .sdp import Negotiated
from .srtp import SrtpContext, SrtpError

SAMPLE_RATE = 8000  # G.711's, and what the session speaks before a codec is negotiated
PTIME_MS = 20
PTIME_S = PTIME_MS / 1000
SAMPLES_PER_PACKET = 160  # G.711 at 20 ms; other codecs: codec.spec.samples(PTIME_MS)
BYTES_PER_PACKET = SAMPLES_PER_PACKET * 2  # PCM16
MAX_CONCEALED_PACKETS = 5
DTMF_EVENTS = "0123456789*#ABCD"
RTCP_PAYLOAD_TYPES = range(72, 77)  # RTCP packet types 200-204 with the marker bit masked off
CN_PAYLOAD_TYPE = 13
# Largest RTP datagram taken in: G.711 at the longest common ptime (120 ms = 960 bytes) plus header, CSRCs, an
# extension and an SRTP tag fits well below; a 60 KB packet would be 7.5 s of "audio" injected at once.
MAX_RTP_DATAGRAM = 1500


def _even_ports(ports: tuple[int, int], tries: int = 64) -> list[int]:
    first, last = ports
    evens = list(range(first + first % 2, last + 1, 2))
    random.shuffle(evens)
    return evens[:tries]


class ReorderBuffer:
    """Puts RTP packets back in sequence order; a gap is given up once ``depth`` packets wait behind it.

    ``push`` returns the packets now in order, with ``None`` for each lost packet given up (at most
    ``MAX_CONCEALED_PACKETS`` per gap). Late and duplicate packets are dropped; sequence wrap is handled.
    """

    def __init__(self, *, depth: int = 4):
        self.depth = depth
        self._next: int | None = None
        self._pending: dict[int, RtpPacket] = {}
        self.lost = 0
        self.late = 0

    def reset(self) -> None:
        """Forget the sequence (a new SSRC)."""
        self._next = None
        self._pending.clear()

    def push(self, packet: RtpPacket) -> list[RtpPacket | None]:
        seq = packet.sequence_number
        if self._next is None:
            self._next = seq
        ahead = (seq - self._next) & 0xFFFF
        if ahead >= 0x8000 or seq in self._pending:
            self.late += 1
            return []
        if ahead > 3000:  # a jump (sender restarted its sequence): resynchronise
            self._pending.clear()
            self._next = seq
        self._pending[seq] = packet
        return self._drain()

    def _drain(self) -> list[RtpPacket | None]:
        out: list[RtpPacket | None] = []
        while self._pending:
            if self._next in self._pending:
                out.append(self._pending.pop(self._next))
                self._next = (self._next + 1) & 0xFFFF
            elif len(self._pending) > self.depth:
                nearest = min(self._pending, key=lambda s: (s - self._next) & 0xFFFF)
                gap = (nearest - self._next) & 0xFFFF
                self.lost += gap
                out.extend([None] * min(gap, MAX_CONCEALED_PACKETS))
                self._next = nearest
            else:
                break
        return out


class DTMFDecoder:
    """RFC 4733 telephone-events → digits, one per event.

    A digit is reported at its end packet; the end packet is sent three times with the same timestamp, so
    events are de-duplicated on (RTP timestamp, event code). An event whose end packets were all lost is
    reported when the next event starts.
    """

    def __init__(self):
        self._reported: deque[tuple[int, int]] = deque(maxlen=8)
        self._pending: tuple[int, int] | None = None  # (timestamp, event) seen without its end yet

    def reset(self) -> None:
        self._reported.clear()
        self._pending = None

    def feed(self, payload: bytes, timestamp: int) -> list[str]:
        """Digits completed by this packet (usually none or one)."""
        if len(payload) < 4:
            return []
        key, end = (timestamp, payload[0]), bool(payload[1] & 0x80)
        digits = []
        if self._pending is not None and self._pending != key:
            digits += self._report(self._pending)
        self._pending = None
        if end:
            digits += self._report(key)
        elif key not in self._reported:
            self._pending = key
        return digits

    def _report(self, key: tuple[int, int]) -> list[str]:
        if key in self._reported or key[1] >= len(DTMF_EVENTS):
            return []
        self._reported.append(key)
        return [DTMF_EVENTS[key[1]]]


@dataclass
class _DTMFEvent:
    code: int
    packets: int
    sent: int = 0
    timestamp: int = 0


@dataclass
class RtpStats:
    """Counters for the call log line."""

    packets_in: int = 0
    packets_out: int = 0
    ignored: int = 0  # from a source other than the latched one, or not RTP for us
    dtmf_digits: str = ""
    srtp_dropped: int = 0  # SRTP that failed authentication or replayed (also counted in ignored)
    undecodable: int = 0  # payloads the codec rejected (concealed with silence)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class RtpSession(asyncio.DatagramProtocol):
    """RTP for one call over UDP: decoded audio and DTMF in ``events``, continuous 20 ms packets out.

    ``events`` yields ``("audio", pcm16_bytes)`` at :attr:`sample_rate` (8 kHz for G.711, 16 kHz for G.722,
    48 kHz for Opus) and ``("dtmf", digit)``. With SRTP negotiated every packet in is authenticated (tampered and
    replayed ones are dropped and counted in ``stats.srtp_dropped``) before it can latch or play, and every
    packet out is encrypted.

    Symmetric RTP (RFC 4961), locked down: the first packet of a negotiated payload type latches its source,
    but only a source whose IP is the SDP ``c=`` address or the SIP signalling source (``signalling_host``,
    any port: NATs rewrite ports) and that ``source_allowed`` accepts (the server's ``allowed_peers``).
    Packets from any other address are ignored. Nothing is sent before the latch: the SDP address is never
    sent to on its own word, so an INVITE cannot aim our RTP at a third party (no reflection) and a caller
    behind NAT opens its own pinhole with its first packet. Once latched a packet leaves every 20 ms
    (silence when nothing was written) to the latched address only.
    """

    def __init__(self, *, jitter_depth: int = 4, queue_size: int = 1000, signalling_host: str | None = None,
                 source_allowed: Callable[[str], bool] | None = None):
        self.signalling_host = signalling_host
        self._source_allowed = source_allowed or (lambda _ip: True)
        self._expected: set = set()
        self.negotiated: Negotiated | None = None
        self.latched: tuple[str, int] | None = None
        self.stats = RtpStats()
        self.events: asyncio.Queue[tuple[str, bytes | str]] = asyncio.Queue(maxsize=queue_size)
        self._reorder = ReorderBuffer(depth=jitter_depth)
        self._dtmf = DTMFDecoder()
        self._remote_ssrc: int | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._closed = False
        self._out = bytearray()
        self._sender: asyncio.Task | None = None
        self._ssrc = random.getrandbits(32)
        self._seq = random.getrandbits(16)
        self._timestamp = random.getrandbits(32)
        self._first = True
        self.local_address: tuple[str, int] | None = None
        self.last_received: float | None = None  # loop time of the last accepted packet
        self._dtmf_queue: deque[_DTMFEvent] = deque()
        self._codec: MediaCodec | None = None
        self._srtp: SrtpContext | None = None

    async def open(self, *, host: str, ports: tuple[int, int] | None = None) -> tuple[str, int]:
        """Bind the UDP socket to an even port (RFC 3550 §11), within ``ports`` (first, last) if given.

        Returns the local (host, port); OSError when no port of the range is free.
        """
        loop = asyncio.get_running_loop()
        candidates = _even_ports(ports) if ports else [0] * 8
        last_error: OSError | None = None
        for attempt, port in enumerate(candidates):
            try:
                transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
            except OSError as exc:
                last_error = exc
                continue
            bound = transport.get_extra_info("sockname")[:2]
            if self._closed:  # the call ended while the socket was being bound
                transport.close()
                raise OSError("RTP session closed while opening")
            if bound[1] % 2 and attempt < len(candidates) - 1:
                transport.close()  # an odd ephemeral port: try again for an even one (the last try keeps it)
                continue
            self._transport, self.local_address = transport, bound
            return bound
        raise last_error or OSError("no free even RTP port")

    def configure(self, negotiated: Negotiated) -> None:
        """Apply (or re-apply, after a re-INVITE) the negotiated codec, payload types and direction.

        A new remote media address (the call was moved to another media endpoint) releases the latch, so
        the next source is latched afresh.
        """
        if self.negotiated is not None and self.negotiated.remote != negotiated.remote:
            self.latched = None
        if self._codec is None or self._codec.name != negotiated.codec:
            if self._codec is not None:  # queued audio is at the old codec's rate
                self._out.clear()
            self._codec = MediaCodec(negotiated.codec)
        if not negotiated.srtp:
            self._srtp = None
        elif self._srtp is None or not self._srtp.same_keys(negotiated.local_crypto, negotiated.remote_crypto):
            self._srtp = SrtpContext(local=negotiated.local_crypto, remote=negotiated.remote_crypto)
        self.negotiated = negotiated
        hosts = (negotiated.remote_host, self.signalling_host)
        self._expected = {ip for ip in map(_ip, filter(None, hosts)) if ip is not None and not ip.is_unspecified}

    def start(self) -> None:
        """Start the continuous 20 ms sender."""
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    def close(self) -> None:
        """Stop sending and close the socket (for good: a later ``open`` fails)."""
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # --- outgoing -----------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        """PCM rate of the negotiated codec (what ``events`` carry and ``write`` takes); 8000 before one is."""
        return self._codec.sample_rate if self._codec is not None else SAMPLE_RATE

    @property
    def srtp(self) -> bool:
        """Whether the media is SRTP."""
        return self._srtp is not None

    @property
    def _packet_bytes(self) -> int:
        return self.sample_rate * PTIME_MS // 1000 * 2

    def write(self, pcm: bytes) -> None:
        """Queue PCM16 at :attr:`sample_rate` for sending."""
        self._out += pcm

    def clear_output(self) -> None:
        """Drop queued audio (the bot was interrupted)."""
        self._out.clear()

    @property
    def buffered_seconds(self) -> float:
        return len(self._out) / 2 / self.sample_rate

    async def drain(self, *, timeout: float = 30.0) -> None:
        """Wait until the queued audio has been sent (or the session stopped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._out and self._sender is not None and loop.time() < deadline:
            await asyncio.sleep(PTIME_S)

    @property
    def awaiting_latch(self) -> bool:
        """We should send, but the peer's first RTP packet has not arrived yet."""
        n = self.negotiated
        return n is not None and n.we_send and self.latched is None and self._transport is not None

    def _destination(self) -> tuple[str, int] | None:
        n = self.negotiated
        if n is None or not n.we_send or n.remote_host in ("0.0.0.0", "::"):
            return None
        return self.latched  # None until the peer's first packet: no RTP to an address on the SDP's word

    def _next_payload(self) -> bytes:
        size = self._packet_bytes
        chunk = bytes(self._out[:size])
        del self._out[:size]
        if len(chunk) < size:
            chunk += bytes(size - len(chunk))
        return self._codec.encode(chunk)

    def send_dtmf(self, digit: str, *, duration_ms: int = 100) -> bool:
        """Queue an RFC 4733 event (0-9 * # A-D); False when the caller offered no telephone-event."""
        n = self.negotiated
        if n is None or n.dtmf_payload_type is None or digit.upper() not in DTMF_EVENTS:
            return False
        self._dtmf_queue.append(_DTMFEvent(code=DTMF_EVENTS.index(digit.upper()),
                                           packets=max(1, duration_ms // 20)))
        return True

    @property
    def dtmf_pending(self) -> bool:
        return bool(self._dtmf_queue)

    def _next_dtmf(self) -> tuple[int, int, bytes, int] | None:
        """(payload type, timestamp, payload, marker) of the event packet due now, if an event is playing."""
        if not self._dtmf_queue:
            return None
        event = self._dtmf_queue[0]
        if event.sent == 0:
            event.timestamp = self._timestamp
        event.sent += 1
        end = event.sent > event.packets  # then three end packets with the final duration (RFC 4733 §2.5.1.4)
        duration = min(event.sent, event.packets) * (self.negotiated.dtmf_clock_rate * PTIME_MS // 1000)
        payload = struct.pack("!BBH", event.code, (0x80 if end else 0) | 10, duration)
        if event.sent >= event.packets + 3:
            self._dtmf_queue.popleft()
        return self.negotiated.dtmf_payload_type, event.timestamp, payload, int(event.sent == 1)

    def send_packet(self) -> None:
        """Send one 20 ms packet now: a DTMF event packet, queued audio, or silence."""
        destination = self._destination()
        if destination is None or self._transport is None:
            if not self.awaiting_latch:  # on hold: the bot's audio plays out into nothing, in real time
                del self._out[:self._packet_bytes]
            return  # before the caller's first packet the bot's audio waits (a greeting is heard from its start)
        dtmf = self._next_dtmf()
        if dtmf is not None:  # the bot's audio waits while a digit plays
            pt, timestamp, payload, marker = dtmf
        else:
            pt, timestamp, payload = self.negotiated.payload_type, self._timestamp, self._next_payload()
            marker = int(self._first)
            self._first = False
        packet = RtpPacket(payload_type=pt, marker=marker, sequence_number=self._seq, timestamp=timestamp,
                           ssrc=self._ssrc, payload=payload)
        data = packet.serialize()
        if self._srtp is not None:
            try:
                data = self._srtp.protect(data)
            except SrtpError as exc:  # never sent in clear; the sequence moves on
                logger.debug(f"SRTP packet not sent: {exc}")
                data = None
        if data is not None:
            self._transport.sendto(data, destination)
        self._seq = (self._seq + 1) & 0xFFFF
        self._timestamp = (self._timestamp + self._codec.spec.ticks(PTIME_MS)) & 0xFFFFFFFF
        self.stats.packets_out += 1

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_time = loop.time()
        while True:
            self.send_packet()
            next_time += PTIME_S
            delay = next_time - loop.time()
            if delay < -0.2:  # the loop stalled: skip ahead instead of bursting
                next_time = loop.time()
                delay = 0
            await asyncio.sleep(max(0.0, delay))

    # --- incoming -----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            self._receive(data, (addr[0], addr[1]))
        except Exception:  # never let one odd packet break the call
            logger.exception(f"RTP packet from {addr} dropped")
            self.stats.ignored += 1

    def _acceptable(self, payload_type: int, addr: tuple[str, int]) -> bool:
        """A negotiated payload type from the latched source, or (before the latch) from an allowed one."""
        n = self.negotiated
        if n is None or payload_type not in (n.payload_type, n.dtmf_payload_type, CN_PAYLOAD_TYPE) or addr[1] == 0:
            return False
        if self.latched is not None:
            return addr == self.latched
        # neither the SDP c= nor the SIP source, or outside allowed_peers: never latched
        return _ip(addr[0]) in self._expected and self._source_allowed(addr[0])

    def _receive(self, data: bytes, addr: tuple[str, int]) -> None:
        if not 12 <= len(data) <= MAX_RTP_DATAGRAM or data[0] >> 6 != 2 or (data[1] & 0x7F) in RTCP_PAYLOAD_TYPES:
            self.stats.ignored += 1
            return
        if not self._acceptable(data[1] & 0x7F, addr):  # the source is checked before any parsing
            self.stats.ignored += 1
            return
        if self._srtp is not None:  # authenticated before it may latch, play or count as media
            try:
                data = self._srtp.unprotect(data)
            except SrtpError:
                self.stats.srtp_dropped += 1
                self.stats.ignored += 1
                return
        try:
            packet = RtpPacket.parse(data)
        except ValueError:  # padding, CSRC count or extension past the end: junk, counted, not logged
            self.stats.ignored += 1
            return
        if self.latched is None:
            self.latched = addr
            logger.debug(f"RTP latched to {addr[0]}:{addr[1]}")
        self.stats.packets_in += 1
        self.last_received = asyncio.get_running_loop().time()
        if packet.ssrc != self._remote_ssrc:
            self._remote_ssrc = packet.ssrc
            self._reorder.reset()
            self._dtmf.reset()
        if packet.payload_type == self.negotiated.dtmf_payload_type:
            for digit in self._dtmf.feed(packet.payload, packet.timestamp):
                self.stats.dtmf_digits += digit
                self._emit("dtmf", digit)
        elif packet.payload_type != CN_PAYLOAD_TYPE:
            for ready in self._reorder.push(packet):
                self._emit("audio", self._decode(ready))

    def _decode(self, packet: RtpPacket | None) -> bytes:
        """A packet's PCM; silence of one packet for a lost or undecodable one."""
        if packet is not None:
            try:
                return self._codec.decode(packet.payload)
            except CodecError:
                self.stats.undecodable += 1
        return bytes(self._packet_bytes)

    def report_dtmf(self, digit: str) -> None:
        """A digit that arrived outside RTP (SIP INFO): counted and queued like an RFC 4733 one."""
        self.stats.dtmf_digits += digit
        self._emit("dtmf", digit)

    def _emit(self, kind: str, value: bytes | str) -> None:
        if self.events.full():
            self.events.get_nowait()  # nobody is reading: keep the newest
        self.events.put_nowait((kind, value))

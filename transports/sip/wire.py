"""SIP on the wire: one UDP socket and one TCP listener on the same port (and a TLS listener on its own port),
framing, limits and keep-alives.

Bytes become messages here and nowhere else: the one ``try`` around the parser is in this module, and a
malformed request gets a 400 built from its raw headers (or is dropped when not even that is readable).
Everything above sees only ``on_message(message, source)`` and calls :meth:`SIPWire.send`.

Limits (all in :class:`SIPConfig`): a token bucket per source IP for datagrams and TCP messages (beyond it:
dropped silently), a larger UDP receive buffer, a cap on TCP connections in all and per source IP, an idle
timeout, a deadline for a message once begun (slow headers or body), a token bucket for CRLF keep-alives per
connection, and a cap on what may wait in a connection's send buffer. Nothing here resolves names: a
destination that is not an IP literal is dropped.

SIP over TLS (``config.tls_cert``): a TCP listener on ``config.tls_port`` whose connections are counted against
the same caps *before* the handshake, then upgraded with ``start_tls`` within ``config.tls_handshake_secs``; a
handshake that fails (garbage, plain SIP, a wrong certificate) or times out closes the connection and is counted
in ``tls_failures``. After the handshake a TLS connection is framed and limited exactly like a TCP one.

Our own requests over TLS (outbound calls to ``sips:``, a ``sips:`` registrar): :meth:`SIPWire.connect_tls` opens
a connection with a client context (the peer's certificate and name verified by default, ``tls.client_context``),
reuses it while it is open (dials at once to one peer share one handshake), and reads it like an accepted one;
``send`` to that peer then writes on it, so responses, the ACK and in-dialog requests of the call travel on the
connection and never fall back to clear-text UDP. ``keep_open`` spares a registration's connection the idle timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import socket
import ssl
from collections.abc import Callable

from loguru import logger

from .config import SIPConfig
from .message import MAX_MESSAGE_SIZE, SIPMessage, SIPParseError, canonical_name, parse_message, parse_stream
from .tls import server_context

Address = tuple[str, int]
MAX_DATAGRAM = 65_507  # IPv4 UDP payload limit
MAX_SEND_BUFFER = 256 * 1024  # bytes a TCP peer may leave unread before its connection is closed
MAX_RATE_SOURCES = 10_000  # source IPs tracked by the rate limiter
_TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take(n)`` says whether n were there (and takes them)."""

    def __init__(self, *, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def take(self, now: float, n: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class SourceRateLimiter:
    """A token bucket per source IP, the table bounded (idle sources are forgotten first)."""

    def __init__(self, *, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, TokenBucket] = {}
        self._dropping: set[str] = set()
        self.dropped = 0

    def allow(self, ip: str, now: float) -> bool:
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= MAX_RATE_SOURCES:
                self._prune(now)
            bucket = self._buckets[ip] = TokenBucket(rate=self.rate, burst=self.burst, now=now)
        if bucket.take(now):
            self._dropping.discard(ip)
            return True
        self.dropped += 1
        if ip not in self._dropping:
            self._dropping.add(ip)
            logger.warning(f"SIP from {ip}: over {self.rate:g} messages/s, dropping until it slows down")
        return False

    def _prune(self, now: float) -> None:
        for ip in [ip for ip, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[ip]
        while len(self._buckets) >= MAX_RATE_SOURCES:  # all busy: forget the oldest
            del self._buckets[next(iter(self._buckets))]


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]):
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr) -> None:
        self._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable for something we sent: nothing to do
        logger.debug(f"SIP UDP socket: {exc}")


class _PausedUntilTLS(asyncio.StreamReaderProtocol):
    """A stream protocol that reads nothing until ``start_tls``: the ClientHello that arrives with the connection
    must reach the TLS layer, not the plain StreamReader's buffer (``start_tls`` resumes reading itself)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()
        super().connection_made(transport)


class SIPWire:
    """UDP and TCP for the SIP server: parsed messages to ``on_message(message, source)``, bytes out via ``send``.

    Parameters:
        config: Address, port and the transport limits.
        on_message: Called with every well-formed message and its source (ip, port); for TCP the source is the
            connection's peer address, and ``send`` to it writes on that connection.
        in_use: ``in_use(peer)``: whether a TCP connection carries a live call (then it is not closed for idling:
            our BYE must be able to go back on it).
    """

    def __init__(self, *, config: SIPConfig, on_message: Callable[[SIPMessage, Address], None] | None = None,
                 in_use: Callable[[Address], bool] | None = None):
        self.config = config
        self.on_message = on_message or (lambda message, source: None)
        self.in_use = in_use or (lambda peer: False)
        self._refusing = False
        self.address: Address | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.Server | None = None
        self._streams: dict[Address, asyncio.StreamWriter] = {}
        self._secure: set[Address] = set()  # the TLS connections among _streams
        self._per_source: dict[str, int] = {}
        self._tls_server: asyncio.Server | None = None
        self._tls_context: ssl.SSLContext | None = None
        self.tls_address: Address | None = None
        self.tls_failures = 0  # handshakes that failed or timed out (garbage, plain text, bad certificates)
        self._limiter = SourceRateLimiter(rate=config.udp_rate_per_source, burst=config.udp_burst_per_source)
        self._opened: set[asyncio.Task] = set()  # the read loops of the TLS connections we opened
        self._connecting: dict[Address, asyncio.Future] = {}  # TLS connections being opened, by destination
        self._kept: set[Address] = set()  # connections we opened that stay open while idle (keep_open)

    @property
    def rate_limited(self) -> int:
        """SIP messages dropped so far by the per-source rate limit (for metrics)."""
        return self._limiter.dropped

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> Address:
        """Bind UDP (and TCP on the same port when ``config.tcp``); returns (host, port)."""
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _UDP(self._datagram),
                                                           local_addr=(self.config.host, self.config.port))
        self.address = self._udp.get_extra_info("sockname")[:2]
        self._grow_receive_buffer()
        transports = "udp"
        if self.config.tcp:
            try:
                self._tcp_server = await asyncio.start_server(self._serve_connection, self.address[0],
                                                              self.address[1], limit=MAX_MESSAGE_SIZE)
                transports = "udp+tcp"
            except OSError as exc:
                logger.warning(f"SIP over TCP not available on port {self.address[1]}: {exc}")
        if self.config.tls:
            await self._start_tls_listener()
            transports += f" and tls port {self.tls_address[1]}"
        logger.info(f"SIP server listening on {transports} {self.address[0]}:{self.address[1]}")
        return self.address

    async def _start_tls_listener(self) -> None:
        """The TLS listener (plain TCP accept; each connection is upgraded in its own task)."""
        config = self.config
        self._tls_context = server_context(cert=config.tls_cert, key=config.tls_key, client_ca=config.tls_client_ca)
        def protocol() -> _PausedUntilTLS:
            return _PausedUntilTLS(asyncio.StreamReader(limit=MAX_MESSAGE_SIZE),
                                   lambda reader, writer: self._serve_connection(reader, writer, tls=True))

        try:
            self._tls_server = await asyncio.get_running_loop().create_server(protocol, self.address[0],
                                                                               config.tls_port)
        except OSError:
            await self.close()
            raise
        self.tls_address = self._tls_server.sockets[0].getsockname()[:2]

    def _grow_receive_buffer(self) -> None:
        sock = self._udp.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.udp_receive_buffer)
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError as exc:
            logger.warning(f"SIP UDP receive buffer left as it is: {exc}")
            return
        if granted < self.config.udp_receive_buffer:  # Linux reports twice what it grants, capped by rmem_max
            logger.info(f"SIP UDP receive buffer {granted} bytes (asked {self.config.udp_receive_buffer}; "
                        "raise net.core.rmem_max for more)")

    async def close(self) -> None:
        for server in (self._tcp_server, self._tls_server):
            if server is not None:
                server.close()
        self._tcp_server = self._tls_server = None
        for stream in list(self._streams.values()):
            stream.close()
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    @property
    def connections(self) -> int:
        """Open TCP connections."""
        return len(self._streams)

    def is_stream(self, peer: Address) -> bool:
        """Whether ``peer`` is a TCP or TLS connection (responses and requests to it go on that connection)."""
        return peer in self._streams

    def is_secure(self, peer: Address) -> bool:
        """Whether ``peer`` is a TLS connection."""
        return peer in self._secure

    def transport_of(self, peer: Address) -> str:
        """``"tls"``, ``"tcp"`` or ``"udp"``: how messages from ``peer`` came (for Via and Contact)."""
        return "tls" if peer in self._secure else "tcp" if peer in self._streams else "udp"

    def port_for(self, peer: Address) -> int:
        """Our port for Via and Contact in messages to ``peer``: on a TLS connection our TLS listener's, else (a
        connection we opened, with no listener) our end of it, which the peer can only reach down that connection;
        else the SIP port."""
        if peer in self._secure:
            if self.tls_address is not None:
                return self.tls_address[1]
            local = self.local_port(peer)
            if local is not None:
                return local
        return self.address[1] if self.address else self.config.port

    # --- connections we open -----------------------------------------------------------------

    async def connect_tls(self, destination: Address, *, context: ssl.SSLContext, server_hostname: str,
                          timeout: float | None = None) -> Address:
        """A TLS connection to ``destination`` (an IP literal and port) for our own requests, reused while open;
        returns the peer address that ``send`` writes to. ``server_hostname``: the name (or IP) its certificate
        must carry. Raises ``OSError`` (``ssl.SSLError`` for a refused certificate) or ``TimeoutError``."""
        existing = self._streams.get(destination)
        if existing is not None and not existing.is_closing() and destination in self._secure:
            return destination
        pending = self._connecting.get(destination)
        if pending is not None:  # dials at once to one peer share one connection (and one handshake)
            return await asyncio.shield(pending)
        opening = asyncio.ensure_future(self._open_tls(destination, context, server_hostname,
                                                       timeout or self.config.tls_handshake_secs))
        self._connecting[destination] = opening
        try:
            return await asyncio.shield(opening)
        finally:
            if opening.done():
                self._connecting.pop(destination, None)
            else:  # we were cancelled: the others waiting on it still get it; it forgets itself when done
                opening.add_done_callback(lambda _: self._connecting.pop(destination, None))

    async def _open_tls(self, destination: Address, context: ssl.SSLContext, server_hostname: str,
                        timeout: float) -> Address:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            destination[0], destination[1], ssl=context, server_hostname=server_hostname, limit=MAX_MESSAGE_SIZE,
            ssl_handshake_timeout=timeout), timeout + 1)
        peer = writer.get_extra_info("peername")[:2]
        self._streams[peer] = writer
        self._secure.add(peer)
        task = asyncio.get_running_loop().create_task(self._serve_opened(reader, writer, peer))
        self._opened.add(task)
        task.add_done_callback(self._opened.discard)
        return peer

    def keep_open(self, peer: Address, keep: bool = True) -> None:
        """Keep a connection we opened while it is idle (a registration's: the registrar sends our calls down it),
        or let the idle timeout close it again."""
        if keep:
            self._kept.add(peer)
        else:
            self._kept.discard(peer)

    def local_port(self, peer: Address) -> int | None:
        """Our port on the connection with ``peer`` (for a Contact a registrar reaches us at through it)."""
        stream = self._streams.get(peer)
        return stream.get_extra_info("sockname")[1] if stream is not None else None

    async def _serve_opened(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            peer: Address) -> None:
        """Read a connection we opened until it ends (idle, unless a call lives on it: ``in_use``)."""
        try:
            why = await self._read_until_closed(reader, writer, peer)
        finally:
            self._forget(peer, writer)
        logger.debug(f"SIP over TLS to {peer[0]}:{peer[1]}: {why}")

    # --- sending ------------------------------------------------------------------------------

    def send(self, data: bytes, destination: Address) -> None:
        """On the TCP connection with that peer when there is one, else UDP. Never resolves a name."""
        stream = self._streams.get(destination)
        if stream is not None:
            if stream.is_closing():
                return
            if stream.transport.get_write_buffer_size() > MAX_SEND_BUFFER:
                logger.warning(f"SIP over TCP to {destination[0]}:{destination[1]}: peer not reading; closing")
                stream.close()
                return
            stream.write(data)
            return
        host, port = destination
        if self._udp is None or not is_ip_literal(host) or not 0 < port < 65536:
            logger.debug(f"SIP to {host!r}:{port} not sent (not an IP literal and port)")
            return
        if len(data) > MAX_DATAGRAM:
            logger.warning(f"SIP to {host}:{port} not sent: {len(data)} bytes do not fit a datagram")
            return
        self._udp.sendto(data, (host, port))

    # --- receiving ----------------------------------------------------------------------------

    def _datagram(self, data: bytes, source: Address) -> None:
        if not self._limiter.allow(source[0], asyncio.get_running_loop().time()):
            return
        try:
            message = parse_message(data)
        except SIPParseError as exc:
            logger.warning(f"SIP from {source[0]}:{source[1]} malformed ({exc}); {len(data)} bytes")
            self._answer_malformed(data, source, exc)
            return
        if message is None:  # CRLF keep-alive (RFC 5626 §4.4.1): answer a double CRLF with a single one
            if data.startswith(b"\r\n\r\n"):
                self.send(b"\r\n", source)
            return
        self._deliver(message, source)

    def _deliver(self, message: SIPMessage, source: Address) -> None:
        try:
            self.on_message(message, source)
        except Exception:  # the layers above answer what they can; a bug there must not stop the socket
            logger.exception(f"SIP message from {source[0]}:{source[1]} failed")

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                                tls: bool = False) -> None:
        """One TCP (or TLS) connection: messages framed by Content-Length, responses back on the same connection."""
        peer = writer.get_extra_info("peername")[:2]
        if len(self._streams) >= self.config.tcp_max_connections or \
                self._per_source.get(peer[0], 0) >= self.config.tcp_max_per_source:
            if not self._refusing:  # one line per episode, not per connection
                logger.warning(f"SIP over TCP from {peer[0]}:{peer[1]} refused: connection limit "
                               f"({len(self._streams)} open, {self._per_source.get(peer[0], 0)} from this address)"
                               "; refusing further connections over the limit silently")
            self._refusing = True
            writer.close()
            return
        self._refusing = False
        self._streams[peer] = writer
        self._per_source[peer[0]] = self._per_source.get(peer[0], 0) + 1
        try:
            if tls and not await self._handshake(writer, peer):
                return
            why = await self._read_until_closed(reader, writer, peer)
        finally:
            self._forget(peer, writer)
            self._per_source[peer[0]] -= 1
            if not self._per_source[peer[0]]:
                del self._per_source[peer[0]]
        logger.debug(f"SIP over TCP from {peer[0]}:{peer[1]}: {why}")

    async def _read_until_closed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                 peer: Address) -> str:
        """Read a connection (accepted or ours) until it ends; why it ended."""
        try:
            return await self._read_messages(reader, writer, peer)
        except SIPParseError as exc:
            return f"malformed ({exc})"
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):  # ssl.SSLError: a TLS record broke
            return "connection lost"

    def _forget(self, peer: Address, writer: asyncio.StreamWriter) -> None:
        """Close a connection and drop it from the tables (unless a newer one to the same peer took its place)."""
        if self._streams.get(peer) is writer:
            del self._streams[peer]
            self._secure.discard(peer)
            self._kept.discard(peer)
        writer.close()

    async def _handshake(self, writer: asyncio.StreamWriter, peer: Address) -> bool:
        """Upgrade a connection on the TLS port; False (counted, logged once per connection at info) when the
        peer sent something that is not a TLS handshake, failed it, or was too slow."""
        timeout = self.config.tls_handshake_secs
        try:
            await asyncio.wait_for(writer.start_tls(self._tls_context, ssl_handshake_timeout=timeout), timeout + 1)
        except (OSError, asyncio.TimeoutError, EOFError, ValueError) as exc:  # ssl.SSLError is an OSError
            self.tls_failures += 1
            reason = type(exc).__name__ + (f": {exc.reason}" if getattr(exc, "reason", None) else "")
            logger.info(f"SIP over TLS from {peer[0]}:{peer[1]}: handshake failed ({reason[:80]}); closing")
            return False
        self._secure.add(peer)
        return True

    async def _read_messages(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             peer: Address) -> str:
        """Read until the peer leaves or breaks a limit; returns why the connection ends."""
        loop = asyncio.get_running_loop()
        config = self.config
        keepalives = TokenBucket(rate=config.tcp_keepalive_rate, burst=config.tcp_keepalive_burst, now=loop.time())
        buffer, message_deadline = b"", None
        while True:
            if message_deadline is None:
                timeout, limit = config.tcp_idle_secs, "idle"
            else:
                timeout, limit = message_deadline - loop.time(), "message not completed in time"
            try:
                data = await asyncio.wait_for(reader.read(65536), max(timeout, 0.0))
            except asyncio.TimeoutError:
                if message_deadline is None and (self.in_use(peer) or peer in self._kept):
                    continue  # idle, but a call (or a registration) lives on this connection
                logger.info(f"SIP over TCP from {peer[0]}:{peer[1]}: {limit}; closing")
                return limit
            if not data:
                return "closed by peer"
            buffer += data
            while True:
                stripped = buffer.lstrip(b"\r\n")
                crlf = len(buffer) - len(stripped)
                if crlf and not stripped:  # only keep-alives (RFC 5626 §3.5.1): bounded per connection
                    if not keepalives.take(loop.time(), max(1, crlf // 4)):
                        logger.warning(f"SIP over TCP from {peer[0]}:{peer[1]}: keep-alive flood; closing")
                        return "keep-alive flood"
                    if crlf >= 4:
                        self.send(b"\r\n", peer)
                buffer = stripped  # CRLFs before a start line are ignored (RFC 3261 §7.5)
                if not buffer:
                    message_deadline = None
                    break
                if message_deadline is None:
                    message_deadline = loop.time() + config.tcp_message_secs
                try:
                    message, used = parse_stream(buffer)
                except SIPParseError as exc:
                    logger.warning(f"SIP over TCP from {peer[0]}:{peer[1]} malformed ({exc}); closing")
                    self._answer_malformed(buffer, peer, exc)
                    return "malformed"
                if message is None:
                    break
                buffer, message_deadline = buffer[used:], None
                if self._limiter.allow(peer[0], loop.time()):
                    self._deliver(message, peer)

    # --- malformed requests -------------------------------------------------------------------

    def _answer_malformed(self, data: bytes, source: Address, error: SIPParseError) -> None:
        """A 400 when the request names its transaction (Via, From, To, Call-ID, CSeq) in readable text.

        The header values are copied as they came (they may be what was malformed) and the 400 goes back to
        the source address; binary junk, responses and ACKs are dropped.
        """
        head = data.lstrip(b"\r\n").split(b"\r\n\r\n", 1)[0][:8192]
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return
        lines = text.split("\r\n")
        if any(ord(c) < 32 and c != "\t" for line in lines for c in line):
            return  # control characters or bare CR/LF: nothing safe to echo back
        start = lines[0].split(" ")
        if len(start) != 3 or start[2] != "SIP/2.0" or not _TOKEN.match(start[0]) or start[0].upper() == "ACK":
            return
        fields: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep and _TOKEN.match(name.strip()):
                fields.setdefault(canonical_name(name), []).append(value.strip())
        if not all(fields.get(name) for name in ("Via", "From", "To", "Call-ID", "CSeq")):
            return
        to = fields["To"][0]
        if ";tag=" not in to.lower():
            to += f";tag={secrets.token_hex(6)}"
        reason = "".join(c for c in str(error) if 32 <= ord(c) < 127)[:100]
        out = [f"SIP/2.0 400 Bad Request ({reason})"]
        out += [f"Via: {via}" for via in fields["Via"][:64]]
        out += [f"From: {fields['From'][0]}", f"To: {to}", f"Call-ID: {fields['Call-ID'][0]}",
                f"CSeq: {fields['CSeq'][0]}", f"Server: {self.config.user_agent}", "Content-Length: 0"]
        self.send(("\r\n".join(out) + "\r\n\r\n").encode("utf-8"), source)


__all__ = ["SIPWire", "SourceRateLimiter", "TokenBucket", "is_ip_literal"]

"""An asyncio SIP user-agent server over UDP and TCP (RFC 3261): answers calls, one RTP session per call.

INVITE → 100 Trying, 180 Ringing (optional), 200 OK with the SDP answer (or our offer when the INVITE
has none, the answer then comes in the ACK). The 200 is retransmitted from T1 = 0.5 s doubling to T2 = 4 s
until the ACK; without one after 64·T1 = 32 s the call is ended with a BYE. BYE from either side (ours
follows the route set); CANCEL → 200 and 487; OPTIONS → 200; re-INVITE/UPDATE → 200 with the current SDP;
INFO → 200 (``application/dtmf-relay`` digits become DTMF events); other methods → 405 or 501; requests
for unknown dialogs → 481. Responses go to the request's source address when the top Via asks for
``rport`` (RFC 3581), and carry a To-tag except 100.

Policy comes before any application work: peers outside ``allowed_peers`` get 403 and calls beyond
``max_calls`` get 503, so the application callback (which builds the pipeline) only runs for accepted
calls. Every call ends with one log line saying how it ended.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from loguru import logger

from .message import (MAX_MESSAGE_SIZE, REASONS, SIPMessage, SIPParseError, SIPRequest, SIPResponse, parse_address,
                      parse_cseq, parse_message, parse_stream, parse_via, split_list, uri_host_port)
from .rtp import RtpSession
from .sdp import Negotiated, SDPBuilder, SDPError, parse_sdp, read_answer

ALLOWED_METHODS = ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "INFO", "UPDATE")
KNOWN_NOT_ALLOWED = ("REGISTER", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER", "PRACK")
RESPONSE_CACHE_SECS = 32.0
SUPPORTED_EXTENSIONS = ("timer",)  # session-timer refreshes are answered (re-INVITE/UPDATE → 200)


@dataclass
class SIPConfig:
    """Where the server listens and its call policy.

    Parameters:
        host: Address to bind the SIP and RTP sockets to.
        port: SIP port (0 picks a free one; see ``SIPUserAgentServer.port``).
        advertised_host: Address put in Contact and SDP; by default the local address that routes to the caller.
        max_calls: Concurrent calls; beyond it INVITEs get 503 before any application work.
        allowed_peers: Addresses or networks (``"10.0.0.0/8"``) that may call; empty allows everyone.
        max_call_secs: Calls are hung up (BYE) after this long; None for no limit.
        rtp_timeout_secs: Hang up when no RTP arrived for this long while the caller should be sending
            (not on hold); None to never. Catches callers that vanished without a BYE.
        ring_secs: Time between 180 Ringing and 200 OK.
        send_ringing: Send 180 Ringing before answering.
        t1, t2: RFC 3261 timers (retransmission start and cap).
        user_agent: Server / User-Agent header value.
        tcp: Also accept SIP over TCP on the same port (responses and our BYE go back on the connection).
        rtp_ports: (first, last) UDP port range for RTP (firewall rules); None picks free even ports.
    """

    host: str = "0.0.0.0"
    port: int = 5060
    advertised_host: str | None = None
    max_calls: int = 16
    allowed_peers: tuple[str, ...] = ()
    max_call_secs: float | None = 4 * 3600
    rtp_timeout_secs: float | None = 60.0
    ring_secs: float = 0.0
    send_ringing: bool = True
    t1: float = 0.5
    t2: float = 4.0
    user_agent: str = "pipecat-nemotron"
    tcp: bool = True
    rtp_ports: tuple[int, int] | None = None

    def __post_init__(self):
        self._networks = [ipaddress.ip_network(p, strict=False) for p in self.allowed_peers]

    def allows(self, ip: str) -> bool:
        """Whether a peer address may use the server."""
        if not self._networks:
            return True
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self._networks)


def _tag() -> str:
    return secrets.token_hex(6)


def _branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


def _local_ip_for(peer_ip: str) -> str:
    """The local address the kernel would use to reach ``peer_ip``."""
    family = socket.AF_INET6 if ":" in peer_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((peer_ip, 9))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class SIPCall:
    """One call (dialog) answered by the server, with its RTP session and the caller's identity.

    Attributes: ``call_id``, ``caller_uri`` and ``caller_name`` (From), ``called_uri`` (To),
    ``remote_address`` (ip, port of the INVITE), ``rtp`` (:class:`RtpSession`), ``negotiated``
    (codec, payload types, direction), ``outcome`` once it ended, and the ``ended`` event.
    """

    def __init__(self, *, server: SIPUserAgentServer, invite: SIPRequest, source: tuple[str, int]):
        caller = parse_address(invite.get("From"))
        self.server = server
        self.invite = invite
        self.call_id = invite.call_id
        self.caller_uri = caller.uri
        self.caller_name = caller.display_name
        self.called_uri = parse_address(invite.get("To")).uri
        asserted = invite.get("P-Asserted-Identity")
        self.asserted_identity = parse_address(split_list(asserted)[0]).uri if asserted else None
        self.remote_address = source
        self.remote_tag = caller.tag or ""
        self.local_tag = _tag()
        contact = invite.get_all("Contact")
        self.remote_target = parse_address(contact[0]).uri if contact else caller.uri
        self.route_set = invite.get_all("Record-Route")
        self.remote_cseq = invite.cseq[0]
        self.local_cseq = 0
        self.rtp = RtpSession()
        self.sdp: SDPBuilder | None = None
        self.negotiated: Negotiated | None = None
        self.offer_in_ack = False
        self.state = "ringing"  # ringing → answered → confirmed → ended
        self.outcome = ""
        self.started_at = time.time()
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.ended = asyncio.Event()
        self.confirmed = asyncio.Event()
        self._ended_callbacks: list[Callable[[SIPCall], Awaitable[None] | None]] = []
        self._tasks: set[asyncio.Task] = set()
        self._timers: list[asyncio.TimerHandle] = []

    @property
    def identity(self) -> dict:
        """Who is calling: From URI and display name, P-Asserted-Identity, Call-ID, remote address."""
        return {"call_id": self.call_id, "caller": self.caller_uri, "display_name": self.caller_name,
                "called": self.called_uri, "asserted_identity": self.asserted_identity,
                "remote_address": f"{self.remote_address[0]}:{self.remote_address[1]}"}

    @property
    def active(self) -> bool:
        return self.state != "ended"

    def add_ended_callback(self, callback: Callable[[SIPCall], Awaitable[None] | None]) -> None:
        """Call ``callback(call)`` (sync or async) when the call ends, whoever ends it."""
        if self.state == "ended":
            self._spawn(self._run_callback(callback))
        else:
            self._ended_callbacks.append(callback)

    async def hangup(self, reason: str = "local hangup") -> None:
        """End the call from our side with a BYE (after the ACK, as RFC 3261 §15 asks)."""
        await self.server.hangup(self, reason)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_callback(self, callback) -> None:
        try:
            result = callback(self)
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            logger.exception(f"call {self.call_id}: ended callback failed")


OnCall = Callable[[SIPCall], Awaitable[None]]


class SIPUserAgentServer(asyncio.DatagramProtocol):
    """The UDP SIP server: accepts calls under the policy in :class:`SIPConfig` and runs ``on_call``.

    ``on_call(call)`` runs as its own task once the 200 OK is sent; when it returns and the call is still
    up, the call is hung up.
    """

    def __init__(self, *, config: SIPConfig, on_call: OnCall | None = None):
        self.config = config
        self.on_call = on_call
        self.calls: dict[str, SIPCall] = {}
        self.address: tuple[str, int] | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._responses: dict[tuple[str, str], tuple[bytes, tuple[str, int]]] = {}
        self._client: dict[tuple[str, int, str], asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._tcp_server: asyncio.Server | None = None
        self._streams: dict[tuple[str, int], asyncio.StreamWriter] = {}

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Bind the SIP socket; returns (host, port)."""
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.config.host, self.config.port))
        self.address = self._transport.get_extra_info("sockname")[:2]
        transports = "udp"
        if self.config.tcp:
            try:
                self._tcp_server = await asyncio.start_server(self._on_tcp_connection, self.address[0],
                                                              self.address[1], limit=MAX_MESSAGE_SIZE)
                transports = "udp+tcp"
            except OSError as exc:
                logger.warning(f"SIP over TCP not available on port {self.address[1]}: {exc}")
        logger.info(f"SIP server listening on {transports} {self.address[0]}:{self.address[1]}")
        return self.address

    @property
    def port(self) -> int:
        return self.address[1] if self.address else self.config.port

    @property
    def active_calls(self) -> int:
        return sum(1 for call in self.calls.values() if call.active)

    async def stop(self) -> None:
        """Hang up every call and close the socket."""
        for call in list(self.calls.values()):
            if call.active:
                call.confirmed.set()  # no waiting for outstanding ACKs on the way out
                await self.hangup(call, "server stopped")
        await asyncio.sleep(0)
        for task in list(self._tasks):
            task.cancel()
        if self._tcp_server is not None:
            self._tcp_server.close()
            self._tcp_server = None
        for stream in list(self._streams.values()):
            stream.close()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- datagrams ------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr) -> None:
        source = (addr[0], addr[1])
        try:
            message = parse_message(data)
        except SIPParseError as exc:
            logger.warning(f"SIP from {source[0]}:{source[1]} malformed ({exc}); {len(data)} bytes")
            self._answer_malformed(data, source, exc)
            return
        except Exception:  # a parser bug must not take the server down
            logger.exception(f"SIP from {source[0]}:{source[1]} could not be parsed")
            return
        if message is None:  # CRLF keep-alive (RFC 5626 §4.4.1): answer with a single CRLF
            if data.startswith(b"\r\n\r\n"):
                self._send_raw(b"\r\n", source)
            return
        self._dispatch(message, source)

    def _dispatch(self, message: SIPMessage, source: tuple[str, int]) -> None:
        try:
            if isinstance(message, SIPRequest):
                self._on_request(message, source)
            else:
                self._on_response(message)
        except SIPParseError as exc:
            logger.warning(f"SIP {getattr(message, 'method', 'response')} from {source}: {exc}")
            if isinstance(message, SIPRequest) and message.method != "ACK":
                try:
                    self._respond(message, source, 400, reason=f"Bad Request ({exc})"[:120])
                except SIPParseError:
                    pass  # not even a 400 can be addressed: dropped
        except Exception:
            logger.exception(f"SIP message from {source} failed")

    async def _on_tcp_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TCP connection: messages framed by Content-Length, responses back on the same connection."""
        peer = writer.get_extra_info("peername")[:2]
        self._streams[peer] = writer
        buffer = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                buffer += data
                while buffer:
                    message, used = parse_stream(buffer)
                    buffer = buffer[used:]
                    if message is None:
                        break
                    self._dispatch(message, peer)
        except SIPParseError as exc:
            logger.warning(f"SIP over TCP from {peer[0]}:{peer[1]} malformed ({exc}); closing the connection")
            self._answer_malformed(buffer, peer, exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self._streams.get(peer) is writer:
                del self._streams[peer]
            writer.close()

    def _answer_malformed(self, data: bytes, source: tuple[str, int], error: SIPParseError) -> None:
        """A 400 when enough of the request is readable to address one; otherwise a silent drop."""
        try:
            head = data.split(b"\r\n\r\n", 1)[0][:8192].decode("utf-8")
            lines = head.split("\r\n")
            if any(ord(c) < 32 and c != "\t" for line in lines for c in line):
                return  # binary junk or bare CR/LF: nothing safe to echo back
            if lines[0].startswith("SIP/2.0") or lines[0].split(" ")[0] == "ACK":
                return
            request = SIPRequest(method=lines[0].split(" ")[0], uri="sip:x")
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    request.add(name, value.strip())
            if request.get("Via") and request.get("Call-ID") and request.get("CSeq") and request.get("From"):
                parse_via(request.get_all("Via")[0])  # these raise when the 400 could not be matched anyway
                parse_cseq(request.get("CSeq"))
                parse_address(request.get("From"))
                parse_address(request.get("To") or "")
                self._respond(request, source, 400, reason=f"Bad Request ({error})"[:120])
        except Exception:
            pass  # not even that much is readable: drop

    def _send(self, message: SIPMessage, destination: tuple[str, int]) -> bytes:
        data = message.to_bytes()
        self._send_raw(data, destination)
        return data

    def _send_raw(self, data: bytes, destination: tuple[str, int]) -> None:
        """Over the TCP connection with that peer when there is one, else UDP."""
        stream = self._streams.get(destination)
        if stream is not None and not stream.is_closing():
            stream.write(data)
        elif self._transport is not None:
            self._transport.sendto(data, destination)

    # --- responses ------------------------------------------------------------------------------

    def _response_destination(self, request: SIPRequest, source: tuple[str, int]) -> tuple[str, int]:
        if source in self._streams:
            return source  # back on the connection the request came in on
        via = parse_via(request.get_all("Via")[0])
        if "rport" in via.params:
            return source
        return source[0], via.port or 5060

    def _response(self, request: SIPRequest, source: tuple[str, int], status: int, *, reason: str | None = None,
                  to_tag: str | None = None, body: str | None = None, contact: bool = False,
                  unsupported: str | None = None) -> SIPResponse:
        response = SIPResponse(status=status, reason=reason or REASONS.get(status, ""))
        vias = request.get_all("Via")
        top = parse_via(vias[0])
        top.params["received"] = source[0]
        if "rport" in top.params:
            top.params["rport"] = str(source[1])
        for via in [str(top), *vias[1:]]:
            response.add("Via", via)
        response.add("From", request.get("From"))
        to_header = request.get("To")
        to = parse_address(to_header)
        if status != 100 and not to.tag:
            to.params["tag"] = to_tag or _tag()
            to_header = str(to)
        response.add("To", to_header)
        response.add("Call-ID", request.call_id)
        response.add("CSeq", request.get("CSeq"))
        if 100 < status < 300:
            for route in request.get_all("Record-Route"):
                response.add("Record-Route", route)
        if contact:
            tcp = ";transport=tcp" if source in self._streams else ""
            response.add("Contact", f"<sip:pipecat@{self._contact_host(source)}:{self.port}{tcp}>")
        if status in (200, 405):
            response.add("Allow", ", ".join(ALLOWED_METHODS))
        if unsupported:
            response.add("Unsupported", unsupported)
        if status == 200 and request.method in ("INVITE", "OPTIONS"):
            response.add("Supported", ", ".join(SUPPORTED_EXTENSIONS))
            response.add("Accept", "application/sdp")
        response.add("Server", self.config.user_agent)
        if body is not None:
            response.add("Content-Type", "application/sdp")
            response.body = body.encode()
        return response

    def _respond(self, request: SIPRequest, source: tuple[str, int], status: int, **kwargs) -> SIPResponse:
        response = self._response(request, source, status, **kwargs)
        destination = self._response_destination(request, source)
        data = self._send(response, destination)
        key = (parse_via(request.get_all("Via")[0]).branch, request.method)
        if key[0]:
            self._responses[key] = (data, destination)
            asyncio.get_running_loop().call_later(RESPONSE_CACHE_SECS, self._responses.pop, key, None)
        return response

    def _contact_host(self, source: tuple[str, int]) -> str:
        if self.config.advertised_host:
            return self.config.advertised_host
        if self.address and self.address[0] not in ("0.0.0.0", "::"):
            return self.address[0]
        return _local_ip_for(source[0])

    # --- requests -------------------------------------------------------------------------------

    def _on_request(self, request: SIPRequest, source: tuple[str, int]) -> None:
        branch = parse_via(request.get_all("Via")[0]).branch
        if request.method != "ACK" and (branch, request.method) in self._responses:
            data, destination = self._responses[(branch, request.method)]  # a retransmission
            self._send_raw(data, destination)
            return
        if not self.config.allows(source[0]):
            if request.method != "ACK":
                self._respond(request, source, 403)
                if request.method == "INVITE":
                    self._log_rejected(request, source, "rejected 403 (peer not allowed)")
            return
        required = [o for o in request.get_all("Require") if o.lower() not in SUPPORTED_EXTENSIONS]
        if required and request.method not in ("ACK", "CANCEL"):
            self._respond(request, source, 420, unsupported=", ".join(required))
            return
        handler = getattr(self, f"_on_{request.method.lower()}", None)
        if request.method in ALLOWED_METHODS and handler is not None:
            handler(request, source)
        elif request.method in KNOWN_NOT_ALLOWED:
            self._respond(request, source, 405)
        else:
            self._respond(request, source, 501)

    def _dialog(self, request: SIPRequest) -> SIPCall | None:
        call = self.calls.get(request.call_id)
        if call is None or not call.active or parse_address(request.get("To")).tag != call.local_tag:
            return None  # unknown or terminated dialog (retransmissions were answered from the cache)
        return call

    def _log_rejected(self, request: SIPRequest, source: tuple[str, int], outcome: str) -> None:
        caller = parse_address(request.get("From")).uri
        logger.info(f"call {request.call_id} from {caller} at {source[0]}:{source[1]}: {outcome}")

    def _on_invite(self, request: SIPRequest, source: tuple[str, int]) -> None:
        if parse_address(request.get("To")).tag:
            self._on_reinvite(request, source)
            return
        if request.call_id in self.calls:  # same Call-ID, new branch: a forked/looped copy
            self._respond(request, source, 482)
            return
        if self.active_calls >= self.config.max_calls:
            self._respond(request, source, 503, reason="Service Unavailable (call limit reached)")
            self._log_rejected(request, source, f"rejected 503 (call limit {self.config.max_calls})")
            return
        self._respond(request, source, 100)
        call = SIPCall(server=self, invite=request, source=source)
        self.calls[call.call_id] = call
        self._spawn(self._setup_call(call, request, source))

    async def _setup_call(self, call: SIPCall, request: SIPRequest, source: tuple[str, int]) -> None:
        host = self._contact_host(source)
        bind = self.address[0] if self.address else host
        try:
            _, rtp_port = await call.rtp.open(host=bind, ports=self.config.rtp_ports)
            if call.state != "ringing":  # cancelled meanwhile
                call.rtp.close()
                return
            call.sdp = SDPBuilder(address=host)
            if request.body:
                answer, call.negotiated = call.sdp.answer(parse_sdp(request.body), port=rtp_port)
            else:
                answer, call.offer_in_ack = call.sdp.offer(port=rtp_port), True
        except SDPError as exc:
            self._respond(request, source, 488, to_tag=call.local_tag)
            self._end(call, f"rejected 488 ({exc})")
            return
        except OSError as exc:
            self._respond(request, source, 503, to_tag=call.local_tag, reason="Service Unavailable (no RTP port)")
            self._end(call, f"rejected 503 (no RTP port: {exc})")
            return
        if self.config.send_ringing:
            self._respond(request, source, 180, to_tag=call.local_tag, contact=True)
        if self.config.ring_secs > 0:
            await asyncio.sleep(self.config.ring_secs)
        if call.state != "ringing":
            return  # cancelled while ringing
        self._answer(call, request, source, answer)

    def _answer(self, call: SIPCall, request: SIPRequest, source: tuple[str, int], answer: str) -> None:
        response = self._respond(request, source, 200, to_tag=call.local_tag, body=answer, contact=True)
        call.state, call.answered_at = "answered", time.time()
        if call.negotiated is not None:
            call.rtp.configure(call.negotiated)
            call.rtp.start()
        call._spawn(self._retransmit_2xx(call, response, self._response_destination(request, source)))
        if self.config.max_call_secs:
            call._timers.append(asyncio.get_running_loop().call_later(
                self.config.max_call_secs, lambda: call._spawn(self.hangup(call, "max call length"))))
        if self.config.rtp_timeout_secs:
            call._spawn(self._watch_rtp(call, self.config.rtp_timeout_secs))
        if self.on_call is not None:
            self._spawn(self._run_application(call))

    async def _retransmit_2xx(self, call: SIPCall, response: SIPResponse, destination: tuple[str, int]) -> None:
        """Resend the 2xx at T1, 2·T1, … capped at T2 until the ACK; after 64·T1 give up with a BYE."""
        data, interval, waited = response.to_bytes(), self.config.t1, 0.0
        while waited < 64 * self.config.t1:
            try:
                await asyncio.wait_for(asyncio.shield(call.confirmed.wait()), interval)
                return
            except asyncio.TimeoutError:
                pass
            if not call.active:
                return
            waited += interval
            self._send_raw(data, destination)
            interval = min(interval * 2, self.config.t2)
        if call.active and not call.confirmed.is_set():
            call.confirmed.set()  # let the BYE go out (RFC 3261 §13.3.1.4)
            await self.hangup(call, "no ACK")

    async def _watch_rtp(self, call: SIPCall, timeout: float) -> None:
        """BYE when the caller should be sending RTP but nothing arrived for ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while call.active:
            await asyncio.sleep(min(timeout / 4, 5.0))
            n = call.negotiated
            expecting = n is not None and n.direction in ("sendrecv", "recvonly")
            last = max(call.rtp.last_received or 0.0, quiet_since)
            if not expecting:
                quiet_since = loop.time()  # on hold: the clock starts again when the call resumes
            elif loop.time() - last > timeout and call.active:
                await self.hangup(call, f"RTP timeout ({timeout:g} s without media)")
                return

    async def _run_application(self, call: SIPCall) -> None:
        try:
            await self.on_call(call)
        except Exception:
            logger.exception(f"call {call.call_id}: application failed")
        finally:
            if call.active:
                await self.hangup(call, "application finished")

    def _on_ack(self, request: SIPRequest, source: tuple[str, int]) -> None:
        call = self._dialog(request)
        if call is None or call.state not in ("answered", "confirmed"):
            return  # the ACK of a non-2xx final response, or a stray one: absorbed
        if call.offer_in_ack and request.body:
            try:
                call.negotiated = read_answer(parse_sdp(request.body))
                call.offer_in_ack = False
                call.rtp.configure(call.negotiated)
                call.rtp.start()
            except SDPError as exc:
                logger.warning(f"call {call.call_id}: unusable SDP answer in the ACK ({exc})")
                call.confirmed.set()
                call._spawn(self.hangup(call, f"bad SDP answer in ACK ({exc})"))
                return
        if call.state == "answered":
            call.state = "confirmed"
        call.confirmed.set()

    def _on_cancel(self, request: SIPRequest, source: tuple[str, int]) -> None:
        call = self.calls.get(request.call_id)
        branch = parse_via(request.get_all("Via")[0]).branch
        if call is None or parse_via(call.invite.get_all("Via")[0]).branch != branch:
            self._respond(request, source, 481)
            return
        self._respond(request, source, 200, to_tag=call.local_tag)
        if call.state == "ringing":
            self._respond(call.invite, call.remote_address, 487, to_tag=call.local_tag)
            self._end(call, "cancelled by caller")

    def _on_bye(self, request: SIPRequest, source: tuple[str, int]) -> None:
        call = self._dialog(request)
        if call is None:
            self._respond(request, source, 481)
            return
        self._respond(request, source, 200)
        if call.active:
            call.confirmed.set()
            self._end(call, "caller hung up")

    def _on_options(self, request: SIPRequest, source: tuple[str, int]) -> None:
        if parse_address(request.get("To")).tag and self._dialog(request) is None:
            self._respond(request, source, 481)
            return
        call = self._dialog(request)
        self._respond(request, source, 200, to_tag=call.local_tag if call else None)

    def _on_info(self, request: SIPRequest, source: tuple[str, int]) -> None:
        call = self._dialog(request)
        if call is None:
            self._respond(request, source, 481)
            return
        self._respond(request, source, 200)
        if "dtmf-relay" in (request.get("Content-Type") or "").lower():
            for line in request.body.decode("utf-8", errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key.strip().lower() == "signal" and value.strip():
                    digit = value.strip()[0].upper()
                    call.rtp.stats.dtmf_digits += digit
                    call.rtp._emit("dtmf", digit)

    def _session_update(self, call: SIPCall, request: SIPRequest) -> str | None:
        """Our SDP for a re-INVITE/UPDATE: the answer to a new offer, else the current description."""
        if request.body and call.sdp is not None:
            answer, negotiated = call.sdp.answer(parse_sdp(request.body), port=call.rtp.local_address[1])
            call.negotiated = negotiated
            call.rtp.configure(negotiated)
            call.rtp.start()
            return answer
        return call.sdp.repeat() if call.sdp else None

    def _on_reinvite(self, request: SIPRequest, source: tuple[str, int]) -> None:
        call = self._dialog(request)
        if call is None or not call.active:
            self._respond(request, source, 481)
            return
        try:
            body = self._session_update(call, request)
        except SDPError:
            self._respond(request, source, 488)
            return
        call.confirmed.clear()
        response = self._respond(request, source, 200, body=body, contact=True)
        call._spawn(self._retransmit_reinvite(call, response, self._response_destination(request, source)))

    async def _retransmit_reinvite(self, call: SIPCall, response: SIPResponse, destination) -> None:
        data, interval, waited = response.to_bytes(), self.config.t1, 0.0
        while waited < 64 * self.config.t1 and call.active:
            try:
                await asyncio.wait_for(asyncio.shield(call.confirmed.wait()), interval)
                return
            except asyncio.TimeoutError:
                waited += interval
                self._send_raw(data, destination)
                interval = min(interval * 2, self.config.t2)
        call.confirmed.set()

    def _on_update(self, request: SIPRequest, source: tuple[str, int]) -> None:
        call = self._dialog(request)
        if call is None or not call.active:
            self._respond(request, source, 481)
            return
        try:
            body = self._session_update(call, request) if request.body else None
        except SDPError:
            self._respond(request, source, 488)
            return
        self._respond(request, source, 200, body=body, contact=True)

    # --- our requests -----------------------------------------------------------------------------

    async def hangup(self, call: SIPCall, reason: str) -> None:
        """Send BYE for an answered call (waiting for the ACK first) and end it."""
        if not call.active:
            return
        if call.state == "ringing":
            self._respond(call.invite, call.remote_address, 480, to_tag=call.local_tag)
            self._end(call, f"not answered ({reason})")
            return
        if not call.confirmed.is_set():
            await call.confirmed.wait()
            if not call.active:
                return
        bye, destination = self._bye(call)
        self._end(call, reason)
        self._spawn(self._client_transaction(bye, destination))

    def _bye(self, call: SIPCall) -> tuple[SIPRequest, tuple[str, int]]:
        call.local_cseq = max(call.local_cseq + 1, 1)
        bye = SIPRequest(method="BYE", uri=call.remote_target)
        host = self._contact_host(call.remote_address)
        protocol = "TCP" if call.remote_address in self._streams and not call.route_set else "UDP"
        bye.add("Via", f"SIP/2.0/{protocol} {host}:{self.port};branch={_branch()};rport")
        bye.add("Max-Forwards", "70")
        for route in call.route_set:
            bye.add("Route", route)
        to = parse_address(call.invite.get("To"))
        to.params["tag"] = call.local_tag
        bye.add("From", str(to))
        bye.add("To", call.invite.get("From"))
        bye.add("Call-ID", call.call_id)
        bye.add("CSeq", f"{call.local_cseq} BYE")
        bye.add("User-Agent", self.config.user_agent)
        if call.route_set:
            host, port = uri_host_port(parse_address(call.route_set[0]).uri)
            destination = (host, port or 5060)
        else:  # no proxy: back to where the INVITE came from (NAT-safe, like force_rport)
            destination = call.remote_address
        return bye, destination

    async def _client_transaction(self, request: SIPRequest, destination: tuple[str, int]) -> int | None:
        """Send a non-INVITE request, retransmitting (T1 doubling to T2) until a final response or 64·T1."""
        key = (request.call_id, request.cseq[0], request.method)
        future = asyncio.get_running_loop().create_future()
        self._client[key] = future
        interval, waited = self.config.t1, 0.0
        try:
            if destination[0] and not destination[0][0].isdigit() and ":" not in destination[0]:
                infos = await asyncio.get_running_loop().getaddrinfo(destination[0], destination[1],
                                                                     type=socket.SOCK_DGRAM)
                destination = infos[0][4][:2]
            data = request.to_bytes()
            while waited < 64 * self.config.t1:
                self._send_raw(data, destination)
                try:
                    return await asyncio.wait_for(asyncio.shield(future), interval)
                except asyncio.TimeoutError:
                    waited += interval
                    interval = min(interval * 2, self.config.t2)
            logger.info(f"call {request.call_id}: no response to our {request.method}")
            return None
        finally:
            self._client.pop(key, None)

    def _on_response(self, response: SIPResponse) -> None:
        number, method = response.cseq
        future = self._client.get((response.call_id, number, method))
        if future is not None and not future.done() and response.status >= 200:
            future.set_result(response.status)

    # --- ending -------------------------------------------------------------------------------------

    def _end(self, call: SIPCall, outcome: str) -> None:
        if not call.active:
            return
        call.state, call.outcome, call.ended_at = "ended", outcome, time.time()
        for timer in call._timers:
            timer.cancel()
        current = asyncio.current_task()
        for task in list(call._tasks):  # retransmissions and watchers of this call
            if task is not current:
                task.cancel()
        call.rtp.close()
        call.ended.set()
        call.confirmed.set()
        self._log_call(call)
        for callback in call._ended_callbacks:
            call._spawn(call._run_callback(callback))
        asyncio.get_running_loop().call_later(RESPONSE_CACHE_SECS, self._forget, call)

    def _forget(self, call: SIPCall) -> None:
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]

    def _log_call(self, call: SIPCall) -> None:
        talk = f"{call.ended_at - call.answered_at:.1f}s" if call.answered_at else "-"
        codec = call.negotiated.codec if call.negotiated else "-"
        s = call.rtp.stats
        logger.info(
            f"call {call.call_id} from {call.caller_uri} at {call.remote_address[0]}:{call.remote_address[1]}: "
            f"{call.outcome}; duration {talk}, {codec}, rtp in {s.packets_in} out {s.packets_out} "
            f"ignored {s.ignored}, dtmf {s.dtmf_digits or '-'}")


__all__ = ["SIPCall", "SIPConfig", "SIPUserAgentServer"]

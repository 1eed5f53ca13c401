"""An asyncio SIP user-agent server over UDP and TCP (RFC 3261): the call policy and method routing.

INVITE → 100 Trying, 180 Ringing (optional), 200 OK with the SDP answer (or our offer when the INVITE
has none, the answer then comes in the ACK). The 200 is retransmitted from T1 = 0.5 s doubling to T2 = 4 s
until the ACK; without one after 64·T1 = 32 s the call is ended with a BYE. BYE from either side (ours
follows the route set); CANCEL → 200 and 487; OPTIONS → 200 (503 while full); re-INVITE/UPDATE → 200 with
the current SDP; INFO → 200 (``application/dtmf-relay`` digits become DTMF events); other methods → 405 or
501; requests for unknown dialogs → 481. Responses go to the request's source address when the top Via asks
for ``rport`` (RFC 3581), and carry a To-tag except 100.

Policy comes before any application work: peers outside ``allowed_peers`` get 403, calls beyond
``max_calls`` or refused by the ``admission`` (the STT engine's reservation) get 503 with Retry-After, so
the application callback (which builds the pipeline) only runs for calls that can be served. Every request
is answered or dropped, every failed set-up releases what it took, and every call ends with one log line
saying how it ended.

The layers below: ``wire`` (bytes ↔ messages, transport limits), ``transaction`` (retransmissions),
``responder`` (building and sending responses), ``dialog`` (calls, 2xx retransmission, BYE).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from loguru import logger

from .config import SIPConfig
from .dialog import Dialogs, SIPCall, build_bye, retransmit_until_ack
from .message import SIPMessage, SIPParseError, SIPRequest, parse_address
from .responder import ALLOWED_METHODS, SUPPORTED_EXTENSIONS, Responder
from .rtp import RtpSession
from .sdp import SDPBuilder, SDPError, parse_sdp, read_answer
from .transaction import ClientTransactions, ServerTransactions, server_key
from .wire import SIPWire

Address = tuple[str, int]
KNOWN_NOT_ALLOWED = ("REGISTER", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER", "PRACK")
RESPONSE_CACHE_SECS = 32.0
STOP_GRACE_SECS = 2.0  # how long stop() waits for cancelled applications to return
MAX_UDP_REQUEST = 32 * 1024  # a larger request over UDP gets 513: a 200 echoing it + SDP would not fit a datagram


def _size(message: SIPMessage) -> int:
    return sum(len(name) + len(value) + 4 for name, value in message.headers) + len(message.body)


OnCall = Callable[[SIPCall], Awaitable[None]]
OnRejected = Callable[[SIPRequest, Address, str], None]


class SIPUserAgentServer:
    """The SIP server: accepts calls under the policy in :class:`SIPConfig` and runs ``on_call``.

    ``on_call(call)`` runs as its own task once the 200 OK is sent; when it returns and the call is still
    up, the call is hung up. ``wire`` is injectable (tests pass a fake with ``send``, ``is_stream``,
    ``address``, ``start``, ``close``); the server sets its ``on_message`` and ``in_use`` hooks.

    ``on_rejected(invite, source, reason)``, when set, is told of every new INVITE refused by the policy before
    any call exists, just before the refusal is sent (for metrics that agree with what callers saw): ``reason`` is ``"forbidden"`` (403), ``"call_limit"`` (503, ``max_calls``)
    or the admission's ``refusal`` attribute when it has one (e.g. ``"draining"``), else ``"no_capacity"``.
    """

    def __init__(self, *, config: SIPConfig, on_call: OnCall | None = None, wire: SIPWire | None = None,
                 on_rejected: OnRejected | None = None):
        self.config = config
        self.on_call = on_call
        self.on_rejected = on_rejected
        self.wire = wire or SIPWire(config=config)
        self.wire.on_message = self.handle_message
        self.wire.in_use = self._carries_call
        self.dialogs = Dialogs(linger=RESPONSE_CACHE_SECS)
        self.transactions = ServerTransactions(send=self.wire.send, lifetime=RESPONSE_CACHE_SECS)
        self.client = ClientTransactions(send=self.wire.send, t1=config.t1, t2=config.t2)
        self.responses = Responder(config=config, wire=self.wire, transactions=self.transactions)
        self._tasks: set[asyncio.Task] = set()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> Address:
        """Bind the SIP socket(s); returns (host, port)."""
        return await self.wire.start()

    @property
    def address(self) -> Address | None:
        return self.wire.address

    @property
    def port(self) -> int:
        return self.address[1] if self.address else self.config.port

    @property
    def calls(self) -> dict[str, SIPCall]:
        """Calls by Call-ID (ended ones stay a little while)."""
        return self.dialogs.by_call_id

    @property
    def active_calls(self) -> int:
        """Calls counted against ``max_calls``: up, or ended while their application is still finishing."""
        return self.dialogs.occupied

    @property
    def full(self) -> bool:
        """No room for another call: ``max_calls`` reached or the admission has no capacity."""
        if self.active_calls >= self.config.max_calls:
            return True
        admission = self.config.admission
        return admission is not None and not admission.has_capacity

    def _why_full(self) -> str:
        """What OPTIONS' 503 says: the call limit, or the admission's ``unavailable`` ("draining", "lag"...)."""
        if self.active_calls >= self.config.max_calls:
            return "call limit reached"
        why = getattr(self.config.admission, "unavailable", None)
        return str(why).replace("_", " ") if why else "full"

    async def stop(self) -> None:
        """Hang up every call and close the sockets."""
        for call in self.dialogs.active:
            call.confirmed.set()  # no waiting for outstanding ACKs on the way out
            await self.hangup(call, "server stopped")
        await asyncio.sleep(0)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # applications end (and give their reservations back) in their finally blocks
            await asyncio.wait(tasks, timeout=STOP_GRACE_SECS)
        for call in self.dialogs.by_call_id.values():
            if call.application_running:  # an application that ignored the cancellation
                call.application_finished()
        self.transactions.close()
        await self.wire.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- messages -----------------------------------------------------------------------------

    def _secure(self, peer: Address) -> bool:
        """Whether ``peer`` is a TLS connection (a test's stand-in wire may not know TLS)."""
        is_secure = getattr(self.wire, "is_secure", None)
        return bool(is_secure and is_secure(peer))

    def _carries_call(self, peer: Address) -> bool:
        return any(call.remote_address == peer for call in self.dialogs.active)

    def handle_message(self, message: SIPMessage, source: Address) -> None:
        """Every well-formed message: answered (400 for bad values, 500 for our own bugs) or dropped."""
        try:
            if isinstance(message, SIPRequest):
                self._on_request(message, source)
            else:
                self.client.on_response(message)
        except (SIPParseError, SDPError) as exc:
            logger.warning(f"SIP {getattr(message, 'method', 'response')} from {source[0]}:{source[1]}: {exc}")
            self._answer_error(message, source, 400, f"Bad Request ({exc})")
        except Exception:
            logger.exception(f"SIP {getattr(message, 'method', 'response')} from {source[0]}:{source[1]} failed")
            self._answer_error(message, source, 500, None)

    def _answer_error(self, message: SIPMessage, source: Address, status: int, reason: str | None) -> None:
        if not isinstance(message, SIPRequest) or message.method == "ACK":
            return
        if reason is not None:
            reason = "".join(c for c in reason if 32 <= ord(c) < 127)[:120]
        try:
            self.responses.respond(message, source, status, reason=reason)
        except Exception:
            logger.debug(f"SIP {message.method} from {source[0]}:{source[1]}: no {status} could be addressed")

    def _on_request(self, request: SIPRequest, source: Address) -> None:
        if self.transactions.absorb(request):
            return  # a retransmission: its last response was re-sent
        if not self.wire.is_stream(source) and request.method != "ACK" and _size(request) > MAX_UDP_REQUEST:
            self.responses.respond(request, source, 513)  # our responses echo it and would not fit a datagram
            return
        if not self.config.allows(source[0]) and not self._in_our_dialog(request):
            if request.method != "ACK":
                if request.method == "INVITE":  # told first: whoever sees the 403 sees it counted
                    self._log_rejected(request, source, "rejected 403 (peer not allowed)", "forbidden")
                self.responses.respond(request, source, 403)
            return
        required = [o for o in request.get_all("Require") if o.lower() not in SUPPORTED_EXTENSIONS]
        if required and request.method not in ("ACK", "CANCEL"):
            self.responses.respond(request, source, 420, unsupported=", ".join(required)[:200])
            return
        handler = getattr(self, f"_on_{request.method.lower()}", None)
        if request.method in ALLOWED_METHODS and handler is not None:
            handler(request, source)
        elif request.method in KNOWN_NOT_ALLOWED:
            self.responses.respond(request, source, 405)
        else:
            self.responses.respond(request, source, 501)

    def _in_our_dialog(self, request: SIPRequest) -> bool:
        """An in-dialog request of a call we placed: its peer is whoever we called, allow-listed or not."""
        call = self.dialogs.find(request) if parse_address(request.get("To")).tag else None
        return call is not None and call.direction == "outbound"

    def _log_rejected(self, request: SIPRequest, source: Address, outcome: str, reason: str) -> None:
        caller = parse_address(request.get("From")).uri
        logger.info(f"call {request.call_id} from {caller} at {source[0]}:{source[1]}: {outcome}")
        if self.on_rejected is not None:
            try:
                self.on_rejected(request, source, reason)
            except Exception:
                logger.exception("on_rejected failed")

    # --- INVITE ---------------------------------------------------------------------------------

    def _on_invite(self, request: SIPRequest, source: Address) -> None:
        if parse_address(request.get("To")).tag:
            self._on_reinvite(request, source)
            return
        if request.call_id in self.dialogs:  # same Call-ID, new branch: a forked/looped copy
            self.responses.respond(request, source, 482)
            return
        if self.active_calls >= self.config.max_calls:
            self._log_rejected(request, source, f"rejected 503 (call limit {self.config.max_calls})", "call_limit")
            self.responses.respond(request, source, 503, reason="Service Unavailable (call limit reached)")
            return
        reservation = self._reserve()
        if self.config.admission is not None and reservation is None:
            why = str(getattr(self.config.admission, "refusal", None) or "no_capacity")
            said = why.replace("_", " ")
            self._log_rejected(request, source, f"rejected 503 (admission: {said})", why)
            self.responses.respond(request, source, 503, reason=f"Service Unavailable ({said})")
            return
        try:
            self.responses.respond(request, source, 100)
            rtp = RtpSession(signalling_host=source[0], source_allowed=self.config.allows)
            call = SIPCall(server=self, invite=request, source=source, rtp=rtp, reservation=reservation,
                           invite_key=server_key(request))
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        self.dialogs.add(call)
        call.spawn(self._setup_call(call, request, source))

    def _reserve(self):
        admission = self.config.admission
        if admission is None:
            return None
        try:
            return admission.try_reserve()
        except Exception:
            logger.exception("admission.try_reserve() failed; treating it as full")
            return None

    async def _setup_call(self, call: SIPCall, request: SIPRequest, source: Address) -> None:
        """RTP socket, SDP answer, 180, 200; any failure answers the INVITE and releases what was taken."""
        try:
            host = self.responses.contact_host(source)
            bind = self.address[0] if self.address else host
            _, rtp_port = await call.rtp.open(host=bind, ports=self.config.rtp_ports)
            if call.state != "ringing":  # cancelled meanwhile
                return
            call.sdp = SDPBuilder(address=host, codecs=self.config.codecs,
                                  srtp=self.config.srtp_policy(self._secure(source)))
            if request.body:
                answer, call.negotiated = call.sdp.answer(parse_sdp(request.body), port=rtp_port)
            else:
                answer, call.offer_in_ack = call.sdp.offer(port=rtp_port), True
            if self.config.send_ringing:
                self.responses.respond(request, source, 180, to_tag=call.local_tag, contact=True)
            if self.config.ring_secs > 0:
                await asyncio.sleep(self.config.ring_secs)
            if call.state != "ringing":
                return  # cancelled while ringing
            self._answer(call, request, source, answer)
        except SDPError as exc:
            self._reject(call, request, source, 488, f"rejected 488 ({exc})")
        except OSError as exc:
            self._reject(call, request, source, 503, f"rejected 503 (no RTP port: {exc})",
                         reason="Service Unavailable (no RTP port)")
        except Exception as exc:
            logger.exception(f"call {call.call_id}: set-up failed")
            self._reject(call, request, source, 500, f"rejected 500 (set-up failed: {type(exc).__name__})")

    def _reject(self, call: SIPCall, request: SIPRequest, source: Address, status: int, outcome: str,
                reason: str | None = None) -> None:
        if call.state == "ringing":
            try:
                self.responses.respond(request, source, status, to_tag=call.local_tag, reason=reason)
            except Exception:
                logger.exception(f"call {call.call_id}: the {status} could not be sent")
        self._end(call, outcome)

    def _answer(self, call: SIPCall, request: SIPRequest, source: Address, answer: str) -> None:
        response = self.responses.respond(request, source, 200, to_tag=call.local_tag, body=answer, contact=True)
        call.state, call.answered_at = "answered", time.time()
        if call.negotiated is not None:
            call.rtp.configure(call.negotiated)
            call.rtp.start()
        call.spawn(self._confirm(call, response.to_bytes(), self.responses.destination(request, source)))
        self.supervise(call)
        if self.on_call is not None:
            call.application_started()
            self._spawn(self._run_application(call))

    def supervise(self, call: SIPCall) -> None:
        """The call's limits: hung up after ``max_call_secs``, and after ``rtp_timeout_secs`` without media."""
        if self.config.max_call_secs:
            call.call_later(self.config.max_call_secs, lambda: call.spawn(self.hangup(call, "max call length")))
        if self.config.rtp_timeout_secs:
            call.spawn(self._watch_rtp(call, self.config.rtp_timeout_secs))

    def add_call(self, call: SIPCall) -> None:
        """A call placed by us (``uac``): its in-dialog requests (BYE, re-INVITE) are answered here."""
        self.dialogs.add(call)

    def end(self, call: SIPCall, outcome: str) -> None:
        """End ``call`` without signalling (its one log line is written)."""
        self._end(call, outcome)

    async def _confirm(self, call: SIPCall, data: bytes, destination: Address) -> None:
        """Retransmit the 200 until the ACK; without one after 64·T1, BYE (RFC 3261 §13.3.1.4)."""
        acked = await retransmit_until_ack(call, data, destination, self.wire.send, t1=self.config.t1,
                                           t2=self.config.t2)
        if not acked and call.active:
            call.confirmed.set()  # let the BYE go out
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
            try:
                if call.active:
                    await self.hangup(call, "application finished")
            finally:
                call.application_finished()  # only now the reservation goes back

    # --- in-dialog and other methods -------------------------------------------------------------

    def _on_ack(self, request: SIPRequest, source: Address) -> None:
        call = self.dialogs.find(request)
        if call is None or call.state not in ("answered", "confirmed"):
            return  # a stray ACK: absorbed
        if call.offer_in_ack and request.body:
            try:
                call.negotiated = call.sdp.read_answer(parse_sdp(request.body))
                call.offer_in_ack = False
                call.rtp.configure(call.negotiated)
                call.rtp.start()
            except SDPError as exc:
                logger.warning(f"call {call.call_id}: unusable SDP answer in the ACK ({exc})")
                call.confirmed.set()
                call.spawn(self.hangup(call, f"bad SDP answer in ACK ({exc})"))
                return
        if call.state == "answered":
            call.state = "confirmed"
        call.confirmed.set()

    def _on_cancel(self, request: SIPRequest, source: Address) -> None:
        call = self.dialogs.for_invite(server_key(request, method="INVITE"))
        if call is None or not call.active:
            self.responses.respond(request, source, 481)
            return
        self.responses.respond(request, source, 200, to_tag=call.local_tag)
        if call.state == "ringing":
            self.responses.respond(call.invite, call.remote_address, 487, to_tag=call.local_tag)
            self._end(call, "cancelled by caller")

    def _on_bye(self, request: SIPRequest, source: Address) -> None:
        call = self.dialogs.find(request)
        if call is None:
            self.responses.respond(request, source, 481)
            return
        self.responses.respond(request, source, 200)
        call.confirmed.set()
        self._end(call, "caller hung up" if call.direction == "inbound" else "callee hung up")

    def _on_options(self, request: SIPRequest, source: Address) -> None:
        if parse_address(request.get("To")).tag:
            call = self.dialogs.find(request)
            if call is None:
                self.responses.respond(request, source, 481)
            else:
                self.responses.respond(request, source, 200)
            return
        if self.full:  # so a proxy's health check (Kamailio dispatcher) stops routing calls here
            self.responses.respond(request, source, 503, reason=f"Service Unavailable ({self._why_full()})")
            return
        self.responses.respond(request, source, 200)

    def _on_info(self, request: SIPRequest, source: Address) -> None:
        call = self.dialogs.find(request)
        if call is None:
            self.responses.respond(request, source, 481)
            return
        self.responses.respond(request, source, 200)
        if "dtmf-relay" in (request.get("Content-Type") or "").lower():
            for line in request.body.decode("utf-8", errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key.strip().lower() == "signal" and value.strip():
                    call.rtp.report_dtmf(value.strip()[0].upper())

    def _session_update(self, call: SIPCall, request: SIPRequest) -> str | None:
        """Our SDP for a re-INVITE/UPDATE: the answer to a new offer, else the current description.

        A bad offer raises SDPError before anything of the call changes (its RTP socket stays as it is).
        """
        if request.body and call.sdp is not None and call.rtp.local_address is not None:
            answer, negotiated = call.sdp.answer(parse_sdp(request.body), port=call.rtp.local_address[1])
            call.negotiated = negotiated
            call.rtp.configure(negotiated)
            call.rtp.start()
            return answer
        return call.sdp.repeat() if call.sdp else None

    def _on_reinvite(self, request: SIPRequest, source: Address) -> None:
        call = self.dialogs.find(request)
        if call is None:
            self.responses.respond(request, source, 481)
            return
        try:
            body = self._session_update(call, request)
        except SDPError as exc:
            logger.info(f"call {call.call_id}: re-INVITE refused 488 ({exc}); the call goes on")
            self.responses.respond(request, source, 488)
            return
        call.confirmed.clear()
        response = self.responses.respond(request, source, 200, body=body, contact=True)
        call.spawn(self._confirm_reinvite(call, response.to_bytes(), self.responses.destination(request, source)))

    async def _confirm_reinvite(self, call: SIPCall, data: bytes, destination: Address) -> None:
        await retransmit_until_ack(call, data, destination, self.wire.send, t1=self.config.t1, t2=self.config.t2)
        call.confirmed.set()

    def _on_update(self, request: SIPRequest, source: Address) -> None:
        call = self.dialogs.find(request)
        if call is None:
            self.responses.respond(request, source, 481)
            return
        try:
            body = self._session_update(call, request) if request.body else None
        except SDPError as exc:
            logger.info(f"call {call.call_id}: UPDATE refused 488 ({exc}); the call goes on")
            self.responses.respond(request, source, 488)
            return
        self.responses.respond(request, source, 200, body=body, contact=True)

    # --- our requests -----------------------------------------------------------------------------

    async def hangup(self, call: SIPCall, reason: str) -> None:
        """Send BYE for an answered call (waiting for the ACK first) and end it; 480 for a ringing one."""
        if not call.active:
            return
        if call.state == "ringing":
            self._reject(call, call.invite, call.remote_address, 480, f"not answered ({reason})")
            return
        if not call.confirmed.is_set():
            await call.confirmed.wait()
            if not call.active:
                return
        protocol, via_port = "UDP", self.port
        if self.wire.is_stream(call.remote_address) and not call.route_set:
            protocol = "TLS" if self._secure(call.remote_address) else "TCP"
            via_port = self.wire.port_for(call.remote_address) if protocol == "TLS" else self.port
        bye, destination = build_bye(call, via_host=self.responses.contact_host(call.remote_address), via_port=via_port,
                                     protocol=protocol, user_agent=self.config.user_agent)
        self._end(call, reason)
        self._spawn(self.client.request(bye, destination))

    # --- ending -------------------------------------------------------------------------------------

    def _end(self, call: SIPCall, outcome: str) -> None:
        if call.finish(outcome):
            logger.info(call.summary())
            self.dialogs.forget_later(call)


__all__ = ["OnCall", "SIPCall", "SIPConfig", "SIPUserAgentServer"]

"""Outbound calls (RFC 3261 §13.2, the UAC): dial a SIP URI and get the same :class:`SIPCall` as an inbound call.

``SIPUserAgentClient(uas=server).dial("sip:alice@192.0.2.7")`` sends our INVITE (the ``SDPBuilder`` offer:
PCMU, PCMA, telephone-event) from the server's own socket, straight to the URI's host or through an
outbound proxy (a pre-loaded ``Route: <sip:proxy;lr>``), answers a 401/407 with digest credentials once, follows
the provisional responses, CANCELs when nobody answers within ``ring_timeout``, acknowledges the final response
(the transaction ACKs a non-2xx, the dialog a 2xx) and builds the dialog: route set from Record-Route, remote
target from Contact. An answered call is a :class:`SIPCall` the server knows: the peer's BYE, re-INVITE and
INFO are answered like those of an inbound call, ``SIPCallTransport(call=result.call)`` runs the pipeline, and an
``EndFrame`` (or ``call.hangup()``) sends our BYE. The outcome is a :class:`CallResult`; every dial logs one line.

``sips:`` targets (or ``;transport=tls``, or a ``sips:`` outbound proxy) go over TLS: a connection opened with
``tls.client_context`` (the peer's certificate and name verified unless ``tls_verify=False``; ``tls_ca`` for a
private CA), our Via says TLS, our Contact is ``sips:`` at our TLS port, the offer is SDES-SRTP (RTP/SAVP, as
``config.srtp_policy(secure=True)`` says: required unless the server's policy is set otherwise), and every
request of the call (ACK, BYE) goes on that connection. A certificate that does not verify is a ``failed``
outcome that says so; nothing is sent in clear.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from .dialog import SIPCall, build_ack, new_tag
from .digest import Credentials, DigestClient, SIPAuthError
from .message import SIPRequest, SIPResponse
from .outgoing import (SIPTargetError, TLSConnectError, TLSConnector, contact_uri, is_secure, new_call_id,
                       new_request, resolve, sip_uri)
from .rtp import RtpSession
from .sdp import SDPBuilder, SDPError, parse_sdp
from .transaction import InviteClientTransaction
from .uas import SIPUserAgentServer

Address = tuple[str, int]
BUSY = (486, 600)
NO_ANSWER = (408, 480, 487)
MAX_AUTH_ROUNDS = 3  # a 401 and a 407 (registrar and proxy) may both come; a third challenge is a refusal


@dataclass(frozen=True)
class CallResult:
    """How a dial ended: ``outcome`` is ``answered``, ``busy`` (486/600), ``no_answer`` (our ring timeout and
    CANCEL, 408, 480), ``rejected`` (any other final status, or refused credentials) or ``failed`` (no response,
    a name that does not resolve, no RTP port, an unusable answer). ``call`` is set when answered."""

    outcome: str
    status: int | None = None
    reason: str = ""
    call: SIPCall | None = None

    @property
    def answered(self) -> bool:
        return self.outcome == "answered"

    def __str__(self) -> str:
        code = f"{self.status} " if self.status else ""
        return f"{self.outcome.replace('_', ' ')}" + (f" ({code}{self.reason})" if code or self.reason else "")


def _outcome(status: int, cancelled: bool) -> str:
    if status in BUSY:
        return "busy"
    if status in NO_ANSWER and (status != 487 or cancelled):
        return "no_answer"
    return "rejected"


class SIPUserAgentClient:
    """Places calls from a running :class:`SIPUserAgentServer` (its socket, transactions and dialogs).

    Parameters:
        uas: The started server; answered calls join its dialogs (so in-dialog requests reach them).
        credentials: For digest challenges (401/407) on the INVITE; None answers none.
        outbound_proxy: ``host[:port]`` or ``sip:`` URI every INVITE goes through (pre-loaded Route); None: the
            Request-URI's host.
        from_uri: Our identity (From), e.g. ``sip:bot@pbx.example.com``; by default ``sip:USER@our-address``.
        display_name: Display name in From.
        user: User part of our Contact.
        tls_ca: CA file or directory that a TLS peer's certificate must chain to (None: the system's CAs).
        tls_verify: Verify a TLS peer's certificate and name (False only for a lab peer; logged as a warning).
    """

    def __init__(self, *, uas: SIPUserAgentServer, credentials: Credentials | None = None,
                 outbound_proxy: str | None = None, from_uri: str | None = None, display_name: str | None = None,
                 user: str = "pipecat", tls_ca: str | Path | None = None, tls_verify: bool = True):
        self.uas = uas
        self.credentials = credentials
        self.outbound_proxy = sip_uri(outbound_proxy) if outbound_proxy else None
        self.from_uri = sip_uri(from_uri) if from_uri else None
        self.display_name = display_name
        self.user = user
        self._tls = TLSConnector(uas.wire, ca=tls_ca, verify=tls_verify)
        self._tasks: set[asyncio.Task] = set()

    async def dial(self, uri: str, *, ring_timeout: float = 60.0) -> CallResult:
        """Call ``uri`` and wait until it is answered, refused or given up (``ring_timeout`` s of ringing)."""
        try:
            uri = sip_uri(uri)
            next_hop = self.outbound_proxy or uri
            destination = await resolve(next_hop)
        except SIPTargetError as exc:
            return self._log(CallResult("failed", reason=str(exc)), uri, "-")
        secure = is_secure(next_hop) or is_secure(uri)
        if secure:
            try:
                destination = await self._tls.connect(next_hop, destination)
            except TLSConnectError as exc:
                return self._log(CallResult("failed", reason=str(exc)), uri, "-")
        rtp = RtpSession(signalling_host=destination[0], source_allowed=lambda ip: True)  # we chose this peer
        result = CallResult("failed", reason="not placed")
        call_id = "-"
        try:
            host = self.uas.responses.contact_host(destination)
            bind = self.uas.address[0] if self.uas.address else host
            _, rtp_port = await rtp.open(host=bind, ports=self.uas.config.rtp_ports)
            sdp = SDPBuilder(address=host, codecs=self.uas.config.codecs,  # what inbound calls accept
                             srtp=self.uas.config.srtp_policy(secure))
            call_id = new_call_id(host)
            result = await self._invite(uri, destination, host, call_id, sdp, sdp.offer(port=rtp_port), rtp,
                                        ring_timeout, secure)
        except OSError as exc:
            result = CallResult("failed", reason=f"no RTP port ({exc})")
        finally:
            if not result.answered:
                rtp.close()
        return self._log(result, uri, call_id)

    def _log(self, result: CallResult, uri: str, call_id: str) -> CallResult:
        logger.info(f"call {call_id} to {uri}: {result}")
        return result

    async def _invite(self, uri: str, destination: Address, host: str, call_id: str, sdp: SDPBuilder, offer: str,
                      rtp: RtpSession, ring_timeout: float, secure: bool) -> CallResult:
        port = self.uas.wire.port_for(destination)  # our TLS listener's port on a TLS connection
        ours = self.from_uri or contact_uri(self.user, host, port)
        name = f'"{self.display_name}" ' if self.display_name else ""
        from_ = f"{name}<{ours}>;tag={new_tag()}"
        routes = [f"<{self.outbound_proxy};lr>"] if self.outbound_proxy else []
        digest = DigestClient(self.credentials)
        deadline = asyncio.get_running_loop().time() + ring_timeout
        for cseq in range(1, MAX_AUTH_ROUNDS + 2):
            invite = new_request("INVITE", uri, via=(host, port), from_=from_, to=f"<{uri}>", call_id=call_id,
                                 cseq=cseq, contact=f"<{contact_uri(self.user, host, port, secure=secure)}>",
                                 user_agent=self.uas.config.user_agent, routes=routes,
                                 transport="TLS" if secure else "UDP")
            for header, value in digest.headers("INVITE", uri):
                invite.add(header, value)
            invite.add("Allow", "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, UPDATE")
            invite.add("Content-Type", "application/sdp")
            invite.body = offer.encode()
            transaction = self.uas.client.invite(invite, destination)
            response = await self._await_final(transaction, deadline)
            if isinstance(response, CallResult):
                return response
            if response.status in (401, 407) and cseq <= MAX_AUTH_ROUNDS:
                try:
                    digest.challenged(response)
                except SIPAuthError as exc:
                    return CallResult("rejected", response.status, str(exc).removeprefix(f"{response.status} "))
                continue
            if response.status >= 300:
                return CallResult(_outcome(response.status, False), response.status, response.reason)
            return self._answered(transaction, response, destination, host, sdp, rtp)
        return CallResult("rejected", reason="too many challenges")

    async def _await_final(self, transaction: InviteClientTransaction, deadline: float) -> SIPResponse | CallResult:
        """The final response (2xx or non-2xx); after ``deadline`` a CANCEL (once a provisional came) and the
        outcome of that."""
        loop = asyncio.get_running_loop()
        cancelled = cancel_sent = False
        while True:
            timeout = None if cancelled else max(0.0, deadline - loop.time())
            try:
                response = await transaction.next(timeout)
            except asyncio.TimeoutError:
                cancelled = True
                if transaction.provisional_received and not cancel_sent:
                    cancel_sent = self._cancel(transaction.request, transaction.destination)
                continue  # without a provisional, CANCEL waits for one (RFC 3261 §9.1); timer B ends it
            if response is None:
                transaction.close()
                if cancelled and transaction.provisional_received:
                    return CallResult("no_answer", reason="no answer, and no response to our CANCEL")
                return CallResult("failed", reason=f"no response from {transaction.destination[0]}:"
                                                   f"{transaction.destination[1]}")
            if response.status < 200:
                if cancelled and not cancel_sent:
                    cancel_sent = self._cancel(transaction.request, transaction.destination)
                continue
            if cancelled:
                if response.status < 300:  # answered just as we cancelled: ACK it, then BYE
                    call = self._answered(transaction, response, transaction.destination,
                                          self.uas.responses.contact_host(transaction.destination), None, None)
                    if call.call is not None:
                        await call.call.hangup("not answered in time")
                return CallResult("no_answer", response.status if response.status != 487 else None,
                                  "not answered in time, cancelled")
            return response

    def _cancel(self, invite: SIPRequest, destination: Address) -> bool:
        """CANCEL our INVITE (RFC 3261 §9.1: its Request-URI, top Via, Route, From, To, Call-ID, CSeq number)."""
        cancel = SIPRequest(method="CANCEL", uri=invite.uri)
        cancel.add("Via", invite.get_all("Via")[0])
        cancel.add("Max-Forwards", "70")
        for route in invite.get_all("Route"):
            cancel.add("Route", route)
        for header in ("From", "To", "Call-ID"):
            cancel.add(header, invite.get(header))
        cancel.add("CSeq", f"{invite.cseq[0]} CANCEL")
        cancel.add("User-Agent", self.uas.config.user_agent)
        task = asyncio.get_running_loop().create_task(self.uas.client.send(cancel, destination))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _answered(self, transaction: InviteClientTransaction, response: SIPResponse, destination: Address,
                  host: str, sdp: SDPBuilder | None, rtp: RtpSession | None) -> CallResult:
        """ACK the 2xx and build the call; an unusable SDP answer is ACKed and then hung up."""
        rtp = rtp or RtpSession(signalling_host=destination[0], source_allowed=lambda ip: True)
        call = SIPCall.outbound(server=self.uas, invite=transaction.request, answer=response,
                                destination=destination, rtp=rtp)
        ack, ack_destination = build_ack(call, via_host=host, via_port=self.uas.wire.port_for(destination),
                                         protocol=self.uas.wire.transport_of(destination).upper(),
                                         user_agent=self.uas.config.user_agent)
        transaction.acknowledge(response, ack.to_bytes(), ack_destination)
        call.sdp = sdp
        call.state, call.answered_at = "confirmed", time.time()
        call.confirmed.set()
        self.uas.add_call(call)
        if sdp is None:
            return CallResult("answered", response.status, response.reason, call)
        try:
            call.negotiated = sdp.read_answer(parse_sdp(response.body))
        except SDPError as exc:
            call.spawn(call.hangup(f"unusable SDP answer ({exc})"))
            return CallResult("failed", response.status, f"unusable SDP answer: {exc}")
        rtp.configure(call.negotiated)
        rtp.start()
        self.uas.supervise(call)
        return CallResult("answered", response.status, response.reason, call)


__all__ = ["CallResult", "SIPUserAgentClient"]

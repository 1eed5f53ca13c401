"""Dialogs (RFC 3261 §12): one :class:`SIPCall` per answered INVITE, found by Call-ID and both tags.

Also the dialog's own duties: retransmitting our 2xx until the ACK (§13.3.1.4, the TU's job, not the
transaction's) and building our BYE along the route set (§12.2.1.1). A call ends once, through
:meth:`SIPCall.finish`, which releases everything it holds: timers, tasks, the RTP socket and the admission
reservation.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from loguru import logger

from .admission import Reservation
from .message import SIPParseError, SIPRequest, SIPResponse, parse_address, split_list, uri_host_port
from .rtp import RtpSession
from .sdp import Negotiated, SDPBuilder
from .wire import is_ip_literal

if TYPE_CHECKING:
    from .uas import SIPUserAgentServer

Address = tuple[str, int]


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


class SIPCall:
    """One call (dialog) answered by the server, with its RTP session and the caller's identity.

    Attributes: ``call_id``, ``caller_uri`` and ``caller_name`` (From), ``called_uri`` (To),
    ``remote_address`` (ip, port of the INVITE), ``rtp`` (:class:`RtpSession`), ``negotiated``
    (codec, payload types, direction), ``reservation`` (the admission's, released when the call ends),
    ``outcome`` once it ended, and the ``ended`` event. The INVITE's headers were checked by the parser.
    """

    def __init__(self, *, server: SIPUserAgentServer, invite: SIPRequest, source: Address, rtp: RtpSession,
                 reservation: Reservation | None = None, invite_key: tuple = ()):
        caller = parse_address(invite.get("From"))
        self.server = server
        self.invite = invite
        self.invite_key = invite_key
        self.call_id = invite.call_id
        self.caller_uri = caller.uri
        self.caller_name = caller.display_name
        self.called_uri = parse_address(invite.get("To")).uri
        asserted = split_list(invite.get("P-Asserted-Identity") or "")
        self.asserted_identity = parse_address(asserted[0]).uri if asserted else None
        self.remote_address = source
        self.pinned = False  # True: in-dialog requests go to remote_address whatever the route set (our TLS link)
        self.remote_tag = caller.tag or ""
        self.local_tag = new_tag()
        contact = [c for c in invite.get_all("Contact") if c != "*"]
        self.remote_target = parse_address(contact[0]).uri if contact else caller.uri
        self.route_set = invite.get_all("Record-Route")
        self.remote_cseq = invite.cseq[0]
        self.local_cseq = 0
        self.direction = "inbound"
        # What our in-dialog requests carry: From (us, with our tag) and To (the peer, with its tag)
        to = parse_address(invite.get("To"))
        to.params["tag"] = self.local_tag
        self.local_party, self.remote_party = str(to), invite.get("From")
        self.rtp = rtp
        self.reservation = reservation
        self.application_running = False
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

    @classmethod
    def outbound(cls, *, server: SIPUserAgentServer, invite: SIPRequest, answer: SIPResponse,
                 destination: Address, rtp: RtpSession) -> SIPCall:
        """The dialog of a call we placed (RFC 3261 §12.1.2), from our INVITE and the 2xx that answered it:
        the route set is the 2xx's Record-Route reversed, the remote target its Contact. In-dialog requests go
        to the first route, else to the remote target when it is an IP literal, else where the INVITE went."""
        call = cls(server=server, invite=invite, source=destination, rtp=rtp)
        ours, theirs = parse_address(invite.get("From")), parse_address(answer.get("To"))
        call.direction = "outbound"
        call.caller_uri, call.caller_name, call.called_uri = ours.uri, ours.display_name, theirs.uri
        call.local_tag, call.remote_tag = ours.tag or "", theirs.tag or ""
        call.local_party, call.remote_party = invite.get("From"), answer.get("To")
        contact = [c for c in answer.get_all("Contact") if c != "*"]
        call.remote_target = parse_address(contact[0]).uri if contact else invite.uri
        call.route_set = list(reversed(answer.get_all("Record-Route")))
        call.remote_cseq, call.local_cseq = 0, invite.cseq[0]
        if server.wire.is_stream(destination):
            call.pinned = True  # a connection we opened (TLS): every request of the call goes on it
        elif not call.route_set:
            try:
                host, port = uri_host_port(call.remote_target)
            except ValueError:
                host, port = "", None
            if is_ip_literal(host):
                call.remote_address = (host, port or 5060)
        return call

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
            self.spawn(self._run_callback(callback))
        else:
            self._ended_callbacks.append(callback)

    async def hangup(self, reason: str = "local hangup") -> None:
        """End the call from our side with a BYE (after the ACK, as RFC 3261 §15 asks)."""
        await self.server.hangup(self, reason)

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` as a task of this call (cancelled when the call ends)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """A timer of this call (cancelled when the call ends)."""
        self._timers.append(asyncio.get_running_loop().call_later(delay, callback))

    def finish(self, outcome: str) -> bool:
        """End the call: release its timers, tasks, RTP socket and reservation; False if it had ended."""
        if not self.active:
            return False
        self.state, self.outcome, self.ended_at = "ended", outcome, time.time()
        for timer in self._timers:
            timer.cancel()
        current = asyncio.current_task()
        for task in list(self._tasks):  # retransmissions and watchers of this call
            if task is not current:
                task.cancel()
        self.rtp.close()
        if not self.application_running:  # else once the application has returned (its STT may still drain)
            self.release_reservation()
        self.ended.set()
        self.confirmed.set()
        for callback in self._ended_callbacks:
            self.spawn(self._run_callback(callback))
        return True

    def application_started(self) -> None:
        """The application (``on_call``) runs for this call: the reservation is kept until it has returned."""
        self.application_running = True

    def application_finished(self) -> None:
        """The application returned: the reservation goes back (if the call has ended; it has by then)."""
        self.application_running = False
        if not self.active:
            self.release_reservation()

    @property
    def occupies_slot(self) -> bool:
        """Counts against ``max_calls``: up, or ended while its application is still finishing."""
        return self.active or self.application_running

    def release_reservation(self) -> None:
        """Give the admission reservation back (idempotent: the STT service may release it too)."""
        if self.reservation is not None:
            try:
                self.reservation.release()
            except Exception:
                logger.exception(f"call {self.call_id}: releasing the admission reservation failed")

    def summary(self) -> str:
        """The call's one log line: who, how it ended, how long, codec (and SRTP) and RTP counts."""
        who = f"to {self.called_uri}" if self.direction == "outbound" else f"from {self.caller_uri}"
        talk = f"{self.ended_at - self.answered_at:.1f}s" if self.answered_at and self.ended_at else "-"
        codec = self.negotiated.codec if self.negotiated else "-"
        s = self.rtp.stats
        if self.negotiated is not None and self.negotiated.srtp:
            codec += f" SRTP ({s.srtp_dropped} dropped)"
        return (f"call {self.call_id} {who} at {self.remote_address[0]}:{self.remote_address[1]}: "
                f"{self.outcome}; duration {talk}, {codec}, rtp in {s.packets_in} out {s.packets_out} "
                f"ignored {s.ignored}, dtmf {s.dtmf_digits or '-'}")

    async def _run_callback(self, callback) -> None:
        try:
            result = callback(self)
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            logger.exception(f"call {self.call_id}: ended callback failed")


class Dialogs:
    """The calls by Call-ID; a request belongs to a dialog when Call-ID, local tag (To) and remote tag (From)
    all match. Ended calls stay ``linger`` seconds so a late Call-ID reuse is still seen as one."""

    def __init__(self, *, linger: float = 32.0):
        self.linger = linger
        self.by_call_id: dict[str, SIPCall] = {}

    def add(self, call: SIPCall) -> None:
        self.by_call_id[call.call_id] = call

    def __contains__(self, call_id: str) -> bool:
        return call_id in self.by_call_id

    @property
    def active(self) -> list[SIPCall]:
        return [call for call in self.by_call_id.values() if call.active]

    @property
    def occupied(self) -> int:
        """Calls holding a slot: up, or ended with their application still finishing."""
        return sum(1 for call in self.by_call_id.values() if call.occupies_slot)

    def find(self, request: SIPRequest) -> SIPCall | None:
        """The active dialog of an in-dialog request, or None (unknown, ended, or tags that do not match)."""
        call = self.by_call_id.get(request.call_id)
        if call is None or not call.active:
            return None
        if parse_address(request.get("To")).tag != call.local_tag:
            return None
        if (parse_address(request.get("From")).tag or "") != call.remote_tag:
            return None
        return call

    def for_invite(self, key: tuple) -> SIPCall | None:
        """The call whose INVITE server transaction has this key (what a CANCEL names)."""
        for call in self.by_call_id.values():
            if call.invite_key == key:
                return call
        return None

    def forget_later(self, call: SIPCall) -> None:
        asyncio.get_running_loop().call_later(self.linger, self._forget, call)

    def _forget(self, call: SIPCall) -> None:
        if call.application_running:  # still counted as a call: look again later
            self.forget_later(call)
            return
        if self.by_call_id.get(call.call_id) is call:
            del self.by_call_id[call.call_id]


async def retransmit_until_ack(call: SIPCall, data: bytes, destination: Address,
                               send: Callable[[bytes, Address], None], *, t1: float, t2: float) -> bool:
    """Resend our 2xx at T1, 2·T1, … capped at T2 until ``call.confirmed`` (the ACK); False after 64·T1."""
    interval, waited = t1, 0.0
    while waited < 64 * t1:
        try:
            await asyncio.wait_for(asyncio.shield(call.confirmed.wait()), interval)
            return True
        except asyncio.TimeoutError:
            pass
        if not call.active:
            return True
        waited += interval
        send(data, destination)
        interval = min(interval * 2, t2)
    return call.confirmed.is_set()


def build_bye(call: SIPCall, *, via_host: str, via_port: int, protocol: str,
              user_agent: str) -> tuple[SIPRequest, Address]:
    """Our BYE for ``call`` (RFC 3261 §15.1.1) and where it goes: the first route, else the peer's address.

    A route whose host is a name rather than an IP literal is not resolved (no DNS on the event loop): the
    BYE then goes back to where the INVITE came from.
    """
    call.local_cseq = max(call.local_cseq + 1, 1)
    return build_in_dialog(call, "BYE", call.local_cseq, via_host=via_host, via_port=via_port, protocol=protocol,
                           user_agent=user_agent)


def build_ack(call: SIPCall, *, via_host: str, via_port: int, user_agent: str,
              protocol: str = "UDP") -> tuple[SIPRequest, Address]:
    """Our ACK of the 2xx that answered our INVITE (RFC 3261 §13.2.2.4): in the dialog, the INVITE's CSeq."""
    return build_in_dialog(call, "ACK", call.invite.cseq[0], via_host=via_host, via_port=via_port,
                           protocol=protocol, user_agent=user_agent)


def build_in_dialog(call: SIPCall, method: str, cseq: int, *, via_host: str, via_port: int, protocol: str,
                    user_agent: str) -> tuple[SIPRequest, Address]:
    """A request within ``call``'s dialog (§12.2.1.1): to the remote target along the route set."""
    request = SIPRequest(method=method, uri=call.remote_target)
    request.add("Via", f"SIP/2.0/{protocol} {via_host}:{via_port};branch={new_branch()};rport")
    request.add("Max-Forwards", "70")
    for route in call.route_set:
        request.add("Route", route)
    request.add("From", call.local_party)
    request.add("To", call.remote_party)
    request.add("Call-ID", call.call_id)
    request.add("CSeq", f"{cseq} {method}")
    request.add("User-Agent", user_agent)
    destination = call.remote_address  # no proxy: back to where the INVITE came from (NAT-safe)
    if call.route_set and not call.pinned:
        try:
            host, port = uri_host_port(parse_address(call.route_set[0]).uri)
        except (ValueError, SIPParseError):
            host, port = "", None
        if is_ip_literal(host):
            destination = (host, port or 5060)
        else:
            logger.info(f"call {call.call_id}: route {host!r} is not an IP literal; {method} to {destination[0]}")
    return request, destination


__all__ = ["Dialogs", "SIPCall", "build_ack", "build_bye", "build_in_dialog", "new_branch", "new_tag",
           "retransmit_until_ack"]

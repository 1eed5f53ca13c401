"""SIP transactions (RFC 3261 §17): which requests are retransmissions, and our own requests' retries.

Server side: a request matches a transaction by the top Via's branch, its sent-by and the method, with ACK
matching the INVITE it acknowledges (§17.2.3); a branch without the ``z9hG4bK`` cookie falls back to the
RFC 2543 fields (Call-ID, From tag, CSeq number, top Via). A retransmitted request gets the last response
again; an ACK of a non-2xx final response is absorbed. The ACK of a 2xx is its own transaction and goes to
the dialog (the 2xx itself is retransmitted by the dialog layer, as §13.3.1.4 asks). Entries live 64·T1.

Client side: our non-INVITE requests (BYE, REGISTER, CANCEL) are retransmitted from T1 doubling to T2 until a
final response, matched by the branch and the CSeq method (§17.1.3); our INVITE has its own transaction
(timers A and B, the ACK of a non-2xx final, the dialog's ACK re-sent for a retransmitted 2xx).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from .message import SIPRequest, SIPResponse, parse_address, parse_via

Address = tuple[str, int]
MAGIC_COOKIE = "z9hG4bK"
MAX_SERVER_TRANSACTIONS = 20_000


def server_key(request: SIPRequest, *, method: str | None = None) -> tuple:
    """The RFC 3261 §17.2.3 key of the server transaction ``request`` belongs to (``method`` overrides its own)."""
    via = parse_via(request.get_all("Via")[0])
    method = method or request.method
    if method == "ACK":
        method = "INVITE"
    if via.branch.startswith(MAGIC_COOKIE):
        return ("3261", via.branch, via.host.lower(), via.port or 5060, method)
    from_tag = parse_address(request.get("From")).tag or ""
    return ("2543", request.call_id, from_tag, request.cseq[0], str(via), method)


@dataclass
class _ServerTransaction:
    data: bytes
    destination: Address
    status: int
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


class ServerTransactions:
    """The server transactions: the last response of each, replayed for retransmitted requests.

    Parameters:
        send: ``send(data, destination)`` on the wire.
        lifetime: Seconds a transaction is remembered after its first response (64·T1).
    """

    def __init__(self, *, send: Callable[[bytes, Address], None], lifetime: float = 32.0):
        self._send = send
        self.lifetime = lifetime
        self._table: dict[tuple, _ServerTransaction] = {}

    def __len__(self) -> int:
        return len(self._table)

    def absorb(self, request: SIPRequest) -> bool:
        """True when ``request`` belongs to a transaction we answered: its last response is re-sent (an ACK
        of a non-2xx final is just absorbed). False for a new request, and for the ACK of a 2xx."""
        transaction = self._table.get(server_key(request))
        if transaction is None:
            return False
        if request.method == "ACK":
            return transaction.status >= 300
        self._send(transaction.data, transaction.destination)
        return True

    def record(self, request: SIPRequest, data: bytes, destination: Address, status: int) -> None:
        """Remember the response just sent for ``request`` (the newest one is what a retransmission gets)."""
        if request.method == "ACK":
            return
        key = server_key(request)
        transaction = self._table.get(key)
        if transaction is not None:
            transaction.data, transaction.destination, transaction.status = data, destination, status
            return
        if len(self._table) >= MAX_SERVER_TRANSACTIONS:
            self._expire(next(iter(self._table)))
        transaction = self._table[key] = _ServerTransaction(data=data, destination=destination, status=status)
        transaction.expiry = asyncio.get_running_loop().call_later(self.lifetime, self._expire, key)

    def _expire(self, key: tuple) -> None:
        transaction = self._table.pop(key, None)
        if transaction is not None and transaction.expiry is not None:
            transaction.expiry.cancel()

    def close(self) -> None:
        for key in list(self._table):
            self._expire(key)


class ClientTransactions:
    """Our requests (RFC 3261 §17.1), matched to their responses by the top Via's branch and the CSeq method.

    Non-INVITE (BYE, REGISTER, CANCEL): retransmitted T1 doubling to T2 until a final response, given up after
    64·T1 (:meth:`send`). INVITE (:meth:`invite`): an :class:`InviteClientTransaction` whose responses the caller
    reads one by one.
    """

    def __init__(self, *, send: Callable[[bytes, Address], None], t1: float, t2: float):
        self._send = send
        self.t1, self.t2 = t1, t2
        self._pending: dict[tuple[str, str], Callable[[SIPResponse], None]] = {}

    @staticmethod
    def _key(message: SIPRequest | SIPResponse) -> tuple[str, str]:
        return parse_via(message.get_all("Via")[0]).branch, message.cseq[1]

    def __len__(self) -> int:
        return len(self._pending)

    async def request(self, request: SIPRequest, destination: Address) -> int | None:
        """Send ``request``; the final status, or None when nothing answered within 64·T1."""
        response = await self.send(request, destination)
        return None if response is None else response.status

    async def send(self, request: SIPRequest, destination: Address) -> SIPResponse | None:
        """Send a non-INVITE ``request``; its final response, or None when nothing answered within 64·T1."""
        key = self._key(request)
        future = asyncio.get_running_loop().create_future()

        def on_response(response: SIPResponse) -> None:
            if not future.done() and response.status >= 200:
                future.set_result(response)

        self._pending[key] = on_response
        interval, waited, data = self.t1, 0.0, request.to_bytes()
        try:
            while waited < 64 * self.t1:
                self._send(data, destination)
                try:
                    return await asyncio.wait_for(asyncio.shield(future), interval)
                except asyncio.TimeoutError:
                    waited += interval
                    interval = min(interval * 2, self.t2)
            logger.info(f"{request.method} {request.call_id}: no response from {destination[0]}:{destination[1]}")
            return None
        finally:
            self._pending.pop(key, None)

    def invite(self, request: SIPRequest, destination: Address) -> InviteClientTransaction:
        """Start the client transaction of our INVITE (sent at once); read its responses with ``next()``."""
        key = self._key(request)
        transaction = InviteClientTransaction(request=request, destination=destination, send=self._send,
                                              t1=self.t1, on_done=lambda: self._pending.pop(key, None))
        self._pending[key] = transaction.on_response
        transaction.start()
        return transaction

    def on_response(self, response: SIPResponse) -> bool:
        """Hand a response to the transaction waiting for it; False when none is (a stray response)."""
        handler = self._pending.get(self._key(response))
        if handler is None:
            return False
        handler(response)
        return True


class InviteClientTransaction:
    """The client transaction of one INVITE (RFC 3261 §17.1.1, with RFC 6026's 2xx handling).

    The INVITE is retransmitted (timer A: T1, 2·T1, …) until the first response; without any response in 64·T1
    (timer B) ``next()`` returns None. Each non-2xx final response is acknowledged here (the ACK reuses the
    INVITE's branch); a 2xx is the dialog's to acknowledge: ``acknowledge(data, destination)`` sends that ACK
    and re-sends it for every retransmitted 2xx while the transaction lingers (64·T1 after the final response,
    then ``on_done``).
    """

    def __init__(self, *, request: SIPRequest, destination: Address, send: Callable[[bytes, Address], None],
                 t1: float, on_done: Callable[[], None]):
        self.request, self.destination = request, destination
        self._send, self.t1, self._on_done = send, t1, on_done
        self._responses: asyncio.Queue[SIPResponse | None] = asyncio.Queue()
        self._final: SIPResponse | None = None
        self._responded = asyncio.Event()
        self._acks: dict[str, tuple[bytes, Address]] = {}  # To-tag of a 2xx → our ACK of it
        self._timer: asyncio.Task | None = None
        self._linger: asyncio.TimerHandle | None = None

    @property
    def provisional_received(self) -> bool:
        return self._responded.is_set()

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().create_task(self._retransmit())

    async def _retransmit(self) -> None:
        data, interval, waited = self.request.to_bytes(), self.t1, 0.0
        while waited < 64 * self.t1:
            self._send(data, self.destination)
            step = min(interval, 64 * self.t1 - waited)
            try:
                await asyncio.wait_for(self._responded.wait(), step)
                return
            except asyncio.TimeoutError:
                waited += step
                interval *= 2
        self._responses.put_nowait(None)  # timer B: nothing answered

    async def next(self, timeout: float | None = None) -> SIPResponse | None:
        """The next response (provisional or final), None after timer B; asyncio.TimeoutError after ``timeout``."""
        return await asyncio.wait_for(self._responses.get(), timeout)

    def on_response(self, response: SIPResponse) -> None:
        self._responded.set()
        if response.status < 200:
            if self._final is None:
                self._responses.put_nowait(response)
            return
        if response.status >= 300:
            self._send(self._non_2xx_ack(response).to_bytes(), self.destination)
            if self._final is None:
                self._final = response
                self._responses.put_nowait(response)
                self._finish()
            return
        tag = parse_address(response.get("To")).tag or ""
        if tag in self._acks:  # a retransmitted 2xx: our ACK again
            self._send(*self._acks[tag])
            return
        if self._final is None:
            self._final = response
            self._finish()
        self._responses.put_nowait(response)  # also a 2xx of another fork: the caller acknowledges it too

    def acknowledge(self, response: SIPResponse, data: bytes, destination: Address) -> None:
        """Send the dialog's ACK of a 2xx and re-send it whenever that 2xx comes again."""
        self._acks[parse_address(response.get("To")).tag or ""] = (data, destination)
        self._send(data, destination)

    def _non_2xx_ack(self, response: SIPResponse) -> SIPRequest:
        """RFC 3261 §17.1.1.3: Request-URI, top Via, From, Call-ID, Route as the INVITE; To of the response."""
        invite = self.request
        ack = SIPRequest(method="ACK", uri=invite.uri)
        ack.add("Via", invite.get_all("Via")[0])
        ack.add("Max-Forwards", "70")
        for route in invite.get_all("Route"):
            ack.add("Route", route)
        ack.add("From", invite.get("From"))
        ack.add("To", response.get("To"))
        ack.add("Call-ID", invite.call_id)
        ack.add("CSeq", f"{invite.cseq[0]} ACK")
        return ack

    def _finish(self) -> None:
        self._responded.set()
        if self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(64 * self.t1, self.close)

    def close(self) -> None:
        """Stop retransmitting and forget the transaction (later responses are strays)."""
        if self._timer is not None:
            self._timer.cancel()
        if self._linger is not None:
            self._linger.cancel()
        self._on_done()


__all__ = ["ClientTransactions", "InviteClientTransaction", "ServerTransactions", "server_key"]

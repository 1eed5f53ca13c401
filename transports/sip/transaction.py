"""SIP transactions (RFC 3261 §17): which requests are retransmissions, and our own requests' retries.

Server side: a request matches a transaction by the top Via's branch, its sent-by and the method, with ACK
matching the INVITE it acknowledges (§17.2.3); a branch without the ``z9hG4bK`` cookie falls back to the
RFC 2543 fields (Call-ID, From tag, CSeq number, top Via). A retransmitted request gets the last response
again; an ACK of a non-2xx final response is absorbed. The ACK of a 2xx is its own transaction and goes to
the dialog (the 2xx itself is retransmitted by the dialog layer, as §13.3.1.4 asks). Entries live 64·T1.

Client side: our requests (the BYE) are retransmitted from T1 doubling to T2 until a final response, matched
by the branch and the CSeq method (§17.1.3).
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
    """Our non-INVITE requests: retransmitted (T1 doubling to T2) until a final response or 64·T1."""

    def __init__(self, *, send: Callable[[bytes, Address], None], t1: float, t2: float):
        self._send = send
        self.t1, self.t2 = t1, t2
        self._pending: dict[tuple[str, str], asyncio.Future] = {}

    @staticmethod
    def _key(message: SIPRequest | SIPResponse) -> tuple[str, str]:
        return parse_via(message.get_all("Via")[0]).branch, message.cseq[1]

    async def request(self, request: SIPRequest, destination: Address) -> int | None:
        """Send ``request``; the final status, or None when nothing answered within 64·T1."""
        key = self._key(request)
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        interval, waited, data = self.t1, 0.0, request.to_bytes()
        try:
            while waited < 64 * self.t1:
                self._send(data, destination)
                try:
                    return await asyncio.wait_for(asyncio.shield(future), interval)
                except asyncio.TimeoutError:
                    waited += interval
                    interval = min(interval * 2, self.t2)
            logger.info(f"call {request.call_id}: no response to our {request.method}")
            return None
        finally:
            self._pending.pop(key, None)

    def on_response(self, response: SIPResponse) -> bool:
        """Hand a response to the transaction waiting for it; False when none is (a stray response)."""
        future = self._pending.get(self._key(response))
        if future is None:
            return False
        if not future.done() and response.status >= 200:
            future.set_result(response.status)
        return True


__all__ = ["ClientTransactions", "ServerTransactions", "server_key"]

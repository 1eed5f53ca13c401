"""Our responses to requests (RFC 3261 §8.2.6): built from the request, sent where §18.2.2 and RFC 3581 say,
and remembered by the server transaction so a retransmitted request gets the same one again."""

from __future__ import annotations

import socket

from .config import SIPConfig
from .dialog import new_tag
from .message import REASONS, SIPRequest, SIPResponse, parse_address, parse_via
from .transaction import ServerTransactions
from .wire import SIPWire

Address = tuple[str, int]
ALLOWED_METHODS = ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "INFO", "UPDATE")
SUPPORTED_EXTENSIONS = ("timer",)  # session-timer refreshes are answered (re-INVITE/UPDATE → 200)


def _local_ip_for(peer_ip: str) -> str:
    """The local address the kernel would use to reach ``peer_ip`` (an IP literal: no DNS)."""
    family = socket.AF_INET6 if ":" in peer_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((peer_ip, 9))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class Responder:
    """Builds and sends the server's responses: Vias with ``received``/``rport``, From/To (a To-tag on all but
    100), Call-ID, CSeq, Record-Route in 1xx/2xx, Contact, Allow, Retry-After on every 503, our SDP."""

    def __init__(self, *, config: SIPConfig, wire: SIPWire, transactions: ServerTransactions):
        self.config = config
        self._wire = wire
        self._transactions = transactions

    @property
    def _port(self) -> int:
        return self._wire.address[1] if self._wire.address else self.config.port

    def destination(self, request: SIPRequest, source: Address) -> Address:
        if self._wire.is_stream(source):
            return source  # back on the connection the request came in on
        via = parse_via(request.get_all("Via")[0])
        if "rport" in via.params:
            return source
        return source[0], via.port or 5060

    def build(self, request: SIPRequest, source: Address, status: int, *, reason: str | None = None,
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
            to.params["tag"] = to_tag or new_tag()
            to_header = str(to)
        response.add("To", to_header)
        response.add("Call-ID", request.call_id)
        response.add("CSeq", request.get("CSeq"))
        if 100 < status < 300:
            for route in request.get_all("Record-Route"):
                response.add("Record-Route", route)
        if contact:
            response.add("Contact", self.contact(request, source))
        if status in (200, 405):
            response.add("Allow", ", ".join(ALLOWED_METHODS))
        if status == 503:  # every 503 says when to come back (RFC 3261 §21.5.4)
            response.add("Retry-After", str(self.config.retry_after_secs))
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

    def respond(self, request: SIPRequest, source: Address, status: int, **kwargs) -> SIPResponse:
        response = self.build(request, source, status, **kwargs)
        destination = self.destination(request, source)
        data = response.to_bytes()
        self._wire.send(data, destination)
        self._transactions.record(request, data, destination, status)
        return response

    def contact(self, request: SIPRequest, source: Address) -> str:
        """Our Contact for a dialog with ``source``: ``;transport=tcp``/``tls`` on a connection (the TLS port for
        TLS), and a ``sips:`` URI when the request asked for one (RFC 5630 §4)."""
        host, port = self.contact_host(source), self._port
        if not self._wire.is_stream(source):
            return f"<sip:pipecat@{host}:{port}>"
        secure = getattr(self._wire, "is_secure", None)
        if secure is not None and secure(source):
            port = self._wire.port_for(source)
            if request.uri.lower().startswith("sips:"):
                return f"<sips:pipecat@{host}:{port}>"
            return f"<sip:pipecat@{host}:{port};transport=tls>"
        return f"<sip:pipecat@{host}:{port};transport=tcp>"

    def contact_host(self, source: Address) -> str:
        if self.config.advertised_host:
            return self.config.advertised_host
        if self._wire.address and self._wire.address[0] not in ("0.0.0.0", "::"):
            return self._wire.address[0]
        return _local_ip_for(source[0])


__all__ = ["ALLOWED_METHODS", "Responder", "SUPPORTED_EXTENSIONS"]

"""Our own out-of-dialog requests (REGISTER, INVITE, CANCEL): where they go and how they start.

A target is a ``sip:`` or ``sips:`` URI or ``host[:port]`` (``sips:`` and ``;transport=tls``: over TLS); its host
is used as it is when it is an IP literal, else looked up with ``loop.getaddrinfo`` (the resolver runs in the
loop's executor, never blocking the event loop; A/AAAA only, no SRV/NAPTR; port 5060, 5061 for ``sips:``).
Requests carry a Via with a fresh branch and ``rport``, Max-Forwards, From/To/Call-ID/CSeq and our Contact (the
address the registrar or peer reaches us at: the UAS's own socket).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
from pathlib import Path

from .message import SIPParseError, SIPRequest, parse_address, uri_host_port
from .tls import TLSConfigError, client_context
from .wire import SIPWire, is_ip_literal

Address = tuple[str, int]
RESOLVE_TIMEOUT_SECS = 5.0


class SIPTargetError(ValueError):
    """A target that is not a usable ``sip:`` URI or host[:port], or a host that does not resolve."""


def sip_uri(target: str) -> str:
    """``target`` as a ``sip:`` or ``sips:`` URI (``host``, ``user@host:port``, ``sip:…`` and ``sips:…`` are
    accepted; a bare target becomes ``sip:``)."""
    target = target.strip()
    scheme = "sips:" if target.lower().startswith("sips:") else "sip:"
    uri = target if target.lower().startswith(scheme) else f"{scheme}{target}"
    try:
        uri_host_port(uri)
    except SIPParseError as exc:
        raise SIPTargetError(f"{target!r} is not a SIP URI ({exc})") from None
    if any(c.isspace() or c in "<>\"" for c in uri):
        raise SIPTargetError(f"{target!r} is not a SIP URI")
    return scheme + uri[len(scheme):]


def is_secure(uri: str) -> bool:
    """Whether requests to ``uri`` go over TLS: a ``sips:`` URI, or ``;transport=tls``."""
    lowered = uri.lower()
    return lowered.startswith("sips:") or ";transport=tls" in lowered


def uri_user(uri: str) -> str | None:
    """The user part of a ``sip:`` URI, or None."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    return rest.split("@", 1)[0] if "@" in rest else None


async def resolve(target: str, *, default_port: int = 5060, family: int = socket.AF_INET) -> Address:
    """(ip, port) of a ``sip:`` URI or host[:port]: IP literals as they are, names through ``loop.getaddrinfo``
    (in the executor). SIPTargetError when the name does not resolve."""
    uri = sip_uri(target)
    host, port = uri_host_port(uri)
    port = port or (5061 if is_secure(uri) else default_port)
    if is_ip_literal(host):
        return host, port
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM),
                                       RESOLVE_TIMEOUT_SECS)
    except (OSError, asyncio.TimeoutError) as exc:
        raise SIPTargetError(f"{host!r} does not resolve ({exc or 'timed out'})") from None
    if not infos:
        raise SIPTargetError(f"{host!r} does not resolve")
    return infos[0][4][0], port


class TLSConnector:
    """TLS connections for our own requests (outbound calls, registration): one client context (the peer's
    certificate must chain to ``ca``, the system's CAs by default, and name the host dialled, unless ``verify`` is
    False), made at the first use off the event loop; connections reused while open (``SIPWire.connect_tls``)."""

    def __init__(self, wire: SIPWire, *, ca: str | Path | None = None, verify: bool = True):
        self.wire = wire
        self.ca, self.verify = ca, verify
        self._context: ssl.SSLContext | None = None

    async def connect(self, next_hop: str, destination: Address) -> Address:
        """The connection to ``destination``, the resolved ``next_hop`` URI whose host the certificate must name;
        raises ``TLSConnectError`` saying why not."""
        try:
            if self._context is None:
                self._context = await asyncio.to_thread(client_context, ca=self.ca, verify=self.verify)
            name, _ = uri_host_port(next_hop)
            return await self.wire.connect_tls(destination, context=self._context, server_hostname=name.strip("[]"))
        except (OSError, asyncio.TimeoutError, TLSConfigError) as exc:
            raise TLSConnectError(f"TLS to {destination[0]}:{destination[1]}: {_tls_failure(exc)}") from None


class TLSConnectError(ConnectionError):
    """A TLS connection for our request could not be had: refused certificate, no handshake in time, bad CA file."""


def _tls_failure(exc: BaseException) -> str:
    """What went wrong opening a TLS connection, in one line."""
    if isinstance(exc, TLSConfigError):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the peer's certificate was refused ({exc.verify_message or exc.reason})"
    if isinstance(exc, asyncio.TimeoutError) or "handshake is taking longer" in str(exc):  # asyncio's own bound
        return "no TLS handshake in time"
    return f"{type(exc).__name__}: {exc}"


def new_call_id(host: str) -> str:
    return f"{secrets.token_hex(12)}@{host}"


def new_request(method: str, uri: str, *, via: Address, from_: str, to: str, call_id: str, cseq: int,
                contact: str | None, user_agent: str, routes: list[str] = (), transport: str = "UDP") -> SIPRequest:
    """An out-of-dialog request with a fresh branch (a new transaction each time)."""
    host = f"[{via[0]}]" if ":" in via[0] else via[0]
    request = SIPRequest(method=method, uri=uri)
    request.add("Via", f"SIP/2.0/{transport} {host}:{via[1]};branch=z9hG4bK{secrets.token_hex(8)};rport")
    request.add("Max-Forwards", "70")
    for route in routes:
        request.add("Route", route)
    request.add("From", from_)
    request.add("To", to)
    request.add("Call-ID", call_id)
    request.add("CSeq", f"{cseq} {method}")
    if contact is not None:
        request.add("Contact", contact)
    request.add("User-Agent", user_agent)
    return request


def contact_uri(user: str, host: str, port: int, *, secure: bool = False) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"sips:{user}@{host}:{port}" if secure else f"sip:{user}@{host}:{port}"


def same_contact(value: str, ours: str) -> bool:
    """Whether a Contact of a registrar's 200 is ``ours`` (user, host and port compared, parameters ignored)."""
    try:
        theirs = parse_address(value).uri
        return uri_user(theirs) == uri_user(ours) and uri_host_port(theirs) == uri_host_port(ours)
    except SIPParseError:
        return False


__all__ = ["SIPTargetError", "TLSConnectError", "TLSConnector", "contact_uri", "is_secure", "new_call_id",
           "new_request", "resolve", "same_contact", "sip_uri", "uri_user"]

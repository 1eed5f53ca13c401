"""SIPConfig: where the SIP server listens, its call policy, and the limits that keep it up under abuse."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..codecs import DEFAULT_CODECS, SPECS
from .admission import CallAdmission
from .sdp import SRTP_POLICIES

# Who may call a server started without an explicit allow-list (serve-sip without --allow): loopback, the RFC 1918
# private networks, IPv6 unique-local (fc00::/7) and link-local addresses. A PBX or proxy on the same host or LAN
# works out of the box; a stranger on the internet who finds an open port 5060 gets 403 instead of the model.
PRIVATE_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                     "fc00::/7", "169.254.0.0/16", "fe80::/10")
ANY = "any"


def allowed_peers_for(allow: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`SIPConfig.allowed_peers` for an operator's allow-list: none given -> `PRIVATE_NETWORKS`; "any" -> everyone
    (an empty tuple); otherwise the addresses/networks given. Raises ValueError for one that is not an address or
    network."""
    allow = tuple(a.strip() for a in allow)
    if not allow:
        return PRIVATE_NETWORKS
    if ANY in allow:
        return ()
    for network in allow:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not an IP address or network (e.g. 10.0.0.0/8, 192.0.2.7); "
                             f"'{ANY}' allows everyone") from None
    return allow


@dataclass
class SIPConfig:
    """Where the server listens, its call policy and its transport limits (``transports/sip/README.md``).

    Parameters:
        host: Address to bind the SIP and RTP sockets to.
        port: SIP port (0 picks a free one; see ``SIPUserAgentServer.port``).
        advertised_host: Address put in Contact and SDP; by default the local address that routes to the caller.
        max_calls: Concurrent calls; beyond it INVITEs get 503 (with Retry-After) before any application work.
        allowed_peers: Addresses or networks (``"10.0.0.0/8"``) that may call, and send RTP; empty allows everyone
            (``allowed_peers_for()`` turns an operator's list into this, with `PRIVATE_NETWORKS` when none is given).
        max_call_secs: Calls are hung up (BYE) after this long; None for no limit.
        rtp_timeout_secs: Hang up when no RTP arrived for this long while the caller should be sending
            (not on hold); None to never. Catches callers that vanished without a BYE.
        ring_secs: Time between 180 Ringing and 200 OK.
        send_ringing: Send 180 Ringing before answering.
        t1, t2: RFC 3261 timers (retransmission start and cap).
        user_agent: Server / User-Agent header value.
        tcp: Also accept SIP over TCP on the same port (responses and our BYE go back on the connection).
        rtp_ports: (first, last) UDP port range for RTP (firewall rules); None picks free even ports.
        admission: Asked for a reservation before a new call is answered (the STT engine); None: only max_calls.
        retry_after_secs: Retry-After of every 503 (call limit, admission full, OPTIONS while full).
        udp_receive_buffer: SO_RCVBUF asked for the SIP UDP socket (the kernel caps it at net.core.rmem_max).
        udp_rate_per_source, udp_burst_per_source: Token bucket per source IP for SIP datagrams (messages per
            second, burst); datagrams beyond it are dropped silently.
        tcp_max_connections, tcp_max_per_source: Open TCP connections in all and per source IP; beyond them a
            new connection is closed at once.
        tcp_idle_secs: A TCP connection with no complete message (or keep-alive) for this long is closed.
        tcp_message_secs: A message once begun must be complete within this long (slow headers/body).
        tcp_keepalive_rate, tcp_keepalive_burst: CRLF keep-alives per second per connection (token bucket);
            beyond it the connection is closed.
        tls_cert, tls_key: PEM certificate chain and key: with them the server also accepts SIP over TLS on
            ``tls_port`` (same framing, limits and connection caps as TCP; the caps count TCP and TLS together).
        tls_port: Port of the TLS listener (5061; 0 picks a free one, see ``SIPWire.tls_address``).
        tls_client_ca: Require client certificates signed by this CA (mutual TLS with a trunk); None: not asked.
        tls_handshake_secs: A TLS handshake must complete within this long (else the connection is closed and
            counted in ``SIPWire.tls_failures``, as is a failed one).
        srtp: SDES-SRTP policy: ``"required"`` (plain RTP/AVP offers get 488), ``"optional"`` (SRTP when offered),
            ``"off"``; None (the default): required for calls over TLS, optional over UDP/TCP.
        codecs: Codecs accepted, among PCMU, PCMA, G722, OPUS: an answer picks the caller's first one of these;
            our own offer lists them in this order.
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
    admission: CallAdmission | None = None
    retry_after_secs: int = 5
    udp_receive_buffer: int = 4 * 1024 * 1024
    udp_rate_per_source: float = 200.0
    udp_burst_per_source: int = 400
    tcp_max_connections: int = 256
    tcp_max_per_source: int = 16
    tcp_idle_secs: float = 120.0
    tcp_message_secs: float = 10.0
    tcp_keepalive_rate: float = 1.0
    tcp_keepalive_burst: int = 10
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_port: int = 5061
    tls_client_ca: str | None = None
    tls_handshake_secs: float = 10.0
    srtp: str | None = None
    codecs: tuple[str, ...] = DEFAULT_CODECS

    def __post_init__(self):
        self._networks = [ipaddress.ip_network(p, strict=False) for p in self.allowed_peers]
        if self.srtp is not None and self.srtp not in SRTP_POLICIES:
            raise ValueError(f"srtp={self.srtp!r}: one of {', '.join(SRTP_POLICIES)} (or None: required on TLS)")
        self.codecs = tuple(c.upper() for c in self.codecs)
        unknown = [c for c in self.codecs if c not in SPECS]
        if unknown or not self.codecs:
            raise ValueError(f"codecs: {unknown or 'none'} not supported (known: {', '.join(SPECS)})")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key without tls_cert")

    @property
    def tls(self) -> bool:
        """Whether the server listens for SIP over TLS."""
        return self.tls_cert is not None

    def srtp_policy(self, secure: bool) -> str:
        """The SRTP policy of a call that came over TLS (``secure``) or not."""
        if self.srtp is not None:
            return self.srtp
        return "required" if secure else "optional"

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


__all__ = ["ANY", "PRIVATE_NETWORKS", "SIPConfig", "allowed_peers_for"]

"""TLS contexts for SIP over TLS (RFC 3261 §26.2, RFC 5630): one place that turns certificate options into an
``ssl.SSLContext``, for our TLS listener and for connections we open ourselves (outbound calls, registration).

- :func:`server_context`: our certificate chain and key (PEM); TLS 1.2 or newer; client certificates are asked
  for only when ``client_ca`` is given (mutual TLS with a trunk), and then required.
- :func:`client_context`: peer verification ON (the system's CAs, or ``ca`` for a private PBX/trunk CA) with host
  name checking, TLS 1.2 or newer; ``verify=False`` exists for a lab PBX with a self-signed certificate and is
  logged as a warning every time a context is made. An optional client certificate for mutual TLS.

Contexts are built once, at start-up (reading files is blocking); the handshakes themselves run on the event loop
(asyncio's ``start_tls``), never blocking it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from loguru import logger

DEFAULT_TLS_PORT = 5061


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


def _load_chain(context: ssl.SSLContext, cert: str | Path, key: str | Path | None) -> None:
    try:
        context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"TLS certificate {cert} / key {key}: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca: str | Path) -> None:
    try:
        if Path(ca).is_dir():
            context.load_verify_locations(capath=str(ca))
        else:
            context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"TLS CA {ca}: {exc}") from None


def server_context(*, cert: str | Path, key: str | Path | None = None,
                   client_ca: str | Path | None = None) -> ssl.SSLContext:
    """The context of our TLS listener: ``cert`` (PEM chain, leaf first) and ``key`` (PEM; None when in ``cert``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    if client_ca is not None:
        _load_ca(context, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(*, ca: str | Path | None = None, verify: bool = True, cert: str | Path | None = None,
                   key: str | Path | None = None) -> ssl.SSLContext:
    """The context for TLS connections we open: the peer's certificate is verified against ``ca`` (or the system
    store) and must name the host we connect to (pass ``server_hostname`` to the connection when connecting by
    IP to a certificate that names a host). ``cert``/``key``: our client certificate, for mutual TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        if ca is not None:
            _load_ca(context, ca)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        logger.warning("SIP over TLS: peer certificate verification is OFF (lab use only: anyone on the path "
                       "can read and change the calls)")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        _load_chain(context, cert, key)
    return context


__all__ = ["DEFAULT_TLS_PORT", "TLSConfigError", "client_context", "server_context"]

"""Registration (RFC 3261 §10): keep our contact bound to an address-of-record at a registrar or PBX.

``SIPRegistration(uas=server, aor="sip:bot@pbx.example.com", credentials=...)`` REGISTERs the server's own
contact (``sip:bot@OUR-IP:OUR-PORT``, the same socket that answers calls), answers the 401/407 digest challenge,
and refreshes at half the granted lifetime (the ``expires`` of our Contact in the 200, else its Expires header,
else what we asked). A 423 Interval Too Brief raises the asked lifetime to the registrar's Min-Expires. After a
failure (timeout, 5xx/4xx) it tries again with capped exponential back-off (``Retry-After`` honoured); refused
credentials are reported once, clearly, and retried only every ``auth_retry_secs`` (60 s by default), so a wrong
password never becomes a REGISTER storm. ``stop()`` unregisters (Expires: 0).

Calls the registrar routes to us arrive at the UAS like any other INVITE (it does not check the Request-URI's
user); the registrar must be in ``allowed_peers`` (``serve-sip --register`` adds it).

A ``sips:`` registrar (or ``;transport=tls``) is reached over TLS (``outgoing.TLSConnector``: its certificate
verified against ``tls_ca`` and its name), and that connection is kept open while registered: our Contact is
``sips:`` at our TLS listener when the server has one, else ``sip:...;transport=tls`` at our end of the connection,
so the registrar sends our calls down it (as Kamailio, Asterisk and FreeSWITCH do for a connection-oriented
contact). Calls over TLS follow the server's SRTP policy (required by default).
"""

from __future__ import annotations

import asyncio
import os
import random
import re

from loguru import logger

from .digest import Credentials, DigestClient, SIPAuthError
from .message import SIPResponse, parse_address
from .outgoing import (SIPTargetError, TLSConnectError, TLSConnector, contact_uri, is_secure, new_call_id,
                       new_request, resolve, same_contact, sip_uri, uri_user)
from .uas import SIPUserAgentServer

Address = tuple[str, int]
MIN_REFRESH_SECS = 1.0
MAX_ROUNDS = 4  # REGISTERs per attempt: the first, a digest answer, a 423 retry, a stale-nonce answer


class RegistrationError(Exception):
    """A REGISTER was refused or not answered; ``retry_after`` is the registrar's Retry-After, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def granted_expires(response: SIPResponse, contact: str, asked: int) -> int:
    """The lifetime the registrar granted our contact: its Contact ``expires``, else Expires, else ``asked``."""
    for value in response.get_all("Contact"):
        if value != "*" and same_contact(value, contact):
            expires = parse_address(value).params.get("expires")
            if expires and re.fullmatch("[0-9]{1,10}", expires):
                return int(expires)
    header = response.get("Expires")
    if header is not None and re.fullmatch("[0-9]{1,10}", header.strip()):
        return int(header.strip())
    return asked


def _seconds(value: str | None) -> float | None:
    match = re.match(r"^\s*([0-9]{1,6})", value or "")
    return float(match.group(1)) if match else None


class SIPRegistration:
    """Keeps ``aor`` registered to the server's contact until ``stop()``.

    Parameters:
        uas: The started server whose socket is registered (and answers the calls that come).
        aor: Address-of-record, ``sip:user@domain``.
        registrar: ``host[:port]``, ``sip:`` or ``sips:`` URI (``sips:`` or ``;transport=tls``: over TLS) to send
            REGISTER to; by default ``$SIP_REGISTRAR``, else the AOR's domain (and scheme).
        credentials: For the digest challenge; by default ``SIP_USERNAME``/``SIP_PASSWORD`` (user: the AOR's).
        expires: Lifetime asked for, in seconds.
        retry_min_secs, retry_max_secs: Back-off after a failure: doubling from the first, capped at the second.
        auth_retry_secs: Wait after refused credentials before trying again.
        tls_ca, tls_verify: For a ``sips:`` registrar: the CA its certificate must chain to (None: the system's),
            and whether to verify it at all (False only for a lab; logged as a warning).
    """

    def __init__(self, *, uas: SIPUserAgentServer, aor: str, registrar: str | None = None,
                 credentials: Credentials | None = None, expires: int = 300, retry_min_secs: float = 2.0,
                 retry_max_secs: float = 300.0, auth_retry_secs: float = 60.0, tls_ca: str | None = None,
                 tls_verify: bool = True):
        self.uas = uas
        self.aor = sip_uri(aor)
        self.user = uri_user(self.aor)
        if not self.user:
            raise SIPTargetError(f"{aor!r}: the address-of-record needs a user (sip:user@domain)")
        registrar = registrar or os.environ.get("SIP_REGISTRAR")
        self.registrar = sip_uri(registrar) if registrar else \
            self.aor.split(":", 1)[0] + ":" + self.aor.split("@", 1)[1]
        self._tls = TLSConnector(uas.wire, ca=tls_ca, verify=tls_verify) if is_secure(self.registrar) else None
        self.credentials = credentials or Credentials.from_env(username=os.environ.get("SIP_USERNAME") or self.user)
        self.expires = expires
        self.retry_min_secs, self.retry_max_secs, self.auth_retry_secs = retry_min_secs, retry_max_secs, auth_retry_secs
        self.state = "idle"  # idle → registering → registered / failed / auth_failed → unregistered
        self.last_error: str | None = None
        self.granted: int | None = None
        self.registrations = 0  # 200 OKs to our REGISTERs (refreshes included)
        self.requests = 0  # REGISTERs sent
        self.registered = asyncio.Event()
        self.contact: str | None = None
        self._digest = DigestClient(self.credentials)
        self._call_id: str | None = None
        self._from_tag = os.urandom(6).hex()
        self._cseq = 0
        self._resolved: Address | None = None  # the registrar's address
        self._destination: Address | None = None  # where REGISTER goes (over TLS: the connection's peer)
        self._task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"SIPRegistration(aor={self.aor!r}, registrar={self.registrar!r}, state={self.state!r})"

    def start(self) -> None:
        """Start registering (and keep refreshing) in the background."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, *, timeout: float = 5.0) -> None:
        """Stop refreshing and unregister (Expires: 0), waiting at most ``timeout`` s for the registrar."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.state == "registered":
            try:
                await asyncio.wait_for(self._register(0), timeout)
                logger.info(f"SIP registration {self.aor}: unregistered")
            except (RegistrationError, SIPAuthError, asyncio.TimeoutError) as exc:
                logger.warning(f"SIP registration {self.aor}: unregister failed ({exc or 'timed out'})")
        self.state = "unregistered"
        self.registered.clear()
        if self._tls is not None and self._destination is not None:
            self.uas.wire.keep_open(self._destination, False)  # the idle timeout may close it now

    async def _run(self) -> None:
        failures = 0
        while True:
            self.state = "registering"
            try:
                granted = await self._register(self.expires)
            except SIPAuthError as exc:
                self._digest.forget()  # the next try starts from a fresh challenge (2 REGISTERs, not 3)
                self._failed("auth_failed", str(exc))
                logger.error(f"SIP registration {self.aor} at {self.registrar}: {exc}; "
                             f"trying again in {self.auth_retry_secs:g} s")
                await asyncio.sleep(self.auth_retry_secs)
                continue
            except (RegistrationError, SIPTargetError) as exc:
                failures += 1
                delay = min(self.retry_max_secs, self.retry_min_secs * 2 ** (failures - 1))
                delay *= random.uniform(0.8, 1.0)  # registrations of many bots do not retry in step
                retry_after = getattr(exc, "retry_after", None)
                if retry_after is not None:
                    delay = max(delay, retry_after)
                self._failed("failed", str(exc))
                logger.warning(f"SIP registration {self.aor} at {self.registrar}: {exc}; "
                               f"trying again in {delay:.0f} s")
                await asyncio.sleep(delay)
                continue
            failures = 0
            refresh = max(MIN_REFRESH_SECS, granted / 2)
            logger.info(f"SIP registration {self.aor} at {self.registrar}: registered {self.contact} for "
                        f"{granted} s; refreshing in {refresh:g} s")
            await asyncio.sleep(refresh)

    def _failed(self, state: str, error: str) -> None:
        self.state, self.last_error = state, error
        self.registered.clear()

    async def _register(self, expires: int) -> int:
        """One registration (or removal with 0): challenges and 423 answered; the granted lifetime."""
        if self._resolved is None:
            self._resolved = await resolve(self.registrar)
        self._destination = await self._connect()
        host = self.uas.responses.contact_host(self._destination)
        port, self.contact = self._contact(host)
        self._call_id = self._call_id or new_call_id(host)  # one Call-ID for every REGISTER (§10.2.4)
        for _ in range(MAX_ROUNDS):
            self._cseq += 1
            request = new_request("REGISTER", self.registrar, via=(host, port),
                                  from_=f"<{self.aor}>;tag={self._from_tag}", to=f"<{self.aor}>", call_id=self._call_id,
                                  cseq=self._cseq, contact=f"<{self.contact}>", user_agent=self.uas.config.user_agent,
                                  transport="TLS" if self._tls else "UDP")
            request.add("Expires", str(expires))
            for header, value in self._digest.headers("REGISTER", self.registrar):
                request.add(header, value)
            self.requests += 1
            response = await self.uas.client.send(request, self._destination)
            if response is None:
                raise RegistrationError(f"no response from {self._destination[0]}:{self._destination[1]}")
            if response.status in (401, 407):
                self._digest.challenged(response)
                continue
            if response.status == 423:
                minimum = _seconds(response.get("Min-Expires"))
                if minimum is None or minimum <= expires:
                    raise RegistrationError("423 Interval Too Brief without a usable Min-Expires")
                expires = self.expires = int(minimum)
                continue
            if 200 <= response.status < 300:
                self._digest.accepted()
                if expires == 0:
                    return 0
                self.granted = granted_expires(response, self.contact, expires)
                self.registrations += 1
                self.state, self.last_error = "registered", None
                self.registered.set()
                return self.granted
            raise RegistrationError(f"{response.status} {response.reason}",
                                    retry_after=_seconds(response.get("Retry-After")))
        raise RegistrationError("too many challenges or 423s in a row")

    async def _connect(self) -> Address:
        """Where REGISTER goes: the registrar's address, or our TLS connection to it (opened again if it closed)."""
        if self._tls is None:
            return self._resolved
        try:
            peer = await self._tls.connect(self.registrar, self._resolved)
        except TLSConnectError as exc:
            raise RegistrationError(str(exc)) from None
        self.uas.wire.keep_open(peer)
        return peer

    def _contact(self, host: str) -> tuple[int, str]:
        """(our Via port, our Contact): the server's own socket, or over TLS its TLS listener, else our end of the
        connection (the registrar sends our calls down it)."""
        if self._tls is None:
            return self.uas.port, contact_uri(self.user, host, self.uas.port)
        port = self.uas.wire.port_for(self._destination)
        if self.uas.wire.tls_address is not None:
            return port, contact_uri(self.user, host, port, secure=True)
        return port, contact_uri(self.user, host, port) + ";transport=tls"


__all__ = ["RegistrationError", "SIPRegistration", "granted_expires"]

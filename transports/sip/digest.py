"""HTTP digest authentication for our SIP requests (RFC 3261 §22, RFC 7616, RFC 2617): the client side.

A registrar or proxy answers 401 (``WWW-Authenticate``) or 407 (``Proxy-Authenticate``); :class:`DigestClient`
reads the challenge and gives the ``Authorization``/``Proxy-Authorization`` header for the retried request.
MD5 and SHA-256 (and their ``-sess`` forms), ``qop=auth`` (``auth-int`` when it is the only one offered) with a
fresh cnonce and a nonce count that goes up each time a nonce is reused; without qop the RFC 2069 form.
The strongest algorithm offered is taken (SHA-256 before MD5). A new challenge after we answered a fresh one is
a wrong user name or password (:class:`SIPAuthError`), unless it says ``stale=true`` (the nonce expired: answer
the new one); after a reused nonce it is just a new nonce. Credentials never reach a log line: the password
is left out of every ``repr``.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass, field

MAX_CHALLENGE = 4096  # characters of one challenge header
MAX_NONCE = 1024  # characters of a nonce or opaque value
# Strongest first: the order in which offered algorithms are chosen.
ALGORITHMS = {"SHA-256": "sha256", "SHA-256-SESS": "sha256", "MD5": "md5", "MD5-SESS": "md5"}
_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)\s*(?:,|$)')
_TOKEN = re.compile(r"^[\x21-\x7e]*$")


class SIPAuthError(Exception):
    """Authentication cannot succeed: the credentials were refused (wrong user name or password), no credentials
    were given, or the challenge cannot be answered (garbage, an unknown algorithm, no realm). The message says
    which, and never contains the password."""


@dataclass(frozen=True)
class Credentials:
    """A user name and password for digest authentication (the password is kept out of ``repr``)."""

    username: str
    password: str = field(repr=False)
    realm: str | None = None  # answer only challenges of this realm (None: any)

    @classmethod
    def from_env(cls, *, username_var: str = "SIP_USERNAME", password_var: str = "SIP_PASSWORD",
                 username: str | None = None) -> Credentials | None:
        """From the environment (``SIP_USERNAME``/``SIP_PASSWORD`` by default); None when no password is set."""
        password = os.environ.get(password_var)
        user = username or os.environ.get(username_var)
        if password is None or not user:
            return None
        return cls(username=user, password=password)


@dataclass(frozen=True)
class Challenge:
    """One parsed ``Digest`` challenge."""

    header: str  # "WWW-Authenticate" or "Proxy-Authenticate"
    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False

    @property
    def answer_header(self) -> str:
        return "Proxy-Authorization" if self.header == "Proxy-Authenticate" else "Authorization"


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_challenge(header: str, value: str) -> Challenge:
    """A ``Digest`` challenge header value; SIPAuthError when it is not one we can answer."""
    if len(value) > MAX_CHALLENGE:
        raise SIPAuthError(f"{header} is {len(value)} characters long (at most {MAX_CHALLENGE})")
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise SIPAuthError(f"{header} scheme {scheme[:20]!r} is not Digest")
    params: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None or match.end() == position:
            raise SIPAuthError(f"{header} is not a list of name=value parameters near {rest[position:][:30]!r}")
        params[match.group(1).lower()] = _unquote(match.group(2))
        position = match.end()
    for name in ("realm", "nonce"):
        if name not in params:
            raise SIPAuthError(f"{header} has no {name}")
    for name in ("nonce", "opaque", "realm"):
        if name in params and (len(params[name]) > MAX_NONCE or not _TOKEN.match(params[name].replace(" ", "!"))):
            raise SIPAuthError(f"{header} {name} is too long or not printable ({len(params[name])} characters)")
    algorithm = params.get("algorithm", "MD5").upper()
    if algorithm not in ALGORITHMS:
        raise SIPAuthError(f"{header} algorithm {algorithm[:30]!r} is not supported (MD5, SHA-256 and -sess)")
    qop = tuple(q.strip().lower() for q in params.get("qop", "").split(",") if q.strip())
    if qop and not {"auth", "auth-int"} & set(qop):
        raise SIPAuthError(f"{header} qop {params['qop'][:30]!r} offers neither auth nor auth-int")
    return Challenge(header=header, realm=params["realm"], nonce=params["nonce"], algorithm=algorithm, qop=qop,
                     opaque=params.get("opaque"), stale=params.get("stale", "").lower() == "true")


def _hash(algorithm: str, text: str) -> str:
    return hashlib.new(ALGORITHMS[algorithm], text.encode("utf-8")).hexdigest()


def digest_response(*, algorithm: str, username: str, password: str, realm: str, nonce: str, method: str,
                    uri: str, qop: str | None = None, nc: str = "", cnonce: str = "", body: bytes = b"") -> str:
    """The ``response`` value of RFC 7616 §3.4.1 (RFC 2069 form when ``qop`` is None)."""
    algorithm = algorithm.upper()
    ha1 = _hash(algorithm, f"{username}:{realm}:{password}")
    if algorithm.endswith("-SESS"):
        ha1 = _hash(algorithm, f"{ha1}:{nonce}:{cnonce}")
    a2 = f"{method}:{uri}"
    if qop == "auth-int":
        a2 += ":" + hashlib.new(ALGORITHMS[algorithm], body).hexdigest()
    ha2 = _hash(algorithm, a2)
    if qop is None:
        return _hash(algorithm, f"{ha1}:{nonce}:{ha2}")
    return _hash(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class DigestClient:
    """Answers the challenges of one registrar or proxy for one user (one per registration or call).

    ``challenged(response)`` takes a 401/407 and raises SIPAuthError when it cannot be answered, or when it is
    a second, non-stale challenge after we answered one (the credentials are wrong). ``headers(method, uri)``
    gives the authorization header(s) for the next request: a nonce already answered is reused with the nonce
    count going up (nc=00000002, …), so a refresh needs no new challenge while the nonce is good.
    """

    def __init__(self, credentials: Credentials | None):
        self.credentials = credentials
        self._challenges: dict[tuple[str, str], Challenge] = {}  # (header, realm) → the challenge we answer
        self._counts: dict[str, int] = {}  # nonce → requests sent with it
        # (header, realm) → the nonce count of our last answer since the last success: a refusal of a nonce we
        # reused (count > 1) is only the registrar wanting a fresh nonce, of a fresh one (count 1) wrong credentials
        self._answered: dict[tuple[str, str], int] = {}

    def __repr__(self) -> str:
        user = self.credentials.username if self.credentials else None
        return f"DigestClient(username={user!r}, realms={sorted(r for _, r in self._challenges)})"

    def challenged(self, response) -> None:
        """Take the challenges of a 401 or 407 response (``SIPResponse``)."""
        header = "Proxy-Authenticate" if response.status == 407 else "WWW-Authenticate"
        values = response.get_all(header)
        if not values:
            raise SIPAuthError(f"{response.status} without a {header} header")
        if self.credentials is None:
            raise SIPAuthError(f"{response.status} {response.reason}: authentication asked, but no credentials "
                               "were given (SIP_USERNAME / SIP_PASSWORD)")
        errors, offered = [], []
        for value in values[:8]:
            try:
                offered.append(parse_challenge(header, value))
            except SIPAuthError as exc:
                errors.append(str(exc))
        if self.credentials.realm is not None:
            offered = [c for c in offered if c.realm == self.credentials.realm]
        if not offered:
            raise SIPAuthError("; ".join(errors) or f"no challenge for realm {self.credentials.realm!r}")
        order = list(ALGORITHMS)
        by_realm: dict[str, Challenge] = {}
        for challenge in offered:  # the strongest algorithm per realm
            best = by_realm.get(challenge.realm)
            if best is None or order.index(challenge.algorithm) < order.index(best.algorithm):
                by_realm[challenge.realm] = challenge
        for realm, challenge in by_realm.items():
            key = (header, realm)
            if self._answered.get(key) == 1 and not challenge.stale:
                raise SIPAuthError(f"{response.status} {response.reason}: the credentials of user "
                                   f"{self.credentials.username!r} were refused in realm {realm!r} "
                                   "(wrong user name or password?)")
            self._challenges[key] = challenge
        self._counts = {c.nonce: self._counts.get(c.nonce, 0) for c in self._challenges.values()}

    def accepted(self) -> None:
        """The request with our credentials got through: a later challenge is a fresh one again."""
        self._answered.clear()

    def forget(self) -> None:
        """Drop every cached challenge (the next request goes without credentials)."""
        self._challenges.clear()
        self._counts.clear()
        self._answered.clear()

    def headers(self, method: str, uri: str, body: bytes = b"") -> list[tuple[str, str]]:
        """(header name, value) for each challenge we hold, to add to the request about to be sent."""
        out = []
        for key, challenge in self._challenges.items():
            out.append((challenge.answer_header, self._answer(challenge, method, uri, body)))
            self._answered[key] = self._counts[challenge.nonce]
        return out

    def _answer(self, challenge: Challenge, method: str, uri: str, body: bytes) -> str:
        credentials = self.credentials
        qop = "auth" if "auth" in challenge.qop else ("auth-int" if challenge.qop else None)
        count = self._counts.get(challenge.nonce, 0) + 1
        self._counts[challenge.nonce] = count
        nc, cnonce = f"{count:08x}", secrets.token_hex(12)
        response = digest_response(algorithm=challenge.algorithm, username=credentials.username,
                                   password=credentials.password, realm=challenge.realm, nonce=challenge.nonce,
                                   method=method, uri=uri, qop=qop, nc=nc, cnonce=cnonce, body=body)
        parts = [f"username={_quote(credentials.username)}", f"realm={_quote(challenge.realm)}",
                 f"nonce={_quote(challenge.nonce)}", f"uri={_quote(uri)}", f"response={_quote(response)}",
                 f"algorithm={challenge.algorithm}"]
        if challenge.opaque is not None:
            parts.append(f"opaque={_quote(challenge.opaque)}")
        if qop is not None:
            parts += [f"qop={qop}", f"nc={nc}", f"cnonce={_quote(cnonce)}"]
        return "Digest " + ", ".join(parts)


__all__ = ["Challenge", "Credentials", "DigestClient", "SIPAuthError", "digest_response", "parse_challenge"]

"""SDES-SRTP (RFC 4568 ``a=crypto``, RFC 3711 SRTP) through ``pylibsrtp`` (libsrtp, as aiortc uses it).

An offer's ``a=crypto`` lines are read strictly (:func:`parse_crypto`): a tag of 1-9 digits, a suite we support
(``AES_CM_128_HMAC_SHA1_80``, ``AES_CM_128_HMAC_SHA1_32``), exactly one ``inline:`` key of 30 bytes (16-byte master
key + 14-byte salt) in canonical base64, an optional lifetime (``2^N`` or decimal, at most 2^48 and at least
``MIN_LIFETIME`` packets: we do not re-key mid-call) and an optional ``MKI:length``; no session parameters
(``UNENCRYPTED_SRTP``, ``KDR=``, ``FEC_*`` ... would weaken or complicate the stream; ``WSH=`` is only a hint and
is accepted). Anything else makes the line unusable (:class:`CryptoError` says why); the answer picks the first
usable line in the offerer's order and adds our own fresh key with the same tag and suite (:func:`new_crypto`).

:class:`SrtpContext` protects what we send with our key and unprotects what arrives with the peer's: a packet
that fails authentication, is replayed, or carries the wrong MKI raises :class:`SrtpError` (the RTP session
drops and counts it). Our key has no MKI; a peer's MKI (sent between the payload and the tag, outside the
authenticated part, RFC 3711 §3.1) is checked and removed before libsrtp sees the packet.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass

import pylibsrtp

SUITES = {  # suite → (libsrtp profile, authentication tag bytes)
    "AES_CM_128_HMAC_SHA1_80": (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 10),
    "AES_CM_128_HMAC_SHA1_32": (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32, 4),
}
DEFAULT_SUITE = "AES_CM_128_HMAC_SHA1_80"
KEY_SALT_BYTES = 30  # 128-bit master key + 112-bit master salt
MAX_LIFETIME = 2**48  # RFC 3711 §9.2: at most 2^48 SRTP packets per master key
MIN_LIFETIME = 2**20  # 5.8 h of 20 ms packets: longer than any call we allow without re-keying
MAX_MKI_BYTES = 4
MAX_LINE = 512
REPLAY_WINDOW = 128
_TAG = re.compile(r"^[0-9]{1,9}$")
_SUITE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_B64 = re.compile(r"^[A-Za-z0-9+/]{40}$")  # 30 bytes: exactly 40 characters, no padding
_LIFETIME = re.compile(r"^(?:2\^([0-9]{1,2})|([0-9]{1,15}))$")
_MKI = re.compile(r"^([0-9]{1,10}):([0-9]{1,3})$")
_WSH = re.compile(r"^WSH=[0-9]{1,10}$")


class CryptoError(ValueError):
    """An ``a=crypto`` value we cannot use; the message says why."""


class SrtpError(ValueError):
    """An SRTP packet that failed authentication, was replayed, or is malformed."""


@dataclass(frozen=True)
class Crypto:
    """One ``a=crypto`` attribute: tag, suite, master key||salt, optional lifetime and MKI (value, length)."""

    tag: int
    suite: str
    key: bytes
    lifetime: int | None = None
    mki: tuple[int, int] | None = None

    def attribute(self) -> str:
        """The value after ``a=crypto:``."""
        text = f"{self.tag} {self.suite} inline:{base64.b64encode(self.key).decode()}"
        if self.lifetime is not None:
            text += f"|{self.lifetime}"
        if self.mki is not None:
            text += f"|{self.mki[0]}:{self.mki[1]}"
        return text

    def __repr__(self) -> str:  # keys stay out of logs and tracebacks
        return f"Crypto(tag={self.tag}, suite={self.suite})"


def _lifetime(text: str) -> int:
    match = _LIFETIME.match(text)
    if match is None:
        raise CryptoError(f"bad lifetime {text[:20]!r}")
    value = 2 ** int(match[1]) if match[1] is not None else int(match[2])
    if not 0 < value <= MAX_LIFETIME:
        raise CryptoError(f"lifetime {text[:20]} beyond 2^48")
    if value < MIN_LIFETIME:
        raise CryptoError(f"lifetime {text[:20]} too short (we do not re-key during a call)")
    return value


def _mki(text: str) -> tuple[int, int]:
    match = _MKI.match(text)
    if match is None:
        raise CryptoError(f"bad MKI {text[:20]!r}")
    value, length = int(match[1]), int(match[2])
    if not 1 <= length <= MAX_MKI_BYTES:
        raise CryptoError(f"MKI length {length} (1..{MAX_MKI_BYTES} supported)")
    if value >= 256 ** length:
        raise CryptoError(f"MKI {value} does not fit {length} bytes")
    return value, length


def parse_crypto(value: str) -> Crypto:
    """An ``a=crypto`` value (after the colon) → :class:`Crypto`; CryptoError when it is malformed or unusable."""
    if len(value) > MAX_LINE or any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise CryptoError("over-long or non-ASCII a=crypto")
    parts = value.split(" ")
    if len(parts) < 3 or "" in parts:
        raise CryptoError("a=crypto needs a tag, a suite and key parameters")
    tag, suite, keys, session_params = parts[0], parts[1], parts[2], parts[3:]
    if not _TAG.match(tag):
        raise CryptoError(f"bad tag {tag[:20]!r}")
    if not _SUITE.match(suite) or suite not in SUITES:
        raise CryptoError(f"unsupported suite {suite[:40]!r}")
    if ";" in keys:
        raise CryptoError("more than one key (MKI key switching) is not supported")
    method, _, info = keys.partition(":")
    if method != "inline" or not info:
        raise CryptoError(f"key method {method[:20]!r} (only inline: is defined)")
    fields = info.split("|")
    if len(fields) > 3:
        raise CryptoError("too many key fields")
    if not _B64.match(fields[0]):
        raise CryptoError("key||salt is not 40 characters of base64 (30 bytes)")
    try:
        key = base64.b64decode(fields[0], validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError("key||salt is not base64") from None
    if len(key) != KEY_SALT_BYTES:
        raise CryptoError(f"key||salt is {len(key)} bytes, not {KEY_SALT_BYTES}")
    lifetime = mki = None
    for field in fields[1:]:
        if ":" in field:
            if mki is not None:
                raise CryptoError("two MKIs")
            mki = _mki(field)
        else:
            if lifetime is not None or mki is not None:
                raise CryptoError("lifetime must come once, before the MKI")
            lifetime = _lifetime(field)
    for param in session_params:
        if not _WSH.match(param):
            raise CryptoError(f"session parameter {param[:30]!r} not supported")
    return Crypto(tag=int(tag), suite=suite, key=key, lifetime=lifetime, mki=mki)


def select_crypto(values: list[str]) -> tuple[Crypto | None, str | None]:
    """The first usable offered line (offerer's preference order) and, when none is, the first reason."""
    reason = None
    for value in values:
        try:
            return parse_crypto(value), None
        except CryptoError as exc:
            reason = reason or str(exc)
    return None, reason or "no a=crypto line"


def new_crypto(tag: int, suite: str = DEFAULT_SUITE) -> Crypto:
    """Our own attribute: a fresh random master key and salt for ``suite``."""
    if suite not in SUITES:
        raise CryptoError(f"unsupported suite {suite!r}")
    return Crypto(tag=tag, suite=suite, key=secrets.token_bytes(KEY_SALT_BYTES))


class SrtpContext:
    """Protect with our key, unprotect with the peer's (any SSRC, RFC 3711 replay window of 128 packets)."""

    def __init__(self, *, local: Crypto, remote: Crypto):
        self.local, self.remote = local, remote
        self._tag_bytes = SUITES[remote.suite][1]
        self._mki = remote.mki[0].to_bytes(remote.mki[1], "big") if remote.mki else b""
        self._outbound = pylibsrtp.Session(self._policy(local, pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
        self._inbound = pylibsrtp.Session(self._policy(remote, pylibsrtp.Policy.SSRC_ANY_INBOUND))

    @staticmethod
    def _policy(crypto: Crypto, ssrc_type: int) -> pylibsrtp.Policy:
        policy = pylibsrtp.Policy(key=crypto.key, ssrc_type=ssrc_type, srtp_profile=SUITES[crypto.suite][0])
        policy.window_size = REPLAY_WINDOW
        return policy

    def same_keys(self, local: Crypto, remote: Crypto) -> bool:
        return (self.local.key, self.local.suite, self.remote.key, self.remote.suite, self.remote.mki) == \
            (local.key, local.suite, remote.key, remote.suite, remote.mki)

    def protect(self, packet: bytes) -> bytes:
        """An RTP packet → SRTP; SrtpError when libsrtp refuses it (e.g. a sequence number far behind)."""
        try:
            return self._outbound.protect(packet)
        except pylibsrtp.Error as exc:
            raise SrtpError(str(exc)) from None

    def unprotect(self, packet: bytes) -> bytes:
        """An SRTP packet → RTP; SrtpError when it is short, has the wrong MKI, fails authentication or replays."""
        if self._mki:
            cut = len(packet) - self._tag_bytes - len(self._mki)
            if cut < 12 or packet[cut:cut + len(self._mki)] != self._mki:
                raise SrtpError("wrong or missing MKI")
            packet = packet[:cut] + packet[cut + len(self._mki):]
        if len(packet) < 12 + self._tag_bytes:
            raise SrtpError("shorter than a header and a tag")
        try:
            return self._inbound.unprotect(packet)
        except pylibsrtp.Error as exc:
            raise SrtpError(str(exc)) from None


__all__ = ["Crypto", "CryptoError", "DEFAULT_SUITE", "SUITES", "SrtpContext", "SrtpError", "new_crypto",
           "parse_crypto", "select_crypto"]

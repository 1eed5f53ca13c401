"""serve-sip --register: keep the phone transcriber registered with a PBX or registrar while it serves.

    SIP_PASSWORD=... pipecat-nemotron serve-sip --register sip:bot@pbx.example.com --model demo

The registration (``transports.sip.registration.SIPRegistration``) binds ``sip:USER@OUR-IP:PORT`` (the serving
socket) to the address-of-record; calls to it come from the registrar, which is therefore added to the allow-list
(unless ``--allow any``). Credentials: ``--username`` (else ``$SIP_USERNAME``, else the AOR's user) and the
password from the environment variable ``--password-env`` (``SIP_PASSWORD``), never from the command line.
"""

from __future__ import annotations

import argparse
import ipaddress
import os

from loguru import logger

from ..transports.sip.digest import Credentials
from ..transports.sip.outgoing import SIPTargetError, resolve, sip_uri, uri_user
from ..transports.sip.registration import SIPRegistration
from ..transports.sip.uas import SIPUserAgentServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--register", default=None, help="address-of-record to register (sip:user@registrar)")
    parser.add_argument("--registrar", default=None, help="registrar host[:port] (default: the AOR's host)")
    parser.add_argument("--username", default=None, help="digest user name (default: $SIP_USERNAME or the AOR's)")
    parser.add_argument("--password-env", default="SIP_PASSWORD", help="environment variable with the password")
    parser.add_argument("--register-expires", type=int, default=300, help="registration lifetime asked for")
    parser.add_argument("--registrar-ca", default=None,
                        help="CA file a sips: registrar's certificate must chain to (default: the system's CAs)")


def check(args: argparse.Namespace) -> None:
    """--register is a sip: AOR with a user; raises ValueError with what would work."""
    if getattr(args, "register", None) is None:
        return
    args.register = sip_uri(args.register)
    if not uri_user(args.register):
        raise ValueError(f"--register {args.register}: needs a user (sip:user@registrar)")
    if args.password_env not in os.environ:
        logger.warning(f"--register: ${args.password_env} is not set; registering without a password")


async def admit_registrar(args: argparse.Namespace, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``allowed`` plus the registrar's address (the INVITEs for the registered user come from it)."""
    if getattr(args, "register", None) is None or not allowed:
        return allowed
    try:
        host, _ = await resolve(args.registrar or os.environ.get("SIP_REGISTRAR") or args.register)
    except SIPTargetError as error:  # registering retries later; its calls get 403 until --allow names it
        logger.warning(f"--register: {error}; pass --allow with the registrar's address for its calls")
        return allowed
    address = ipaddress.ip_address(host)
    if any(address in ipaddress.ip_network(network, strict=False) for network in allowed):
        return allowed
    logger.info(f"--register: allowing calls from the registrar {host}")
    return (*allowed, host)


def start(args: argparse.Namespace, uas: SIPUserAgentServer) -> SIPRegistration | None:
    if getattr(args, "register", None) is None:
        return None
    password = os.environ.get(args.password_env)
    user = args.username or os.environ.get("SIP_USERNAME") or uri_user(args.register)
    credentials = Credentials(username=user, password=password) if password is not None else None
    registration = SIPRegistration(uas=uas, aor=args.register, registrar=args.registrar, credentials=credentials,
                                   expires=args.register_expires, tls_ca=getattr(args, "registrar_ca", None))
    registration.start()
    return registration


__all__ = ["add_arguments", "admit_registrar", "check", "start"]

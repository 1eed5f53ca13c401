"""Outbound call: dial a SIP URI, transcribe what the callee says, exit with the call's outcome.

    pipecat-nemotron call sip:alice@192.0.2.7 --model demo
    pipecat-nemotron call sip:1001@pbx.example.com --proxy 192.0.2.10 --from sip:bot@pbx.example.com \\
        --username bot --password-env SIP_PASSWORD --greeting hello.wav
    pipecat-nemotron call sips:1001@pbx.example.com --tls-ca pbx-ca.pem    # SIP over TLS, SDES-SRTP

The call is placed from our own SIP socket (``--host``/``--port``, a free port by default) by
``transports.sip.uac``: digest auth on 401/407 with ``SIP_USERNAME``/``SIP_PASSWORD`` (or ``--username`` and
``--password-env``), CANCEL after ``--ring-timeout``. Once answered the same per-call pipeline as serve-sip runs
(``phone.run_call``: VAD → NemotronSTTService → one JSON line per final transcript), the greeting is played when
the callee picks up, and the call ends when the callee hangs up or after ``--max-call-secs``. It answers no
calls of its own: inbound INVITEs get 403. A ``sips:`` URI (or ``--proxy sips:...``) goes over TLS with SRTP; the
peer's certificate must chain to ``--tls-ca`` (default: the system's CAs) and name the host dialled, unless
``--tls-no-verify`` (lab use; logged as a warning).

Exit status: 0 answered, 3 busy, 4 no answer, 5 rejected (with the SIP status in the message), 6 failed
(network, no response), 2 bad options.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import IO

from loguru import logger

from ..transports.sip import SIPConfig, SIPUserAgentServer
from ..transports.sip.digest import Credentials
from ..transports.sip.outgoing import SIPTargetError, sip_uri
from ..transports.sip.uac import CallResult, SIPUserAgentClient
from .phone import load_greeting, make_stt, run_call

EXIT_CODES = {"answered": 0, "busy": 3, "no_answer": 4, "rejected": 5, "failed": 6}
NOBODY = ("0.0.0.0/32",)  # allowed_peers no caller has: our socket answers only the dialogs we start


def credentials_for(args: argparse.Namespace) -> Credentials | None:
    return Credentials.from_env(password_var=args.password_env, username=args.username)


async def place_call(args: argparse.Namespace, *, stt_factory=None, out: IO[str] | None = None) -> CallResult:
    """Load the model, dial, transcribe the callee until either side hangs up; the call's result."""
    out = out or (sys.stdout if args.output == "-" else open(args.output, "a", encoding="utf-8"))
    if stt_factory is None:
        from rich.console import Console

        from ..stt import NemotronSTTService
        from .console import loading

        with loading(Console(stderr=True), f"{args.model} ({args.chunk_ms} ms chunks)"):
            engine = await NemotronSTTService.preload(model=args.model, chunk_ms=args.chunk_ms, device=args.device,
                                                      max_streams=1, threads=args.threads)
        stt_factory = lambda call: make_stt(args, engine=engine)  # noqa: E731
    greeting = load_greeting(args.greeting) if args.greeting else None
    config = SIPConfig(host=args.host, port=args.port, advertised_host=args.advertise, allowed_peers=NOBODY,
                       max_call_secs=args.max_call_secs or None)
    server = SIPUserAgentServer(config=config)
    await server.start()
    try:
        client = SIPUserAgentClient(uas=server, credentials=credentials_for(args), outbound_proxy=args.proxy,
                                    from_uri=args.from_uri, tls_ca=args.tls_ca, tls_verify=not args.tls_no_verify)
        result = await client.dial(args.uri, ring_timeout=args.ring_timeout)
        if result.answered:
            await run_call(result.call, stt=stt_factory(result.call), out=out, greeting=greeting)
        return result
    finally:
        await server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipecat-nemotron call", description=__doc__.split("\n")[0])
    parser.add_argument("uri", help="who to call: sip:user@host[:port] (sips: for TLS + SRTP)")
    parser.add_argument("--model", default="demo", help="Hugging Face id, .nemo path, or 'demo'")
    parser.add_argument("--chunk-ms", type=int, default=160, help="80, 160, 320, 560 or 1120")
    parser.add_argument("--language", default="auto", help="a locale such as en-US, or 'auto' to detect")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the model")
    parser.add_argument("--greeting", default=None, help="a WAV played when the callee answers")
    parser.add_argument("--proxy", default=None, help="outbound proxy host[:port] (default: the URI's host)")
    parser.add_argument("--from", dest="from_uri", default=None, help="our identity, e.g. sip:bot@pbx.example.com")
    parser.add_argument("--username", default=None, help="digest user name (default: $SIP_USERNAME)")
    parser.add_argument("--password-env", default="SIP_PASSWORD", help="environment variable with the password")
    parser.add_argument("--host", default="0.0.0.0", help="address of our SIP and RTP sockets")
    parser.add_argument("--port", type=int, default=0, help="our SIP port (0: a free one)")
    parser.add_argument("--advertise", default=None, help="address for Contact/SDP (default: the routed one)")
    parser.add_argument("--tls-ca", default=None, help="CA file/directory a sips: peer's certificate must chain to")
    parser.add_argument("--tls-no-verify", action="store_true", help="do not verify a sips: peer (lab use)")
    parser.add_argument("--ring-timeout", type=float, default=60.0, help="CANCEL after ringing this long")
    parser.add_argument("--max-call-secs", type=float, default=3600, help="hang up after this long (0: never)")
    parser.add_argument("--output", default="-", help="JSON-lines file to append transcripts to ('-': stdout)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    from . import options

    options.check_chunk_ms(args.chunk_ms)
    options.check_device(args.device)
    args.language = options.check_language(args.language or "auto", args.model)
    args.uri = sip_uri(args.uri)
    if args.ring_timeout <= 0:
        raise ValueError("--ring-timeout must be more than 0 seconds")


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (see the module's docstring)."""
    from .console import quiet_third_party
    from .phone import configure_logging

    args = parse_args(argv)
    configure_logging()
    quiet_third_party()
    try:
        check_args(args)
    except (ValueError, SIPTargetError) as error:
        logger.error(f"call: {error}")
        return 2
    try:
        result = asyncio.run(place_call(args))
    except KeyboardInterrupt:
        return 130
    except OSError as error:
        logger.error(f"call: {error}")
        return EXIT_CODES["failed"]
    print(f"call to {args.uri}: {result}", file=sys.stderr, flush=True)
    return EXIT_CODES[result.outcome]


if __name__ == "__main__":
    raise SystemExit(main())

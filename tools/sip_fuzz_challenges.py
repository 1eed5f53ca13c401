"""Hostile registrars for the SIP client side: our REGISTER (``transports/sip/registration.py``) answered with
fuzzed challenges and responses, seeded.

Each input is one registrar behaviour, applied to every REGISTER it gets: 401/407 challenges with garbage
WWW-Authenticate / Proxy-Authenticate values (not Digest, no realm, no nonce, a 60 KB nonce, unknown or absurd
algorithms, unbalanced quotes, control characters, Unicode, hundreds of parameters, a stale=true that never ends,
a fresh challenge every time, many headers at once), 423 with missing or absurd Min-Expires, and 200/4xx/5xx with
junk Contact/Expires/Retry-After. The oracle, per input: the registration reaches a state (registered, failed or
auth_failed) within its deadline with a short printable ``last_error`` when it failed; it sent at most
``registration.MAX_ROUNDS`` REGISTERs per attempt (no loop with the registrar); nothing raised out of a task and
no ERROR record carries a traceback. ``python -m tools.sip_fuzz_challenges --inputs 2000 --seed 1``; the SIP fuzzer
runs a slice of it with ``--challenges N``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import string
import sys
from dataclasses import dataclass, field

ALGORITHMS = ["MD5", "SHA-256", "md5", "sha-256", "MD5-sess", "SHA-256-sess", "SHA-512-256", "ROT13", "", "\"MD5\"",
              "MD5" * 400, "SHA-256,MD5", "ＭＤ５"]


def _quoted(rng: random.Random, n: int) -> str:
    return '"' + "".join(rng.choice(string.ascii_letters + string.digits + "+/=") for _ in range(n)) + '"'


def hostile_value(rng: random.Random) -> str:
    """One fuzzed challenge header value."""
    realm, nonce = f'realm={_quoted(rng, 8)}', f"nonce={_quoted(rng, 24)}"
    options = [
        lambda: "Basic " + realm,
        lambda: "Digest " + nonce,  # no realm
        lambda: "Digest " + realm,  # no nonce
        lambda: "Digest",
        lambda: "",
        lambda: f"Digest {realm}, nonce={_quoted(rng, rng.choice([1025, 4000, 60_000]))}",  # huge nonce
        lambda: f"Digest {realm}, {nonce}, algorithm={rng.choice(ALGORITHMS)}",
        lambda: f"Digest {realm}, {nonce}, qop=\"{rng.choice(['auth-conf', '', ',,,', 'auth' * 300, 'AUTH'])}\"",
        lambda: f"Digest {realm}, {nonce}, opaque={_quoted(rng, rng.choice([0, 2000]))}",
        lambda: f"Digest {realm}, nonce=\"unterminated",
        lambda: f"Digest {realm}, {nonce}, " + ", ".join(f"p{i}=v{i}" for i in range(rng.choice([50, 500]))),
        lambda: f"Digest realm=\"a\x00b\", {nonce}",
        lambda: f"Digest realm=\"ünïcødé\", nonce=\"٣٣٣\"",
        lambda: "Digest ,,,,===\"\"\"\\\\",
        lambda: f"Digest {realm} {nonce}",  # no comma
        lambda: f"Digest {realm}, {nonce}, stale=true",  # forever stale
        lambda: f"Digest {realm}, nonce={_quoted(rng, 16)}, qop=\"auth\"",  # a fresh nonce each time: wrong password
        lambda: f"Digest {realm}, {nonce}, algorithm=SHA-256, qop=\"auth-int\"",
        lambda: "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 300))),
    ]
    return rng.choice(options)()


def hostile_response(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """(status line, extra headers) of one fuzzed registrar answer."""
    kind = rng.random()
    if kind < 0.75:
        status = rng.choice(["401 Unauthorized", "407 Proxy Authentication Required"])
        header = "WWW-Authenticate" if status.startswith("401") else "Proxy-Authenticate"
        if rng.random() < 0.05:
            return status, []  # a challenge without its header
        count = rng.choice([1, 1, 1, 2, 3, 40])
        return status, [(header, hostile_value(rng)) for _ in range(count)]
    if kind < 0.85:
        junk = rng.choice(["", "abc", "-5", "0", "1" * 30, "4294967296", "٣٠", "60", "999999"])
        return "423 Interval Too Brief", [("Min-Expires", junk)] if junk else []
    if kind < 0.95:
        junk = rng.choice(["", "abc", "-1", "99999999999", "3600", "0"])
        return "200 OK", [("Contact", f"<sip:someone@192.0.2.1>;expires={junk}"), ("Expires", junk or "x")]
    return rng.choice(["403 Forbidden", "500 Oops", "503 Service Unavailable", "404 Not Found", "606 No"]), \
        [("Retry-After", rng.choice(["", "abc", "1", "99999999999"]))]


@dataclass
class ChallengeReport:
    inputs: int = 0
    outcomes: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    tracebacks: int = 0

    def summary(self) -> str:
        return (f"registration challenges: {self.inputs} hostile registrars, outcomes {self.outcomes}, "
                f"{len(self.failures)} failures {self.failures[:5]}, {self.tracebacks} tracebacks")


class HostileRegistrar(asyncio.DatagramProtocol):
    """Answers every REGISTER with the response of the current input (From/To/Call-ID/CSeq/Via echoed)."""

    def __init__(self):
        self.transport = None
        self.response: tuple[str, list[tuple[str, str]]] = ("200 OK", [])
        self.requests: set[str] = set()  # CSeq lines of the REGISTERs seen (retransmissions counted once)

    @property
    def registers(self) -> int:
        return len(self.requests)

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
        if not head[0].startswith("REGISTER"):
            return
        echoed = [line for line in head[1:] if line.split(":", 1)[0].lower() in ("via", "from", "to", "call-id",
                                                                                   "cseq")]
        self.requests.update(line for line in echoed if line.lower().startswith("cseq"))
        status, extra = self.response
        while True:
            lines = [f"SIP/2.0 {status}", *echoed, *(f"{k}: {v}" for k, v in extra), "Content-Length: 0"]
            data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace")
            if len(data) < 65_000 or not extra:  # what fits a datagram (the parser caps messages at 64 KiB)
                break
            extra = extra[:-1]
        self.transport.sendto(data, addr)


async def fuzz_challenges(count: int, seed: int = 1, *, deadline: float = 2.0) -> ChallengeReport:
    """Run ``count`` hostile registrar inputs against SIPRegistration in this process."""
    from loguru import logger

    from pipecat_nemotron.transports.sip import SIPConfig, SIPUserAgentServer
    from pipecat_nemotron.transports.sip.digest import Credentials
    from pipecat_nemotron.transports.sip.registration import MAX_ROUNDS, SIPRegistration

    rng = random.Random(seed)
    report = ChallengeReport()
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    sink = logger.add(lambda message: errors.append(str(message)), level="ERROR",
                      filter=lambda record: record["exception"] is not None)
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(str(context.get("exception") or context)))
    registrar = HostileRegistrar()
    transport, _ = await loop.create_datagram_endpoint(lambda: registrar, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    server = SIPUserAgentServer(config=SIPConfig(host="127.0.0.1", port=0, t1=0.002, t2=0.04,
                                                         udp_rate_per_source=1e6, udp_burst_per_source=10**6))
    await server.start()
    try:
        for index in range(count):
            registrar.response = hostile_response(rng)
            registrar.requests.clear()
            registration = SIPRegistration(uas=server, aor="sip:bot@127.0.0.1", registrar=f"127.0.0.1:{port}",
                                           credentials=Credentials("bot", "pw"), expires=60, retry_min_secs=30,
                                           auth_retry_secs=30)
            registration.start()
            end = loop.time() + deadline
            while registration.state not in ("registered", "failed", "auth_failed") and loop.time() < end:
                await asyncio.sleep(0.002)
            state, error, sent = registration.state, registration.last_error, registrar.registers
            await registration.stop(timeout=0.2)
            report.inputs += 1
            report.outcomes[state] = report.outcomes.get(state, 0) + 1
            what = f"input {index} ({registrar.response[0]}, {str(registrar.response[1])[:120]!r})"
            if state not in ("registered", "failed", "auth_failed"):
                report.failures.append(f"{what}: no outcome within {deadline} s (state {state})")
            elif state != "registered" and (not error or len(error) > 400 or not error.isprintable()):
                report.failures.append(f"{what}: unclear error {error[:200] if error else error!r}")
            if sent > MAX_ROUNDS:
                report.failures.append(f"{what}: {sent} REGISTERs in one attempt")
    finally:
        await server.stop()
        transport.close()
        loop.set_exception_handler(previous_handler)
        logger.remove(sink)
    report.tracebacks = len(errors)
    report.failures += [f"traceback: {e[:300]}" for e in errors[:5]]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    report = asyncio.run(fuzz_challenges(args.inputs, args.seed))
    print(report.summary())
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

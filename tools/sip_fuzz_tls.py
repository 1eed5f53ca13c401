"""SIP over TLS and SDES-SRTP under hostile input: garbage instead of TLS handshakes, fuzzed ``a=crypto`` offers over
a real TLS connection, and SRTP junk at answered calls; seeded.

Inputs, one kind each (``--inputs N``):

- ``handshake``: a connection to the TLS port that sends garbage instead of a ClientHello: random bytes, plain SIP,
  HTTP, an SSLv2 hello, a TLS record header announcing 16 MB, a real ClientHello truncated or bit-flipped, NULs;
  then either closes or waits for the server to close. Each must be closed by the server and counted once in
  ``SIPWire.tls_failures``.
- ``silent``: a connection that sends nothing (closed after ``tls_handshake_secs``, counted).
- ``crypto``: an INVITE over a real TLS connection whose RTP/SAVP offer carries fuzzed ``a=crypto`` lines (bad
  base64, wrong key lengths, unknown suites, absurd lifetimes and MKIs, session parameters, thousands of lines,
  NULs and Unicode); every one gets a final response (488, or 200 when a usable line was left), answered calls are
  ACKed and hung up.
- ``srtp``: an answered SRTP call gets tampered, replayed, truncated, plain-RTP and random packets at its media
  port, then a good one: junk is dropped and counted (``stats.srtp_dropped``), the good packet plays.

The oracle: no traceback and no ERROR record; the server answers OPTIONS over TLS afterwards; the handshake
failures counted equal the garbage connections sent; every crypto INVITE got a final response; TLS connections and
calls back to 0. ``python -m tools.sip_fuzz_tls --inputs 2000 --seed 1``; the SIP fuzzer runs a slice with
``--tls N``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import random
import secrets
import ssl
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
MAX_MESSAGE_SIZE = 65_535  # transports/sip/message.py: a larger message closes the connection
SUITES = ["AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32", "AES_256_CM_HMAC_SHA1_80", "F8_128_HMAC_SHA1_80",
          "AEAD_AES_128_GCM", "", "aes_cm_128_hmac_sha1_80", "AES_CM_128_HMAC_SHA1_80" * 20, "²"]


def _key(n: int = 30) -> str:
    return base64.b64encode(secrets.token_bytes(n)).decode()


def crypto_junk(rng: random.Random) -> list[str]:
    """Fuzzed a=crypto values (after the colon) for one offer; sometimes with a good line among them."""
    key = _key()
    options = [
        lambda: f"1 {rng.choice(SUITES)} inline:{key}",
        lambda: f"1 AES_CM_128_HMAC_SHA1_80 inline:{_key(rng.choice([0, 1, 16, 29, 31, 32, 46, 300]))}",
        lambda: f"1 AES_CM_128_HMAC_SHA1_80 inline:{key[:-2]}{rng.choice(['==', '!!', '..', 'é', '  '])}",
        lambda: f"1 AES_CM_128_HMAC_SHA1_80 inline:{key}|{rng.choice(['2^0', '2^48', '2^49', '2^99', '2^', '^', '0', '-1', '2^²', '9' * 30, '2^31|2^31'])}",
        lambda: f"1 AES_CM_128_HMAC_SHA1_80 inline:{key}|2^31|{rng.choice(['1:0', '1:4', '0:1', '256:1', '1:999', '99999999999:4', ':', '1:', ':4', '1:4:4'])}",
        lambda: f"1 AES_CM_128_HMAC_SHA1_80 inline:{key}|1:1;inline:{_key()}|2:1",
        lambda: f"1 AES_CM_128_HMAC_SHA1_80 inline:{key} {rng.choice(['UNENCRYPTED_SRTP', 'KDR=24', 'FEC_ORDER=FEC_SRTP', 'WSH=64', 'WSH=', 'X' * 500])}",
        lambda: f"{rng.choice(['0', '-1', '1234567890', '²', '', 'x', '9' * 100])} AES_CM_128_HMAC_SHA1_80 inline:{key}",
        lambda: "1 AES_CM_128_HMAC_SHA1_80 " + rng.choice(["", "inline:", "uri:" + key, "inline", key,
                                                           "inline:" + key + "\x00"]),
        lambda: "".join(rng.choice("abc019 :|;^=/+") for _ in range(rng.randint(0, 200))),
        lambda: "1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * rng.choice([41, 1000, 8000, 70000]),
    ]
    lines = [rng.choice(options)() for _ in range(rng.choice([1, 1, 2, 3, 50, 500]))]
    if rng.random() < 0.3:  # a usable line among the junk: the call is answered with SRTP
        lines.insert(rng.randrange(len(lines) + 1), f"{rng.randint(1, 9)} AES_CM_128_HMAC_SHA1_80 inline:{key}")
    return lines


def client_hello() -> bytes:
    """The first flight of a real TLS client (what garbage mutates)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="fuzz.invalid")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def handshake_junk(rng: random.Random, hello: bytes) -> tuple[str, bytes]:
    flipped = bytearray(hello)
    for _ in range(rng.randint(1, 8)):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    options = [
        ("random", lambda: rng.randbytes(rng.randint(1, 4000))),
        ("sip", lambda: b"OPTIONS sip:bot@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:1;branch=z9hG4bKx\r\n\r\n"),
        ("http", lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("sslv2", lambda: b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + rng.randbytes(37)),
        ("huge-record", lambda: b"\x16\x03\x01\xff\xff" + rng.randbytes(rng.randint(0, 100))),
        ("truncated-hello", lambda: hello[:rng.randint(1, len(hello) - 1)]),
        ("flipped-hello", lambda: bytes(flipped)),
        ("nul", lambda: bytes(rng.randint(1, 5000))),
        ("crlf", lambda: b"\r\n" * rng.randint(1, 2000)),
        ("empty", lambda: b""),
    ]
    name, make = rng.choice(options)
    return name, make()


@dataclass
class TLSFuzzReport:
    inputs: int = 0
    kinds: dict = field(default_factory=dict)
    garbage_connections: int = 0
    tls_failures: int = 0
    crypto_invites: int = 0
    crypto_answered: dict = field(default_factory=dict)
    srtp_dropped: int = 0
    srtp_played: int = 0
    alive: bool = False
    connections_after: int = -1
    calls_after: int = -1
    errors: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"TLS/SRTP: {self.inputs} inputs {self.kinds}; garbage handshakes {self.garbage_connections}, "
                f"counted {self.tls_failures}; a=crypto INVITEs {self.crypto_invites} -> {self.crypto_answered}; "
                f"SRTP junk dropped {self.srtp_dropped}, good packets played {self.srtp_played}; alive "
                f"{self.alive}; connections/calls after {self.connections_after}/{self.calls_after}; "
                f"{len(self.errors)} errors")


def _certificate(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    paths = directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class _TLSClient:
    """One TLS connection to the server: requests out, messages in (framed by Content-Length)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.port = writer.get_extra_info("sockname")[1]

    @classmethod
    async def open(cls, port: int) -> "_TLSClient":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # our own throw-away certificate
        return cls(*await asyncio.open_connection(HOST, port, ssl=context))

    async def read(self, timeout: float = 5.0):
        from pipecat_nemotron.transports.sip.message import parse_message

        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length")), 0)
        return parse_message(head + await self.reader.readexactly(length))

    async def final(self, timeout: float = 5.0):
        while True:
            message = await self.read(timeout)
            if getattr(message, "status", 0) >= 200:
                return message

    def request(self, method: str, *, tls_port: int, call_id: str, to: str = "<sip:bot@127.0.0.1>", body: str = "",
                cseq: int = 1) -> int:
        ctype = "Content-Type: application/sdp\r\n" if body else ""
        data = (f"{method} sip:bot@{HOST}:{tls_port};transport=tls SIP/2.0\r\n"
                f"Via: SIP/2.0/TLS {HOST}:{self.port};branch=z9hG4bK{secrets.token_hex(6)};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:fuzz@{HOST}>;tag=fuzz\r\nTo: {to}\r\nCall-ID: {call_id}\r\n"
                f"CSeq: {cseq} {method}\r\nContact: <sip:fuzz@{HOST}:{self.port};transport=tls>\r\n{ctype}"
                f"Content-Length: {len(body.encode())}\r\n\r\n{body}")
        self.writer.write(data.encode())
        return len(data.encode())

    def close(self):
        self.writer.close()


def _offer(media_port: int, crypto: list[str]) -> str:
    return (f"v=0\r\no=fuzz 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio {media_port} RTP/SAVP 0\r\n" + "".join(f"a=crypto:{line}\r\n" for line in crypto))


async def _garbage(port: int, data: bytes, rng: random.Random) -> None:
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        if data:
            writer.write(data)
        if rng.random() < 0.5:
            writer.close()
            return
        await asyncio.wait_for(reader.read(), 5)  # the server closes it
        writer.close()
    except (OSError, asyncio.TimeoutError):
        pass


async def _srtp_junk(server, client: _TLSClient, tls_port: int, rng: random.Random, report: TLSFuzzReport) -> None:
    """An answered SRTP call: junk at its media port, then a good packet; hung up."""
    from aiortc.rtp import RtpPacket

    from pipecat_nemotron.transports.sip.sdp import parse_sdp
    from pipecat_nemotron.transports.sip.srtp import SrtpContext, new_crypto, parse_crypto

    ours = new_crypto(1)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(HOST, 0))
    call_id = secrets.token_hex(8)
    try:
        client.request("INVITE", tls_port=tls_port, call_id=call_id,
                       body=_offer(transport.get_extra_info("sockname")[1], [ours.attribute()]))
        ok = await client.final()
        if ok.status != 200:
            report.failures.append(f"a good SRTP offer got {ok.status}")
            return
        client.request("ACK", tls_port=tls_port, call_id=call_id, to=ok.get("To"))
        media = parse_sdp(ok.body).media[0]
        context = SrtpContext(local=ours, remote=parse_crypto(media.crypto[0]))
        call = server.calls[call_id]
        target = (HOST, media.port)
        seq = rng.randrange(60000)
        good = context.protect(RtpPacket(payload_type=0, sequence_number=seq, timestamp=0, ssrc=9,
                                         payload=b"\xff" * 160).serialize())
        tampered = bytearray(good)
        tampered[rng.randrange(12, len(tampered))] ^= 1 << rng.randrange(8)
        plain = RtpPacket(payload_type=0, sequence_number=seq + 1, timestamp=160, ssrc=9, payload=b"\xff" * 160)
        junk = [bytes(tampered), good[:rng.randint(12, len(good) - 1)], plain.serialize(),
                b"\x80\x00" + rng.randbytes(rng.randint(10, 1400)), good[:12] + rng.randbytes(170)]
        for data in junk:
            transport.sendto(data, target)
        await asyncio.sleep(0.05)
        dropped_junk = call.rtp.stats.srtp_dropped
        transport.sendto(good, target)
        transport.sendto(good, target)  # replayed
        await asyncio.sleep(0.05)
        if call.rtp.stats.packets_in != 1 or call.rtp.stats.srtp_dropped < dropped_junk + 1:
            report.failures.append(f"SRTP junk: {call.rtp.stats} after {len(junk)} junk, a good packet and a replay")
        report.srtp_dropped += call.rtp.stats.srtp_dropped
        report.srtp_played += call.rtp.stats.packets_in
        client.request("BYE", tls_port=tls_port, call_id=call_id, to=ok.get("To"), cseq=2)
        await client.final()
    finally:
        transport.close()


async def fuzz_tls(inputs: int, seed: int) -> TLSFuzzReport:
    from loguru import logger

    from pipecat_nemotron.transports.sip import SIPConfig, SIPUserAgentServer

    rng = random.Random(seed)
    report = TLSFuzzReport()
    hello = client_hello()
    sink = logger.add(lambda m: report.errors.append(str(m)[:2000]), level="ERROR")
    loop = asyncio.get_running_loop()
    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: report.errors.append(
        str(context.get("message")) + "".join(traceback.format_exception(context["exception"]))
        if context.get("exception") else str(context.get("message"))))
    directory = Path(tempfile.mkdtemp(prefix="sip_fuzz_tls_"))
    cert, key = _certificate(directory)

    async def on_call(call):
        await call.ended.wait()

    server = SIPUserAgentServer(config=SIPConfig(host=HOST, port=0, tls_cert=str(cert), tls_key=str(key), tls_port=0,
                                                 tls_handshake_secs=0.5, t1=0.02, t2=0.1, rtp_timeout_secs=2.0,
                                                 max_call_secs=10, send_ringing=False, max_calls=64,
                                                 tcp_max_per_source=64),
                                on_call=on_call)
    await server.start()
    tls_port = server.wire.tls_address[1]
    pending: set[asyncio.Task] = set()
    client = await _TLSClient.open(tls_port)
    try:
        for _ in range(inputs):
            kind = rng.choices(["handshake", "silent", "crypto", "srtp"], weights=[50, 2, 40, 8])[0]
            report.inputs += 1
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
            if kind in ("handshake", "silent"):
                name, data = handshake_junk(rng, hello) if kind == "handshake" else ("silent", b"")
                report.garbage_connections += 1
                task = loop.create_task(_garbage(tls_port, data, rng if kind == "handshake" else random.Random(1)))
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(0.002)
            elif kind == "crypto":
                call_id = secrets.token_hex(8)
                report.crypto_invites += 1
                size = client.request("INVITE", tls_port=tls_port, call_id=call_id,
                                      body=_offer(4000, crypto_junk(rng)))
                try:
                    final = await client.final()
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                    if size <= MAX_MESSAGE_SIZE or isinstance(exc, asyncio.TimeoutError):
                        report.failures.append(f"a=crypto INVITE ({size} bytes): no final response "
                                               f"({type(exc).__name__})")
                    report.crypto_answered["closed (over the size limit)"] = \
                        report.crypto_answered.get("closed (over the size limit)", 0) + 1
                    client.close()
                    client = await _TLSClient.open(tls_port)
                    continue
                report.crypto_answered[final.status] = report.crypto_answered.get(final.status, 0) + 1
                if final.status == 400:  # unparseable (NUL, bare CR...): answered, then the connection is closed
                    client.close()
                    client = await _TLSClient.open(tls_port)
                    continue
                if final.status == 200:
                    client.request("ACK", tls_port=tls_port, call_id=call_id, to=final.get("To"))
                    client.request("BYE", tls_port=tls_port, call_id=call_id, to=final.get("To"), cseq=2)
                    await client.final()
            else:  # on a connection of its own (an oversized INVITE may just have closed the shared one)
                own = await _TLSClient.open(tls_port)
                try:
                    await _srtp_junk(server, own, tls_port, rng, report)
                finally:
                    own.close()
        if pending:
            await asyncio.wait(pending, timeout=10)
        client.close()
        deadline = loop.time() + 5
        while loop.time() < deadline and (server.wire.connections or server.active_calls or
                                          server.wire.tls_failures < report.garbage_connections):
            await asyncio.sleep(0.05)
        probe = await _TLSClient.open(tls_port)
        probe.request("OPTIONS", tls_port=tls_port, call_id=secrets.token_hex(8))
        report.alive = (await probe.final()).status == 200
        probe.close()
        await asyncio.sleep(0.1)
        report.tls_failures = server.wire.tls_failures
        report.connections_after, report.calls_after = server.wire.connections, server.active_calls
    finally:
        await server.stop()
        logger.remove(sink)
        loop.set_exception_handler(old_handler)
    if report.tls_failures != report.garbage_connections:
        report.failures.append(f"{report.garbage_connections} garbage handshakes, {report.tls_failures} counted")
    if not report.alive:
        report.failures.append("no OPTIONS answer over TLS afterwards")
    if report.connections_after or report.calls_after:
        report.failures.append(f"{report.connections_after} connections / {report.calls_after} calls left")
    report.failures += [f"error logged: {e[:300]}" for e in report.errors]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    report = asyncio.run(fuzz_tls(args.inputs, args.seed))
    print(report.summary())
    for failure in report.failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())

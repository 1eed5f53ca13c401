"""The `pipecat-nemotron` command.

Only typer is imported at module level: torch, NeMo and Pipecat load inside the command that needs them, so `--help`
is quick, and every option is checked (`options.py`) before the model loads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .options import CHUNK_SIZES_MS, OptionError

app = typer.Typer(help="Streaming multilingual speech-to-text for Pipecat on nemotron-3.5-asr-streaming.",
                  no_args_is_help=True, add_completion=False)

DEFAULT_MODEL = "nvidia/nemotron-3.5-asr-streaming-0.6b"  # = pipecat_nemotron.engine.DEFAULT_MODEL (test_cli)
MODEL_HELP = "Hugging Face id, .nemo path, or 'demo' (the bundled demo model: en-US, es-ES, de-DE)"
CHUNK_HELP = f"chunk size in ms: {', '.join(map(str, CHUNK_SIZES_MS))}"
LANGUAGE_HELP = "a locale such as en-US (one of the model's 40; 'pipecat-nemotron languages'), or 'auto' to detect"
DEVICE_HELP = "auto, cpu, cuda or cuda:N"
PRECISION_HELP = ("fp32, or int8 on a CPU: the encoder's Linear layers quantised (2-4x the streams per core on the "
                  "0.6B model, a small accuracy cost; see the README)")
DRAIN_HELP = "on SIGTERM (or POST /drain): seconds live calls may go on before the server ends them"
METRICS_PORT_HELP = "serve Prometheus /metrics, /healthz and POST /drain on this HTTP port"
METRICS_HOST_HELP = "address of the metrics port (POST /drain has no authentication: keep it private)"


def _checked(check):
    """A typer callback from an options.py check: OptionError -> typer's usage error (exit status 2)."""
    def callback(value):
        if value is None:
            return value
        try:
            return check(value)
        except OptionError as error:
            raise typer.BadParameter(str(error)) from None
    return callback


def _chunk_ms(value):
    from .options import check_chunk_ms
    return _checked(check_chunk_ms)(value)


def _device(value):
    from .options import check_device
    return _checked(check_device)(value)


def _precision(value):
    from .options import check_precision
    return _checked(check_precision)(value)


def _fail(error) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[red]error:[/] {error}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def _language_for(language: str, model: str) -> str:
    """The locale to run with, checked against the model's own dictionary where readable without loading it."""
    from .options import check_language

    try:
        return check_language(language, model)
    except OptionError as error:
        _fail(error)


@app.command()
def transcribe(
    files: List[Path] = typer.Argument(..., exists=True, dir_okay=False,
                                       help="audio files: WAV (PCM, float, μ-law, A-law, any rate), FLAC, OGG"),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    chunk_ms: int = typer.Option(160, help=CHUNK_HELP, callback=_chunk_ms),
    language: str = typer.Option("auto", help=LANGUAGE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=_device),
    realtime: bool = typer.Option(True, "--realtime/--fast", help="pace audio like a live call, or as fast as possible"),
    json_lines: bool = typer.Option(False, "--json", help="one JSON line per final transcript on stdout"),
    vad_mode: int = typer.Option(2, min=0, max=3, help="WebRTC VAD aggressiveness"),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads of the model (default: CPUs - 1, at least 1)"),
    precision: str = typer.Option("fp32", help=PRECISION_HELP, callback=_precision),
):
    """Stream audio files as calls through NemotronSTTService (all files at once, batched)."""
    import asyncio
    import json

    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from .console import loading, quiet_third_party

    quiet_third_party()
    console, out = Console(stderr=True), Console()
    locale = _language_for(language, model)
    from ..wav import WavError, read_wav

    try:
        wavs = {str(path): read_wav(path) for path in files}
    except WavError as error:
        _fail(error)
    _quiet_pipecat()
    from ..engine import Engine, NemotronEngineError
    from ..languages import locale_to_language
    from ..stt import NemotronSTTService
    from .transcribe import transcribe_call

    try:
        with loading(console, f"{model} ({chunk_ms} ms chunks)"):
            # its own engine, sized for the files: a batch job where every file is admitted however far the engine
            # runs behind (--fast floods it on purpose); closed at the end
            engine = Engine(model=model, chunk_ms=chunk_ms, device=device, max_streams=max(4, len(files)),
                            max_admission_lag_s=None, precision=precision,
                            **({"threads": threads} if threads else {}))
            engine.wait_ready()
        if locale != "auto" and locale not in engine.languages:
            raise NemotronEngineError(f"{model} has no prompt for {locale}; it knows {sorted(engine.languages)}")
    except NemotronEngineError as error:
        _fail(error)
    for name, wav in wavs.items():
        console.print(f"[dim]{name}: {wav.seconds:.1f} s, {wav.sample_rate} Hz {wav.encoding}, "
                      f"{wav.channels} channel(s)[/]")

    def show_final(utterance):
        try:
            _show_final(utterance)
        except BrokenPipeError:  # the reader went away (`| head`): stop like any Unix filter, not after a stall
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            os._exit(0)

    def _show_final(utterance):
        if json_lines:
            out.print_json(json.dumps(utterance.as_dict(), ensure_ascii=False)) if out.is_terminal else \
                print(json.dumps(utterance.as_dict(), ensure_ascii=False), flush=True)
        else:
            prefix = f"{Path(utterance.file).name} " if len(wavs) > 1 else ""
            out.print(f"{prefix}[cyan][{utterance.start_s:6.2f}–{utterance.end_s:6.2f}][/] "
                      f"[magenta]{utterance.language or '?':>5}[/] {utterance.text}  "
                      f"[dim](final {utterance.latency_ms:.0f} ms after end of speech)[/]")

    async def run_all():
        progresses = {}

        def render():
            table = Table.grid(padding=(0, 1))
            for name, progress in progresses.items():
                table.add_row(f"[dim]{Path(name).name}[/]", f"[yellow]{progress.interim}[/]")
            return table

        with Live(render(), console=console, transient=True, refresh_per_second=12,
                  auto_refresh=not json_lines) as live:
            def show_interim(progress):
                progresses[progress.file] = progress
                live.update(render())

            tasks = [transcribe_call(name, wav, stt=NemotronSTTService(
                engine=engine, language=locale_to_language(locale) if locale != "auto" else None),
                realtime=realtime, vad_mode=vad_mode, on_final=show_final, on_interim=show_interim)
                for name, wav in wavs.items()]
            return await asyncio.gather(*tasks)

    results = asyncio.run(run_all())
    stats = engine.stats
    console.print(f"[dim]{sum(len(r.finals) for r in results)} utterances from {len(results)} call(s); "
                  f"{stats.steps} model steps, mean batch {stats.streams_stepped / max(1, stats.steps):.1f}, "
                  f"step time {stats.realtime_factor:.2f}× the chunk duration[/]")
    engine.close()


@app.command("serve-webrtc")
def serve_webrtc(
    host: str = typer.Option("127.0.0.1", help="address to listen on (not loopback: needs --allow-remote)"),
    port: int = typer.Option(7860, min=0, max=65535, help="HTTP port of the page and the offer endpoint"),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    chunk_ms: int = typer.Option(160, help=CHUNK_HELP, callback=_chunk_ms),
    language: str = typer.Option("auto", help=LANGUAGE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=_device),
    llm: Optional[bool] = typer.Option(None, "--llm/--no-llm", show_default="when NEMOTRON_LLM_API_KEY or "
                                       "OPENAI_API_KEY is set", help="answer with an OpenAI-compatible LLM"),
    allow_remote: bool = typer.Option(False, "--allow-remote",
                                      help="listen on a non-loopback --host: anyone who reaches the port can use "
                                           "the model (and your LLM key); there is no authentication"),
    threads: Optional[int] = typer.Option(None, min=1, show_default="CPUs - 1, at least 1",
                                          help="CPU threads of the model"),
    precision: str = typer.Option("fp32", help=PRECISION_HELP, callback=_precision),
    drain_timeout: float = typer.Option(60.0, min=0, help=DRAIN_HELP),
    metrics_port: Optional[int] = typer.Option(None, min=0, max=65535, show_default="off", help=METRICS_PORT_HELP),
    metrics_host: str = typer.Option("127.0.0.1", help=METRICS_HOST_HELP),
):
    """A browser page where a person talks and sees live transcripts (WebRTC, http://HOST:PORT/)."""
    from .console import quiet_third_party
    from .options import is_loopback

    quiet_third_party()
    locale = _language_for(language, model)
    if not is_loopback(host) and not allow_remote:
        _fail(f"--host {host} is not a loopback address: anyone who can reach it could use the model (and your LLM "
              "key). Pass --allow-remote to do that on purpose (browsers give the microphone only to localhost or "
              "HTTPS pages, so put it behind a TLS proxy), or keep the default 127.0.0.1.")
    from .webrtc_server import run_webrtc_server

    run_webrtc_server(host=host, port=port, model=model, chunk_ms=chunk_ms, language=locale, device=device, llm=llm,
                      allow_remote=allow_remote, threads=threads, precision=precision, drain_timeout=drain_timeout,
                      metrics_port=metrics_port, metrics_host=metrics_host)


@app.command("serve-sip")
def serve_sip(
    host: str = typer.Option("0.0.0.0", help="address to listen on (SIP UDP+TCP, and RTP)"),
    port: int = typer.Option(5060, min=0, max=65535, help="SIP port"),
    advertise: Optional[str] = typer.Option(None, show_default="the address that routes to the caller",
                                            help="address for Contact/SDP"),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    chunk_ms: int = typer.Option(160, help=CHUNK_HELP, callback=_chunk_ms),
    language: str = typer.Option("auto", help=LANGUAGE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=_device),
    threads: Optional[int] = typer.Option(None, min=1, show_default="CPUs - 1, at least 1",
                                          help="CPU threads of the model"),
    precision: str = typer.Option("fp32", help=PRECISION_HELP, callback=_precision),
    max_calls: Optional[int] = typer.Option(None, min=1, show_default="the measured capacity: 24 for the demo "
                                            "model on a 2-core CPU; 0.6B: 3 in int8, 1 in fp32",
                                            help="concurrent calls; 503 + Retry-After beyond"),
    allow: List[str] = typer.Option([], "--allow", show_default="loopback and private networks only",
                                    help="peer address or network that may call (repeat); 'any' for everyone"),
    max_call_secs: float = typer.Option(3600, min=0, help="hang up after this long (0: never)"),
    retry_after: int = typer.Option(5, min=0, help="Retry-After seconds of every 503"),
    sip_rate: float = typer.Option(200.0, min=0.1, help="SIP messages per second per source IP (burst: twice "
                                                         "that); beyond: dropped"),
    tcp_max_connections: int = typer.Option(256, min=1, help="open SIP TCP connections in all"),
    tcp_max_per_source: int = typer.Option(16, min=1, help="open SIP TCP connections per IP"),
    tcp_idle_secs: float = typer.Option(120.0, min=0.1, help="close an idle SIP TCP connection after this long"),
    tls_cert: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                            help="PEM certificate chain: also accept SIP over TLS on --tls-port"),
    tls_key: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                           help="PEM private key of --tls-cert (when not in that file)"),
    tls_port: int = typer.Option(5061, min=0, max=65535, help="SIP over TLS port (with --tls-cert)"),
    srtp: Optional[str] = typer.Option(None, show_default="required over TLS, optional over UDP/TCP",
                                       help="SDES-SRTP policy: required, optional or off (checked by serve-sip)"),
    greeting: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                            help="a short audio file played when a call starts"),
    output: str = typer.Option("-", help="JSON-lines file to append final transcripts to ('-': stdout)"),
    drain_timeout: float = typer.Option(60.0, min=0, help=DRAIN_HELP),
    metrics_port: Optional[int] = typer.Option(None, min=0, max=65535, show_default="off", help=METRICS_PORT_HELP),
    metrics_host: str = typer.Option("127.0.0.1", help=METRICS_HOST_HELP),
    register: Optional[str] = typer.Option(None, help="register as this address-of-record (sip:user@registrar) "
                                           "and keep it registered; calls to it arrive here"),
    registrar: Optional[str] = typer.Option(None, show_default="the AOR's host",
                                            help="registrar host[:port], or sips:host[:port] for TLS"),
    registrar_ca: Optional[Path] = typer.Option(None, exists=True, show_default="the system's CAs",
                                                help="CA file a sips: registrar's certificate must chain to"),
    username: Optional[str] = typer.Option(None, show_default="$SIP_USERNAME, else the AOR's user",
                                           help="digest user name for --register"),
    password_env: str = typer.Option("SIP_PASSWORD", help="environment variable holding the digest password"),
    register_expires: int = typer.Option(300, min=1, help="registration lifetime asked for (refreshed at half)"),
):
    """Answer SIP calls directly (UDP/TCP) and write one JSON line per final transcript."""
    from .console import quiet_third_party

    quiet_third_party()
    locale = _language_for(language, model)
    try:
        from ..transports.sip.config import allowed_peers_for

        allowed_peers_for(allow)
    except ValueError as error:
        _fail(f"--allow: {error}")
    argv = ["--host", host, "--port", str(port), "--model", model, "--chunk-ms", str(chunk_ms), "--language", locale,
            "--device", device, "--max-call-secs", str(max_call_secs), "--retry-after", str(retry_after),
            "--sip-rate", str(sip_rate), "--tcp-max-connections", str(tcp_max_connections),
            "--tcp-max-per-source", str(tcp_max_per_source), "--tcp-idle-secs", str(tcp_idle_secs),
            "--output", output, "--drain-timeout", str(drain_timeout), "--metrics-host", metrics_host,
            "--precision", precision]
    for name, value in (("--advertise", advertise), ("--threads", threads), ("--max-calls", max_calls),
                        ("--greeting", greeting), ("--metrics-port", metrics_port), ("--tls-cert", tls_cert),
                        ("--tls-key", tls_key), ("--tls-port", tls_port), ("--srtp", srtp)):
        if value is not None:
            argv += [name, str(value)]
    for network in allow:
        argv += ["--allow", network]
    if register is not None:
        argv += ["--register", register, "--password-env", password_env, "--register-expires", str(register_expires)]
        for name, value in (("--registrar", registrar), ("--username", username), ("--registrar-ca", registrar_ca)):
            if value is not None:
                argv += [name, str(value)]
    from .phone import main as phone_main

    phone_main(argv)


@app.command("call")
def call(
    uri: str = typer.Argument(..., help="who to call: sip:user@host[:port] (sips: for TLS + SRTP)"),
    model: str = typer.Option("demo", help=MODEL_HELP),
    chunk_ms: int = typer.Option(160, help=CHUNK_HELP, callback=_chunk_ms),
    language: str = typer.Option("auto", help=LANGUAGE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=_device),
    greeting: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                            help="a short audio file played when the callee answers"),
    proxy: Optional[str] = typer.Option(None, show_default="the URI's host", help="outbound proxy host[:port]"),
    from_uri: Optional[str] = typer.Option(None, "--from", help="our identity, e.g. sip:bot@pbx.example.com"),
    username: Optional[str] = typer.Option(None, show_default="$SIP_USERNAME", help="digest user name"),
    password_env: str = typer.Option("SIP_PASSWORD", help="environment variable holding the digest password"),
    host: str = typer.Option("0.0.0.0", help="address of our SIP and RTP sockets"),
    port: int = typer.Option(0, min=0, max=65535, help="our SIP port (0: a free one)"),
    advertise: Optional[str] = typer.Option(None, show_default="the address that routes to the callee",
                                            help="address for Contact/SDP"),
    ring_timeout: float = typer.Option(60.0, min=0.1, help="CANCEL after ringing this long (seconds)"),
    max_call_secs: float = typer.Option(3600, min=0, help="hang up after this long (0: never)"),
    output: str = typer.Option("-", help="JSON-lines file to append final transcripts to ('-': stdout)"),
    tls_ca: Optional[Path] = typer.Option(None, exists=True, show_default="the system's CAs",
                                          help="CA file or directory a sips: callee's certificate must chain to"),
    tls_no_verify: bool = typer.Option(False, "--tls-no-verify", help="do not verify a sips: callee (lab use)"),
):
    """Call a SIP URI, transcribe what the callee says; exit 0 answered, 3 busy, 4 no answer, 5 rejected, 6 failed."""
    from .console import quiet_third_party

    quiet_third_party()
    locale = _language_for(language, model)
    argv = [uri, "--model", model, "--chunk-ms", str(chunk_ms), "--language", locale, "--device", device,
            "--password-env", password_env, "--host", host, "--port", str(port), "--ring-timeout", str(ring_timeout),
            "--max-call-secs", str(max_call_secs), "--output", output]
    for name, value in (("--greeting", greeting), ("--proxy", proxy), ("--from", from_uri), ("--username", username),
                        ("--advertise", advertise), ("--tls-ca", tls_ca)):
        if value is not None:
            argv += [name, str(value)]
    if tls_no_verify:
        argv.append("--tls-no-verify")
    from .dial import main as dial_main

    raise typer.Exit(dial_main(argv))


@app.command("serve-riva")
def serve_riva(
    host: str = typer.Option("127.0.0.1", help="address to listen on (gRPC, no TLS)"),
    port: int = typer.Option(50051, min=0, max=65535, help="gRPC port (Riva's default)"),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    chunk_ms: int = typer.Option(160, help=CHUNK_HELP, callback=_chunk_ms),
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=_device),
    max_streams: Optional[int] = typer.Option(None, min=1, show_default="the measured capacity: 24 for the demo "
                                              "model on a 2-core CPU; 0.6B on a CPU: 3 in int8, 1 in fp32",
                                              help="client streams at once; beyond it RESOURCE_EXHAUSTED"),
    threads: Optional[int] = typer.Option(None, min=1, show_default="CPUs - 1, at least 1",
                                          help="CPU threads of the model"),
    precision: str = typer.Option("fp32", help=PRECISION_HELP, callback=_precision),
    drain_timeout: float = typer.Option(60.0, min=0, help=DRAIN_HELP.replace("calls", "streams")),
    metrics_port: Optional[int] = typer.Option(None, min=0, max=65535, show_default="off", help=METRICS_PORT_HELP),
    metrics_host: str = typer.Option("127.0.0.1", help=METRICS_HOST_HELP),
    tls_cert: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                            help="PEM certificate chain: serve gRPC over TLS (with --tls-key)"),
    tls_key: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="PEM private key for --tls-cert"),
):
    """A Riva-compatible streaming ASR server (nvidia.riva.asr gRPC): bots in many processes share one engine."""
    import logging

    from .console import quiet_third_party

    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .phone import default_max_calls
    from .riva.server import run_riva_server

    if (tls_cert is None) != (tls_key is None):
        _fail("TLS needs both --tls-cert and --tls-key")
    streams = max_streams or default_max_calls(model, device, precision)[0]
    run_riva_server(host=host, port=port, model=model, chunk_ms=chunk_ms, device=device, max_streams=streams,
                    threads=threads, precision=precision, drain_timeout=drain_timeout, metrics_port=metrics_port,
                    metrics_host=metrics_host,
                    tls_cert=str(tls_cert) if tls_cert else None, tls_key=str(tls_key) if tls_key else None)


@app.command()
def languages():
    """List the model's 40 locales with their support tier and Pipecat Language."""
    from rich.console import Console
    from rich.table import Table

    from ..languages import LOCALE_TIERS, locale_to_language

    table = Table("locale", "tier", "Pipecat Language")
    for locale, tier in LOCALE_TIERS.items():
        language = locale_to_language(locale)
        table.add_row(locale, tier.value, f"Language.{language.name}" if language else "-")
    Console().print(table)


def _quiet_pipecat() -> None:
    import sys

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def main():
    app()


if __name__ == "__main__":
    main()

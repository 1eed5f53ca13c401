"""The `pipecat-nemotron` command."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

app = typer.Typer(help="Streaming multilingual speech-to-text for Pipecat on nemotron-3.5-asr-streaming.",
                  no_args_is_help=True, add_completion=False)
console = Console(stderr=True)
out = Console()


@app.command()
def transcribe(
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="WAV files (any rate; PCM, μ-law, A-law)"),
    model: str = typer.Option("nvidia/nemotron-3.5-asr-streaming-0.6b", help="Hugging Face id, .nemo path, or 'demo'"),
    chunk_ms: int = typer.Option(160, help="80, 160, 320, 560 or 1120"),
    language: str = typer.Option("auto", help="a locale such as en-US, or 'auto' to detect"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    realtime: bool = typer.Option(True, "--realtime/--fast", help="pace audio like a live call, or as fast as possible"),
    json_lines: bool = typer.Option(False, "--json", help="one JSON line per final transcript on stdout"),
    vad_mode: int = typer.Option(2, min=0, max=3, help="WebRTC VAD aggressiveness"),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads of the model (default: CPUs - 1, at least 1)"),
):
    """Stream WAV files as calls through NemotronSTTService (all files at once, batched)."""
    logging.basicConfig(level=logging.WARNING)
    _quiet_pipecat()
    from ..engine import Engine, NemotronEngineError
    from ..languages import language_to_locale, locale_to_language
    from ..stt import NemotronSTTService
    from .transcribe import transcribe_call
    from ..wav import WavError, read_wav

    try:
        wavs = {str(path): read_wav(path) for path in files}
        locale = language_to_locale(language)
    except (WavError, ValueError) as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2)
    with console.status(f"loading {model} ({chunk_ms} ms chunks)…"):
        try:
            engine = Engine.shared(model=model, chunk_ms=chunk_ms, device=device, max_streams=max(4, len(files)),
                                   **({"threads": threads} if threads else {}))
            engine.wait_ready()
            if locale != "auto" and locale not in engine.languages:
                raise NemotronEngineError(f"{model} has no prompt for {locale}; it knows {sorted(engine.languages)}")
        except NemotronEngineError as error:
            console.print(f"[red]error:[/] {error}")
            raise typer.Exit(2)
    for name, wav in wavs.items():
        console.print(f"[dim]{name}: {wav.seconds:.1f} s, {wav.sample_rate} Hz {wav.encoding}, "
                      f"{wav.channels} channel(s)[/]")

    def show_final(utterance):
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
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(7860),
    model: str = typer.Option("nvidia/nemotron-3.5-asr-streaming-0.6b", help="Hugging Face id, .nemo path, or 'demo'"),
    chunk_ms: int = typer.Option(160, help="80, 160, 320, 560 or 1120"),
    language: str = typer.Option("auto", help="a locale such as en-US, or 'auto' to detect"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    llm: Optional[bool] = typer.Option(None, "--llm/--no-llm",
                                       help="answer with an LLM (default: when NEMOTRON_LLM_API_KEY/OPENAI_API_KEY is set)"),
):
    """A browser page where a person talks and sees live transcripts (WebRTC, http://HOST:PORT/)."""
    logging.basicConfig(level=logging.INFO)
    from .webrtc_server import run_webrtc_server

    run_webrtc_server(host=host, port=port, model=model, chunk_ms=chunk_ms, language=language, device=device, llm=llm)


@app.command("serve-sip", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve_sip(ctx: typer.Context):
    """Answer SIP calls directly (UDP/TCP) and write one JSON line per final transcript.

    Options: --host --port --advertise --model --chunk-ms --language --device --threads --max-calls --allow
    --max-call-secs --greeting --output (see `pipecat-nemotron serve-sip --help-sip`).
    """
    from .phone import main as phone_main

    args = ["--help" if arg == "--help-sip" else arg for arg in ctx.args]
    phone_main(args)


@app.command()
def languages():
    """List the model's 40 locales with their support tier and Pipecat Language."""
    from ..languages import LOCALE_TIERS, locale_to_language

    table = Table("locale", "tier", "Pipecat Language")
    for locale, tier in LOCALE_TIERS.items():
        language = locale_to_language(locale)
        table.add_row(locale, tier.value, f"Language.{language.name}" if language else "-")
    out.print(table)


def _quiet_pipecat() -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def main():
    app()


if __name__ == "__main__":
    main()

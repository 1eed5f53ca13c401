"""Talk in the browser, see live transcripts with their language: WebRTC (Pipecat SmallWebRTC) + Nemotron.

    python examples/webrtc_agent.py --model demo          # bundled demo model (en-US, es-ES, de-DE)
    python examples/webrtc_agent.py                       # the real model, 40 locales, auto-detected
    python examples/webrtc_agent.py --language de-DE      # fix the language instead of detecting it

Then open http://localhost:7860/ and press Start. Browsers only give the microphone to `localhost` or HTTPS
pages: for another machine, put the server behind HTTPS (e.g. `caddy reverse-proxy --to :7860`) or use an SSH
tunnel (`ssh -L 7860:localhost:7860 server`). There is no STUN/TURN server (`iceServers: []`), so the browser and
the server must reach each other directly (same machine or LAN).

The page shows the interim hypothesis while you speak and one line per utterance with its language tag
(`en-US`, `es-ES`, ...). With an OpenAI-compatible endpoint configured, the bot also answers in text:

    export NEMOTRON_LLM_API_KEY=...            # or OPENAI_API_KEY
    export NEMOTRON_LLM_BASE_URL=http://localhost:8000/v1   # or OPENAI_BASE_URL (default: api.openai.com)
    export NEMOTRON_LLM_MODEL=...              # or OPENAI_MODEL

Everything here is `pipecat_nemotron.apps.webrtc_server` (also `pipecat-nemotron serve-webrtc`); this file shows the
pieces: a per-call pipeline `transport.input() -> VADProcessor(WebRTCVADAnalyzer) -> NemotronSTTService ->
TranscriptRelay -> transport.output()`, all calls sharing one batched engine.
"""

from __future__ import annotations

import argparse

from pipecat_nemotron.engine import DEFAULT_MODEL
from pipecat_nemotron.apps.webrtc_server import run_webrtc_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face id, .nemo path, or 'demo'")
    parser.add_argument("--chunk-ms", type=int, default=160, help="80, 160, 320, 560 or 1120")
    parser.add_argument("--language", default="auto", help="a locale such as en-US, or 'auto' to detect")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-llm", action="store_true", help="transcripts only, even when an LLM key is set")
    args = parser.parse_args()
    run_webrtc_server(host=args.host, port=args.port, model=args.model, chunk_ms=args.chunk_ms,
                      language=args.language, device=args.device, llm=False if args.no_llm else None)


if __name__ == "__main__":
    main()

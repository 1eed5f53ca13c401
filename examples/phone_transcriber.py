"""Phone transcriber: a SIP trunk or PBX sends calls straight to this bot, one JSON line per final transcript.

    python examples/phone_transcriber.py --port 5060 --model demo --output calls.jsonl
    python examples/phone_transcriber.py --allow 10.0.0.0/8 --max-calls 8 --greeting hello.wav

Same as `pipecat-nemotron serve-sip`. Per call the pipeline (see `pipecat_nemotron.apps.phone.run_call`) is::

    SIPCallTransport.input() → VADProcessor(WebRTCVADAnalyzer) → NemotronSTTService → TranscriptWriter
                             → SIPCallTransport.output()

Point a trunk or PBX at it (Asterisk: ``direct_media=no``, ``rtp_symmetric=yes``, ``dtmf_mode=rfc4733``;
FreeSWITCH / Kamailio: route to ``sip:transcriber@HOST:PORT``).
"""

from pipecat_nemotron.apps.phone import main

if __name__ == "__main__":
    main()

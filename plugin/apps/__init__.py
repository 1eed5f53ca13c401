"""The applications users run, on top of the library (engine, STT service, languages, VAD, transports):

- ``cli``: the ``pipecat-nemotron`` command (``transcribe``, ``serve-sip``, ``serve-webrtc``, ``languages``);
- ``phone``: ``serve-sip``, answering SIP calls and writing transcripts;
- ``webrtc_server``: ``serve-webrtc``, browser calls with an optional LLM;
- ``transcribe``: WAV files through the same service, paced like calls;
- ``client_session``: running one connected client's pipeline until it leaves.

The dependency points one way: applications import the library, the library never imports ``apps``.
"""

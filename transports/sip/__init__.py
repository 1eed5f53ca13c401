"""Direct SIP/RTP calls for Pipecat: an asyncio UDP user-agent server and a per-call transport.

``message`` parses and writes SIP, ``sdp`` does the offer/answer, ``rtp`` carries G.711 and RFC 4733 DTMF,
``uas`` answers calls under a policy (call limit, allowed peers, maximum length), and ``transport`` turns a
call into Pipecat ``input()``/``output()`` processors. Nothing here imports the engine or the STT service.
"""

from .message import SIPParseError, SIPRequest, SIPResponse, parse_message
from .rtp import DTMFDecoder, ReorderBuffer, RtpSession
from .sdp import Negotiated, SDPBuilder, SDPError, parse_sdp
from .transport import SIPCallTransport, SIPInputTransport, SIPOutputTransport, SIPServer
from .uas import SIPCall, SIPConfig, SIPUserAgentServer

__all__ = [
    "DTMFDecoder", "Negotiated", "ReorderBuffer", "RtpSession", "SDPBuilder", "SDPError", "SIPCall",
    "SIPCallTransport", "SIPConfig", "SIPInputTransport", "SIPOutputTransport", "SIPParseError", "SIPRequest",
    "SIPResponse", "SIPServer", "SIPUserAgentServer", "parse_message", "parse_sdp",
]

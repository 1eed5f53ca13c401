"""Direct SIP/RTP calls for Pipecat: an asyncio UDP user-agent server and a per-call transport.

``message`` parses and writes SIP, ``sdp`` does the offer/answer, ``rtp`` carries G.711, G.722 or Opus
(``transports/codecs.py``) and RFC 4733 DTMF, ``srtp`` SDES-SRTP, ``wire`` frames UDP/TCP/TLS under limits (``tls``
makes the contexts), ``transaction`` and ``dialog`` are the RFC 3261 layers, ``uas`` answers
calls under a policy (call limit, admission, allowed peers, maximum length), and ``transport`` turns a call
into Pipecat ``input()``/``output()`` processors. The client side: ``digest`` answers 401/407 challenges,
``registration`` keeps a contact registered with a PBX, ``uac`` places outbound calls. Nothing here imports the
engine or the STT service:
``admission`` is the protocol the engine satisfies.
"""

from .admission import CallAdmission, Reservation
from .config import SIPConfig
from .dialog import SIPCall
from .message import SIPParseError, SIPRequest, SIPResponse, parse_message
from .rtp import DTMFDecoder, ReorderBuffer, RtpSession
from .sdp import Negotiated, SDPBuilder, SDPError, parse_sdp
from .transport import SIPCallTransport, SIPInputTransport, SIPOutputTransport, SIPServer
from .uas import SIPUserAgentServer
from .digest import Credentials, SIPAuthError
from .registration import SIPRegistration
from .uac import CallResult, SIPUserAgentClient

__all__ = [
    "CallAdmission", "CallResult", "Credentials", "DTMFDecoder", "Reservation", "Negotiated", "ReorderBuffer", "RtpSession", "SDPBuilder", "SDPError", "SIPCall",
    "SIPCallTransport", "SIPConfig", "SIPInputTransport", "SIPOutputTransport", "SIPParseError", "SIPRequest",
    "SIPAuthError", "SIPRegistration", "SIPResponse", "SIPServer", "SIPUserAgentClient", "SIPUserAgentServer",
    "parse_message", "parse_sdp",
]

"""Pipecat transport for SIP calls: one :class:`SIPCallTransport` per call, and :class:`SIPServer`.

``SIPServer(on_call=...)`` answers calls; for each accepted call it awaits ``on_call(call)``, in which the
application builds and runs an ordinary pipeline around ``SIPCallTransport(call=call)``::

    async def on_call(call):
        transport = SIPCallTransport(call=call)
        pipeline = Pipeline([transport.input(), stt, ..., transport.output()])
        ...  # run it; it ends when the caller hangs up, or hangs up when the bot pushes EndFrame

Input: the call's audio decoded at the negotiated codec's own rate (8 kHz G.711, 16 kHz G.722, 48 kHz Opus:
``transport.sample_rate``; never narrowed to 8 kHz) → ``InputAudioRawFrame``; RFC 4733 (and SIP INFO) digits →
``InputDTMFFrame``. Output: the bot's audio (resampled to the codec's rate) → RTP, paced in real time. An
``EndFrame`` reaching the output hangs up (BYE) after the queued audio was sent; a BYE from the
caller ends the pipeline gracefully (``EndWorkerFrame``). Transports never import the engine.
"""

from __future__ import annotations

import asyncio

from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (CancelFrame, EndFrame, EndWorkerFrame, InputAudioRawFrame, InputDTMFFrame,
                                   InterruptionFrame, OutputAudioRawFrame, OutputDTMFFrame, OutputDTMFUrgentFrame,
                                   StartFrame)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams

from .admission import CallAdmission
from .config import SIPConfig
from .dialog import SIPCall
from .rtp import SAMPLE_RATE
from .uas import OnCall, SIPUserAgentServer

OUTPUT_AHEAD_SECS = 0.1  # how much bot audio may wait in the RTP queue (keeps interruptions quick)
HANGUP_TAIL_SECS = 0.3  # after the bot's last packet, time for the far end's jitter buffer to play it out


def default_params(sample_rate: int = SAMPLE_RATE) -> TransportParams:
    """Mono in and out at ``sample_rate`` (the call's codec rate: 8 kHz for G.711). No end silence from the base
    class (its default is 2 s): the RTP session keeps sending silence itself and the output waits
    ``HANGUP_TAIL_SECS`` before the BYE."""
    return TransportParams(audio_in_enabled=True, audio_out_enabled=True, audio_in_sample_rate=sample_rate,
                           audio_out_sample_rate=sample_rate, audio_in_channels=1, audio_out_channels=1,
                           audio_out_end_silence_secs=0)


class SIPInputTransport(BaseInputTransport):
    """Pushes the caller's audio (``InputAudioRawFrame``) and keypresses (``InputDTMFFrame``) downstream."""

    def __init__(self, *, transport: SIPCallTransport, params: TransportParams, **kwargs):
        super().__init__(params, **kwargs)
        self._transport = transport
        self._call = transport.call
        self._reader: asyncio.Task | None = None
        # RTP arrives with jitter: a wall-clock reset of the filter (Pipecat's default 0.2 s) would drop audio
        self._resampler = create_stream_resampler(clear_after_secs=None)

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)
        if self._reader is None:
            self._reader = self.create_task(self._read_call())
        await self._transport._call_started()

    async def stop(self, frame: EndFrame):
        await super().stop(frame)
        await self._stop_reader()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._stop_reader()

    async def _stop_reader(self):
        if self._reader is not None:
            await self.cancel_task(self._reader)
            self._reader = None

    async def _read_call(self):
        events = self._call.rtp.events
        while True:
            kind, value = await events.get()
            if kind == "audio":
                audio, rate = value, self._call.rtp.sample_rate
                if self.sample_rate != rate:
                    audio = await self._resampler.resample(audio, rate, self.sample_rate)
                await self.push_audio_frame(InputAudioRawFrame(audio=audio, sample_rate=self.sample_rate,
                                                               num_channels=1))
            elif kind == "dtmf":
                await self._push_dtmf(value)
            elif kind == "end":
                await self._end_pipeline()
                return

    async def _push_dtmf(self, digit: str):
        try:
            button = KeypadEntry(digit)
        except ValueError:
            logger.debug(f"{self}: DTMF {digit!r} has no keypad entry")
            return
        await self.push_frame(InputDTMFFrame(button=button))

    async def _end_pipeline(self):
        """The caller hung up: let queued audio through, then end the pipeline gracefully."""
        queue = getattr(self, "_audio_in_queue", None)
        if queue is not None:
            try:
                await asyncio.wait_for(queue.join(), 2.0)
            except asyncio.TimeoutError:
                pass
        if self._transport.end_on_hangup:
            await self.push_frame(EndWorkerFrame(reason=f"call ended: {self._call.outcome}"))


class SIPOutputTransport(BaseOutputTransport):
    """Sends the bot's audio to the caller as RTP; ``EndFrame`` hangs up once the audio has gone out."""

    def __init__(self, *, transport: SIPCallTransport, params: TransportParams, **kwargs):
        super().__init__(params, **kwargs)
        self._transport = transport
        self._call = transport.call
        self._resampler = create_stream_resampler()

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def stop(self, frame: EndFrame):
        await super().stop(frame)
        if self._call.active:
            await self._call.rtp.drain(timeout=10.0)
            await asyncio.sleep(HANGUP_TAIL_SECS)
        await self._call.hangup("bot hung up")

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._call.hangup("pipeline cancelled")

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            self._call.rtp.clear_output()

    def _supports_native_dtmf(self) -> bool:
        n = self._call.negotiated
        return n is not None and n.dtmf_payload_type is not None

    async def _write_dtmf_native(self, frame: OutputDTMFFrame | OutputDTMFUrgentFrame):
        """RFC 4733 events on the caller's telephone-event payload type (else pipecat plays tones in-band)."""
        for button in frame.buttons or []:
            self._call.rtp.send_dtmf(button.value)
        while self._call.active and self._call.rtp.dtmf_pending:
            await asyncio.sleep(0.02)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        if not self._call.active:
            return False
        audio, rate = frame.audio, self._call.rtp.sample_rate
        if frame.num_channels != 1:
            audio = _first_channel(audio, frame.num_channels)
        if frame.sample_rate != rate:
            audio = await self._resampler.resample(audio, frame.sample_rate, rate)
        self._call.rtp.write(audio)
        while self._call.active and self._call.rtp.buffered_seconds > OUTPUT_AHEAD_SECS:
            await asyncio.sleep(0.01)
        return True


def _first_channel(audio: bytes, channels: int) -> bytes:
    import numpy as np

    return np.frombuffer(audio, dtype="<i2").reshape(-1, channels)[:, 0].tobytes()


class SIPCallTransport(BaseTransport):
    """The Pipecat transport of one SIP call: ``input()`` and ``output()`` processors.

    Events: ``on_call_started(transport, call)`` when the pipeline starts, ``on_call_ended(transport, call)``
    when the call ends (either side). ``call.identity`` has the caller's From URI, display name, Call-ID
    and remote address.

    Parameters:
        call: The answered call (from ``SIPServer``'s ``on_call``).
        params: Transport parameters; by default mono in and out at the call's codec rate (``sample_rate``:
            8 kHz G.711, 16 kHz G.722, 48 kHz Opus). Give the pipeline the same ``audio_in_sample_rate``.
        end_on_hangup: End the pipeline (``EndWorkerFrame``) when the caller hangs up.
    """

    def __init__(self, *, call: SIPCall, params: TransportParams | None = None, end_on_hangup: bool = True,
                 name: str | None = None):
        super().__init__(name=name)
        self.call = call
        self.end_on_hangup = end_on_hangup
        self._params = params or default_params(call.rtp.sample_rate)
        self._input: SIPInputTransport | None = None
        self._output: SIPOutputTransport | None = None
        self._started = False
        self._register_event_handler("on_call_started")
        self._register_event_handler("on_call_ended")
        call.add_ended_callback(self._call_ended)

    @property
    def sample_rate(self) -> int:
        """The audio rate of the call's input frames (the negotiated codec's unless ``params`` said otherwise):
        use it as the pipeline's ``audio_in_sample_rate`` so VAD and STT read the frames at their real rate."""
        return self._params.audio_in_sample_rate or self.call.rtp.sample_rate

    def input(self) -> SIPInputTransport:
        if self._input is None:
            self._input = SIPInputTransport(transport=self, params=self._params, name=self._input_name)
        return self._input

    def output(self) -> SIPOutputTransport:
        if self._output is None:
            self._output = SIPOutputTransport(transport=self, params=self._params, name=self._output_name)
        return self._output

    async def hangup(self) -> None:
        """Hang up now (BYE), without waiting for queued audio."""
        await self.call.hangup("bot hung up")

    async def _call_started(self):
        if not self._started:
            self._started = True
            await self._call_event_handler("on_call_started", self.call)

    async def _call_ended(self, call: SIPCall):
        events = call.rtp.events
        if events.full():
            events.get_nowait()
        events.put_nowait(("end", ""))
        await self._call_event_handler("on_call_ended", call)


class SIPServer:
    """Answers SIP calls over UDP and runs ``on_call(call)`` for each accepted one.

    Parameters:
        on_call: ``async def on_call(call: SIPCall)``; build and run the call's pipeline here. When it
            returns, the call is hung up if it is still up.
        host, port: Where to listen (port 0: a free port, see ``port`` after ``start()``).
        max_calls: Concurrent calls; beyond it INVITEs get 503 before ``on_call`` runs.
        allowed_peers: Addresses or networks allowed to call (403 otherwise); empty allows all.
        max_call_secs: Hang up calls after this long (None: no limit).
        admission: Asked for a reservation before each call is answered (e.g. the STT ``Engine``); full → 503.
        config: A full :class:`SIPConfig` instead of the keyword arguments above.
    """

    def __init__(self, *, on_call: OnCall, host: str = "0.0.0.0", port: int = 5060, max_calls: int = 16,
                 allowed_peers: tuple[str, ...] | list[str] = (), max_call_secs: float | None = 4 * 3600,
                 admission: CallAdmission | None = None, config: SIPConfig | None = None):
        self.config = config or SIPConfig(host=host, port=port, max_calls=max_calls,
                                          allowed_peers=tuple(allowed_peers), max_call_secs=max_call_secs,
                                          admission=admission)
        self.uas = SIPUserAgentServer(config=self.config, on_call=on_call)

    async def start(self) -> tuple[str, int]:
        """Start listening; returns the bound (host, port)."""
        return await self.uas.start()

    @property
    def port(self) -> int:
        return self.uas.port

    @property
    def calls(self) -> dict[str, SIPCall]:
        return self.uas.calls

    async def serve_forever(self) -> None:
        """Start (if needed) and run until cancelled; hangs up every call on the way out."""
        if self.uas.address is None:
            await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Hang up every call and stop listening."""
        await self.uas.stop()

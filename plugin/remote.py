"""A call's stream on a remote `serve-riva` server, with the in-process `Stream`'s interface.

`NemotronSTTService(server="host:port")` uses it so a bot process holds no model: its audio goes to a shared server
(one batched engine for many bot processes) while the service keeps its own VAD-driven finalize. Each utterance is
one `StreamingRecognize` RPC: `finalize()` half-closes it (the server then pads, steps, and sends the utterance's
final) and the next utterance's RPC is opened at once, so no audio waits for a connection. The server's own
endpointing is switched off for these RPCs (the VAD in the pipeline decides). Results keep the utterances' order.
A failed RPC (server gone, at capacity) ends the stream with `RemoteStreamError`; the service opens a new stream
at the next utterance, as after an engine fault.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from riva.client.proto import riva_asr_pb2, riva_asr_pb2_grpc

from .engine import Final, NemotronEngineError, Partial
from .engine.errors import BacklogError, CapacityError, StreamClosedError

SAMPLE_RATE = 16000
NEVER_MS = 24 * 3600 * 1000  # endpointing stop_history that never ends an utterance by itself
MAX_QUEUED_S = 30.0  # audio waiting for the RPC (a server that stopped reading)


class RemoteStreamError(NemotronEngineError):
    """The remote server refused or dropped the stream."""


class _Utterance:
    """One RPC: its request queue and the results it produced."""

    def __init__(self):
        self.requests: asyncio.Queue = asyncio.Queue()
        self.queued_s = 0.0
        self.finals: list[str] = []
        self.language: str | None = None
        self.done = asyncio.Event()
        self.error: BaseException | None = None
        self.task: asyncio.Task | None = None
        self.finalized_at = 0.0


class RemoteStream:
    """`feed()` 16 kHz PCM16, `finalize()` each utterance, `async for` the `Partial`/`Final` results, `close()`."""

    def __init__(self, *, server: str, language: str = "auto", secure: bool = False):
        self.server = server
        self.language = language
        self.closed = False
        self.reservation = None
        self._channel = grpc.aio.secure_channel(server, grpc.ssl_channel_credentials()) if secure else \
            grpc.aio.insecure_channel(server)
        self._stub = riva_asr_pb2_grpc.RivaSpeechRecognitionStub(self._channel)
        self._results: asyncio.Queue = asyncio.Queue()
        self._utterances: list[_Utterance] = []
        self._current = self._open()

    # ---- caller side (the event loop) --------------------------------------------------------
    def feed(self, audio: bytes) -> None:
        self._check_open()
        utterance = self._current
        seconds = len(audio) / 2 / SAMPLE_RATE
        if utterance.queued_s + seconds > MAX_QUEUED_S:
            raise BacklogError(f"{utterance.queued_s:.0f} s of audio wait for {self.server}: it stopped reading")
        utterance.queued_s += seconds
        utterance.requests.put_nowait(riva_asr_pb2.StreamingRecognizeRequest(audio_content=bytes(audio)))

    def finalize(self) -> None:
        """End the utterance (half-close its RPC) and open the next one's."""
        self._check_open()
        self._current.finalized_at = time.monotonic()
        self._current.requests.put_nowait(None)
        self._current = self._open()

    def set_language(self, language: str) -> None:
        """From the next utterance (its RPC's config)."""
        self.language = language

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for utterance in self._utterances:
            if utterance.task is not None:
                utterance.task.cancel()
        self._results.put_nowait(StopAsyncIteration)
        asyncio.ensure_future(self._channel.close())

    @property
    def lag_s(self) -> float:
        """Audio handed over but not yet sent to the server."""
        return sum(u.queued_s for u in self._utterances if not u.done.is_set())

    def seconds_to_drain(self) -> float:
        return 0.0  # the server's backlog is not visible from here

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._results.get()
        if item is StopAsyncIteration:
            self._results.put_nowait(StopAsyncIteration)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    # ---- RPCs ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise StreamClosedError("the remote stream is closed")

    def _open(self) -> _Utterance:
        utterance = _Utterance()
        previous = self._utterances[-1] if self._utterances else None
        self._utterances = [u for u in self._utterances if not u.done.is_set()] + [utterance]
        utterance.task = asyncio.ensure_future(self._run(utterance, previous))
        return utterance

    async def _requests(self, utterance: _Utterance):
        config = riva_asr_pb2.RecognitionConfig(
            encoding=1, sample_rate_hertz=SAMPLE_RATE, language_code="" if self.language == "auto" else self.language,
            endpointing_config=riva_asr_pb2.EndpointingConfig(stop_history=NEVER_MS))
        yield riva_asr_pb2.StreamingRecognizeRequest(
            streaming_config=riva_asr_pb2.StreamingRecognitionConfig(config=config, interim_results=True))
        while True:
            request = await utterance.requests.get()
            if request is None:
                return
            utterance.queued_s = max(0.0, utterance.queued_s - len(request.audio_content) / 2 / SAMPLE_RATE)
            yield request

    async def _run(self, utterance: _Utterance, previous: _Utterance | None) -> None:
        """Run one utterance's RPC; deliver its results once the previous utterance's are out (order kept)."""
        try:
            async for response in self._stub.StreamingRecognize(self._requests(utterance)):
                for result in response.results:
                    if not result.alternatives:
                        continue
                    alternative = result.alternatives[0]
                    language = alternative.language_code[-1] if alternative.language_code else None
                    if result.is_final:
                        utterance.finals.append(alternative.transcript)
                        utterance.language = language or utterance.language
                    elif previous is None or previous.done.is_set():
                        self._results.put_nowait(Partial(" ".join([*utterance.finals, alternative.transcript]),
                                                         language, 0.0, result.audio_processed))
        except grpc.aio.AioRpcError as error:
            kind = CapacityError if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else RemoteStreamError
            utterance.error = kind(f"{self.server}: {error.code().name}: {error.details()}")
        except asyncio.CancelledError:
            utterance.done.set()
            raise
        if previous is not None:
            await previous.done.wait()
        if utterance.error is not None:
            self._results.put_nowait(utterance.error)
        elif utterance.finalized_at:
            text = " ".join(t for t in utterance.finals if t)
            self._results.put_nowait(Final(text, utterance.language, 0.0, 0.0,
                                           latency_s=time.monotonic() - utterance.finalized_at))
        utterance.done.set()

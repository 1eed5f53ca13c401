"""Admission: a call's claim on an engine stream, taken before the call is answered.

Every transport asks the same question before it answers (SIP 200, WebRTC answer, media-stream
start, a gRPC stream): can the engine take one more call? `Engine.try_reserve()` answers it with a
`StreamReservation` (or None when full), so a caller beyond capacity is refused before it is answered
instead of answered and then dropped. The reservation is handed to `NemotronSTTService(reservation=...)`,
whose streams run on it, and is released exactly once when the call is over, whichever way it ended:
`release()` is idempotent, so the transport and the service may both call it.
"""

from __future__ import annotations

import threading
from .errors import CapacityError, StreamClosedError


class Capacity:
    """How many reservations an engine grants at once (its stream slots). Thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._held = 0
        self._next = 0

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    @property
    def free(self) -> int:
        with self._lock:
            return self.size - self._held

    def try_reserve(self) -> "StreamReservation | None":
        """A reservation, or None when every slot is reserved."""
        with self._lock:
            if self._held >= self.size:
                return None
            self._held += 1
            self._next += 1
            number = self._next
        return StreamReservation(capacity=self, number=number)

    def reserve(self) -> "StreamReservation":
        """A reservation; raises `CapacityError` when every slot is reserved."""
        reservation = self.try_reserve()
        if reservation is None:
            raise CapacityError(f"all {self.size} stream slots of this engine are in use; "
                                "refuse the call or raise max_streams.")
        return reservation

    def give_back(self) -> None:
        """One reservation ended (called by `StreamReservation.release`, once per reservation)."""
        with self._lock:
            self._held -= 1


class StreamReservation:
    """One call's claim on an engine stream slot; see the module docstring.

    Attributes:
        number: a sequence number, for logs.
    """

    def __init__(self, *, capacity: Capacity, number: int):
        self.number = number
        self._capacity = capacity
        self._lock = threading.Lock()
        self._released = False
        self._stream = None

    @property
    def capacity(self) -> Capacity:
        """The engine capacity this reservation counts against."""
        return self._capacity

    @property
    def released(self) -> bool:
        with self._lock:
            return self._released

    @property
    def stream(self):
        """The stream currently open on this reservation, if any."""
        with self._lock:
            return self._stream

    def bind(self, stream) -> None:
        """Attach a newly opened stream (the engine does this in `open_stream`)."""
        with self._lock:
            if self._released:
                raise StreamClosedError(f"reservation {self.number} was released; reserve again.")
            if self._stream is not None and not self._stream.closed:
                raise StreamClosedError(f"reservation {self.number} already has open stream {self._stream.id}.")
            self._stream = stream

    def unbind(self, stream) -> None:
        """Detach a stream that was closed (the reservation stays held for the next stream of the call)."""
        with self._lock:
            if self._stream is stream:
                self._stream = None

    def release(self) -> None:
        """Give the slot back; closes a stream still open on it. Safe to call more than once."""
        with self._lock:
            if self._released:
                return
            self._released = True
            stream, self._stream = self._stream, None
        self._capacity.give_back()
        if stream is not None:
            stream.close()

    def __enter__(self) -> "StreamReservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<StreamReservation {self.number}{' released' if self.released else ''}>"

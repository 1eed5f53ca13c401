"""Admission: how the SIP server asks whatever serves the calls (the STT engine) for room before answering.

Transports never import the engine, so this is a structural protocol: the engine's ``Engine`` satisfies
:class:`CallAdmission` as it is (``try_reserve()`` and ``has_capacity``), and tests use a small fake. Two optional
string attributes name a refusal in the 503's reason phrase: ``refusal`` (why the last ``try_reserve()`` gave None)
and ``unavailable`` (why there is no capacity now, for OPTIONS); the servers' ``DrainingAdmission`` has both.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Reservation(Protocol):
    """Room held for one call; ``release()`` gives it back and may be called any number of times."""

    def release(self) -> None: ...


@runtime_checkable
class CallAdmission(Protocol):
    """Something with a bounded number of call slots (the engine's streams)."""

    def try_reserve(self) -> Reservation | None:
        """A reservation for one more call, or None when full."""
        ...

    @property
    def has_capacity(self) -> bool:
        """Whether ``try_reserve()`` would succeed now (for OPTIONS health answers)."""
        ...


__all__ = ["CallAdmission", "Reservation"]

"""Graceful drain of a server (serve-sip, serve-webrtc): stop taking calls, let the live ones finish, then leave.

SIGTERM (or ``POST /drain`` on the admin port, ``metrics.AdminServer``) starts it. From then on new calls are
refused (SIP: INVITE 503 + Retry-After and OPTIONS 503, so a Kamailio dispatcher probing with OPTIONS takes the
node out; WebRTC: offers get HTTP 503 + Retry-After) while the live calls go on for up to ``--drain-timeout``
seconds. Calls still up then are ended by the server (SIP: BYE) and their pipelines end gracefully, so the STT
service still delivers the finals of what was said; then the process exits with status 0. A second SIGTERM ends
the wait at once (the calls are still ended gracefully); a drain with no calls exits at once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

from loguru import logger

DEFAULT_DRAIN_TIMEOUT_S = 60.0
POLL_S = 0.1


class Drain:
    """Whether a server is draining, and the waits of its graceful stop.

    ``draining`` is a plain flag, safe to read from any thread (the admin HTTP thread reads it for /healthz).
    ``request()`` runs on the event loop (a signal handler added with ``install_signal_handlers``);
    ``request_threadsafe()`` from any other thread. Asking again while draining ends the wait for the live calls
    (``hurry``) when ``hurry_if_repeated`` (a second SIGTERM), and is a no-op otherwise (a repeated POST).
    """

    def __init__(self, *, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S):
        if timeout_s < 0:
            raise ValueError("the drain timeout must be 0 or more seconds")
        self.timeout_s = timeout_s
        self.draining = False
        self.started_at: float | None = None  # time.monotonic() of the request
        self.reason = ""
        self._requested = asyncio.Event()
        self._hurry = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals: list[int] = []

    def request(self, reason: str, *, hurry_if_repeated: bool = True) -> None:
        """Start draining (on the event loop); a repeated request may end the wait for the live calls."""
        if self.draining:
            if hurry_if_repeated and not self._hurry.is_set():
                logger.warning(f"drain: {reason} again: ending the remaining calls now")
                self._hurry.set()
            return
        self.draining, self.reason, self.started_at = True, reason, time.monotonic()
        logger.info(f"drain: {reason}: refusing new calls (503 + Retry-After), live calls may go on for up to "
                    f"{self.timeout_s:g} s")
        self._requested.set()

    def request_threadsafe(self, reason: str, *, hurry_if_repeated: bool = False) -> None:
        """`request` from another thread (the admin HTTP server's)."""
        if self._loop is None:
            raise RuntimeError("the drain is not bound to an event loop yet")
        self._loop.call_soon_threadsafe(lambda: self.request(reason, hurry_if_repeated=hurry_if_repeated))

    def bind(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Remember the event loop that ``request_threadsafe`` hands requests to (the running one by default)."""
        self._loop = loop or asyncio.get_running_loop()

    def install_signal_handlers(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        """SIGTERM (by default) starts the drain; a second one hurries it."""
        self.bind()
        for signum in signals:
            self._loop.add_signal_handler(signum, self.request, signal.Signals(signum).name)
            self._signals.append(signum)

    def remove_signal_handlers(self) -> None:
        for signum in self._signals:
            self._loop.remove_signal_handler(signum)
        self._signals.clear()

    async def requested(self) -> None:
        """Return once a drain has been asked for."""
        await self._requested.wait()

    @property
    def hurried(self) -> bool:
        return self._hurry.is_set()

    async def wait_for(self, done: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Wait until ``done()`` (polled), the bound (``timeout_s``, default the drain timeout, counted from the
        request) or a hurry; returns ``done()``."""
        loop = asyncio.get_running_loop()
        bound = self.timeout_s if timeout_s is None else timeout_s
        started = self.started_at if timeout_s is None and self.started_at is not None else time.monotonic()
        deadline = loop.time() + max(0.0, bound - (time.monotonic() - started))
        while not done() and not self._hurry.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            hurry = asyncio.ensure_future(self._hurry.wait())
            try:
                await asyncio.wait([hurry], timeout=min(POLL_S, remaining))
            finally:
                hurry.cancel()
        return done()

    async def wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``done()`` or ``timeout_s`` (a hurry does not cut this one short); returns ``done()``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not done() and loop.time() < deadline:
            await asyncio.sleep(min(POLL_S, max(0.0, deadline - loop.time())))
        return done()


class DrainingAdmission:
    """A call admission (``transports.sip.admission.CallAdmission``) that refuses while draining.

    Wraps the engine's own admission (``try_reserve()``/``has_capacity``), or none (every call gets a no-op
    reservation until the drain). ``refusal`` says why the last ``try_reserve()`` gave None: ``"draining"``,
    ``"lag"`` (the engine runs behind real time), ``"not_ready"`` (the engine is not serving) or ``"capacity"``;
    the SIP server puts it in its 503's reason phrase and its log line, and the metrics count refusals by it.
    """

    def __init__(self, *, drain: Drain, engine=None):
        self.drain = drain
        self.engine = engine
        self.refusal: str | None = None

    def try_reserve(self):
        if self.drain.draining:
            self.refusal = "draining"
            return None
        if self.engine is None:
            return _NoReservation()
        reservation = self.engine.try_reserve()
        if reservation is None:
            self.refusal = engine_refusal(self.engine)
        return reservation

    @property
    def has_capacity(self) -> bool:
        return not self.drain.draining and (self.engine is None or self.engine.has_capacity)

    @property
    def unavailable(self) -> str | None:
        """Why there is no capacity now (the SIP server's OPTIONS 503 says it), None while there is."""
        if self.drain.draining:
            return "draining"
        if self.engine is None or self.engine.has_capacity:
            return None
        return engine_refusal(self.engine)


def engine_refusal(engine) -> str:
    """Why ``engine.try_reserve()`` gives None now: "not_ready", "lag" or "capacity"."""
    if not getattr(engine, "alive_or_loading", True):
        return "not_ready"
    if getattr(engine, "lagging", False):
        return "lag"
    return "capacity"


class _NoReservation:
    """The reservation of an admission with no engine behind it (a server built with its own STT factory)."""

    def release(self) -> None:
        pass


__all__ = ["DEFAULT_DRAIN_TIMEOUT_S", "Drain", "DrainingAdmission", "engine_refusal"]

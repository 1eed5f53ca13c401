"""What a stream yields, and the queue that carries it from the engine thread to asyncio."""

from __future__ import annotations

import asyncio
import re
import threading
from collections import deque
from dataclasses import dataclass, field

TAG_PATTERN = re.compile(r"\s*<([a-z]{2,3}-[A-Z]{2})>")
# closing punctuation and tags before an utterance's first word: the end of the PREVIOUS utterance, which the
# model wrote once it heard the pause (opening marks such as "¿" and "¡" belong to the new one)
LEADING_MARKS = re.compile(r"^(?:\s*(?:<[a-z]{2,3}-[A-Z]{2}>|[.,;:!?…]+))+\s*")


def split_language_tags(text: str) -> tuple[str, list[str]]:
    """Remove `<xx-YY>` tags from model text; return (clean text, tags in order)."""
    tags = TAG_PATTERN.findall(text)
    clean = " ".join(TAG_PATTERN.sub("", text).split())
    return clean, tags


def split_leading_marks(text: str) -> tuple[str, str]:
    """(closing marks and tags before the first word, the rest) of an utterance's raw model text."""
    match = LEADING_MARKS.match(text)
    return (text[:match.end()].strip(), text[match.end():]) if match else ("", text)


@dataclass(frozen=True)
class Transcript:
    """Text of the current utterance so far. `start_s`/`end_s` are seconds of fed audio."""

    text: str
    language: str | None
    start_s: float
    end_s: float
    token_ids: tuple[int, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Partial(Transcript):
    """Interim text of an utterance still in progress; it may still change."""


@dataclass(frozen=True)
class Final(Transcript):
    """The whole utterance, after `finalize()`. `latency_s` is finalize request -> result."""

    latency_s: float = 0.0


class ResultQueue:
    """Thread-safe, bounded-by-design queue: consecutive partials collapse into the newest.

    Finals are never dropped; a slow consumer only loses interim text that a newer
    interim already supersedes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self._loop = loop
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._event = asyncio.Event() if loop is not None else None
        self._sync_event = threading.Event()
        self._ended = False

    def put(self, item) -> None:
        with self._lock:
            if self._ended:
                return
            if isinstance(item, Partial) and self._items and isinstance(self._items[-1], Partial):
                self._items[-1] = item
            else:
                self._items.append(item)
        self._wake()

    def end(self) -> None:
        with self._lock:
            self._ended = True
        self._wake()

    def _wake(self) -> None:
        self._sync_event.set()
        if self._loop is not None and self._event is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def _pop(self):
        with self._lock:
            if self._items:
                return True, self._items.popleft()
            if self._ended:
                return True, StopAsyncIteration
            self._sync_event.clear()
            if self._event is not None:
                self._event.clear()
            return False, None

    async def get(self):
        """Next result; raises StopAsyncIteration when the stream is closed and drained."""
        while True:
            ready, item = self._pop()
            if ready:
                if item is StopAsyncIteration:
                    raise StopAsyncIteration
                if isinstance(item, BaseException):
                    raise item
                return item
            if self._event is None:
                raise RuntimeError("this stream was opened outside an event loop; use get_sync()")
            await self._event.wait()

    def get_sync(self, timeout: float | None = None):
        """Blocking variant for threads; returns None on timeout or when closed and drained."""
        while True:
            ready, item = self._pop()
            if ready:
                if isinstance(item, BaseException):
                    raise item
                return None if item is StopAsyncIteration else item
            if not self._sync_event.wait(timeout):
                return None

"""Observers for tests: one that records every moment, one that raises in every moment."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from typing import Any

import chatfeed
from chatfeed import ClientState, FeedEvent, Gap
from chatfeed.bridge import Record
from chatfeed.exceptions import ChatfeedError

from .conftest import WAIT

Call = tuple[Any, ...]
"""One moment as recorded: its name, then its arguments in the order the method declares them."""


class Started:
    """What `Recording.handler_started` returns: a token `handler_finished` must get back."""

    _serials = itertools.count(1)

    def __init__(self, handler: str) -> None:
        self.serial = next(self._serials)
        self.handler = handler

    def __repr__(self) -> str:
        return f"<Started {self.serial} {self.handler}>"


class Recording(chatfeed.Observer):
    """Overrides every moment: records each as a tuple ``(name, *arguments)``, and in which thread it came.

    ``started`` tokens are `Started` objects, one per call. A test waits for a
    moment with `wait_for`, in the loop that reports it.
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.threads: set[str] = set()
        self._changed: asyncio.Future[None] | None = None

    def _add(self, *call: Any) -> None:
        self.calls.append(call)
        self.threads.add(threading.current_thread().name)
        changed = self._changed
        if changed is not None and not changed.done():
            changed.set_result(None)

    def of(self, *names: str) -> list[Call]:
        """The calls of the moments ``names``, in order."""
        return [call for call in self.calls if call[0] in names]

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        """Return once ``predicate()`` holds; it is checked after each call."""

        async def wait() -> None:
            while not predicate():
                if self._changed is None or self._changed.done():
                    self._changed = asyncio.get_running_loop().create_future()
                await self._changed

        await asyncio.wait_for(wait(), timeout)

    async def wait_for_calls(self, name: str, count: int, timeout: float = WAIT) -> list[Call]:
        """Wait until ``name`` was called ``count`` times; return its calls."""
        await self.wait_for(lambda: len(self.of(name)) >= count, timeout)
        return self.of(name)

    def attached(self, subject: object) -> None:
        self._add("attached", subject)

    def connecting(self, feed: str | None, *, attempt: int) -> None:
        self._add("connecting", feed, attempt)

    def connected(self, feed: str | None, *, is_reconnect: bool, downtime: float | None) -> None:
        self._add("connected", feed, is_reconnect, downtime)

    def disconnected(
        self,
        feed: str | None,
        *,
        code: int | None,
        reason: str,
        error: ChatfeedError,
        retry_in: float | None,
    ) -> None:
        self._add("disconnected", feed, code, reason, error, retry_in)

    def state_changed(self, feed: str | None, state: ClientState) -> None:
        self._add("state_changed", feed, state)

    def frame_received(self, feed: str | None, frame: str | bytes) -> None:
        self._add("frame_received", feed, frame)

    def event_received(self, feed: str | None, event: FeedEvent) -> None:
        self._add("event_received", feed, event)

    def duplicate_dropped(self, feed: str | None, event: FeedEvent) -> None:
        self._add("duplicate_dropped", feed, event)

    def backfilled(self, feed: str | None, *, gap: Gap, events: int, error: Exception | None) -> None:
        self._add("backfilled", feed, gap, events, error)

    def handler_started(self, feed: str | None, event: Any, *, handler: str) -> object:
        token = Started(handler)
        self._add("handler_started", feed, event, handler, token)
        return token

    def handler_finished(
        self,
        feed: str | None,
        event: Any,
        *,
        handler: str,
        duration: float,
        error: BaseException | None,
        started: object,
    ) -> None:
        self._add("handler_finished", feed, event, handler, duration, error, started)

    def backpressure(self, feed: str | None, *, engaged: bool, where: str) -> None:
        self._add("backpressure", feed, engaged, where)

    def published(self, record: Record, *, stored: bool, duration: float) -> None:
        self._add("published", record, stored, duration)

    def publish_failed(self, record: Record, *, error: BaseException, attempt: int) -> None:
        self._add("publish_failed", record, error, attempt)

    def acknowledged(self, feed: str, event: FeedEvent) -> None:
        self._add("acknowledged", feed, event)

    def redelivery(self, feed: str, event: FeedEvent, *, attempt: int, delay: float) -> None:
        self._add("redelivery", feed, event, attempt, delay)

    def dead_lettered(self, feed: str | None, event: FeedEvent | None, *, attempts: int) -> None:
        self._add("dead_lettered", feed, event, attempts)


class Broken(Recording):
    """Records every moment, like `Recording`, then raises: an observer with a bug in every method."""

    def _add(self, *call: Any) -> None:
        super()._add(*call)
        raise RuntimeError(f"observer bug in {call[0]}")


def handler_calls(observer: Recording) -> list[tuple[str | None, Any, str, Started, float, BaseException | None]]:
    """Each handler call as ``(feed, event, handler, token, duration, error)``, checking that its start and end pair up.

    The token of each `handler_finished` must be the one its `handler_started`
    returned, for the same event and handler, and given once.
    """
    open_calls: dict[int, Call] = {}
    paired = []
    for call in observer.of("handler_started", "handler_finished"):
        if call[0] == "handler_started":
            _, feed, event, handler, token = call
            open_calls[token.serial] = call
            continue
        _, feed, event, handler, duration, error, token = call
        assert isinstance(token, Started), f"handler_finished got {token!r}, not what handler_started returned"
        started = open_calls.pop(token.serial)
        assert started[1:4] == (feed, event, handler), (started, call)
        paired.append((feed, event, handler, token, duration, error))
    assert not open_calls, f"handler calls that never finished: {list(open_calls.values())}"
    return paired

"""Observers: what a client, pool, bridge or consumer reports at each moment that matters.

An [`Observer`][chatfeed.Observer] is a class with one no-op method per
moment; a subclass overrides those it wants. `hooks_of` works out, once, which
methods an observer (or several) overrides, into a `Hooks` whose other slots
are ``None``: the receive path tests a slot and calls nothing for a moment
nobody observes, so an observer of connections costs nothing per frame, and
no observer costs nothing at all.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from .exceptions import UsageError

if TYPE_CHECKING:
    from ._client import ClientState
    from ._delivery import Gap
    from .bridge._envelope import Record
    from .exceptions import ChatfeedError
    from .models import FeedEvent

__all__ = ["Hooks", "Observer", "hooks_of"]

logger = logging.getLogger("chatfeed")


class Observer:
    """What chatfeed reports as it works: subclass it and override the moments you need.

    Pass an instance as ``observer=`` to a [`Client`][chatfeed.Client], a
    [`Pool`][chatfeed.Pool], a [`Bridge`][chatfeed.bridge.Bridge] or a
    [`Consumer`][chatfeed.bridge.Consumer] (or a list of observers). Only the
    methods a subclass overrides are ever called: the others cost nothing.

    Every method is called on the event loop, synchronously, as the moment
    happens: it must be quick and must not block (count, time, hand over to a
    queue). An exception it raises is logged (the first time at ERROR, then at
    DEBUG) and chatfeed goes on as if it had returned.

    ``feed`` is the key of a pool's feed (or of the feed a bridged event came
    from), ``None`` for a lone [`Client`][chatfeed.Client]. Nothing passed to
    an observer holds the token: a frame that quotes it is given with it
    replaced by ``***``.

    Example:
        ```python
        class Reconnects(chatfeed.Observer):
            def __init__(self) -> None:
                self.by_code: collections.Counter[int | None] = collections.Counter()

            def disconnected(self, feed, *, code, reason, error, retry_in) -> None:
                self.by_code[code] += 1

        client = chatfeed.Client(url, token=jwt, observer=Reconnects())
        ```
    """

    def attached(self, subject: object) -> None:
        """Called once, when a client, pool, bridge or consumer is made with this observer.

        An exporter keeps ``subject`` to read its ``statistics()`` when it is
        scraped (feeds by state, buffered events). A pool's feeds do not call it.
        """

    # A connection's life

    def connecting(self, feed: str | None, *, attempt: int) -> None:
        """A connection attempt starts (``attempt`` counts from 1 since the last success)."""

    def connected(self, feed: str | None, *, is_reconnect: bool, downtime: float | None) -> None:
        """A connection was authenticated; ``downtime`` is the seconds since the last one was lost."""

    def disconnected(
        self,
        feed: str | None,
        *,
        code: int | None,
        reason: str,
        error: ChatfeedError,
        retry_in: float | None,
    ) -> None:
        """An authenticated connection ended.

        Args:
            feed: The feed's key.
            code: The WebSocket close code, or ``None`` when the connection was
                not closed by a handshake (a ping timeout, a reset).
            reason: The close reason, token scrubbed.
            error: Why, as the ``Disconnected`` event gives it.
            retry_in: Seconds until the next attempt, or ``None`` when the
                client gives up.
        """

    def state_changed(self, feed: str | None, state: ClientState) -> None:
        """The client (or the pool's feed) moved to ``state``."""

    # What comes in

    def frame_received(self, feed: str | None, frame: str | bytes) -> None:
        """A frame arrived on an authenticated connection, as the wire carried it, token scrubbed."""

    def event_received(self, feed: str | None, event: FeedEvent) -> None:
        """An event is about to be delivered: parsed from a frame, backfilled, or (consumer) fetched.

        Duplicates dropped by ``dedupe`` are not; see `duplicate_dropped`.
        """

    def duplicate_dropped(self, feed: str | None, event: FeedEvent) -> None:
        """``dedupe`` dropped ``event``: it was delivered already."""

    def backfilled(self, feed: str | None, *, gap: Gap, events: int, error: Exception | None) -> None:
        """A backfill ended: ``events`` items fetched for ``gap``, and what failed, if anything did."""

    # Delivery

    def handler_started(self, feed: str | None, event: Any, *, handler: str) -> object:
        """A handler is called with ``event``; what this returns is given back to `handler_finished`.

        It runs in the task that runs the handler, just before: a context made
        current here (a tracing span) is the handler's.
        """
        return None

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
        """The handler returned (``error`` is ``None``) or raised, after ``duration`` seconds.

        ``started`` is what `handler_started` returned for this call.
        """

    def backpressure(self, feed: str | None, *, engaged: bool, where: str) -> None:
        """A buffer filled up, so ``feed`` (``None``: every feed) is not read (``engaged``); or it is again.

        ``where`` says which: ``"events"`` (an ``events()`` stream), the name
        of a handler with ``concurrency``, ``"bridge"`` (its window of
        unpublished records), ``"consumer"`` (events being handled).
        """

    # The bridge and the consumer

    def published(self, record: Record, *, stored: bool, duration: float) -> None:
        """The bridge's broker acknowledged ``record`` (``stored`` False: it had it already).

        ``duration`` is the seconds from the first attempt to the
        acknowledgement, retries included; ``record.feed``, ``record.type``,
        ``record.chat`` and ``record.created`` say what it was.
        """

    def publish_failed(self, record: Record, *, error: BaseException, attempt: int) -> None:
        """Publishing ``record`` failed (``attempt`` times so far); the bridge tries again, same dedup id."""

    def acknowledged(self, feed: str, event: FeedEvent) -> None:
        """A consumer acknowledged ``event``: its handlers succeeded, or the next one was asked for."""

    def redelivery(self, feed: str, event: FeedEvent, *, attempt: int, delay: float) -> None:
        """A consumer's handler failed on ``event``: it comes back after ``delay`` seconds."""

    def dead_lettered(self, feed: str | None, event: FeedEvent | None, *, attempts: int) -> None:
        """A consumer stored ``event`` aside, after ``attempts`` deliveries.

        ``event`` and ``feed`` are ``None`` for an entry of the log that could not be read.
        """


HOOKS = (
    "connecting",
    "connected",
    "disconnected",
    "state_changed",
    "frame_received",
    "event_received",
    "duplicate_dropped",
    "backfilled",
    "backpressure",
    "published",
    "publish_failed",
    "acknowledged",
    "redelivery",
    "dead_lettered",
)
"""The moments called as they are; the handler's two are combined into ``Hooks.handler``."""


class Hooks:
    """The methods some observers override, each combined into one function; ``None`` when nobody does.

    ``handler`` wraps a handler's call when an observer overrides
    `Observer.handler_started` or `Observer.handler_finished`.
    """

    __slots__ = (*HOOKS, "handler", "observers")

    connecting: Callable[..., None] | None
    connected: Callable[..., None] | None
    disconnected: Callable[..., None] | None
    state_changed: Callable[..., None] | None
    frame_received: Callable[..., None] | None
    event_received: Callable[..., None] | None
    duplicate_dropped: Callable[..., None] | None
    backfilled: Callable[..., None] | None
    backpressure: Callable[..., None] | None
    published: Callable[..., None] | None
    publish_failed: Callable[..., None] | None
    acknowledged: Callable[..., None] | None
    redelivery: Callable[..., None] | None
    dead_lettered: Callable[..., None] | None

    def __init__(self, observers: tuple[Observer, ...]) -> None:
        self.observers = observers
        for name in HOOKS:
            setattr(self, name, _combined(name, [_bound(observer, name) for observer in observers]))
        timed = [
            observer
            for observer in observers
            if _overrides(observer, "handler_started") or _overrides(observer, "handler_finished")
        ]
        self.handler: Callable[[Callable[[Any], Any], bool, str], Callable[[Any], Any]] | None = (
            (lambda call, is_async, name: _timed(call, is_async, name, timed)) if timed else None
        )

    def attach(self, subject: object) -> None:
        """Tell every observer it observes ``subject``."""
        for observer in self.observers:
            if _overrides(observer, "attached"):
                _guarded(observer.attached, "attached")(subject)


def hooks_of(observer: Observer | Sequence[Observer] | None) -> Hooks | None:
    """Return the hooks of ``observer`` (one, or a sequence), or ``None`` when there is none.

    Raises:
        UsageError: ``observer`` is not an `Observer` nor a sequence of them.
    """
    if observer is None:
        return None
    observers = (observer,) if isinstance(observer, Observer) else observer
    if isinstance(observers, (str, bytes)) or not isinstance(observers, Sequence):
        raise UsageError(f"observer must be a chatfeed.Observer or a list of them, not {observer!r}")
    for each in observers:
        if not isinstance(each, Observer):
            raise UsageError(f"an observer must be an instance of a chatfeed.Observer subclass, not {each!r}")
    return Hooks(tuple(observers)) if observers else None


def _overrides(observer: Observer, name: str) -> bool:
    return getattr(type(observer), name) is not getattr(Observer, name)


def _bound(observer: Observer, name: str) -> Callable[..., None] | None:
    return _guarded(getattr(observer, name), name) if _overrides(observer, name) else None


def _combined(name: str, calls: list[Callable[..., None] | None]) -> Callable[..., None] | None:
    present = [call for call in calls if call is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def every(*args: Any, **kwargs: Any) -> None:
        for call in present:
            call(*args, **kwargs)

    return every


def _guarded(method: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``method``, with what it raises logged instead: an observer never breaks what it observes."""
    failed = False

    def guarded(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        try:
            return method(*args, **kwargs)
        except Exception:
            owner = type(getattr(method, "__self__", method)).__qualname__
            logger.log(
                logging.DEBUG if failed else logging.ERROR,
                "observer %s.%s raised; chatfeed goes on without it",
                owner,
                name,
                exc_info=True,
            )
            failed = True
            return None

    return guarded


def _timed(call: Callable[[Any], Any], is_async: bool, name: str, observers: list[Observer]) -> Callable[[Any], Any]:
    """Return ``call`` (a handler's), reporting each of its calls to ``observers``."""
    starts = [_guarded(observer.handler_started, "handler_started") for observer in observers]
    finishes = [_guarded(observer.handler_finished, "handler_finished") for observer in observers]
    clock = time.perf_counter

    def started(event: Any) -> list[object]:
        feed = getattr(event, "feed", None)
        return [start(feed, event, handler=name) for start in starts]

    def finished(event: Any, begun: float, tokens: list[object], error: BaseException | None) -> None:
        duration = clock() - begun
        feed = getattr(event, "feed", None)
        for finish, token in zip(reversed(finishes), reversed(tokens), strict=True):
            finish(feed, event, handler=name, duration=duration, error=error, started=token)

    if is_async:

        async def timed_async(event: Any) -> Any:
            tokens = started(event)
            begun = clock()
            try:
                result = await call(event)
            except BaseException as exc:
                finished(event, begun, tokens, exc)
                raise
            finished(event, begun, tokens, None)
            return result

        return timed_async

    async def rest(event: Any, awaitable: Awaitable[Any], begun: float, tokens: list[object]) -> Any:
        try:
            result = await awaitable
        except BaseException as exc:
            finished(event, begun, tokens, exc)
            raise
        finished(event, begun, tokens, None)
        return result

    def timed(event: Any) -> Any:
        tokens = started(event)
        begun = clock()
        try:
            result = call(event)
        except BaseException as exc:
            finished(event, begun, tokens, exc)
            raise
        if result is not None and inspect.isawaitable(result):  # a sync function returning a coroutine
            return rest(event, result, begun, tokens)
        finished(event, begun, tokens, None)
        return result

    return timed

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

from ._logging import log_fields
from .exceptions import UsageError

if TYPE_CHECKING:
    from ._client import ClientState
    from ._delivery import Gap
    from .bridge._envelope import Record
    from .exceptions import ChatfeedError
    from .models import FeedEvent

__all__ = ["Hooks", "Observer", "hooks_of", "observer_failed"]

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
    from), ``None`` for a lone [`Client`][chatfeed.Client]. A frame is given
    with the token replaced by ``***`` wherever it quotes it, as are the
    ``error`` and unknown events made of such frames; a message or chat is
    the feed's content, given as it came.

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
        """A connection attempt starts: ``attempt`` is 1, then 2, 3... until one authenticates."""

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
            code: The WebSocket close code: the server's, or 1006 when the
                connection ended without a closing handshake (a reset, a ping
                timeout); ``None`` when chatfeed ended it on an error of its
                own (a token function that failed mid-session).
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

UNGUARDED = frozenset({"frame_received", "event_received"})
"""The moments of every frame: their callers catch what they raise (a try costs nothing), not a wrapper."""


class Hooks:
    """The methods some observers override, each combined into one function; ``None`` when nobody does.

    Each is guarded (what it raises is logged, see `observer_failed`) but
    those of `UNGUARDED`, whose callers catch exceptions themselves.
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
            methods = [getattr(observer, name) for observer in observers if _overrides(observer, name)]
            setattr(self, name, _combined(name, methods, guard=name not in UNGUARDED))
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


_FAILED: set[tuple[type[Any], str]] = set()
"""The (observer class, method) pairs that raised once already: logged at DEBUG from then on."""


def observer_failed(method: Callable[..., Any], name: str) -> None:
    """Log the exception being handled, which ``method`` (an observer's ``name``) raised.

    The first of each observer class and method at ERROR, with its traceback;
    the next ones at DEBUG: an observer failing on every frame must not
    flood the log.
    """
    method = getattr(method, "func", method)  # a functools.partial of it
    owner_class = type(getattr(method, "__self__", method))
    owner = owner_class.__qualname__
    key = (owner_class, name)
    level = logging.DEBUG if key in _FAILED else logging.ERROR
    _FAILED.add(key)
    logger.log(
        level,
        "observer %s.%s raised; chatfeed goes on without it",
        owner,
        name,
        exc_info=True,
        extra=log_fields(observer=f"{owner}.{name}"),
    )


def _overrides(observer: Observer, name: str) -> bool:
    return getattr(type(observer), name) is not getattr(Observer, name)


def _combined(name: str, methods: list[Callable[..., Any]], *, guard: bool) -> Callable[..., Any] | None:
    if not methods:
        return None
    if len(methods) == 1:
        return _guarded(methods[0], name) if guard else methods[0]
    guarded = [_guarded(method, name) for method in methods]

    def every(*args: Any, **kwargs: Any) -> None:
        for call in guarded:
            call(*args, **kwargs)

    return every


def _guarded(method: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``method``, with what it raises logged instead: an observer never breaks what it observes."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception:
            observer_failed(method, name)
            return None

    return guarded


def _timed(call: Callable[[Any], Any], is_async: bool, name: str, observers: list[Observer]) -> Callable[[Any], Any]:
    """Return ``call`` (a handler's), reporting each of its calls to ``observers``.

    One observer's methods are called as they are, within a try (a
    handler's call is on the path of every event); several observers', each
    guarded, ``handler_finished`` in the reverse order of ``handler_started``.
    """
    start: Callable[..., object] | None
    finish: Callable[..., None] | None
    if len(observers) == 1:
        (observer,) = observers
        start = observer.handler_started if _overrides(observer, "handler_started") else None
        finish = observer.handler_finished if _overrides(observer, "handler_finished") else None
    else:
        starts = [_guarded(observer.handler_started, "handler_started") for observer in observers]
        finishes = [_guarded(observer.handler_finished, "handler_finished") for observer in observers][::-1]

        def start(feed: str | None, event: Any, *, handler: str) -> object:
            return [each(feed, event, handler=handler) for each in starts][::-1]

        def finish(feed: str | None, event: Any, *, started: Any, **details: Any) -> None:
            for each, token in zip(finishes, started, strict=True):
                each(feed, event, started=token, **details)

    clock = time.perf_counter

    def begin(event: Any) -> object:
        if start is None:
            return None
        try:
            return start(getattr(event, "feed", None), event, handler=name)
        except Exception:
            observer_failed(start, "handler_started")
            return None

    def end(event: Any, begun: float, token: object, error: BaseException | None) -> None:
        if finish is None:
            return
        duration = clock() - begun
        try:
            finish(getattr(event, "feed", None), event, handler=name, duration=duration, error=error, started=token)
        except Exception:
            observer_failed(finish, "handler_finished")

    if is_async:

        async def timed_async(event: Any) -> Any:
            # begin() and end(), written out: this runs for every event.
            token = None
            if start is not None:
                try:
                    token = start(getattr(event, "feed", None), event, handler=name)
                except Exception:
                    observer_failed(start, "handler_started")
            begun = clock()
            try:
                result = await call(event)
            except BaseException as exc:
                end(event, begun, token, exc)
                raise
            if finish is not None:
                duration = clock() - begun
                try:
                    finish(
                        getattr(event, "feed", None),
                        event,
                        handler=name,
                        duration=duration,
                        error=None,
                        started=token,
                    )
                except Exception:
                    observer_failed(finish, "handler_finished")
            return result

        return timed_async

    async def rest(event: Any, awaitable: Awaitable[Any], begun: float, token: object) -> Any:
        try:
            result = await awaitable
        except BaseException as exc:
            end(event, begun, token, exc)
            raise
        end(event, begun, token, None)
        return result

    def timed(event: Any) -> Any:
        token = begin(event)
        begun = clock()
        try:
            result = call(event)
        except BaseException as exc:
            end(event, begun, token, exc)
            raise
        if result is not None and inspect.isawaitable(result):  # a sync function returning a coroutine
            return rest(event, result, begun, token)
        end(event, begun, token, None)
        return result

    return timed

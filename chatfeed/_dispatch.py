"""Delivery of events: handlers in registration order, then every subscriber.

The receive loop awaits `Dispatcher.dispatch` once per event, so events
reach handlers and [`EventStream`][chatfeed.EventStream] subscribers in the order the frames
arrived, with no task or queue hop in between. A subscriber whose buffer is
full makes ``dispatch`` wait, which stops the loop reading from the socket:
TCP backpressure instead of dropping or growing without bound. A handler
registered with ``concurrency`` hands the event to its `chatfeed._lanes.Lanes`
instead of running it, and makes ``dispatch`` wait the same way when it holds
its ``max_pending`` events. A pending [`Expectation`][chatfeed.Expectation] is
one more entry of its event's route, so that none costs anything per frame
while nothing waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import math
import sys
import weakref
from collections.abc import Awaitable, Callable, Generator, Hashable
from typing import Any, Generic, TypeVar

from typing_extensions import Self

from ._lanes import Lanes, _wake, by_chat
from ._logging import log_fields
from ._observe import Hooks
from .exceptions import ClientClosedError, UsageError
from .models import (
    EVENTS_BY_NAME,
    Chat,
    Connected,
    Disconnected,
    EventName,
    FeedEvent,
    FeedStopped,
    Message,
    ServerMessage,
)

__all__ = [
    "Dispatcher",
    "ErrorHook",
    "EventName",
    "EventStream",
    "Expectation",
    "Handler",
    "KeyFunction",
    "being_cancelled",
    "resolve_event",
]

logger = logging.getLogger("chatfeed")

E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)

Handler = Callable[[E], "Awaitable[None] | None"]
"""A function called with each event of one kind; sync or async."""

ErrorHook = Callable[[Exception, Any], "Awaitable[None] | None"]
"""Called with the exception a handler raised and the event it was handling."""

KeyFunction = Callable[[E], Hashable]
"""The ordering key of an event, for a handler registered with ``concurrency``."""

DEFAULT_MAX_PENDING = 1024
"""Events a concurrent handler holds, queued or running, before the feed stops being read."""

# Events the receive loop does not deliver: their handlers run inline, always.
_LIFECYCLE = (Connected, Disconnected, FeedStopped)


STALL_WARNING_AFTER = 30.0
"""Seconds a full event stream may hold the receive loop up before each warning."""

_EVENT_CLASSES = frozenset(EVENTS_BY_NAME.values()) | {ServerMessage, FeedStopped}

# Payloads mistaken for the events that carry them.
_EVENT_OF_PAYLOAD: dict[type[Any], str] = {Message: "NewMessage", Chat: "NewChat"}


def resolve_event(event: str | type[Any], *, extra_names: tuple[str, ...] = ()) -> type[Any]:
    """Return the event class that a name or class passed to ``Client.on`` stands for.

    Args:
        event: The name or class.
        extra_names: Names the caller resolves itself (a pool's), listed in the error.

    Raises:
        UsageError: Not an event chatfeed delivers.
    """
    if isinstance(event, str):
        try:
            return EVENTS_BY_NAME[event]
        except KeyError:
            known = [*EVENTS_BY_NAME, *extra_names]
            names = ", ".join(repr(name) for name in known)
            import difflib  # only for this mistake: importing chatfeed need not pay for it

            close = difflib.get_close_matches(event, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"unknown event {event!r}; {hint}expected one of {names}, or an event class") from None
    if isinstance(event, type) and event in _EVENT_CLASSES:
        return event
    if event in _EVENT_OF_PAYLOAD:
        carrier = _EVENT_OF_PAYLOAD[event]
        raise UsageError(
            f"chatfeed.{event.__name__} is the payload of an event, not an event: register "
            f"chatfeed.{carrier}, whose .payload is the {event.__name__}"
        )
    raise UsageError(f"cannot register a handler for {event!r}; expected an event name or class")


def check_concurrency(concurrency: int, key: KeyFunction[Any] | None, max_pending: int) -> None:
    """Raise `UsageError` unless the arguments make a valid concurrency setting."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise UsageError(f"concurrency must be a positive int, not {concurrency!r}")
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise UsageError(f"max_pending must be a positive int, not {max_pending!r}")
    if key is not None and not callable(key):
        raise UsageError(f"key must be a function of the event, or None for no ordering, not {key!r}")
    if concurrency == 1 and (key is not by_chat or max_pending != DEFAULT_MAX_PENDING):
        raise UsageError("key and max_pending apply to a handler registered with concurrency > 1")
    if max_pending < concurrency:
        raise UsageError(f"max_pending ({max_pending}) must be at least concurrency ({concurrency})")


def check_timeout(timeout: float | None) -> None:
    """Raise `UsageError` unless ``timeout`` is a positive, finite number of seconds or ``None``."""
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0
    ):
        raise UsageError(f"timeout must be a positive number of seconds or None, not {timeout!r}")


def check_where(where: Callable[[Any], bool] | None, cls: type[Any]) -> None:
    """Raise `UsageError` unless ``where`` is ``None`` or a sync function of an event."""
    if where is not None and not callable(where):
        raise UsageError(f"where must be a function of the event returning a bool, not {where!r}")
    if where is not None and _Entry(where, cls).is_async:
        raise UsageError("where must be a sync function: it is called for each event as it is delivered")


class _Entry:
    __slots__ = ("call", "event", "func", "is_async", "lanes", "name")

    def __init__(self, func: Callable[..., Any], event: type[Any], *, with_feed: bool = False) -> None:
        self.func = func
        # What delivery calls with the event: the function itself, or, for a
        # pool's handler, a function passing it the event's feed too.
        self.call: Callable[[Any], Any] = (lambda event: func(event, event.feed)) if with_feed else func
        self.event = event
        # A function, or an object whose __call__ is one (a handler with state).
        self.is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
            getattr(func, "__call__", None)  # noqa: B004  (the method itself, to inspect it)
        )
        self.name = getattr(func, "__qualname__", None) or type(func).__qualname__
        self.lanes: Lanes | None = None  # with concurrency > 1


class _Route:
    """The handlers of one event class, its own and its bases', worked out once."""

    __slots__ = ("entries", "lone_async")

    def __init__(self, entries: tuple[_Entry, ...]) -> None:
        self.entries = entries
        lone = entries[0] if len(entries) == 1 else None
        self.lone_async = lone.call if lone is not None and lone.is_async and lone.lanes is None else None


# The routes of a dispatcher without handlers, shared by all of them and never
# changed: thousands of clients may have no handler at all, and each would
# otherwise fill a table of its own, or work its route out for every frame.
_NO_HANDLERS = _Route(())
_NO_ROUTES: dict[type[Any], _Route] = dict.fromkeys((*EVENTS_BY_NAME.values(), ServerMessage), _NO_HANDLERS)


class Dispatcher:
    """Handlers by event class, and the open event streams."""

    __slots__ = (
        "__weakref__",
        "_error_hooks",
        "_expectations",
        "_handlers",
        "_routes",
        "_streams",
        "concurrent",
        "error_raised_to",
        "handler_errors",
        "hooks",
        "keep_frames",
        "lone",
        "receivers",
    )

    def __init__(self) -> None:
        self._handlers: dict[type[Any], list[_Entry]] = {}
        # Pending expectations by event class; each is an entry of the routes.
        # Weakly: an expectation its caller dropped (the request failed, say)
        # is forgotten, instead of being tested against every later event.
        self._expectations: dict[type[Any], list[weakref.ref[Expectation[Any]]]] = {}
        # The tasks that read the feed and deliver its events (a client's
        # supervisor; a pool's feeds): awaiting an expectation there would
        # wait for an event that only they can deliver.
        self.receivers: set[asyncio.Task[Any]] = set()
        # The entries of the handlers registered with concurrency > 1.
        self.concurrent: tuple[_Entry, ...] = ()
        # Handlers of each concrete class, its own and its bases' (a handler
        # for ServerMessage sees every server message). Rebuilt on registration.
        self._routes = _NO_ROUTES
        self._streams: tuple[weakref.ref[EventStream[Any]], ...] = ()
        self._error_hooks: tuple[ErrorHook, ...] = ()
        # The event whose lone handler's coroutine dispatch() returned last, and that handler.
        # Read it right after ``dispatch`` returns, before awaiting: the next
        # ``dispatch``, from any feed of a pool, overwrites it.
        self.lone: tuple[object, _Entry | None] = (None, None)
        self.handler_errors = 0
        # Whether each message and chat event keeps the text of its frame
        # (``FRAME_ATTRIBUTE``): set by a bridge, which publishes the frame as
        # the wire carried it. Read once per connection.
        self.keep_frames = False
        # The tasks to which a stream has raised the client's fatal error.
        self.error_raised_to: tuple[asyncio.Task[Any] | None, ...] = ()
        # The observers' hooks, set before any handler is registered: their
        # ``handler`` wraps each handler's call as it is registered.
        self.hooks: Hooks | None = None

    def add_handler(
        self,
        event: str | type[Any],
        func: Callable[..., Any],
        *,
        concurrency: int = 1,
        key: KeyFunction[Any] | None = by_chat,
        max_pending: int = DEFAULT_MAX_PENDING,
        with_feed: bool = False,
    ) -> None:
        """Register ``func`` for ``event``; with ``concurrency > 1``, through lanes ordered by ``key``.

        With ``with_feed``, ``func`` is called with the event and its ``feed``
        (a pool's handler).

        Raises:
            UsageError: An argument is wrong, or does not go with another.
        """
        cls = resolve_event(event)
        if not callable(func):
            raise UsageError(f"a handler must be callable, not {func!r}")
        entry = _Entry(func, cls, with_feed=with_feed)
        check_concurrency(concurrency, key, max_pending)
        if self.hooks is not None and self.hooks.handler is not None:
            entry.call = self.hooks.handler(entry.call, entry.is_async, entry.name)
        if concurrency > 1:
            if issubclass(cls, _LIFECYCLE):
                raise UsageError(f"{cls.__name__} handlers always run inline; concurrency applies to server events")
            if not entry.is_async:
                raise UsageError(
                    f"handler {entry.name} is not async: concurrency runs async handlers side by side. "
                    "Make it `async def`; to run blocking code, await asyncio.to_thread(...) in it"
                )
            entry.lanes = Lanes(
                entry.call,
                lambda exc, event: self._report(exc, event, entry),
                concurrency=concurrency,
                key=key,
                max_pending=max_pending,
            )
            self.concurrent = (*self.concurrent, entry)
        self._handlers.setdefault(cls, []).append(entry)
        self._routes = {}  # worked out again, by _route, as events come

    def expect(
        self, event: str | type[Any], where: Callable[[Any], bool] | None, timeout: float | None
    ) -> Expectation[Any]:
        """Register an expectation of the next ``event`` for which ``where`` is true."""
        cls = resolve_event(event)
        check_where(where, cls)
        check_timeout(timeout)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise UsageError("expect() needs a running event loop: call it from async code") from None
        expectation: Expectation[Any] = Expectation(self, cls, where, loop, timeout)
        ref = weakref.ref(expectation, lambda dead: self._forget_ref(dead, cls))
        self._expectations.setdefault(cls, []).append(ref)
        self._routes = {}
        return expectation

    def forget(self, expectation: Expectation[Any], cls: type[Any]) -> None:
        """Take an ended expectation out of the routes."""
        for ref in self._expectations.get(cls, ()):
            if ref() is expectation:
                self._forget_ref(ref, cls)
                return

    def _forget_ref(self, ref: weakref.ref[Expectation[Any]], cls: type[Any]) -> None:
        pending = self._expectations.get(cls)
        if pending is not None and ref in pending:
            pending.remove(ref)
            if not pending:
                del self._expectations[cls]
            self._routes = {} if self._handlers or self._expectations else _NO_ROUTES

    def _pending_expectations(self) -> list[Expectation[Any]]:
        alive = (ref() for refs in self._expectations.values() for ref in refs)
        return [expectation for expectation in alive if expectation is not None]

    def expectations_of(self, feed: str) -> list[Expectation[Any]]:
        """Return the pending expectations of one feed of a pool."""
        return [expectation for expectation in self._pending_expectations() if expectation.feed == feed]

    def expectations(self) -> int:
        """Return how many expectations are pending."""
        return len(self._pending_expectations())

    def runs_a_handler(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` is a worker of a concurrent handler."""
        return any(entry.lanes is not None and entry.lanes.runs_in(task) for entry in self.concurrent)

    async def drain(self, timeout: float) -> None:
        """Let the concurrent handlers' held calls finish for ``timeout`` seconds, then cancel the rest."""
        drains = [entry.lanes.drain(timeout, entry.name) for entry in self.concurrent if entry.lanes is not None]
        if drains:
            await asyncio.gather(*drains)

    async def cancel_handlers(self) -> None:
        """Cancel every concurrent handler's calls at once, and wait until they have ended."""
        for entry in self.concurrent:
            if entry.lanes is not None:
                await entry.lanes.cancel(entry.name)

    def add_error_hook(self, hook: ErrorHook) -> None:
        if not callable(hook):
            raise UsageError(f"an error hook must be callable, not {hook!r}")
        self._error_hooks = (*self._error_hooks, hook)

    def subscribe(self, buffer: int, *, never_started: Callable[[], bool] = lambda: False) -> EventStream[Any]:
        stream: EventStream[Any] = EventStream(self, buffer, never_started)
        # Weak, so that a stream its reader dropped (leaving ``async for``
        # early) is collected, and unsubscribed, at once.
        self._streams = (*self._streams, weakref.ref(stream, self._forget))
        return stream

    def unsubscribe(self, stream: EventStream[Any]) -> None:
        self._streams = tuple(ref for ref in self._streams if ref() not in (stream, None))

    def _forget(self, dead: weakref.ref[EventStream[Any]]) -> None:
        self._streams = tuple(ref for ref in self._streams if ref is not dead)

    def streams(self) -> list[EventStream[Any]]:
        """Return the open streams."""
        return [stream for stream in (ref() for ref in self._streams) if stream is not None]

    def reads_a_stream(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` reads an open stream (it waited on it last, or created it and nobody waited yet).

        Such a task learns of a fatal error from the stream, after the
        events the stream still holds.
        """
        return any(stream.owner is task for stream in self.streams())

    def end_streams(self, error: BaseException | None = None) -> None:
        """End every open stream (after what they hold) and every expectation, with ``error`` if given."""
        for ref in self._streams:
            stream = ref()
            if stream is not None:
                stream.end(error)
        self._streams = ()
        for expectation in self._pending_expectations():
            expectation._end(error or ClientClosedError("closed before the expected event came"))

    def dispatch(self, event: FeedEvent) -> Awaitable[None] | None:
        """Deliver a server event to its handlers, then to every stream, in order.

        Returns:
            ``None`` when the event was delivered at once (sync handlers only,
            room in every buffer); the coroutine of the event's only handler
            when that handler is async and no stream is open (the caller
            awaits it, and passes an exception it raises to
            `handler_failed`); else a coroutine that finishes the delivery.
            The receive loop calls this for every frame: the common cases
            create no coroutine of chatfeed's at all.
        """
        route = self._routes.get(event.__class__)
        if route is None:
            route = self._route(event.__class__)
        streams = self._streams
        lone = route.lone_async
        if lone is not None and not streams:
            try:
                pending: Awaitable[None] = lone(event)
            except Exception as exc:  # raised on the call itself: a wrong signature, say
                return self._deliver((), event, streams, failed=(exc, route.entries[0]))
            self.lone = (event, route.entries[0])
            return pending
        entries = route.entries
        for index, entry in enumerate(entries):
            lanes = entry.lanes
            if lanes is not None:
                try:
                    if lanes.offer(event):
                        continue
                except Exception as exc:  # the key function's
                    return self._deliver(entries[index + 1 :], event, streams, failed=(exc, entry))
                return self._deliver(entries[index:], event, streams)
            if entry.is_async:
                return self._deliver(entries[index:], event, streams)
            try:
                result = entry.call(event)
            except (Exception, asyncio.CancelledError) as exc:
                return self._deliver(entries[index + 1 :], event, streams, failed=(exc, entry))
            if result is not None and inspect.isawaitable(result):
                return self._deliver(entries[index + 1 :], event, streams, pending=(result, entry))
        for index, ref in enumerate(streams):
            stream = ref()
            if stream is not None and not stream.offer(event):
                return self._deliver((), event, streams[index:])
        return None

    async def handler_failed(self, exc: BaseException, event: Any, lone: tuple[object, _Entry | None]) -> None:
        """Report an exception of the lone handler whose coroutine `dispatch` returned.

        Also called with what any other awaitable of `dispatch` raised, which
        handles its handlers' exceptions itself: only the client's own
        cancellation gets out of it, and is raised again.

        Args:
            exc: What awaiting the awaitable raised.
            event: The event dispatched.
            lone: `lone`, as read right after that ``dispatch``.

        Raises:
            CancelledError: ``exc``, when it is a cancellation of the client itself.
        """
        lone_event, entry = lone
        if event is not lone_event or entry is None:
            raise exc
        await self._handle_failure(exc, entry, event)

    async def _deliver(
        self,
        entries: tuple[_Entry, ...],
        event: Any,
        streams: tuple[weakref.ref[EventStream[Any]], ...],
        *,
        failed: tuple[BaseException, _Entry] | None = None,
        pending: tuple[Awaitable[Any], _Entry] | None = None,
    ) -> None:
        # One coroutine for the rest of a delivery that has to wait: the
        # handlers from ``entries`` on, after the failure or the awaitable of
        # the handler before them, then the streams.
        if pending is not None:
            awaitable, entry = pending
            try:
                await awaitable
            except (Exception, asyncio.CancelledError) as exc:
                failed = (exc, entry)
        if failed is not None:
            await self._handle_failure(*failed, event)
        for entry in entries:
            try:
                if entry.lanes is not None:
                    await _hand_over(entry.lanes, event, entry.name, self.hooks)
                elif entry.is_async:
                    await entry.call(event)
                else:
                    result = entry.call(event)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except (Exception, asyncio.CancelledError) as exc:
                await self._handle_failure(exc, entry, event)
        for ref in streams:
            stream = ref()
            while stream is not None and not stream.offer(event):
                waiter = stream.wait_for_space()
                # The wait must not keep alive a stream whose reader is gone.
                stream = None
                await _wait_for_room(waiter, self.hooks, event, "events")
                stream = ref()

    async def _handle_failure(self, exc: BaseException, entry: _Entry, event: Any) -> None:
        if isinstance(exc, asyncio.CancelledError) and being_cancelled():
            if sys.version_info < (3, 11):
                logger.error(
                    "handler %s raised CancelledError: on Python 3.10 chatfeed cannot tell it from a cancellation "
                    "of the client, which therefore stops; catch the CancelledError of what you awaited",
                    entry.name,
                    extra=log_fields(event=event, handler=entry.name, error=exc),
                )
            raise exc
        # An exception, or a CancelledError of something the handler awaited, not ours.
        await self._report(exc, event, entry)

    async def call_handlers(self, event: Any) -> None:
        """Call the handlers of ``event`` in order; a failing handler stops none of the others."""
        route = self._routes.get(event.__class__)
        if route is None:
            route = self._route(event.__class__)
        await self._deliver(route.entries, event, ())

    def _route(self, cls: type[Any]) -> _Route:
        if self._routes is _NO_ROUTES:
            return _NO_HANDLERS  # a class it does not list; the shared table stays as it is
        # Expectations first: resolving one is immediate, whatever the handlers then take.
        route = self._routes[cls] = _Route(
            (
                *(
                    expectation.entry
                    for base in cls.__mro__
                    for expectation in (ref() for ref in self._expectations.get(base, ()))
                    if expectation is not None
                ),
                *(entry for base in cls.__mro__ for entry in self._handlers.get(base, ())),
            )
        )
        return route

    async def _report(self, exc: BaseException, event: Any, entry: _Entry) -> None:
        self.handler_errors += 1
        logger.error(
            "handler %s raised on a %s event",
            entry.name,
            event.type,
            exc_info=exc,
            extra=log_fields(event=event, handler=entry.name, error=exc),
        )
        if not isinstance(exc, Exception):
            return  # a stray CancelledError: logged and counted, not a hook's business
        await self.call_error_hooks(exc, event)

    async def call_error_hooks(self, exc: Exception, subject: Any) -> None:
        """Call the ``on_error`` hooks with ``exc`` and what failed on (an event, or a `Gap`)."""
        for hook in self._error_hooks:
            try:
                result = hook(exc, subject)
                if result is not None and inspect.isawaitable(result):
                    await result
            except Exception as hook_error:
                name = getattr(hook, "__qualname__", repr(hook))
                event = subject if hasattr(subject, "type") else None  # an event, or the Gap of a backfill
                fields = log_fields(getattr(subject, "feed", None), event=event, handler=name, error=hook_error)
                logger.exception("error hook %s raised", name, extra=fields)


class EventStream(Generic[E]):
    """The events of a client, from subscription on, through a bounded buffer.

    Returned by ``Client.events()``, for one reader at a time. Iterate it with
    ``async for``. It unsubscribes when closed ([`aclose`][chatfeed.EventStream.aclose], or leaving
    ``async with client.events() as stream:``) or when nothing refers to it
    any more, as when ``async for event in client.events():`` is left with
    ``break``. A stream kept in a variable stays subscribed after ``break``,
    and once its buffer is full the client stops reading the feed: close it.
    When the client closes, the stream yields what it still holds, then ends,
    raising the client's fatal error if it stopped on one.
    """

    def __init__(self, dispatcher: Dispatcher, buffer: int, never_started: Callable[[], bool]) -> None:
        self._dispatcher: Dispatcher | None = dispatcher
        self._never_started: Callable[[], bool] | None = never_started
        # The task that reads it: the last one that waited on it, else the one that created it.
        self.owner: asyncio.Task[Any] | None = _current_task()
        self._buffer = buffer
        self._items: collections.deque[E] = collections.deque()
        self._ended = False
        self._error: BaseException | None = None
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> E:
        while not self._items:
            if self._getter is not None:
                raise UsageError("another task is already reading this stream; call events() once per consumer")
            if self._ended:
                if self._error is not None:
                    error, self._error = self._error, None
                    if self._dispatcher is not None:
                        dispatcher = self._dispatcher
                        dispatcher.error_raised_to = (*dispatcher.error_raised_to, asyncio.current_task())
                    raise error
                raise StopAsyncIteration
            if self._never_started is not None:
                if self._never_started():
                    await asyncio.sleep(0)  # lets a run() task created just before start
                    if self._never_started():
                        raise UsageError(
                            "events() is read but the client was never started: use `async with client:`, "
                            "or start `client.run()` in a task"
                        )
                    continue
                self._never_started = None  # started: no need to look again
            self.owner = asyncio.current_task()
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        item = self._items.popleft()
        # Wake a waiting receive loop only once half the buffer is free, so
        # that it refills the buffer in one go instead of one item per wake.
        if self._putter is not None and len(self._items) <= self._buffer // 2:
            _wake(self._putter)
        return item

    def offer(self, item: E) -> bool:
        """Add an item if there is room; return False if the buffer is full.

        An item offered to an ended stream is dropped (and True returned).
        """
        if self._ended:
            return True
        if len(self._items) >= self._buffer:
            return False
        self._items.append(item)
        if self._getter is not None:
            _wake(self._getter)
        return True

    def wait_for_space(self) -> asyncio.Future[None]:
        """Return a future done when an item has been taken or the stream ended."""
        if self._putter is None or self._putter.done():
            self._putter = asyncio.get_running_loop().create_future()
        return self._putter

    def end(self, error: BaseException | None = None) -> None:
        """Stop accepting items; iteration ends once the buffer is drained."""
        self._ended = True
        self._error = error
        _wake(self._getter)
        _wake(self._putter)

    def pending(self) -> int:
        """Return how many events wait in the buffer."""
        return len(self._items)

    async def aclose(self) -> None:
        """Unsubscribe and drop what the buffer holds."""
        self._unsubscribe()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._unsubscribe()

    def _unsubscribe(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.unsubscribe(self)
            self._dispatcher = None
        self._items.clear()
        self._error = None
        self.end()

    def __del__(self) -> None:
        # Leaving ``async for`` early drops the last reference (the dispatcher
        # holds only a weak one); a receive loop waiting for room in this
        # buffer must go on.
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            _wake(self._putter)


class Expectation(Generic[E_co]):
    """The next event of one kind that passes a test, expected from the moment it was asked for.

    Returned by [`Client.expect`][chatfeed.Client.expect]. Await it (``await
    reply``) or call [`wait`][chatfeed.Expectation.wait] with a timeout. It is
    resolved by the first matching event delivered after it was made, even
    before anything awaits it, so an answer that comes back faster than the
    caller reaches its ``await`` is not missed.

    It is meant for one waiter: a wait that times out or is cancelled ends
    the expectation, for any other task awaiting it too. Awaiting it again
    once it is done gives the same result. One that is dropped without being
    awaited (the request it was made for failed, say) is forgotten; use it
    as a context manager to end it as the block ends:

        with client.expect("new_message", where=is_reply) as reply:
            await post_prompt(chat_id, "hello")
            event = await reply.wait(timeout=30)

    It cannot be awaited in a handler that runs inline (the default) or in a
    ``Connected``/``Disconnected`` handler: the feed is not read while such a
    handler runs, so the event could never come. Await it in a handler
    registered with ``concurrency``, or outside handlers.
    """

    __slots__ = (
        "__weakref__",
        "_cls",
        "_dispatcher",
        "_error",
        "_event",
        "_timer",
        "_waiter",
        "_where",
        "entry",
        "feed",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        cls: type[Any],
        where: Callable[[Any], bool] | None,
        loop: asyncio.AbstractEventLoop,
        timeout: float | None,
    ) -> None:
        self._dispatcher: Dispatcher | None = dispatcher
        self.feed: str | None = None  # a pool's expectation of one feed's event
        self._cls = cls
        self._where = where
        # The route holds the expectation weakly too: see Dispatcher._expectations.
        this = weakref.ref(self)

        def check(event: Any) -> None:
            expectation = this()
            if expectation is not None:
                expectation._check(event)

        self.entry = _Entry(check, cls)
        self.entry.name = f"expect({cls.__name__})"
        self._event: E_co | None = None
        self._error: BaseException | None = None
        # Woken when done; the outcome itself is kept here, so that an
        # expectation nobody awaits leaves no "exception never retrieved".
        self._waiter: asyncio.Future[None] = loop.create_future()
        self._timer = None if timeout is None else loop.call_later(timeout, self._expire, timeout)

    def __repr__(self) -> str:
        state = "pending" if not self.done() else "failed" if self._error is not None else "done"
        return f"<chatfeed.Expectation {self._cls.__name__} {state}>"

    def __await__(self) -> Generator[Any, None, E_co]:
        return self.wait().__await__()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Cancel the expectation if it is still pending: the block is left, its answer is no longer wanted."""
        self.cancel()

    async def wait(self, timeout: float | None = None) -> E_co:
        """Wait for the event and return it.

        Args:
            timeout: Seconds to wait from now, on top of the timeout given to
                ``expect()``; ``None`` for no more limit than that one.

        Raises:
            TimeoutError: No matching event within a timeout; the expectation ends.
            ClientClosedError: The client was closed first.
            ChatfeedError: The error that stopped the client first.
            Exception: What ``where`` raised for an event.
        """
        check_timeout(timeout)
        dispatcher = self._dispatcher
        if dispatcher is not None and asyncio.current_task() in dispatcher.receivers:
            raise UsageError(
                "awaiting an expectation in an inline handler (or a Connected/Disconnected handler) would wait "
                "forever: the feed is not read while that handler runs. Register the handler with "
                "concurrency > 1, or await it outside handlers"
            )
        if not self.done():
            try:
                done, _ = await asyncio.wait([self._waiter], timeout=timeout)
            except asyncio.CancelledError:
                self.cancel()
                raise
            if not done:
                self._end(TimeoutError(f"no matching {self._cls.__name__} within {timeout} s"))
        if self._error is not None:
            raise self._error
        return self._event  # type: ignore[return-value]  # done without an error: the event

    def done(self) -> bool:
        """Whether it has its event, or has ended without one."""
        return self._dispatcher is None

    def cancel(self) -> None:
        """Stop expecting; a ``wait()`` in progress raises `CancelledError`."""
        self._end(asyncio.CancelledError())

    def _check(self, event: Any) -> None:
        # An entry of the route of its event class: sync, and never raises.
        if self._dispatcher is None:
            return
        try:
            if self._where is not None and not self._where(event):
                return
        except Exception as exc:
            self._end(exc)
            return
        self._event = event
        self._end(None)

    def _expire(self, timeout: float) -> None:
        self._end(TimeoutError(f"no matching {self._cls.__name__} within {timeout} s of expect()"))

    def _end(self, error: BaseException | None) -> None:
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is None:
            return
        self._error = error
        dispatcher.forget(self, self._cls)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        _wake(self._waiter)


async def _hand_over(lanes: Lanes, event: Any, name: str, hooks: Hooks | None) -> None:
    # Waits until the handler's lanes take the event: they hold max_pending.
    while not lanes.offer(event):
        await _wait_for_room(
            lanes.wait_for_room(),
            hooks,
            event,
            name,
            "handler %s has held its max_pending events for %.0f s; the feed is not read until one finishes",
            name,
        )


async def _wait_for_room(
    waiter: asyncio.Future[None],
    hooks: Hooks | None,
    event: Any,
    where: str,
    message: str | None = None,
    *args: object,
) -> None:
    backpressure = None if hooks is None else hooks.backpressure
    if backpressure is not None:
        backpressure(getattr(event, "feed", None), engaged=True, where=where)
    try:
        handler = None if message is None else where
        await _wait_for_waiter(waiter, message, *args, feed=getattr(event, "feed", None), handler=handler)
    finally:
        if backpressure is not None:
            backpressure(getattr(event, "feed", None), engaged=False, where=where)


async def _wait_for_waiter(
    waiter: asyncio.Future[None],
    message: str | None,
    *args: object,
    feed: str | None = None,
    handler: str | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    timer: asyncio.TimerHandle

    def warn() -> None:
        nonlocal timer
        waited = loop.time() - started
        fields = log_fields(feed, handler=handler, waited=waited)
        if message is None:
            logger.warning(
                "an events() stream has not been read for %.0f s; the feed is not read until it is. A stream "
                "left with `break` but still referenced stays subscribed: use `async with client.events() as "
                "stream:`",
                waited,
                extra=fields,
            )
        else:
            logger.warning(message, *args, waited, extra=fields)
        timer = loop.call_later(STALL_WARNING_AFTER, warn)

    # A timer rather than a timeout on the wait: this runs whenever a buffer
    # fills up, and a timer handle costs far less than asyncio.wait().
    timer = loop.call_later(STALL_WARNING_AFTER, warn)
    try:
        # Shielded: the waiter is shared by every task waiting for that room
        # (a pool's feeds all feed one stream), and cancelling one of them
        # (a removed feed) must not cancel it for the others.
        await asyncio.shield(waiter)
    finally:
        timer.cancel()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


def being_cancelled() -> bool:
    """Whether the current task has a cancellation pending (always assumed before 3.11)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0

"""Delivery of events: handlers in registration order, then every subscriber.

The receive loop awaits `Dispatcher.dispatch` once per event, so events
reach handlers and [`EventStream`][chatfeed.EventStream] subscribers in the order the frames
arrived, with no task or queue hop in between. A subscriber whose buffer is
full makes ``dispatch`` wait, which stops the loop reading from the socket:
TCP backpressure instead of dropping or growing without bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from typing_extensions import Self

from .exceptions import UsageError
from .models import EVENTS_BY_NAME, Chat, EventName, FeedEvent, Message, ServerMessage

__all__ = [
    "Dispatcher",
    "ErrorHook",
    "EventName",
    "EventStream",
    "Handler",
    "being_cancelled",
    "resolve_event",
]

logger = logging.getLogger("chatfeed")

E = TypeVar("E")

Handler = Callable[[E], "Awaitable[None] | None"]
"""A function called with each event of one kind; sync or async."""

ErrorHook = Callable[[Exception, Any], "Awaitable[None] | None"]
"""Called with the exception a handler raised and the event it was handling."""


STALL_WARNING_AFTER = 30.0
"""Seconds a full event stream may hold the receive loop up before each warning."""

_EVENT_CLASSES = frozenset(EVENTS_BY_NAME.values()) | {ServerMessage}

# Payloads mistaken for the events that carry them.
_EVENT_OF_PAYLOAD: dict[type[Any], str] = {Message: "NewMessage", Chat: "NewChat"}


def resolve_event(event: str | type[Any]) -> type[Any]:
    """Return the event class that a name or class passed to ``Client.on`` stands for.

    Raises:
        UsageError: Not an event chatfeed delivers.
    """
    if isinstance(event, str):
        try:
            return EVENTS_BY_NAME[event]
        except KeyError:
            names = ", ".join(repr(name) for name in EVENTS_BY_NAME)
            import difflib  # only for this mistake: importing chatfeed need not pay for it

            close = difflib.get_close_matches(event, EVENTS_BY_NAME, n=1)
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


class _Entry:
    __slots__ = ("func", "is_async", "name")

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func
        self.is_async = inspect.iscoroutinefunction(func)
        self.name = getattr(func, "__qualname__", repr(func))


class _Route:
    """The handlers of one event class, its own and its bases', worked out once."""

    __slots__ = ("entries", "lone_async")

    def __init__(self, entries: tuple[_Entry, ...]) -> None:
        self.entries = entries
        self.lone_async = entries[0].func if len(entries) == 1 and entries[0].is_async else None


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
        "_handlers",
        "_lone",
        "_routes",
        "_streams",
        "error_raised_to",
        "handler_errors",
    )

    def __init__(self) -> None:
        self._handlers: dict[type[Any], list[_Entry]] = {}
        # Handlers of each concrete class, its own and its bases' (a handler
        # for ServerMessage sees every server message). Rebuilt on registration.
        self._routes = _NO_ROUTES
        self._streams: tuple[weakref.ref[EventStream[Any]], ...] = ()
        self._error_hooks: tuple[ErrorHook, ...] = ()
        # The event whose lone handler's coroutine dispatch() returned last, and that handler.
        self._lone: tuple[object, _Entry | None] = (None, None)
        self.handler_errors = 0
        # The tasks to which a stream has raised the client's fatal error.
        self.error_raised_to: tuple[asyncio.Task[Any] | None, ...] = ()

    def add_handler(self, event: str | type[Any], func: Callable[[Any], Any]) -> None:
        if not callable(func):
            raise UsageError(f"a handler must be callable, not {func!r}")
        self._handlers.setdefault(resolve_event(event), []).append(_Entry(func))
        self._routes = {}  # worked out again, by _route, as events come

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
        """End every open stream: after what they hold, with ``error`` if given."""
        for ref in self._streams:
            stream = ref()
            if stream is not None:
                stream.end(error)
        self._streams = ()

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
            self._lone = (event, route.entries[0])
            return pending
        entries = route.entries
        for index, entry in enumerate(entries):
            if entry.is_async:
                return self._deliver(entries[index:], event, streams)
            try:
                result = entry.func(event)
            except (Exception, asyncio.CancelledError) as exc:
                return self._deliver(entries[index + 1 :], event, streams, failed=(exc, entry))
            if result is not None and inspect.isawaitable(result):
                return self._deliver(entries[index + 1 :], event, streams, pending=(result, entry))
        for index, ref in enumerate(streams):
            stream = ref()
            if stream is not None and not stream.offer(event):
                return self._deliver((), event, streams[index:])
        return None

    async def handler_failed(self, exc: BaseException, event: Any) -> None:
        """Report an exception of the lone handler whose coroutine `dispatch` returned.

        Also called with what any other awaitable of `dispatch` raised, which
        handles its handlers' exceptions itself: only the client's own
        cancellation gets out of it, and is raised again.

        Raises:
            CancelledError: ``exc``, when it is a cancellation of the client itself.
        """
        lone_event, entry = self._lone
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
                if entry.is_async:
                    await entry.func(event)
                else:
                    result = entry.func(event)
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
                await _wait_for_room(waiter)
                stream = ref()

    async def _handle_failure(self, exc: BaseException, entry: _Entry, event: Any) -> None:
        if isinstance(exc, asyncio.CancelledError) and being_cancelled():
            if sys.version_info < (3, 11):
                logger.error(
                    "handler %s raised CancelledError: on Python 3.10 chatfeed cannot tell it from a cancellation "
                    "of the client, which therefore stops; catch the CancelledError of what you awaited",
                    entry.name,
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
        route = self._routes[cls] = _Route(
            tuple(entry for base in cls.__mro__ for entry in self._handlers.get(base, ()))
        )
        return route

    async def _report(self, exc: BaseException, event: Any, entry: _Entry) -> None:
        self.handler_errors += 1
        logger.error("handler %s raised on a %s event", entry.name, event.type, exc_info=exc)
        if not isinstance(exc, Exception):
            return  # a stray CancelledError: logged and counted, not a hook's business
        for hook in self._error_hooks:
            try:
                result = hook(exc, event)
                if result is not None and inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("error hook %s raised", getattr(hook, "__qualname__", hook))


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


async def _wait_for_room(waiter: asyncio.Future[None]) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    timer: asyncio.TimerHandle

    def warn() -> None:
        nonlocal timer
        logger.warning(
            "an events() stream has not been read for %.0f s; the feed is not read until it is. A stream left "
            "with `break` but still referenced stays subscribed: use `async with client.events() as stream:`",
            loop.time() - started,
        )
        timer = loop.call_later(STALL_WARNING_AFTER, warn)

    # A timer rather than a timeout on the wait: this runs whenever a buffer
    # fills up, and a timer handle costs far less than asyncio.wait().
    timer = loop.call_later(STALL_WARNING_AFTER, warn)
    try:
        await waiter
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


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)

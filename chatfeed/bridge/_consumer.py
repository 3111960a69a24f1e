"""The consumer: typed events back out of the log, acknowledged once their handlers succeeded.

A `Consumer` reads envelopes from a `Source` (a JetStream durable consumer,
or a Redis Streams consumer group), turns each into the event a pool would
have delivered, and hands it to the handlers registered with `Consumer.on`
and to the open `events()` streams. A delivery is settled once all of them
are done with it: acknowledged if none failed; otherwise retried after a
delay that doubles, and dead-lettered (stored aside, then acknowledged) on
its ``max_deliver``-th failure. An envelope that cannot be read is
dead-lettered at once: it would fail the same way every time.

Handlers registered with ``concurrency`` run in lanes (`chatfeed._lanes`),
one per (feed, chat) by default: the events of one chat reach a handler in
the order they were fetched. At most ``max_in_flight`` deliveries are
fetched and not yet settled; the fetch loop waits for room beyond that.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar, overload

from typing_extensions import Self

from .._lanes import Lanes
from .._logging import log_fields, redact_url
from .._observe import Observer, hooks_of, observer_failed
from ..exceptions import UsageError
from ..models import Chat, ErrorMessage, FeedEvent, Message, NewChat, NewMessage, UnknownMessage
from ._bridge import describe_error as _describe
from ._envelope import Envelope, EnvelopeError

__all__ = ["Consumer", "ConsumerEventStream", "ConsumerStatistics", "Delivery", "Source", "by_feed_and_chat"]

logger = logging.getLogger("chatfeed.bridge")

ConsumerEventName = Literal["new_message", "new_chat", "error", "unknown"]

_CLASSES: dict[str, type[Any]] = {
    "new_message": NewMessage,
    "new_chat": NewChat,
    "error": ErrorMessage,
    "unknown": UnknownMessage,
}

E = TypeVar("E")
_Handler = Callable[[Any, str], Awaitable[None]]
_OnMessage = TypeVar("_OnMessage", bound=Callable[[NewMessage, str], Awaitable[None]])
_OnChat = TypeVar("_OnChat", bound=Callable[[NewChat, str], Awaitable[None]])
_OnError = TypeVar("_OnError", bound=Callable[[ErrorMessage, str], Awaitable[None]])
_OnUnknown = TypeVar("_OnUnknown", bound=Callable[[UnknownMessage, str], Awaitable[None]])
_OnAny = TypeVar("_OnAny", bound=Callable[[Any, str], Awaitable[None]])
_Key = Callable[[Any], Hashable]


class Delivery(Protocol):
    """One delivery of one envelope from the log, as a `Source` gives it."""

    @property
    def data(self) -> bytes:
        """The envelope."""

    @property
    def attempt(self) -> int:
        """How many times it has been delivered, this time included (1 the first time)."""

    @property
    def position(self) -> str:
        """Where it is in the log, for logs and dead letters (a stream sequence, an entry id)."""

    async def ack(self) -> None:
        """Acknowledge it: it is not delivered again."""

    async def retry(self, delay: float) -> None:
        """Have it delivered again, in about ``delay`` seconds."""

    async def extend(self) -> None:
        """Say it is still being handled: the broker does not deliver it again meanwhile."""

    async def release(self) -> None:
        """Give it back at once, to be delivered again (to any process) as if it had not been taken."""

    async def dead_letter(self, reason: str) -> None:
        """Store it aside with ``reason`` (never the envelope's content in the reason), then acknowledge it."""


class Source(Protocol):
    """A durable, shared reader of the log: what a [`Consumer`][chatfeed.bridge.Consumer] reads from."""

    async def open(self) -> None:
        """Connect, and create or join the durable consumer (group)."""

    async def fetch(self, count: int) -> list[Delivery]:
        """Return up to ``count`` deliveries, waiting a moment (about a second) for the first; ``[]`` if none."""

    async def close(self) -> None:
        """Let go of the broker; idempotent."""


def by_feed_and_chat(event: Any) -> Hashable:
    """The default ordering key of a consumer's concurrent handler: the event's feed and chat."""
    payload = getattr(event, "payload", None)
    if isinstance(payload, Message):
        return (event.feed, payload.chat_id)
    if isinstance(payload, Chat):
        return (event.feed, payload.id)
    return (event.feed, None)


@dataclasses.dataclass(frozen=True)
class ConsumerStatistics:
    """What a consumer has done, from [`Consumer.statistics`][chatfeed.bridge.Consumer.statistics].

    Attributes:
        received: Deliveries fetched (a redelivery counts again).
        acked: Deliveries acknowledged after their handlers succeeded.
        retried: Deliveries a handler failed, to be delivered again.
        dead_lettered: Deliveries stored aside (``max_deliver`` failures, or unreadable).
        in_flight: Deliveries fetched and not yet settled.
        handler_errors: Handler calls that raised.
        state: ``"unopened"``, ``"running"``, ``"closing"`` or ``"closed"``.
        broker_up: False from a failed fetch until the next one succeeds.
    """

    received: int
    acked: int
    retried: int
    dead_lettered: int
    in_flight: int
    handler_errors: int
    state: Literal["unopened", "running", "closing", "closed"] = "unopened"
    broker_up: bool = True


class _Pending:
    """One delivery on its way through the handlers: settled when the last of them is done."""

    __slots__ = ("delivery", "error", "event", "feed", "left", "settling")

    def __init__(self, delivery: Delivery, event: FeedEvent | None, feed: str, left: int) -> None:
        self.delivery = delivery
        self.event = event
        self.feed = feed
        self.left = left
        self.error: str | None = None
        self.settling = False  # queued to be settled: settled once


@dataclasses.dataclass(frozen=True)
class _Entry:
    func: _Handler
    name: str
    lanes: Lanes | None


class ConsumerEventStream:
    """The events of a consumer as ``(feed, event)``; each is acknowledged when the next is asked for.

    Use it as ``async with consumer.events() as events: async for feed, event in events:``:
    leaving the block normally acknowledges the last event too; leaving it on
    an exception does not, and that event is delivered again.
    """

    __slots__ = ("_closed", "_consumer", "_current", "_queue")

    def __init__(self, consumer: Consumer, buffer: int) -> None:
        self._consumer = consumer
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(buffer)
        self._current: _Pending | None = None
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[str, FeedEvent]:
        self._finish(None)
        if self._closed:
            raise StopAsyncIteration
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._queue.get())
        ended: asyncio.Future[Any] = self._consumer._ending()
        try:
            await asyncio.wait([waiter, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not waiter.done():
                waiter.cancel()
        if not waiter.done() or waiter.cancelled():
            raise StopAsyncIteration
        pending = waiter.result()
        self._current = pending
        assert pending.event is not None
        return pending.feed, pending.event

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._finish(None if exc is None else f"{type(exc).__name__} in the events() loop")
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: the events still buffered go back to the log, to be delivered again.

        The broker counts that delivery too (towards ``max_deliver``), as it
        counts every delivery; the consumer's statistics do not count it as a retry.
        """
        if self._closed:
            return
        self._closed = True
        self._consumer._streams.discard(self)
        if self._current is not None:
            self._finish("the events() stream closed before its event was done")
        while not self._queue.empty():
            self._consumer._done(self._queue.get_nowait(), "the events() stream closed", count=False)

    def _finish(self, error: str | None) -> None:
        current = self._current
        if current is not None:
            self._current = None
            self._consumer._done(current, error)


class Consumer:
    """Typed events from a bridge's log, for any number of processes sharing a durable name.

    ``Consumer("nats://...", durable="analytics")`` reads the JetStream
    stream through a durable pull consumer; ``Consumer("redis://...",
    durable="analytics")`` reads the partition streams through a consumer
    group of that name. Processes with the same ``durable`` share the work.

    An event that no handler takes (no handler for its type) and no open
    [`events`][chatfeed.bridge.Consumer.events] stream takes is acknowledged
    at once: register the handlers, and open the streams, before
    [`start`][chatfeed.bridge.Consumer.start].

    Args:
        url: The broker: ``nats://`` (JetStream) or ``redis://`` / ``rediss://``.
        durable: The name of the durable consumer (JetStream) or of the consumer group (Redis).
        max_deliver: Deliveries of one event before it is dead-lettered (its
            handlers failed on each).
        retry_delay: Seconds before the first redelivery of a failed event;
            it doubles with each further failure, up to ``retry_maximum``.
        retry_maximum: The longest delay before a redelivery.
        max_in_flight: The most events fetched and not yet settled.
        batch: The most events fetched at once.
        drain_timeout: Seconds [`close`][chatfeed.bridge.Consumer.close] lets
            the handlers' calls finish; the events of unfinished calls are
            not acknowledged, and come back.
        heartbeat: Every this many seconds, the events still being handled
            are reported in progress to the broker, so that a handler slower
            than the broker's ack wait (or ``claim_after``) does not get its
            event delivered a second time meanwhile. Keep it well under both.
        source: Options of the broker's reader: for JetStream ``stream``,
            ``prefix``, ``ack_wait``, ``dead_stream``, ``connect_timeout``
            (see [`JetStreamSource`][chatfeed.bridge.JetStreamSource]); for
            Redis ``prefix``, ``partitions``, ``name``, ``claim_after``,
            ``connect_timeout`` (see [`RedisStreamSource`][chatfeed.bridge.RedisStreamSource]).
        observer: An [`Observer`][chatfeed.Observer], or a list of them: told
            of each event fetched, each handler call, and each event's fate
            (acknowledged, delivered again, dead-lettered).

    Raises:
        UsageError: The URL's scheme is neither, or an option is invalid.
    """

    __slots__ = (
        "__weakref__",
        "_counts",
        "_ended",
        "_entries",
        "_extender",
        "_fetcher",
        "_hooks",
        "_in_flight",
        "_options",
        "_room",
        "_settler",
        "_settling",
        "_source",
        "_state",
        "_streams",
        "_unsettled",
        "_up",
        "_waiting",
    )

    def __init__(
        self,
        url: str,
        *,
        durable: str,
        max_deliver: int = 5,
        retry_delay: float = 1.0,
        retry_maximum: float = 60.0,
        max_in_flight: int = 1024,
        batch: int = 128,
        drain_timeout: float = 10.0,
        heartbeat: float = 10.0,
        observer: Observer | Sequence[Observer] | None = None,
        **source: Any,
    ) -> None:
        if not isinstance(durable, str) or not durable:
            raise UsageError(f"durable must be a non-empty str, not {durable!r}")
        for name, value in (("max_deliver", max_deliver), ("max_in_flight", max_in_flight), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive int, not {value!r}")
        for name, number in (
            ("retry_delay", retry_delay),
            ("retry_maximum", retry_maximum),
            ("drain_timeout", drain_timeout),
            ("heartbeat", heartbeat),
        ):
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number < float("inf"):
                raise UsageError(f"{name} must be a number of seconds, not {number!r}")
        self._source = source_for(url, durable, **source)
        if heartbeat <= 0:
            raise UsageError(f"heartbeat must be a positive number of seconds, not {heartbeat!r}")
        self._options = _ConsumerOptions(
            max_deliver, retry_delay, retry_maximum, max_in_flight, batch, drain_timeout, heartbeat
        )
        self._entries: dict[type[Any], tuple[_Entry, ...]] = {}
        self._streams: set[ConsumerEventStream] = set()
        self._settling: collections.deque[_Pending] = collections.deque()
        self._counts = dict.fromkeys(("received", "acked", "retried", "dead_lettered", "handler_errors"), 0)
        self._in_flight = 0
        self._unsettled: dict[_Pending, float] = {}  # handed out and not settled, with when
        self._waiting: collections.deque[Delivery] = collections.deque()  # fetched, not yet handed out
        self._extender: asyncio.Task[None] | None = None
        self._state: Literal["unopened", "running", "closing", "closed"] = "unopened"
        self._fetcher: asyncio.Task[None] | None = None
        self._settler: asyncio.Task[None] | None = None
        self._room: asyncio.Event | None = None
        self._ended: asyncio.Future[None] | None = None  # done once closed; made in the loop that uses it
        self._up = True
        self._hooks = hooks_of(observer)
        if self._hooks is not None:
            self._hooks.attach(self)

    def __repr__(self) -> str:
        return f"<chatfeed.bridge.Consumer {self._source!r} {self._state}>"

    # Registration

    @overload
    def on(
        self,
        event: Literal["new_message"],
        *,
        concurrency: int = ...,
        key: Callable[[Any], Hashable] = ...,
        max_pending: int = ...,
    ) -> Callable[[_OnMessage], _OnMessage]: ...
    @overload
    def on(
        self,
        event: Literal["new_chat"],
        *,
        concurrency: int = ...,
        key: Callable[[Any], Hashable] = ...,
        max_pending: int = ...,
    ) -> Callable[[_OnChat], _OnChat]: ...
    @overload
    def on(
        self,
        event: Literal["error"],
        *,
        concurrency: int = ...,
        key: Callable[[Any], Hashable] = ...,
        max_pending: int = ...,
    ) -> Callable[[_OnError], _OnError]: ...
    @overload
    def on(
        self,
        event: Literal["unknown"],
        *,
        concurrency: int = ...,
        key: Callable[[Any], Hashable] = ...,
        max_pending: int = ...,
    ) -> Callable[[_OnUnknown], _OnUnknown]: ...
    def on(
        self,
        event: ConsumerEventName,
        *,
        concurrency: int = 1,
        key: Callable[[Any], Hashable] = by_feed_and_chat,
        max_pending: int = 1024,
    ) -> Callable[[_OnAny], _OnAny]:
        """Register an async handler ``func(event, feed)`` for one event name.

        The event is acknowledged once every handler it has succeeded; a
        handler that raises makes it come back (up to ``max_deliver``).

        Args:
            event: ``"new_message"``, ``"new_chat"``, ``"error"`` or ``"unknown"``.
            concurrency: The most calls of this handler at once. Above 1,
                calls run in lanes by ``key``: in order within a key.
            key: The ordering key (by default the event's feed and chat).
            max_pending: The most events queued or running for this handler;
                beyond it, fetching waits.

        Raises:
            UsageError: The name is not one of those, the handler is not an
                async function, or an option is invalid.
        """
        cls = _CLASSES.get(event) if isinstance(event, str) else None
        if cls is None:
            raise UsageError(f"a consumer's events are {', '.join(map(repr, _CLASSES))}; not {event!r}")
        for name, value in (("concurrency", concurrency), ("max_pending", max_pending)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive int, not {value!r}")
        if not callable(key):
            raise UsageError(f"key must be a function of an event, not {key!r}")
        if self._state != "unopened":
            raise UsageError("register handlers before the consumer starts")

        def register(handler: _OnAny) -> _OnAny:
            func: Any = handler
            if not inspect.iscoroutinefunction(func):
                raise UsageError(f"a consumer's handler must be an async function of (event, feed), not {func!r}")
            name = getattr(func, "__qualname__", repr(func))
            hooks = self._hooks
            if hooks is not None and hooks.handler is not None:
                timed = hooks.handler(lambda event: handler(event, event.feed), True, name)
                func = lambda event, feed: timed(event)  # noqa: E731
            entry = _Entry(func, name, None)
            if concurrency > 1:
                lanes = Lanes(
                    lambda pending: self._call(entry, pending),
                    self._lost,
                    concurrency=concurrency,
                    key=lambda pending: key(pending.event),
                    max_pending=max_pending,
                )
                entry = _Entry(func, name, lanes)
            self._entries[cls] = (*self._entries.get(cls, ()), entry)
            return handler

        return register

    def events(self, *, buffer: int = 64) -> ConsumerEventStream:
        """Return a stream of ``(feed, event)``; see [`ConsumerEventStream`][chatfeed.bridge.ConsumerEventStream].

        Each event it yields is acknowledged when the next one is asked for
        (or the ``async with`` block ends normally), and once the handlers
        are done with it too.
        """
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise UsageError(f"buffer must be a positive int, not {buffer!r}")
        if self._state in ("closing", "closed"):
            raise UsageError("the consumer is closed")
        stream = ConsumerEventStream(self, buffer)
        self._streams.add(stream)
        return stream

    # Lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, join the durable consumer, and start fetching.

        Raises:
            BrokerUnavailableError: The broker cannot be reached.
            UsageError: The consumer has started already.
        """
        if self._state != "unopened":
            raise UsageError(f"the consumer is {self._state}: it starts once")
        self._state = "running"
        loop = asyncio.get_running_loop()
        ended = self._ending()
        self._room = asyncio.Event()
        try:
            await self._source.open()
        except BaseException:
            self._state = "closed"
            ended.set_result(None)
            await self._source.close()
            raise
        self._settler = loop.create_task(self._settle_all(), name="chatfeed-consumer-settle")
        self._fetcher = loop.create_task(self._fetch_all(), name="chatfeed-consumer-fetch")
        self._extender = loop.create_task(self._extend_all(), name="chatfeed-consumer-extend")

    async def run(self) -> None:
        """Start, and consume until [`close`][chatfeed.bridge.Consumer.close] is called or the task is cancelled."""
        async with self:
            await asyncio.shield(self._ending())

    async def close(self) -> None:
        """Stop fetching, let the handlers finish (``drain_timeout``), settle what they finished, and disconnect.

        Idempotent. Events whose handlers did not finish are not acknowledged: they come back.
        """
        if self._state == "unopened":
            self._state = "closed"
            await self._source.close()
            return
        if self._state != "running":
            await asyncio.shield(self._ending())
            return
        self._state = "closing"
        try:
            for task in (self._fetcher, self._extender):
                if task is not None:
                    task.cancel()
                    await asyncio.wait([task])
            for entries in self._entries.values():
                for entry in entries:
                    if entry.lanes is not None:
                        await entry.lanes.drain(self._options.drain_timeout, entry.name)
            for stream in list(self._streams):
                await stream.aclose()
            # What was fetched and not handed out, or whose handlers did not
            # finish, goes back to the log now, not after the broker's ack wait.
            left_behind = [_Pending(delivery, None, "", 0) for delivery in self._waiting]
            self._waiting.clear()
            left_behind += [pending for pending in self._unsettled if not pending.settling]
            for pending in left_behind:
                # A handler that failed already counts; one cut short by close() does not.
                self._settle(pending, pending.error or f"{_NOT_COUNTED}the consumer closed")
            if self._settler is not None:
                self._settling.append(_STOP)
                self._wake_settler()
                await asyncio.wait([self._settler])
        finally:
            self._state = "closed"
            try:
                await self._source.close()
            finally:
                ended = self._ending()
                if not ended.done():
                    ended.set_result(None)

    def statistics(self) -> ConsumerStatistics:
        """Return what the consumer has done so far."""
        counts = self._counts
        return ConsumerStatistics(
            received=counts["received"],
            acked=counts["acked"],
            retried=counts["retried"],
            dead_lettered=counts["dead_lettered"],
            in_flight=self._in_flight,
            handler_errors=counts["handler_errors"],
            state=self._state,
            broker_up=self._up,
        )

    def _ending(self) -> asyncio.Future[None]:
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
        return self._ended

    # Fetching and handing out

    async def _fetch_all(self) -> None:
        options = self._options
        source = self._source
        room = self._room
        assert room is not None
        failing = False
        # Until close(), not merely until cancelled: a cancellation that lands as
        # a broker call completes can be lost (see Group._close).
        while self._state == "running":
            free = options.max_in_flight - self._in_flight
            if free <= 0:
                await self._wait_for_room(room, "consumer")
                continue
            try:
                deliveries = await source.fetch(min(options.batch, free))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._up = False
                if not failing:
                    failing = True
                    logger.warning(
                        "fetching from the broker failed (%s); trying again every second",
                        _describe(exc),
                        extra=log_fields(error=exc, delay=1.0),
                    )
                await asyncio.sleep(1.0)
                continue
            self._up = True
            if failing:
                failing = False
                logger.warning("fetching from the broker works again")
            self._counts["received"] += len(deliveries)
            self._in_flight += len(deliveries)
            waiting = self._waiting
            waiting.extend(deliveries)
            while waiting and self._state == "running":  # what is left, close() gives back
                await self._hand_out(waiting.popleft())

    async def _hand_out(self, delivery: Delivery) -> None:
        """Give one delivery to the streams and the handlers; never raises but the consumer's own cancellation."""
        try:
            envelope = Envelope.decode(delivery.data)
            event = envelope.event()
        except Exception as exc:  # EnvelopeError, or what a pathological document makes json raise
            reason = (
                str(exc) if isinstance(exc, EnvelopeError) else f"the envelope cannot be read ({type(exc).__name__})"
            )
            logger.error(
                "dead-lettered the entry at %s of the log: %s",
                delivery.position,
                reason,
                extra=log_fields(error=exc, position=delivery.position),
            )
            self._settle(_Pending(delivery, None, "", 0), f"unreadable: {reason}", dead=True)
            return
        hooks = self._hooks
        if hooks is not None and hooks.event_received is not None:
            try:
                hooks.event_received(envelope.feed, event)
            except Exception:
                observer_failed(hooks.event_received, "event_received")
        entries = self._entries.get(event.__class__, ())
        streams = tuple(self._streams)
        pending = _Pending(delivery, event, envelope.feed, len(entries) + len(streams))
        self._unsettled[pending] = asyncio.get_running_loop().time()
        if pending.left == 0:  # nothing takes this kind of event: acknowledged
            self._settle(pending, None)
            return
        for stream in streams:
            await stream._queue.put(pending)
            if stream._closed:  # closed while this waited for room: it will never be taken
                self._done(pending, "the events() stream closed", count=False)
        for entry in entries:
            lanes = entry.lanes
            if lanes is None:
                await self._call(entry, pending)
                continue
            try:
                if not lanes.offer(pending):
                    await self._hand_to_full_lanes(lanes, pending, entry.name)
            except Exception as exc:  # the handler's key function raised
                self._counts["handler_errors"] += 1
                logger.error(
                    "the key function of handler %s failed on the event at %s",
                    entry.name,
                    delivery.position,
                    exc_info=exc,
                    extra=log_fields(
                        pending.feed or None, event=event, handler=entry.name, error=exc, position=delivery.position
                    ),
                )
                self._done(pending, f"{type(exc).__name__} in the key function of handler {entry.name}")

    async def _wait_for_room(self, room: asyncio.Event, where: str) -> None:
        """Wait until settling makes room for more events in flight; report the wait to the observers."""
        hooks = self._hooks
        backpressure = None if hooks is None else hooks.backpressure
        if backpressure is not None:
            backpressure(None, engaged=True, where=where)
        try:
            while self._in_flight >= self._options.max_in_flight:
                room.clear()
                await room.wait()
        finally:
            if backpressure is not None:
                backpressure(None, engaged=False, where=where)

    async def _hand_to_full_lanes(self, lanes: Lanes, pending: _Pending, name: str) -> None:
        """Wait until the handler's lanes take ``pending``: they hold its ``max_pending``."""
        hooks = self._hooks
        backpressure = None if hooks is None else hooks.backpressure
        if backpressure is not None:
            backpressure(pending.feed, engaged=True, where=name)
        try:
            while not lanes.offer(pending):
                await lanes.wait_for_room()
        finally:
            if backpressure is not None:
                backpressure(pending.feed, engaged=False, where=name)

    async def _call(self, entry: _Entry, pending: _Pending) -> None:
        try:
            await entry.func(pending.event, pending.feed)
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and self._state != "running":
                raise  # close() cancels the fetch loop: the event is not settled, and comes back
            # An exception, or a cancellation of something the handler awaited.
            self._counts["handler_errors"] += 1
            logger.error(
                "handler %s failed on the event at %s (feed %r, delivery %d of %d)",
                entry.name,
                pending.delivery.position,
                pending.feed,
                pending.delivery.attempt,
                self._options.max_deliver,
                exc_info=exc,
                extra=log_fields(
                    pending.feed or None,
                    event=pending.event,
                    handler=entry.name,
                    error=exc,
                    attempt=pending.delivery.attempt,
                    position=pending.delivery.position,
                ),
            )
            self._done(pending, f"{type(exc).__name__} in handler {entry.name}")
        else:
            self._done(pending, None)

    async def _lost(self, exc: BaseException, pending: Any) -> None:
        # A call cancelled by what it awaited (not by us): a failure of the event.
        self._done(pending, f"{type(exc).__name__} in a handler")

    def _done(self, pending: _Pending, error: str | None, *, count: bool = True) -> None:
        if error is not None and pending.error is None:
            pending.error = error if count else f"{_NOT_COUNTED}{error}"
        pending.left -= 1
        if pending.left == 0:
            self._settle(pending, pending.error)

    # Settling: acks, retries and dead letters, awaited by one task

    def _settle(self, pending: _Pending, error: str | None, *, dead: bool = False) -> None:
        if pending.settling:
            return
        pending.settling = True
        pending.error = error
        if dead:
            pending.left = -1
        self._settling.append(pending)
        self._wake_settler()

    def _wake_settler(self) -> None:
        room = self._room
        if room is not None:
            room.set()  # the settler and the fetcher share it: a spurious wake costs a loop

    async def _settle_all(self) -> None:
        queue = self._settling
        options = self._options
        room = self._room
        assert room is not None
        while True:
            if not queue:
                room.clear()
                await room.wait()
                continue
            pending = queue.popleft()
            if pending is _STOP:
                return
            delivery = pending.delivery
            error = pending.error
            try:
                hooks = self._hooks
                if error is None:
                    await _acknowledge(delivery)
                    self._counts["acked"] += 1
                    if hooks is not None and hooks.acknowledged is not None and pending.event is not None:
                        hooks.acknowledged(pending.feed, pending.event)
                elif error.startswith(_NOT_COUNTED):
                    # Running (an events() stream closed early): back to this
                    # consumer at once. Closing: back to any consumer of the durable.
                    await (delivery.retry(0.0) if self._state == "running" else delivery.release())
                elif pending.left == -1 or delivery.attempt >= options.max_deliver:
                    await delivery.dead_letter(error)
                    self._counts["dead_lettered"] += 1
                    if hooks is not None and hooks.dead_lettered is not None:
                        hooks.dead_lettered(pending.feed or None, pending.event, attempts=delivery.attempt)
                    if pending.left != -1:
                        logger.warning(
                            "dead-lettered the event at %s after %d failed deliveries: %s",
                            delivery.position,
                            delivery.attempt,
                            error,
                            extra=log_fields(
                                pending.feed or None,
                                event=pending.event,
                                failed_attempts=delivery.attempt,
                                position=delivery.position,
                            ),
                        )
                else:
                    delay = min(options.retry_maximum, options.retry_delay * 2 ** (delivery.attempt - 1))
                    await delivery.retry(delay)
                    self._counts["retried"] += 1
                    if hooks is not None and hooks.redelivery is not None and pending.event is not None:
                        hooks.redelivery(pending.feed, pending.event, attempt=delivery.attempt, delay=delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The broker will deliver it again (its ack wait, or a claim).
                logger.warning(
                    "could not settle the event at %s (%s)",
                    delivery.position,
                    _describe(exc),
                    extra=log_fields(pending.feed or None, error=exc, position=delivery.position),
                )
            finally:
                self._unsettled.pop(pending, None)
                self._in_flight -= 1
                room.set()

    async def _extend_all(self) -> None:
        # Handlers may take longer than the broker waits for an answer (its
        # ack wait, or claim_after): every ``heartbeat`` seconds, the events
        # still unsettled are said to be in progress, so that they are not
        # delivered a second time, to this process or another, meanwhile.
        heartbeat = self._options.heartbeat
        loop = asyncio.get_running_loop()
        while self._state == "running":
            await asyncio.sleep(heartbeat)
            older = loop.time() - heartbeat
            for pending, since in list(self._unsettled.items()):
                if self._state != "running":  # an extend() lost close()'s cancellation
                    break
                if since <= older and pending in self._unsettled:
                    try:
                        await pending.delivery.extend()
                    except Exception as exc:
                        logger.debug(
                            "could not extend the event at %s: %r",
                            pending.delivery.position,
                            exc,
                            extra=log_fields(pending.feed or None, error=exc, position=pending.delivery.position),
                        )


_NOT_COUNTED = "\x00"
_STOP = _Pending.__new__(_Pending)


@dataclasses.dataclass(frozen=True)
class _ConsumerOptions:
    max_deliver: int
    retry_delay: float
    retry_maximum: float
    max_in_flight: int
    batch: int
    drain_timeout: float
    heartbeat: float


async def _acknowledge(delivery: Delivery) -> None:
    """Acknowledge ``delivery``, trying twice more on failure.

    An acknowledgement is idempotent, and the first one after a broker's
    restart can go out on a pooled connection the restart broke: given up at
    once, the event would stay unacknowledged until this consumer stops, and
    then be handled again.
    """
    for wait in _ACK_RETRIES:
        try:
            await delivery.ack()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            await asyncio.sleep(wait)
    await delivery.ack()


_ACK_RETRIES = (0.1, 0.5)


def source_for(url: str, durable: str, **options: Any) -> Source:
    """Return the reader of the log at ``url``: JetStream for ``nats://``, Redis Streams for ``redis://``."""
    if not isinstance(url, str):
        raise UsageError(f"url must be a str, not {url!r}")
    scheme = url.partition("://")[0].lower()
    if scheme in ("nats", "tls"):
        from ._nats import JetStreamSource

        return JetStreamSource(url, durable, **options)
    if scheme in ("redis", "rediss"):
        from ._redis import RedisStreamSource

        return RedisStreamSource(url, durable, **options)
    raise UsageError(f"the broker's URL must start with nats:// or redis://, not {redact_url(url)[:40]!r}")

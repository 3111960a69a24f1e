"""Many feeds in one process: `Pool`, one feed per key (usually a user), sharing what can be shared.

Each feed is a `chatfeed.Client` set up as a feed of the pool: it has its own
token, connection, retry state, counters and duplicate window, and runs its
own supervisor in one task, so that a feed's failure stays its own. What a
client per feed would duplicate is the pool's, once:

- the options and the handlers: one [`Dispatcher`][chatfeed._dispatch.Dispatcher], whose
  handlers get the event and its feed's key, and whose concurrent handlers'
  lanes take the events of every feed;
- the keepalive: one task pings every connection (`chatfeed._keepalive`);
- the ramp: connection attempts, at start-up and after a mass disconnection
  alike, go out at most ``connect_rate`` per second (`Ramp`),
  on top of each feed's own backoff with full jitter.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Hashable, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

# typing_extensions' overload: get_overloads() finds them on Python 3.10 too.
from typing_extensions import Self, overload

from ._client import Client, ClientStatistics, HandlerStatistics, _State, handler_statistics
from ._config import Compression, Options, TokenSource, _check_token
from ._delivery import Backfill, Dedupe
from ._dispatch import (
    DEFAULT_MAX_PENDING,
    Dispatcher,
    ErrorHook,
    EventStream,
    Expectation,
    KeyFunction,
    check_concurrency,
    check_where,
    resolve_event,
)
from ._keepalive import Keepalive
from ._lanes import by_chat
from ._logging import log_fields, redact_url
from ._observe import Observer, hooks_of
from ._policy import Backoff
from .exceptions import ChatfeedError, ClientClosedError, UsageError
from .models import (
    Connected,
    Disconnected,
    ErrorMessage,
    FeedEvent,
    FeedStopped,
    NewChat,
    NewMessage,
    ServerMessage,
    UnknownMessage,
)

__all__ = ["Pool", "PoolEventName", "PoolEventStream", "PoolHandler", "PoolStatistics", "Ramp"]

logger = logging.getLogger("chatfeed")

E = TypeVar("E")

PoolHandler = Callable[[E, str], "Awaitable[None] | None"]
"""A pool's handler: called with each event of one kind and the key of its feed; sync or async."""

PoolEventName = Literal["new_message", "new_chat", "error", "unknown", "connected", "disconnected", "feed_stopped"]
"""The names [`Pool.on`][chatfeed.Pool.on] accepts: a client's, and ``"feed_stopped"``."""

_OnNewMessage = TypeVar("_OnNewMessage", bound=PoolHandler[NewMessage])
_OnNewChat = TypeVar("_OnNewChat", bound=PoolHandler[NewChat])
_OnError = TypeVar("_OnError", bound=PoolHandler[ErrorMessage])
_OnUnknown = TypeVar("_OnUnknown", bound=PoolHandler[UnknownMessage])
_OnConnected = TypeVar("_OnConnected", bound=PoolHandler[Connected])
_OnDisconnected = TypeVar("_OnDisconnected", bound=PoolHandler[Disconnected])
_OnFeedStopped = TypeVar("_OnFeedStopped", bound=PoolHandler[FeedStopped])
_OnServerMessage = TypeVar("_OnServerMessage", bound=PoolHandler[ServerMessage])
_OnAny = TypeVar("_OnAny", bound=PoolHandler[Any])
_OnErrorHook = TypeVar("_OnErrorHook", bound=ErrorHook)

_FEED_TASK_NAME = "chatfeed-feed"
_PLACEHOLDER_TOKEN = "(each feed has its own)"


@dataclasses.dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of a pool, from [`Pool.statistics`][chatfeed.Pool.statistics] without a key.

    Attributes:
        feeds: Feeds in the pool.
        connecting: Feeds fetching a token or opening their connection.
        authenticating: Feeds waiting for the answer to their auth frame.
        up: Feeds authenticated, their events flowing.
        backing_off: Feeds waiting before their next attempt.
        failed: Feeds stopped for good on an error (see ``FeedStopped``).
        connections: Connections authenticated so far, over all feeds.
        reconnects: Of those, the ones after a feed's first.
        frames_received: Frames received, over all feeds.
        protocol_errors: Frames dropped because they did not parse.
        handler_errors: Exceptions raised by handlers.
        duplicates_dropped: Events dropped by ``dedupe``.
        backfilled_events: Events delivered from ``backfill``.
        backfill_errors: Backfills that failed.
        event_streams: Open ``events()`` streams.
        buffered_events: Events waiting in those streams' buffers.
        handlers: One entry per handler registered with ``concurrency``.
        expectations: Pending [`expect`][chatfeed.Pool.expect] calls.
    """

    feeds: int
    connecting: int
    authenticating: int
    up: int
    backing_off: int
    failed: int
    connections: int
    reconnects: int
    frames_received: int
    protocol_errors: int
    handler_errors: int
    duplicates_dropped: int
    backfilled_events: int
    backfill_errors: int
    event_streams: int
    buffered_events: int
    handlers: tuple[HandlerStatistics, ...]
    expectations: int


class PoolEventStream:
    """The events of every feed of a pool, as ``(key, event)``, through one bounded buffer.

    Returned by [`Pool.events`][chatfeed.Pool.events]; it behaves as a
    client's [`EventStream`][chatfeed.EventStream] does (one reader, backpressure
    on every feed when full, ``aclose()`` or ``async with`` to unsubscribe).
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: EventStream[FeedEvent]) -> None:
        self._stream = stream

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[str, FeedEvent]:
        event = await self._stream.__anext__()
        feed = event.feed
        assert feed is not None  # every event of a pool is marked with its feed
        return feed, event

    def pending(self) -> int:
        """Return how many events wait in the buffer."""
        return self._stream.pending()

    async def aclose(self) -> None:
        """Unsubscribe and drop what the buffer holds."""
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stream.aclose()


class Pool:
    """Many feeds in one process, one per key, with one set of handlers.

    Takes the options of [`Client`][chatfeed.Client], less the token: each
    feed has its own, given to [`add`][chatfeed.Pool.add]. Handlers registered
    with [`on`][chatfeed.Pool.on] get every feed's events with the feed's key;
    [`events`][chatfeed.Pool.events] yields ``(key, event)``. A feed whose token
    is rejected, or whose retries run out, stops alone: a
    [`FeedStopped`][chatfeed.FeedStopped] event says so, and the others go on.

    Args:
        url: The backend's WebSocket address, as for a client.
        connect_rate: The most connection attempts per second, over all
            feeds: at start-up, and when many feeds reconnect at once (each
            also waits its own backoff, with full jitter).
        reconnect: As for [`Client`][chatfeed.Client], per feed.
        auth_timeout: As for a client.
        ping_interval: As for a client; one task pings every feed's connection.
        ping_timeout: As for a client.
        open_timeout: As for a client.
        close_timeout: As for a client.
        max_size: As for a client.
        ssl: As for a client.
        proxy: As for a client.
        auth_retries: As for a client, per feed.
        compression: As for a client.
        backfill: As for a client, per feed; the [`Gap`][chatfeed.Gap] says
            which feed (``gap.feed``).
        backfill_since: As for a client, for every feed's first connection.
        backfill_timeout: As for a client.
        dedupe: As for a client; each feed has its own window.
        drain_timeout: As for a client: [`close`][chatfeed.Pool.close] lets the
            concurrent handlers' calls finish for that long.
        observer: As for a client; told of every feed's moments, with its key.

    Raises:
        UsageError: An argument is invalid.

    Example:
        ```python
        pool = chatfeed.Pool("wss://api.example.com", connect_rate=200)
        for user, token in tokens.items():
            pool.add(user, token=token)

        @pool.on("new_message", concurrency=16)
        async def moderate(event: chatfeed.NewMessage, feed: str) -> None: ...

        await pool.run()
        ```
    """

    __slots__ = (
        "__weakref__",
        "_closing",
        "_dispatcher",
        "_errors",
        "_feeds",
        "_hooks",
        "_keepalive",
        "_leaving",
        "_options",
        "_ramp",
        "_settled",
        "_state",
        "_stopped",
        "_tasks",
        "_unsettled",
    )

    def __init__(
        self,
        url: str,
        *,
        connect_rate: float = 500.0,
        reconnect: Backoff | bool = True,
        auth_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        open_timeout: float = 10.0,
        close_timeout: float = 2.0,
        max_size: int = 2**20,
        ssl: ssl_module.SSLContext | None = None,
        proxy: str | bool | None = True,
        auth_retries: int = 1,
        compression: Compression = None,
        backfill: Backfill | None = None,
        backfill_since: datetime | None = None,
        backfill_timeout: float = 30.0,
        dedupe: Dedupe | bool | None = None,
        drain_timeout: float = 5.0,
        observer: Observer | Sequence[Observer] | None = None,
    ) -> None:
        self._options = Options.check(
            url,
            token=_PLACEHOLDER_TOKEN,
            reconnect=reconnect,
            auth_timeout=auth_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            max_size=max_size,
            ssl=ssl,
            proxy=proxy,
            auth_retries=auth_retries,
            compression=compression,
            backfill=backfill,
            backfill_since=backfill_since,
            backfill_timeout=backfill_timeout,
            dedupe=dedupe,
            drain_timeout=drain_timeout,
        )
        if (
            isinstance(connect_rate, bool)
            or not isinstance(connect_rate, (int, float))
            or not 0 < connect_rate < float("inf")
        ):
            raise UsageError(f"connect_rate must be a positive number of attempts per second, not {connect_rate!r}")
        options = self._options
        self._hooks = hooks_of(observer)
        self._dispatcher = Dispatcher()
        self._dispatcher.hooks = self._hooks
        self._keepalive = (
            None if options.ping_interval is None else Keepalive(options.ping_interval, options.ping_timeout)
        )
        self._ramp = Ramp(connect_rate)
        self._feeds: dict[str, Client] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._errors: dict[str, ChatfeedError] = {}
        self._state: Literal["unopened", "running", "closed"] = "unopened"
        self._unsettled: set[str] = set()  # feeds __aenter__ waits for
        self._settled: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None  # what run() waits for
        self._closing: asyncio.Future[None] | None = None  # done once close() has finished
        self._leaving: set[asyncio.Task[Any]] = set()  # feeds that removed themselves, still ending
        if self._hooks is not None:
            self._hooks.attach(self)

    def __repr__(self) -> str:
        return f"<chatfeed.Pool url={redact_url(self._options.url)!r} feeds={len(self._feeds)} {self._state}>"

    def __len__(self) -> int:
        return len(self._feeds)

    def __contains__(self, key: object) -> bool:
        return key in self._feeds

    # Feeds

    def add(self, key: str, *, token: TokenSource, backfill_since: datetime | None = None) -> None:
        """Add a feed: its key (any non-empty str, usually the user's id) and its token.

        A feed added while the pool runs starts at once (at the pool's
        ``connect_rate``).

        Args:
            key: The feed's key, passed to handlers and yielded by ``events()``.
            token: The feed's JWT, or a function (sync or async) returning one.
            backfill_since: Backfill this feed from this time after its first
                connection (the pool's ``backfill_since`` otherwise): where a
                previous run of the application stopped, say. Needs the
                pool's ``backfill``.

        Raises:
            UsageError: The key is not a non-empty str or is taken, the token
                is invalid, ``backfill_since`` is not a timezone-aware datetime
                or the pool has no ``backfill``, or the pool is closed.
        """
        if not isinstance(key, str) or not key:
            raise UsageError(f"a feed's key must be a non-empty str, not {key!r}")
        if backfill_since is not None:
            if not isinstance(backfill_since, datetime) or backfill_since.utcoffset() is None:
                raise UsageError(f"backfill_since must be a timezone-aware datetime, not {backfill_since!r}")
            if self._options.backfill is None:
                raise UsageError("backfill_since is the start of the feed's first backfill: the pool needs backfill=")
        if self._state == "closed":
            raise UsageError("the pool is closed")
        if key in self._feeds:
            raise UsageError(f"the pool already has a feed {key!r}; remove it first")
        feed = Client.__new__(Client)
        feed._options = self._options
        feed._setup(
            self._dispatcher,
            token=_check_token(token),
            feed=key,
            keepalive=self._keepalive,
            ramp=self._ramp,
            on_state=self._state_changed,
            backfill_since=backfill_since,
            hooks=self._hooks,
        )
        self._feeds[key] = feed
        if self._state == "running":
            self._start(key, feed)

    async def remove(self, key: str) -> None:
        """Close one feed and take it out of the pool; the others go on.

        Events of that feed already queued for concurrent handlers are still
        handled; expectations of that feed raise
        [`ClientClosedError`][chatfeed.ClientClosedError]. Called from one of
        the feed's own handlers, it returns at once and the feed stops when
        that handler returns (so the key can be added again right away).

        Raises:
            UsageError: The pool has no such feed.
        """
        feed = self._feeds.pop(key, None)
        if feed is None:
            raise UsageError(f"the pool has no feed {key!r}")
        self._errors.pop(key, None)
        feed._set_state(_State.CLOSED)
        self._end_expectations(key, ClientClosedError(f"the feed {key!r} was removed from the pool"))
        task = self._tasks.pop(key, None)
        current = asyncio.current_task()
        if task is not None and current is not None and task is current:
            self._leaving.add(current)  # it ends after this handler; close() still waits for it
        elif task is not None:
            task.cancel()
            await asyncio.wait([task])
        self._settle(key)

    def feeds(self) -> list[str]:
        """Return the keys of the feeds, in the order they were added."""
        return list(self._feeds)

    # Registration

    @overload
    def on(
        self,
        event: Literal["new_message"] | type[NewMessage],
        *,
        concurrency: int = ...,
        key: KeyFunction[NewMessage] | None = ...,
        max_pending: int = ...,
    ) -> Callable[[_OnNewMessage], _OnNewMessage]: ...
    @overload
    def on(
        self,
        event: Literal["new_chat"] | type[NewChat],
        *,
        concurrency: int = ...,
        key: KeyFunction[NewChat] | None = ...,
        max_pending: int = ...,
    ) -> Callable[[_OnNewChat], _OnNewChat]: ...
    @overload
    def on(
        self,
        event: Literal["error"] | type[ErrorMessage],
        *,
        concurrency: int = ...,
        key: KeyFunction[ErrorMessage] | None = ...,
        max_pending: int = ...,
    ) -> Callable[[_OnError], _OnError]: ...
    @overload
    def on(
        self,
        event: Literal["unknown"] | type[UnknownMessage],
        *,
        concurrency: int = ...,
        key: KeyFunction[UnknownMessage] | None = ...,
        max_pending: int = ...,
    ) -> Callable[[_OnUnknown], _OnUnknown]: ...
    @overload
    def on(self, event: Literal["connected"] | type[Connected]) -> Callable[[_OnConnected], _OnConnected]: ...
    @overload
    def on(
        self, event: Literal["disconnected"] | type[Disconnected]
    ) -> Callable[[_OnDisconnected], _OnDisconnected]: ...
    @overload
    def on(self, event: Literal["feed_stopped"] | type[FeedStopped]) -> Callable[[_OnFeedStopped], _OnFeedStopped]: ...
    @overload
    def on(
        self,
        event: type[ServerMessage],
        *,
        concurrency: int = ...,
        key: KeyFunction[ServerMessage] | None = ...,
        max_pending: int = ...,
    ) -> Callable[[_OnServerMessage], _OnServerMessage]: ...
    @overload
    def on(self, event: PoolEventName) -> Callable[[_OnAny], _OnAny]: ...

    def on(
        self,
        event: PoolEventName | type[Any],
        *,
        concurrency: int = 1,
        key: KeyFunction[Any] | None = by_chat,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Callable[[_OnAny], _OnAny]:
        """Register the decorated function as a handler of one kind of event, of every feed.

        As [`Client.on`][chatfeed.Client.on], with two differences: the
        handler is called with the event *and the key of its feed*, and
        ``"feed_stopped"`` ([`FeedStopped`][chatfeed.FeedStopped]) says that a
        feed stopped for good. With ``concurrency``, the lanes are shared by
        every feed: at most ``concurrency`` calls at once over the whole
        pool, in order within a chat (``key``), and ``max_pending`` events
        held over the whole pool before the feeds stop being read.

        Raises:
            UsageError: As for ``Client.on``.

        Example:
            ```python
            @pool.on("new_message", concurrency=16)
            async def moderate(event: chatfeed.NewMessage, feed: str) -> None:
                await check(feed, event.payload)
            ```
        """
        cls = _resolve(event)
        check_concurrency(concurrency, key, max_pending)
        # Chat ids may be unique only per user: by default, a lane per feed and chat.
        lane_key = by_feed_and_chat if key is by_chat and concurrency > 1 else key

        def register(func: _OnAny) -> _OnAny:
            self._dispatcher.add_handler(
                cls, func, concurrency=concurrency, key=lane_key, max_pending=max_pending, with_feed=True
            )
            return func

        return register

    def on_error(self, hook: _OnErrorHook) -> _OnErrorHook:
        """Register a function called with ``(exception, event)`` when a handler raises.

        As [`Client.on_error`][chatfeed.Client.on_error]; ``event.feed`` is the
        feed's key. A failed backfill passes its [`Gap`][chatfeed.Gap].
        """
        self._dispatcher.add_error_hook(hook)
        return hook

    @overload
    def expect(
        self,
        event: Literal["new_message"] | type[NewMessage],
        *,
        feed: str | None = ...,
        where: Callable[[NewMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[NewMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["new_chat"] | type[NewChat],
        *,
        feed: str | None = ...,
        where: Callable[[NewChat], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[NewChat]: ...
    @overload
    def expect(
        self,
        event: Literal["error"] | type[ErrorMessage],
        *,
        feed: str | None = ...,
        where: Callable[[ErrorMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[ErrorMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["unknown"] | type[UnknownMessage],
        *,
        feed: str | None = ...,
        where: Callable[[UnknownMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[UnknownMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["connected"] | type[Connected],
        *,
        feed: str | None = ...,
        where: Callable[[Connected], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[Connected]: ...
    @overload
    def expect(
        self,
        event: Literal["disconnected"] | type[Disconnected],
        *,
        feed: str | None = ...,
        where: Callable[[Disconnected], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[Disconnected]: ...
    @overload
    def expect(
        self,
        event: Literal["feed_stopped"] | type[FeedStopped],
        *,
        feed: str | None = ...,
        where: Callable[[FeedStopped], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[FeedStopped]: ...
    @overload
    def expect(
        self,
        event: type[ServerMessage],
        *,
        feed: str | None = ...,
        where: Callable[[ServerMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[ServerMessage]: ...

    def expect(
        self,
        event: PoolEventName | type[Any],
        *,
        feed: str | None = None,
        where: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
    ) -> Expectation[Any]:
        """Start waiting for the next event of one kind, of one feed or any, that passes ``where``.

        As [`Client.expect`][chatfeed.Client.expect], registered at once;
        ``feed`` restricts it to one feed's events.

        Raises:
            UsageError: The pool is closed, or an argument is wrong.
        """
        if self._state == "closed":
            raise UsageError("the pool is closed")
        cls = _resolve(event)
        if feed is not None and not isinstance(feed, str):
            raise UsageError(f"feed must be a feed's key (a str) or None, not {feed!r}")
        check_where(where, cls)
        test = where
        if feed is not None:
            if feed not in self._feeds:
                raise UsageError(f"the pool has no feed {feed!r}")
            if feed in self._errors:
                raise UsageError(f"the feed {feed!r} has stopped: {self._errors[feed]}")

            def test(event: Any) -> bool:
                return event.feed == feed and (where is None or where(event))

        expectation = self._dispatcher.expect(cls, test, timeout)
        expectation.feed = feed
        return expectation

    def events(self, *, buffer: int = 64) -> PoolEventStream:
        """Return an async iterator over every feed's server events, as ``(key, event)``, from now on.

        As [`Client.events`][chatfeed.Client.events]: one bounded buffer; when
        it is full, the feeds stop being read until there is room.

        Raises:
            UsageError: The pool is closed, or ``buffer`` is not a positive int.
        """
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise UsageError(f"buffer must be a positive int, not {buffer!r}")
        if self._state == "closed":
            raise UsageError("the pool is closed")
        return PoolEventStream(self._dispatcher.subscribe(buffer, never_started=lambda: self._state == "unopened"))

    # Running

    async def __aenter__(self) -> Self:
        """Start every feed; return once each feed added so far has authenticated or stopped.

        A feed that cannot connect keeps retrying (as its ``reconnect`` says)
        and keeps this waiting; wrap it in a timeout to bound the wait.

        Raises:
            UsageError: The pool is already running or closed.
        """
        self._begin()
        loop = asyncio.get_running_loop()
        self._unsettled = set(self._feeds)
        self._settled = loop.create_future()
        for key, feed in self._feeds.items():
            self._start(key, feed)
        try:
            if self._unsettled:
                await self._settled
        except BaseException:
            await self._shut_down(drain=False)
            raise
        if self._state == "closed":
            await self.close()
            raise UsageError("the pool was closed while its feeds were connecting")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: object
    ) -> None:
        """Close the pool; when the block was cancelled, cancel the handlers' calls instead of draining them."""
        if isinstance(exc, asyncio.CancelledError) and self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
            try:
                await self._shut_down(drain=False)
            finally:
                self._closing.set_result(None)
            return
        await self.close()

    async def run(self) -> None:
        """Run every feed until [`close`][chatfeed.Pool.close] is called.

        Feeds that stop on an error are reported (``FeedStopped``) and do not
        end the run; a pool whose feeds have all stopped still runs, and feeds
        can be added to it.

        Raises:
            UsageError: The pool is already running or closed.
        """
        if self._state == "unopened":
            self._begin()
            for key, feed in self._feeds.items():
                self._start(key, feed)
        elif self._state == "closed":
            raise UsageError("the pool is closed")
        elif self._stopped is not None:
            raise UsageError("the pool is already running")
        self._stopped = asyncio.get_running_loop().create_future()
        try:
            await self._stopped
        except asyncio.CancelledError:
            await self._shut_down(drain=False)
            raise
        await self.close()  # after a close() from a handler, which left the rest to run()

    async def close(self) -> None:
        """Close every feed, let the concurrent handlers finish (``drain_timeout``), end every stream.

        Returns once no task of the pool is left. Safe to call more than once,
        and from several tasks: a later call waits for the first one's work.
        Called from a handler, it returns at once: the feeds stop reading, and
        ``run()`` (or leaving ``async with``) finishes closing the pool.
        """
        current = asyncio.current_task()
        dispatcher = self._dispatcher
        if current in dispatcher.receivers or dispatcher.runs_a_handler(current):
            # A handler (or a backfill): waiting here for the tasks, and the
            # drain, would wait for itself. Stop every feed but this one now;
            # run() or leaving ``async with`` finishes the job.
            self._state = "closed"
            for feed in self._feeds.values():
                feed._set_state(_State.CLOSED)  # this one's receive loop stops after its handler
            for task in self._tasks.values():
                if task is not current:
                    task.cancel()
            self._end_waits()
            # Once the event being delivered has reached the streams too.
            asyncio.get_running_loop().call_soon(dispatcher.end_streams)
            self._wake_run()
            return
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        try:
            await self._shut_down(drain=True)
        finally:
            self._closing.set_result(None)

    @overload
    def statistics(self) -> PoolStatistics: ...
    @overload
    def statistics(self, key: str) -> ClientStatistics: ...

    def statistics(self, key: str | None = None) -> PoolStatistics | ClientStatistics:
        """Return a snapshot of the pool, or with ``key`` the statistics of that one feed.

        Returns:
            A [`PoolStatistics`][chatfeed.PoolStatistics], or for a key the
            feed's [`ClientStatistics`][chatfeed.ClientStatistics] (whose
            stream and handler figures are the pool's, as they are shared).

        Raises:
            UsageError: No feed has that key.
        """
        if key is not None:
            feed = self._feeds.get(key)
            if feed is None:
                raise UsageError(f"the pool has no feed {key!r}")
            return feed.statistics()
        return self._statistics()

    # Inside

    def _begin(self) -> None:
        if self._state == "closed":
            raise UsageError("the pool is closed; create a new one")
        if self._state == "running":
            raise UsageError("the pool is already running")
        self._state = "running"

    def _start(self, key: str, feed: Client) -> None:
        self._tasks[key] = asyncio.get_running_loop().create_task(self._run_feed(key, feed), name=_FEED_TASK_NAME)

    async def _run_feed(self, key: str, feed: Client) -> None:
        try:
            await feed._supervise(feed._begin(), None)
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and (
                self._state == "closed" or self._feeds.get(key) is not feed
            ):
                raise  # ours: the pool closes, or the feed was removed
            if isinstance(exc, ChatfeedError):
                error = exc
            else:  # a stray cancellation (a handler's, on Python 3.10), or a bug of ours
                logger.error(
                    "feed %r stopped on an unexpected error", key, exc_info=exc, extra=log_fields(key, error=exc)
                )
                error = ChatfeedError(f"unexpected error: {type(exc).__name__}")
            self._errors[key] = error
            self._settle(key)
            try:
                await self._dispatcher.call_handlers(FeedStopped(feed=key, error=error))
            finally:
                self._end_expectations(key, error)  # after: an expectation of this FeedStopped gets it
        finally:
            self._settle(key)
            current = asyncio.current_task()
            if self._tasks.get(key) is current:
                del self._tasks[key]
            if current is not None:
                self._leaving.discard(current)

    def _state_changed(self, feed: Client) -> None:
        if feed._state is _State.OPEN and feed._feed is not None:
            self._settle(feed._feed)

    def _settle(self, key: str) -> None:
        unsettled = self._unsettled
        if key in unsettled:
            unsettled.discard(key)
            if not unsettled and self._settled is not None and not self._settled.done():
                self._settled.set_result(None)

    def _end_expectations(self, key: str, error: Exception) -> None:
        for expectation in self._dispatcher.expectations_of(key):
            expectation._end(error)

    def _end_waits(self) -> None:
        if self._settled is not None and not self._settled.done():
            self._settled.set_result(None)  # __aenter__ waits no more: it finds the pool closed
        self._ramp.close()

    def _wake_run(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def _shut_down(self, *, drain: bool) -> None:
        self._state = "closed"
        for feed in self._feeds.values():
            feed._set_state(_State.CLOSED)
        self._end_waits()
        tasks = [*self._tasks.values(), *self._leaving]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.wait(tasks)
            if drain:
                await self._dispatcher.drain(self._options.drain_timeout)
            else:
                await self._dispatcher.cancel_handlers()
        finally:
            self._dispatcher.end_streams()
            if self._keepalive is not None:
                await self._keepalive.close()
            self._wake_run()

    def _statistics(self) -> PoolStatistics:
        states = dict.fromkeys(("connecting", "authenticating", "open", "backing_off"), 0)
        totals = dict.fromkeys(
            (
                "connections",
                "frames_received",
                "protocol_errors",
                "duplicates_dropped",
                "backfilled_events",
                "backfill_errors",
            ),
            0,
        )
        connected_feeds = 0
        for key, feed in self._feeds.items():
            if key not in self._errors and feed._state.value in states:
                states[feed._state.value] += 1
            counters = feed._counters
            totals["connections"] += counters.connections
            totals["frames_received"] += counters.frames_received
            totals["protocol_errors"] += counters.protocol_errors
            totals["backfill_errors"] += feed._backfill_errors
            if feed._delivery is not None:
                totals["duplicates_dropped"] += feed._delivery.duplicates
                totals["backfilled_events"] += feed._delivery.backfilled
            connected_feeds += counters.connections > 0
        streams = self._dispatcher.streams()
        return PoolStatistics(
            feeds=len(self._feeds),
            connecting=states["connecting"],
            authenticating=states["authenticating"],
            up=states["open"],
            backing_off=states["backing_off"],
            failed=len(self._errors),
            connections=totals["connections"],
            reconnects=totals["connections"] - connected_feeds,
            frames_received=totals["frames_received"],
            protocol_errors=totals["protocol_errors"],
            handler_errors=self._dispatcher.handler_errors,
            duplicates_dropped=totals["duplicates_dropped"],
            backfilled_events=totals["backfilled_events"],
            backfill_errors=totals["backfill_errors"],
            event_streams=len(streams),
            buffered_events=sum(stream.pending() for stream in streams),
            handlers=handler_statistics(self._dispatcher),
            expectations=self._dispatcher.expectations(),
        )


class Ramp:
    """Connection attempts at most ``rate`` per second, for many feeds that would otherwise connect at once.

    Waiters are let through one every ``1 / rate`` seconds on average, in the
    order they came, by one timer; a waiter cancelled meanwhile (a feed
    removed while it waited) gives its turn to the next instead of leaving a
    hole.
    """

    __slots__ = ("_gap", "_next", "_timer", "_waiters")

    def __init__(self, rate: float) -> None:
        self._gap = 1.0 / rate
        self._next = 0.0  # when the next waiter may go
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    async def wait(self) -> None:
        """Return when it is this caller's turn."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._waiters and now >= self._next:
            self._next = now + self._gap
            return
        turn = loop.create_future()
        self._waiters.append(turn)
        if self._timer is None:
            self._timer = loop.call_at(self._next, self._let_one_through)
        await turn

    def close(self) -> None:
        """Stop the timer; whoever still waits is cancelled with its task anyway."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _let_one_through(self) -> None:
        self._timer = None
        waiters = self._waiters
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Turns are due every gap from the first: a timer that fires late (a
        # busy loop) lets through every turn that is due, so the rate holds.
        while waiters and self._next <= now:
            turn = waiters.popleft()
            if not turn.done():  # else cancelled: the next one takes the turn
                turn.set_result(None)
                self._next += self._gap
        if waiters:
            self._timer = loop.call_at(self._next, self._let_one_through)


def by_feed_and_chat(event: Any) -> Hashable:
    """A pool's default ordering key: the event's feed and chat (see [`by_chat`][chatfeed.by_chat])."""
    return (event.feed, by_chat(event))


def _resolve(event: str | type[Any]) -> type[Any]:
    if event == "feed_stopped" or event is FeedStopped:
        return FeedStopped
    return resolve_event(event, extra_names=("feed_stopped",))

"""The client: the public facade and the reconnect supervisor.

A client runs one connection at a time, as a `chatfeed._session.Session`,
and one supervisor task that delivers its events and, when it ends, asks
`chatfeed._policy.RetryState` whether and when to connect again. The
supervisor is started by [`Client.run`][chatfeed.Client.run] or ``async with``
(which first connects in the caller's task, as websockets' ``connect`` does)
and ended by [`Client.close`][chatfeed.Client.close]. Each connection has one
more task, its keepalive. Handlers run inline in the receive loop, one event
at a time, in the order the frames arrived; only a handler registered with
``concurrency`` runs in worker tasks (`chatfeed._lanes`), which ``close()``
drains and ends. After a reconnect, the supervisor runs the ``backfill``
function before it reads the new connection (`chatfeed._delivery`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import signal
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeAlias, TypeVar

# typing_extensions' overload: get_overloads() finds them on Python 3.10 too.
from typing_extensions import Self, overload

from ._config import Compression, Options, TokenSource
from ._delivery import Backfill, Dedupe, Delivery, Gap, fetch_backfill
from ._dispatch import (
    DEFAULT_MAX_PENDING,
    Dispatcher,
    ErrorHook,
    EventName,
    EventStream,
    Expectation,
    Handler,
    KeyFunction,
    check_concurrency,
    resolve_event,
)
from ._keepalive import Keepalive
from ._lanes import by_chat
from ._logging import log_fields, redact_url
from ._observe import Hooks, Observer, hooks_of, observer_failed
from ._policy import Backoff, RetryState
from ._session import Counters, Session
from .exceptions import ChatfeedError, ConnectionLostError, UsageError
from .models import (
    Connected,
    Disconnected,
    ErrorMessage,
    FeedEvent,
    NewChat,
    NewMessage,
    ServerMessage,
    UnknownMessage,
)

if TYPE_CHECKING:
    from ._pool import Ramp

__all__ = ["Client", "ClientState", "ClientStatistics", "HandlerStatistics", "TokenSource"]

logger = logging.getLogger("chatfeed")

E = TypeVar("E")

# Each decorator returns the decorated function as it was, typed as it was;
# the bound checks that it accepts the event it is registered for.
_OnNewMessage = TypeVar("_OnNewMessage", bound=Handler[NewMessage])
_OnNewChat = TypeVar("_OnNewChat", bound=Handler[NewChat])
_OnError = TypeVar("_OnError", bound=Handler[ErrorMessage])
_OnUnknown = TypeVar("_OnUnknown", bound=Handler[UnknownMessage])
_OnConnected = TypeVar("_OnConnected", bound=Handler[Connected])
_OnDisconnected = TypeVar("_OnDisconnected", bound=Handler[Disconnected])
_OnServerMessage = TypeVar("_OnServerMessage", bound=Handler[ServerMessage])
_OnAny = TypeVar("_OnAny", bound=Handler[Any])
_OnErrorHook = TypeVar("_OnErrorHook", bound=ErrorHook)

_TASK_NAME = "chatfeed-client"  # one string for every client: thousands of them may run

ClientState: TypeAlias = Literal["unopened", "connecting", "authenticating", "open", "backing_off", "closed"]
"""Where a client stands, as [`ClientStatistics.state`][chatfeed.ClientStatistics] gives it."""


class _State(enum.Enum):
    UNOPENED = "unopened"
    CONNECTING = "connecting"  # fetching a token, opening the connection
    AUTHENTICATING = "authenticating"  # the auth frame is sent; waiting for the answer
    OPEN = "open"  # authenticated: events flow
    BACKING_OFF = "backing_off"  # waiting before the next attempt
    CLOSED = "closed"  # by close(), or stopped on an error; for good


@dataclasses.dataclass(frozen=True)
class HandlerStatistics:
    """Where a handler registered with ``concurrency`` stands; one of ``ClientStatistics.handlers``.

    Attributes:
        name: The handler's qualified name.
        event: The class of the events it handles.
        concurrency: The most calls it runs at once.
        max_pending: The most events it holds, queued or running.
        running: Calls running now.
        queued: Events waiting for their turn.
        deepest_lane: The most events waiting for one key.
        oldest_queued_age: Seconds the oldest waiting event has waited, or
            ``None`` when none waits.
    """

    name: str
    event: type[Any]
    concurrency: int
    max_pending: int
    running: int
    queued: int
    deepest_lane: int
    oldest_queued_age: float | None


def handler_statistics(dispatcher: Dispatcher) -> tuple[HandlerStatistics, ...]:
    """Return where each handler registered with ``concurrency`` stands."""
    handlers = []
    for entry in dispatcher.concurrent:
        lanes = entry.lanes
        assert lanes is not None
        now = lanes.snapshot()
        handlers.append(
            HandlerStatistics(
                name=entry.name,
                event=entry.event,
                concurrency=lanes.concurrency,
                max_pending=lanes.max_pending,
                running=now.running,
                queued=now.queued,
                deepest_lane=now.deepest_lane,
                oldest_queued_age=now.oldest_queued_age,
            )
        )
    return tuple(handlers)


@dataclasses.dataclass(frozen=True)
class ClientStatistics:
    """A snapshot of what a client has done, from [`Client.statistics`][chatfeed.Client.statistics].

    Attributes:
        state: Where the client stands: ``"unopened"``, ``"connecting"``,
            ``"authenticating"``, ``"open"`` (authenticated, events flow),
            ``"backing_off"`` (waiting before the next attempt) or ``"closed"``.
        connected: Whether a connection is authenticated right now.
        connections: Connections authenticated so far.
        frames_received: Frames received, over all connections.
        protocol_errors: Frames dropped because they did not parse.
        handler_errors: Exceptions raised by handlers.
        event_streams: Open ``events()`` streams.
        buffered_events: Events waiting in those streams' buffers.
        handlers: One entry per handler registered with ``concurrency``.
        expectations: Pending [`expect`][chatfeed.Client.expect] calls.
        duplicates_dropped: Events not delivered because ``dedupe`` had seen them.
        backfilled_events: Events delivered from the ``backfill`` function.
        backfill_errors: Backfills that raised, timed out or gave items of the
            wrong type.
    """

    state: ClientState
    connected: bool
    connections: int
    frames_received: int
    protocol_errors: int
    handler_errors: int
    event_streams: int
    buffered_events: int
    handlers: tuple[HandlerStatistics, ...] = ()
    expectations: int = 0
    duplicates_dropped: int = 0
    backfilled_events: int = 0
    backfill_errors: int = 0


class Client:
    """A client of the chat feed.

    Connects, authenticates with a JWT, delivers every server event to the
    handlers registered with [`on`][chatfeed.Client.on] and to [`events`][chatfeed.Client.events] iterators, and
    reconnects with backoff when the connection is lost.

    Args:
        url: The backend's WebSocket address, ``ws://`` (local development)
            or ``wss://``.
        token: The JWT, or a zero-argument function (sync or async) returning
            one; a function is called before every connection attempt, so it
            can refresh an expired token.
        reconnect: The [`Backoff`][chatfeed.Backoff] between attempts; ``True``
            for the default one; ``False`` to never reconnect (then the first
            failure or disconnection raises).
        auth_timeout: Seconds to wait for the answer to the auth frame.
        ping_interval: Seconds between keepalive pings, or ``None`` for none.
        ping_timeout: Seconds to wait for a pong before the connection is
            considered dead and dropped, or ``None`` to wait forever.
        open_timeout: Seconds allowed for TCP, TLS and the WebSocket handshake.
        close_timeout: Seconds [`close`][chatfeed.Client.close] waits for the server to
            acknowledge the closing handshake before dropping the connection.
        max_size: Largest frame accepted, in bytes (after decompression). A
            larger one closes that connection with code 1009; the client
            reconnects.
        ssl: The TLS context for ``wss://``; by default, the system's trusted
            certificates and hostname checking.
        proxy: A proxy address; ``True`` to use the proxy configured in the
            environment (websockets' default), ``None`` for none.
        auth_retries: How many ``auth_error`` answers in a row are retried with
            a fresh token when ``token`` is a function. A static token is
            never retried, and nothing is with ``reconnect=False``.
        compression: ``"deflate"`` to offer permessage-deflate, which the
            server may accept, or ``None`` (the default) for no compression,
            which saves about 40 KiB per connection and lets the fast frame
            path read the feed; see [compression](../architecture.md#compression).
        backfill: A function called after every reconnect with a
            [`Gap`][chatfeed.Gap], to fetch what the feed pushed meanwhile
            (over the backend's REST API): an async generator, or a function
            (sync or async) returning an iterable, of [`Message`][chatfeed.Message]
            and [`Chat`][chatfeed.Chat]. Its items are delivered as events with
            ``source == "backfill"``, oldest first, before the new connection's.
            See [backfill](../guides/backfill.md).
        backfill_since: Also backfill after the first connection, from this
            (timezone-aware) time: what a restarted program missed.
        backfill_timeout: Seconds a backfill may take to fetch its items;
            what it fetched by then is delivered, and the rest is missed.
        dedupe: ``True``, or a [`Dedupe`][chatfeed.Dedupe] to size the window,
            to drop a message or chat delivered already (as a backfill's
            overlap with the live feed would deliver it twice); ``False`` for
            none. By default (``None``), on when ``backfill`` is given.
        drain_timeout: Seconds [`close`][chatfeed.Client.close] lets the calls
            of handlers registered with ``concurrency`` (queued and running)
            finish before it cancels them.
        observer: An [`Observer`][chatfeed.Observer], or a list of them,
            told of each moment of the client's work (connections, frames,
            events, handler calls): metrics, traces, recordings.

    Raises:
        UsageError: An argument is invalid.

    Example:
        ```python
        client = chatfeed.Client("wss://api.example.com", token=jwt)

        @client.on("new_message")
        async def show(event: chatfeed.NewMessage) -> None:
            print(event.payload.chat_id, event.payload.content)

        await client.run()
        ```
    """

    __slots__ = (
        "__weakref__",
        "_abandoned",
        "_backfill_errors",
        "_cancelled_host",
        "_cancels_by_close",
        "_connecting",
        "_counters",
        "_delivery",
        "_dispatch",
        "_dispatcher",
        "_feed",
        "_first_session",
        "_halted",
        "_hooks",
        "_host",
        "_in_block",
        "_keepalive",
        "_on_state",
        "_options",
        "_ramp",
        "_runner",
        "_since",
        "_state",
        "_stopped",
        "_task",
        "_token",
    )

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource,
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
            token=token,
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
        hooks = hooks_of(observer)
        dispatcher = Dispatcher()
        dispatcher.hooks = hooks
        self._setup(dispatcher, token=token, hooks=hooks)
        if hooks is not None:
            hooks.attach(self)

    def _setup(
        self,
        dispatcher: Dispatcher,
        *,
        token: TokenSource,
        feed: str | None = None,
        keepalive: Keepalive | None = None,
        ramp: Ramp | None = None,
        on_state: Callable[[Client], None] | None = None,
        backfill_since: datetime | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        # A pool's feed (``feed`` is its key) shares the pool's dispatcher,
        # keepalive and ramp; see chatfeed._pool.
        options = self._options
        self._dispatcher = dispatcher
        self._token = token
        self._feed = feed
        self._keepalive = keepalive
        self._ramp = ramp
        self._on_state = on_state
        self._hooks = hooks
        # Where the first backfill starts: a pool's feed may have its own.
        self._since = options.backfill_since if backfill_since is None else backfill_since
        # What the receive loop delivers an event with: the dispatcher's own
        # dispatch, unless duplicates are dropped or events are marked with
        # their feed; then something in front of it, which only such clients pay for.
        # An observer of events gets each one there, after the duplicates are dropped.
        base: Callable[[Any], Awaitable[None] | None] | None = (
            self._dispatch_observed
            if hooks is not None and hooks.event_received is not None
            else None
            if feed is None
            else self._dispatch_of_feed
        )
        duplicate = None if hooks is None else hooks.duplicate_dropped
        self._delivery = (
            Delivery(
                base or dispatcher.dispatch,
                options.dedupe,
                self._since,
                None if duplicate is None else functools.partial(duplicate, feed),
            )
            if options.dedupe is not None or options.backfill is not None
            else None
        )
        self._dispatch = self._delivery.dispatch if self._delivery is not None else base
        self._backfill_errors = 0
        self._counters = Counters()
        self._state = _State.UNOPENED
        self._task: asyncio.Task[None] | None = None  # the supervisor, with async with
        self._first_session: Session | None = None  # async with's, until the supervisor takes it
        self._runner: asyncio.Task[Any] | None = None  # the task in run(), while it runs
        self._stopped: asyncio.Future[None] | None = None  # made by close() to wait for run() to return
        self._cancels_by_close = 0  # cancellations of run()'s task that close() made
        self._connecting: asyncio.Task[Any] | None = None  # the caller's task inside __aenter__
        # The task inside ``async with client:``, cancelled if the client stops on an error.
        self._host: asyncio.Task[Any] | None = None
        self._in_block = False
        self._cancelled_host = False
        self._abandoned = False  # the block was cancelled from outside
        self._halted = False  # close() has cancelled the supervisor

    def _dispatch_of_feed(self, event: Any) -> Any:
        object.__setattr__(event, "feed", self._feed)  # not a field: never on the wire
        return self._dispatcher.dispatch(event)

    @property
    def _observe_frame(self) -> Callable[[str | bytes], None] | None:
        hooks = self._hooks
        if hooks is None or hooks.frame_received is None:
            return None
        return functools.partial(hooks.frame_received, self._feed)

    def _dispatch_observed(self, event: Any) -> Any:
        feed = self._feed
        if feed is not None:
            object.__setattr__(event, "feed", feed)
        hooks = self._hooks
        assert hooks is not None and hooks.event_received is not None  # as _setup chose this
        try:
            hooks.event_received(feed, event)
        except Exception:
            observer_failed(hooks.event_received, "event_received")
        return self._dispatcher.dispatch(event)

    def __repr__(self) -> str:
        return f"<chatfeed.Client url={redact_url(self._options.url)!r} state={self._state.value}>"

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
    def on(
        self,
        event: type[ServerMessage],
        *,
        concurrency: int = ...,
        key: KeyFunction[ServerMessage] | None = ...,
        max_pending: int = ...,
    ) -> Callable[[_OnServerMessage], _OnServerMessage]: ...
    @overload
    def on(self, event: EventName) -> Callable[[_OnAny], _OnAny]: ...

    def on(
        self,
        event: EventName | type[Any],
        *,
        concurrency: int = 1,
        key: KeyFunction[Any] | None = by_chat,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Callable[[_OnAny], _OnAny]:
        """Register the decorated function as a handler of one kind of event.

        Args:
            event: An event name (``"new_message"``, ``"new_chat"``,
                ``"error"``, ``"unknown"``, ``"connected"``,
                ``"disconnected"``; see [`EventName`][chatfeed.EventName]) or the
                matching class; [`ServerMessage`][chatfeed.ServerMessage] receives every
                server event. A misspelt name is a type error for a type checker,
                and a [`UsageError`][chatfeed.UsageError] at run time.
            concurrency: With 1 (the default), the handler runs inline in the
                receive loop, one event at a time. With ``N > 1`` (async
                handlers of server events only), up to ``N`` calls run at
                once, in worker tasks, while events with the same ``key`` run
                one after another in the order they arrived.
            key: The ordering key of an event, for ``concurrency > 1``: by
                default [`by_chat`][chatfeed.by_chat] (in order within a chat,
                parallel across chats); ``None`` for no ordering at all.
            max_pending: For ``concurrency > 1``, the most events the handler
                holds, queued or running; when it holds that many, the client
                stops reading the feed until one finishes (nothing is dropped).

        Handlers may be sync or async; several may handle one kind, and run in
        registration order. Inline handlers run one event at a time in the
        receive loop, so a slow handler slows reading (nothing is dropped):
        give it ``concurrency`` to run calls side by side. An exception in a
        handler is logged and passed to the [`on_error`][chatfeed.Client.on_error]
        hooks; it stops nothing else (a concurrent handler's key goes on with
        its next event). See [concurrency](../guides/concurrency.md).

        Raises:
            UsageError: ``event`` is not an event chatfeed delivers, or the
                concurrency arguments are wrong (``concurrency`` for a sync
                handler or a lifecycle event, ``key`` without ``concurrency``).

        Example:
            ```python
            @client.on("new_chat")
            def remember(event: chatfeed.NewChat) -> None:
                chats[event.payload.id] = event.payload

            @client.on("new_message", concurrency=8)  # in order within each chat
            async def answer(event: chatfeed.NewMessage) -> None:
                await model.reply_to(event.payload)
            ```
        """
        cls = resolve_event(event)
        check_concurrency(concurrency, key, max_pending)

        def register(func: _OnAny) -> _OnAny:
            self._dispatcher.add_handler(cls, func, concurrency=concurrency, key=key, max_pending=max_pending)
            return func

        return register

    @overload
    def expect(
        self,
        event: Literal["new_message"] | type[NewMessage],
        *,
        where: Callable[[NewMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[NewMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["new_chat"] | type[NewChat],
        *,
        where: Callable[[NewChat], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[NewChat]: ...
    @overload
    def expect(
        self,
        event: Literal["error"] | type[ErrorMessage],
        *,
        where: Callable[[ErrorMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[ErrorMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["unknown"] | type[UnknownMessage],
        *,
        where: Callable[[UnknownMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[UnknownMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["connected"] | type[Connected],
        *,
        where: Callable[[Connected], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[Connected]: ...
    @overload
    def expect(
        self,
        event: Literal["disconnected"] | type[Disconnected],
        *,
        where: Callable[[Disconnected], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[Disconnected]: ...
    @overload
    def expect(
        self,
        event: type[ServerMessage],
        *,
        where: Callable[[ServerMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[ServerMessage]: ...
    @overload
    def expect(self, event: EventName, *, where: None = ..., timeout: float | None = ...) -> Expectation[Any]: ...

    def expect(
        self,
        event: EventName | type[Any],
        *,
        where: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
    ) -> Expectation[Any]:
        """Start waiting for the next event of one kind that passes ``where``; await the result later.

        The expectation is registered when ``expect()`` is called, so an
        event that comes before the caller reaches ``await`` is not missed:
        call it *before* the request whose answer it waits for.

        Args:
            event: An event name or class, as for [`on`][chatfeed.Client.on];
                the result is typed after it.
            where: A sync test of the event; the first event for which it
                returns True resolves the expectation. An exception it
                raises is what awaiting the expectation raises.
            timeout: Seconds from now after which awaiting raises
                `TimeoutError`, or ``None`` for no limit.

        Returns:
            An [`Expectation`][chatfeed.Expectation]: ``await`` it, or call its
            ``wait(timeout=...)``; ``cancel()`` it when no longer needed.
            Awaiting it raises the error that stopped the client, or
            [`ClientClosedError`][chatfeed.ClientClosedError] when the client
            is closed first.

        Raises:
            UsageError: The client is closed, or an argument is wrong.

        Example:
            ```python
            reply = client.expect(
                "new_message",
                where=lambda e: e.payload.chat_id == chat_id and e.payload.role == "assistant",
            )
            await post_prompt(chat_id, "hello")  # over REST
            event = await reply.wait(timeout=30)
            ```
        """
        if self._state is _State.CLOSED:
            raise UsageError("the client is closed")
        return self._dispatcher.expect(event, where, timeout)

    def on_error(self, hook: _OnErrorHook) -> _OnErrorHook:
        """Register a function called with ``(exception, event)`` when a handler raises.

        Use it as a decorator. The hook may be sync or async; an exception in
        the hook itself is logged and ignored. A ``backfill`` that fails is
        reported here too, with its [`Gap`][chatfeed.Gap] in place of the event.
        """
        self._dispatcher.add_error_hook(hook)
        return hook

    def events(self, *, buffer: int = 64) -> EventStream[FeedEvent]:
        """Return an async iterator over server events, from now on.

        Each call is a separate subscription with its own buffer of at most
        ``buffer`` events; when a buffer is full, the client stops reading from
        the socket until there is room (nothing is dropped). Leaving
        ``async for event in client.events():`` unsubscribes; a stream kept in
        a variable must be closed (``async with client.events() as stream:``
        or ``await stream.aclose()``). The iterator ends when the client
        closes, raising the error that stopped the client, if any.

        A stream may be created before the client starts (to start ``run()``
        in a task next), but reading it while the client has never been
        started raises [`UsageError`][chatfeed.UsageError] rather than waiting
        forever for events that cannot come.

        Raises:
            UsageError: The client is closed, or ``buffer`` is not a positive int.

        Example:
            ```python
            async with client:
                async for event in client.events():
                    if isinstance(event, chatfeed.NewMessage):
                        print(event.payload.content)
            ```
        """
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise UsageError(f"buffer must be a positive int, not {buffer!r}")
        if self._state is _State.CLOSED:
            raise UsageError("the client is closed")
        return self._dispatcher.subscribe(buffer, never_started=self._never_started)

    # Running

    async def run(self, *, handle_signals: bool = False) -> None:
        """Connect and deliver events until [`close`][chatfeed.Client.close] is called.

        Connection failures and disconnections are retried as ``reconnect``
        says; errors that a retry would meet again end the run.

        Args:
            handle_signals: Also stop, and return normally, on SIGINT (Ctrl-C)
                or SIGTERM, for a program whose whole job is this client:
                ``asyncio.run(client.run(handle_signals=True))`` then ends
                with exit status 0 instead of a ``KeyboardInterrupt``
                traceback. Only the first signal is caught; a second Ctrl-C
                interrupts as usual. Needs the main thread, on Unix.

        Raises:
            AuthenticationError: The server rejected the token.
            ConnectionFailedError: The feed cannot be reached, or a retry is not
                worth it (a fatal close code, HTTP 4xx), or retries ran out.
            UsageError: The client is already running or closed, or
                ``handle_signals`` cannot be honoured here.
        """
        restore = self._stop_on_signals() if handle_signals else None
        try:
            retry = self._begin()
            # The supervisor runs in the calling task, as the caller's own
            # loop would: close() from elsewhere cancels it, and says so.
            self._runner = asyncio.current_task()
            await self._supervise(retry, None)
        except asyncio.CancelledError:
            ours, self._cancels_by_close = self._cancels_by_close, 0
            if not ours:
                raise
            uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                for _ in range(ours):
                    remaining = uncancel()
                if remaining > 0:
                    raise  # cancelled from outside too: that cancellation goes on
        finally:
            self._runner = None
            self._cancels_by_close = 0
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)
            if restore is not None:
                restore()

    async def __aenter__(self) -> Self:
        """Connect in the calling task; return once the first connection is authenticated.

        Raises:
            AuthenticationError: The server rejected the token.
            ConnectionFailedError: As for [`run`][chatfeed.Client.run].
            UsageError: The client is already running or closed, or was
                closed (from another task) while connecting.
        """
        retry = self._begin()
        self._connecting = asyncio.current_task()
        try:
            session = await self._connect(retry)
        except asyncio.CancelledError:
            closed_by_us = self._state is _State.CLOSED
            self._stop(None)
            if closed_by_us:
                uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python 3.11+
                if uncancel is None or uncancel() == 0:
                    raise UsageError("the client was closed while connecting") from None
            raise
        except BaseException as exc:
            self._stop(exc)
            raise
        finally:
            self._connecting = None
        # Nothing is delivered before the supervisor's first step, which comes
        # after the caller's next await: a stream it opens on the next line
        # sees every event.
        if session is None:  # closed from the token function, in this task
            self._stop(None)
            raise UsageError("the client was closed while connecting")
        # Held here until the supervisor takes it: a supervisor cancelled
        # before its first step would never close it.
        self._first_session = session
        self._task = asyncio.get_running_loop().create_task(self._supervise(retry, session), name=_TASK_NAME)
        self._host = asyncio.current_task()
        self._in_block = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: object
    ) -> None:
        """Close the client; raise the error that stopped it, unless the block already saw it.

        As with a task group, an error that stops the client while the block
        runs cancels the block, and the error is raised here in place of that
        cancellation. When an ``events()`` loop in the block receives the
        error itself, the block goes on as it decides, and the error is not
        raised a second time.
        """
        self._in_block = False
        cancelled_by_us, self._cancelled_host = self._cancelled_host, False
        if isinstance(exc, asyncio.CancelledError) and not cancelled_by_us:
            self._abandoned = True  # cancelled from outside: handlers are cancelled, not drained
        await self.close()
        error = self._fatal_error()
        if cancelled_by_us:
            uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python 3.11+
            if uncancel is not None and uncancel() > 0:
                return  # cancelled from outside too: that cancellation goes on
            if exc is None or isinstance(exc, asyncio.CancelledError):
                assert error is not None
                error.__suppress_context__ = True  # the cancellation was ours, not news to the reader
                raise error
        elif exc is None and error is not None and asyncio.current_task() not in self._dispatcher.error_raised_to:
            raise error

    async def close(self) -> None:
        """Stop the client: close the connection, end every task and every event stream.

        Returns once everything has stopped: at once from a client that is
        not running; otherwise once the connection is closed (within
        ``close_timeout``) and the calls of handlers registered with
        ``concurrency`` have finished (within ``drain_timeout``). Safe to call
        more than once, and from several tasks: a later call waits for the
        first one's work instead of cutting it short. Called from a handler,
        it returns at once and the client stops as soon as that handler
        returns.
        """
        was = self._state
        self._set_state(_State.CLOSED)
        task = self._task
        runner = self._runner
        current = asyncio.current_task()
        if (
            current is not runner
            and current is not task
            and (self._dispatcher.runs_a_handler(current) or current in self._dispatcher.receivers)
        ):
            # A concurrent handler, or the backfill function: stop the receive
            # loop, which then waits for this very task (drain_timeout, or the
            # backfill's cancellation), so do not wait here.
            target = runner if runner is not None else task
            if target is not None and target is not current and not target.done():
                self._halt(target)
            return
        if runner is not None:  # run(), in a task of the caller's: wait for run() to return, not for the task
            if runner is current:
                return  # a handler: the receive loop stops when it returns
            # Also when closed already (from a handler that still runs, say):
            # a close() from elsewhere stops it now.
            self._halt(runner)
            if self._stopped is None:
                self._stopped = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._stopped)
        elif task is None:
            connecting = self._connecting
            if connecting is not None and connecting is not asyncio.current_task() and was is not _State.CLOSED:
                connecting.cancel()  # __aenter__ turns it into a UsageError
            self._dispatcher.end_streams()
        elif task is asyncio.current_task():
            pass  # a handler: the receive loop stops when it returns
        elif not task.done():
            self._halt(task)
            await asyncio.wait([task])  # a cancellation of this caller's leaves the supervisor to finish
            session, self._first_session = self._first_session, None
            if session is not None:  # the supervisor was cancelled before it started
                await session.close()
            self._stop(None)
        elif not task.cancelled():
            # The client stopped on a fatal error, which the event streams
            # and the Disconnected event have already reported.
            task.exception()

    def _halt(self, supervisor: asyncio.Task[Any]) -> None:
        """Cancel the supervisor's task, once: a second cancellation would cut its clean-up short."""
        if self._halted:
            return
        self._halted = True
        if supervisor is self._runner:
            self._cancels_by_close += 1
        supervisor.cancel()

    @property
    def connected(self) -> bool:
        """Whether a connection is authenticated right now."""
        return self._state is _State.OPEN

    def statistics(self) -> ClientStatistics:
        """Return a snapshot of the client's counters."""
        dispatcher = self._dispatcher
        streams = dispatcher.streams()
        counters = self._counters
        delivery = self._delivery
        return ClientStatistics(
            state=self._state.value,
            connected=self._state is _State.OPEN,
            connections=counters.connections,
            frames_received=counters.frames_received,
            protocol_errors=counters.protocol_errors,
            handler_errors=self._dispatcher.handler_errors,
            event_streams=len(streams),
            buffered_events=sum(stream.pending() for stream in streams),
            handlers=handler_statistics(dispatcher),
            expectations=dispatcher.expectations(),
            duplicates_dropped=0 if delivery is None else delivery.duplicates,
            backfilled_events=0 if delivery is None else delivery.backfilled,
            backfill_errors=self._backfill_errors,
        )

    # The supervisor

    def _begin(self) -> RetryState:
        if self._state is _State.CLOSED:
            raise UsageError("the client is closed; create a new one")
        if self._state is not _State.UNOPENED:
            raise UsageError("the client is already running")
        self._set_state(_State.CONNECTING)
        options = self._options
        return RetryState(options.backoff, options.auth_retries, token_refreshes=not isinstance(self._token, str))

    def _set_state(self, state: _State) -> None:
        if state is not self._state and self._state is not _State.CLOSED:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "client state: %s -> %s",
                    self._state.value,
                    state.value,
                    extra=log_fields(self._feed, state=state.value, previous_state=self._state.value),
                )
            self._state = state
            if self._on_state is not None:
                self._on_state(self)
            hooks = self._hooks
            if hooks is not None and hooks.state_changed is not None:
                hooks.state_changed(self._feed, state.value)

    def _stop(self, error: BaseException | None) -> None:
        """The client is done: closed for good, its streams ended (with ``error``).

        A pool's feed leaves the shared streams to the pool.
        """
        self._set_state(_State.CLOSED)
        if self._feed is None:
            self._dispatcher.end_streams(error if isinstance(error, Exception) else None)

    async def _connect(self, retry: RetryState, lost_at: float | None = None) -> Session | None:
        """Open and authenticate a session, retrying as ``retry`` says.

        Returns:
            The session, or ``None`` when the client was closed meanwhile from
            this very task (by the token function).

        Raises:
            ChatfeedError: The last attempt's error, when retrying stops.
        """
        options = self._options
        while self._state is not _State.CLOSED:
            self._set_state(_State.CONNECTING)
            try:
                if self._ramp is not None:
                    await self._ramp.wait()
                hooks = self._hooks
                if hooks is not None and hooks.connecting is not None:
                    hooks.connecting(self._feed, attempt=retry.failed_attempts + 1)
                session = await Session.open(
                    options,
                    self._counters,
                    token=self._token,
                    authenticating=lambda: self._set_state(_State.AUTHENTICATING),
                    keepalive=self._keepalive,
                    feed=self._feed,
                )
            except ChatfeedError as exc:
                if self._closing():
                    return None
                await self._back_off(retry.after(exc, uptime=None), retry, exc)
                continue
            if self._closing():
                await session.close()
                return None
            session.lost_at = lost_at
            self._set_state(_State.OPEN)
            return session
        return None

    async def _back_off(self, delay: float | None, retry: RetryState, error: ChatfeedError) -> None:
        """Wait ``delay`` before the next attempt; with no delay, give up on ``error``."""
        if delay is None:
            self._give_up(retry, error)
        self._set_state(_State.BACKING_OFF)
        logger.info(
            "%sreconnecting in %.3f s (attempt %d): %s",
            self._of_feed(),
            delay,
            retry.failures,
            error,
            extra=log_fields(self._feed, error=error, attempt=retry.failures, delay=delay),
        )
        await asyncio.sleep(delay)

    def _of_feed(self) -> str:
        """A log message's prefix naming the feed, for a pool's."""
        return "" if self._feed is None else f"feed {self._feed!r}: "

    def _give_up(self, retry: RetryState, error: ChatfeedError) -> NoReturn:
        url = redact_url(self._options.url)
        if self._feed is not None:
            url = f"{url} (feed {self._feed!r})"
        # Marked (gave_up), so that a program that reports the error itself
        # (the command line) can leave this record out.
        fields = log_fields(
            self._feed,
            error=error,
            failed_attempts=retry.failed_attempts,
            url=self._options.url,
            gave_up=True,
        )
        if retry.failed_attempts:
            logger.warning(
                "giving up on %s after %d failed attempt(s): %s", url, retry.failed_attempts, error, extra=fields
            )
        else:
            logger.warning("giving up on %s: %s", url, error, extra=fields)
        raise error

    async def _supervise(self, retry: RetryState, session: Session | None) -> None:
        error: BaseException | None = None
        abandoned = False  # cancelled by someone other than close(): handlers are cancelled, not drained
        self._first_session = None  # this task owns it now, and closes it
        dispatcher = self._dispatcher
        dispatch = self._dispatch
        receiver = asyncio.current_task()
        if receiver is not None:
            dispatcher.receivers.add(receiver)
        try:
            if session is None:
                session = await self._connect(retry)
            while session is not None:
                if not await self._announce_connected(session):
                    return
                if not await self._backfill(session):
                    return
                ended = await session.deliver(dispatcher, self._counters, self._closing, dispatch, self._observe_frame)
                if ended is None:
                    return
                lost_at = asyncio.get_running_loop().time()
                delay = retry.after(ended, uptime=lost_at - session.authenticated_at)
                session = None  # closed: nothing here keeps it (and its buffers) through the backoff
                await self._announce_lost(ended, delay)
                if delay is not None and self._state is _State.CLOSED:  # close() from a Disconnected handler
                    return
                await self._back_off(delay, retry, ended)
                session = await self._connect(retry, lost_at)
        except Exception as exc:
            error = exc
            raise
        except asyncio.CancelledError:
            abandoned = self._state is not _State.CLOSED or self._abandoned
            raise
        finally:
            if receiver is not None:
                dispatcher.receivers.discard(receiver)
            host = self._host
            host_reads = dispatcher.reads_a_stream(host)
            self._stop(error)
            if self._feed is not None:
                pass  # the pool's handlers are the pool's to drain
            elif abandoned:
                await dispatcher.cancel_handlers()
            else:
                await dispatcher.drain(self._options.drain_timeout)
            if error is not None and self._in_block and not host_reads and host is not None and not host.done():
                # A task group's rule: the block stops, and __aexit__ raises the
                # error. Unless the block reads events(): it gets the error from
                # there, after the events the stream still holds.
                self._cancelled_host = True
                host.cancel()

    async def _backfill(self, session: Session) -> bool:
        """Deliver what the ``backfill`` function fetches for the gap before ``session``, if one is due.

        Returns:
            False when the client was closed meanwhile (``session`` is then closed).
        """
        options = self._options
        delivery = self._delivery
        backfill = options.backfill
        is_reconnect = self._counters.connections > 1
        if backfill is None or delivery is None or not (is_reconnect or self._since is not None):
            return True
        lost_at = session.lost_at
        gap = Gap(
            since=delivery.watermark,
            is_reconnect=is_reconnect,
            downtime=None if lost_at is None else session.authenticated_at - lost_at,
            feed=self._feed,
        )
        try:
            events, error = await fetch_backfill(
                backfill, gap, options.backfill_timeout, receivers=self._dispatcher.receivers
            )
            hooks = self._hooks
            if hooks is not None and hooks.backfilled is not None:
                hooks.backfilled(self._feed, gap=gap, events=len(events), error=error)
            if error is not None:
                self._backfill_errors += 1
                logger.warning(
                    "%sthe backfill failed, the feed goes on without what it missed: %r",
                    self._of_feed(),
                    error,
                    extra=log_fields(self._feed, error=error, downtime=gap.downtime),
                )
                await self._dispatcher.call_error_hooks(error, gap)
            dispatcher = self._dispatcher
            delivered = delivery.backfilled
            for event in events:
                if self._closing():
                    break
                duplicates = delivery.duplicates
                pending = delivery.dispatch(event)
                if delivery.duplicates == duplicates:
                    delivery.backfilled += 1
                if pending is not None:
                    lone = dispatcher.lone
                    try:
                        await pending
                    except (Exception, asyncio.CancelledError) as exc:
                        await dispatcher.handler_failed(exc, event, lone)  # raises the client's own cancellation
            if events:
                logger.info(
                    "%sbackfilled %d event(s) since %s (%d already delivered)",
                    self._of_feed(),
                    delivery.backfilled - delivered,
                    gap.since,
                    len(events) - (delivery.backfilled - delivered),
                    extra=log_fields(self._feed, events=delivery.backfilled - delivered, downtime=gap.downtime),
                )
        except BaseException:
            await session.close()
            raise
        if self._closing():
            await session.close()
            return False
        return True

    async def _announce_connected(self, session: Session) -> bool:
        """Log the session and dispatch `Connected`; return False (and close it) if the client was closed meanwhile."""
        counters = self._counters
        is_reconnect = counters.connections > 1
        lost_at = session.lost_at
        downtime = None if lost_at is None else session.authenticated_at - lost_at
        url = redact_url(self._options.url)
        if is_reconnect:
            logger.info(
                "%sreconnected to %s after %.2f s away",
                self._of_feed(),
                url,
                downtime or 0.0,
                extra=log_fields(self._feed, url=url, downtime=downtime or 0.0),
            )
        else:
            logger.info("%sconnected to %s", self._of_feed(), url, extra=log_fields(self._feed, url=url))
        hooks = self._hooks
        if hooks is not None and hooks.connected is not None:
            hooks.connected(self._feed, is_reconnect=is_reconnect, downtime=downtime)
        try:
            await self._dispatcher.call_handlers(
                Connected(is_reconnect=is_reconnect, downtime=downtime, feed=self._feed)
            )
        except BaseException:
            await session.close()
            raise
        if self._state is _State.CLOSED:
            await session.close()
            return False
        return True

    def _closing(self) -> bool:
        return self._state is _State.CLOSED

    async def _announce_lost(self, error: ChatfeedError, delay: float | None) -> None:
        url = redact_url(self._options.url)
        logger.info(
            "%sconnection to %s lost: %s",
            self._of_feed(),
            url,
            error,
            extra=log_fields(self._feed, url=url, error=error),
        )
        lost = error if isinstance(error, ConnectionLostError) else None
        hooks = self._hooks
        if hooks is not None and hooks.disconnected is not None:
            hooks.disconnected(
                self._feed,
                code=lost.code if lost else None,
                reason=lost.reason if lost else "",
                error=error,
                retry_in=delay,
            )
        # Not open any more while its handlers run; closed already when nothing follows.
        self._set_state(_State.BACKING_OFF if delay is not None else _State.CLOSED)
        await self._dispatcher.call_handlers(
            Disconnected(
                code=lost.code if lost else 1000,
                reason=lost.reason if lost else "",
                will_retry=delay is not None,
                retry_in=delay,
                error=error,
                feed=self._feed,
            )
        )

    def _fatal_error(self) -> Exception | None:
        """The error that stopped the client, once its task has ended on one."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        error = task.exception()
        return error if isinstance(error, Exception) else None

    def _never_started(self) -> bool:
        return self._state is _State.UNOPENED

    def _stop_on_signals(self) -> Callable[[], None]:
        """Make the first SIGINT or SIGTERM stop the client; return what puts the previous handlers back."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        # What was there before: a handler of the loop's (add_signal_handler),
        # or of the signal module's (asyncio.run's own for SIGINT, say).
        of_the_loop = getattr(loop, "_signal_handlers", {})
        previous = {signum: (of_the_loop.get(signum), signal.getsignal(signum)) for signum in signals}
        installed: list[signal.Signals] = []

        def restore() -> None:
            for signum in installed:
                loop.remove_signal_handler(signum)
                handle, handler = previous[signum]
                if handle is not None:
                    loop.add_signal_handler(signum, handle._callback, *handle._args)
                elif handler is not None:
                    signal.signal(signum, handler)
            installed.clear()

        def stop(signum: signal.Signals) -> None:
            logger.info("received %s: closing the client", signum.name)
            restore()  # a second Ctrl-C interrupts as usual
            if self._runner is not None:
                self._set_state(_State.CLOSED)
                self._halt(self._runner)

        try:
            for signum in signals:
                loop.add_signal_handler(signum, stop, signum)
                installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            restore()
            raise UsageError(f"handle_signals=True needs the main thread of a Unix process ({exc})") from None
        return restore

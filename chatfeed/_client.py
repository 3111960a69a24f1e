"""The client: owns the connection loop and every task it starts.

One supervisor task per client runs connect, authenticate, receive and
reconnect in a loop; it is started by [`Client.run`][chatfeed.Client.run] or ``async with`` and
ended by [`Client.close`][chatfeed.Client.close]. Each connection has one more task, its
keepalive. Nothing else is spawned: handlers run inline in the receive loop,
one event at a time, in the order the frames arrived.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import inspect
import ipaddress
import logging
import math
import signal
import ssl as ssl_module
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeAlias, TypeVar, overload

from typing_extensions import Self

from ._connection import Connection, cancel_and_wait
from ._dispatch import Dispatcher, ErrorHook, EventName, EventStream, Handler, resolve_event
from ._logging import redact_url
from ._policy import Backoff, classify
from ._protocol import FeedProtocol, HandshakeState
from .exceptions import (
    AuthenticationError,
    AuthTimeoutError,
    ChatfeedError,
    ConnectionLostError,
    ProtocolError,
    TokenProviderError,
    UsageError,
)
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

__all__ = ["Client", "ClientStatistics", "TokenSource"]

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

TokenSource: TypeAlias = str | Callable[[], str | Awaitable[str]]
"""A JWT, or a function (sync or async) called for a token before every connection attempt."""


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True)
class ClientStatistics:
    """A snapshot of what a client has done, from [`Client.statistics`][chatfeed.Client.statistics].

    Attributes:
        state: ``"unopened"``, ``"open"`` or ``"closed"``.
        connected: Whether a connection is authenticated right now.
        connections: Connections authenticated so far.
        frames_received: Frames received, over all connections.
        protocol_errors: Frames dropped because they did not parse.
        handler_errors: Exceptions raised by handlers.
        event_streams: Open ``events()`` streams.
        buffered_events: Events waiting in those streams' buffers.
    """

    state: str
    connected: bool
    connections: int
    frames_received: int
    protocol_errors: int
    handler_errors: int
    event_streams: int
    buffered_events: int


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
    ) -> None:
        self._url = _check_url(url, ssl)
        self._token = _check_token(token)
        if reconnect is True:
            reconnect = Backoff()
        if reconnect is not False and not isinstance(reconnect, Backoff):
            raise UsageError(f"reconnect must be a Backoff, True or False, not {reconnect!r}")
        self._backoff: Backoff | None = reconnect or None
        self._auth_timeout = _positive("auth_timeout", auth_timeout)
        self._ping_interval = None if ping_interval is None else _positive("ping_interval", ping_interval)
        self._ping_timeout = None if ping_timeout is None else _positive("ping_timeout", ping_timeout)
        self._open_timeout = _positive("open_timeout", open_timeout)
        self._close_timeout = _positive("close_timeout", close_timeout)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
            raise UsageError(f"max_size must be a positive int, not {max_size!r}")
        self._max_size = max_size
        if ssl is not None and not isinstance(ssl, ssl_module.SSLContext):
            raise UsageError(f"ssl must be an ssl.SSLContext or None, not {ssl!r}")
        self._ssl = ssl
        self._proxy = proxy
        if isinstance(auth_retries, bool) or not isinstance(auth_retries, int) or auth_retries < 0:
            raise UsageError(f"auth_retries must be a non-negative int, not {auth_retries!r}")
        self._auth_retries = auth_retries

        self._dispatcher = Dispatcher()
        self._state = _State.UNOPENED
        self._task: asyncio.Task[None] | None = None
        # Set once the first connection is authenticated; ``async with`` waits for it.
        self._authenticated: asyncio.Future[None] | None = None
        # Holds dispatch back until ``async with`` has returned to its caller,
        # so that ``events()`` called right after sees every event.
        self._dispatch_allowed: asyncio.Event | None = None
        self._stop_requested = False
        # The task inside ``async with client:``, cancelled if the client stops on an error.
        self._host: asyncio.Task[Any] | None = None
        self._in_block = False
        self._cancelled_host = False
        self._connected = False
        self._connections = 0
        self._connection: Connection | None = None
        self._frames_received = 0  # by connections that have ended
        self._protocol_errors = 0

    def __repr__(self) -> str:
        return f"<chatfeed.Client url={redact_url(self._url)!r} state={self._state.value} connected={self._connected}>"

    # Registration

    @overload
    def on(self, event: Literal["new_message"] | type[NewMessage]) -> Callable[[_OnNewMessage], _OnNewMessage]: ...
    @overload
    def on(self, event: Literal["new_chat"] | type[NewChat]) -> Callable[[_OnNewChat], _OnNewChat]: ...
    @overload
    def on(self, event: Literal["error"] | type[ErrorMessage]) -> Callable[[_OnError], _OnError]: ...
    @overload
    def on(self, event: Literal["unknown"] | type[UnknownMessage]) -> Callable[[_OnUnknown], _OnUnknown]: ...
    @overload
    def on(self, event: Literal["connected"] | type[Connected]) -> Callable[[_OnConnected], _OnConnected]: ...
    @overload
    def on(
        self, event: Literal["disconnected"] | type[Disconnected]
    ) -> Callable[[_OnDisconnected], _OnDisconnected]: ...
    @overload
    def on(self, event: type[ServerMessage]) -> Callable[[_OnServerMessage], _OnServerMessage]: ...
    @overload
    def on(self, event: EventName) -> Callable[[_OnAny], _OnAny]: ...

    def on(self, event: EventName | type[Any]) -> Callable[[_OnAny], _OnAny]:
        """Register the decorated function as a handler of one kind of event.

        Args:
            event: An event name (``"new_message"``, ``"new_chat"``,
                ``"error"``, ``"unknown"``, ``"connected"``,
                ``"disconnected"``; see [`EventName`][chatfeed.EventName]) or the
                matching class; [`ServerMessage`][chatfeed.ServerMessage] receives every
                server event. A misspelt name is a type error for a type checker,
                and a [`UsageError`][chatfeed.UsageError] at run time.

        Handlers may be sync or async; several may handle one kind, and run in
        registration order. They run one event at a time in the receive loop,
        so a slow handler slows reading (nothing is dropped); hand long work
        to a task of your own. An exception in a handler is logged and passed
        to the [`on_error`][chatfeed.Client.on_error] hooks; it stops nothing else.

        Raises:
            UsageError: ``event`` is not an event chatfeed delivers.

        Example:
            ```python
            @client.on("new_chat")
            def remember(event: chatfeed.NewChat) -> None:
                chats[event.payload.id] = event.payload
            ```
        """
        cls = resolve_event(event)

        def register(func: _OnAny) -> _OnAny:
            self._dispatcher.add_handler(cls, func)
            return func

        return register

    def on_error(self, hook: _OnErrorHook) -> _OnErrorHook:
        """Register a function called with ``(exception, event)`` when a handler raises.

        Use it as a decorator. The hook may be sync or async; an exception in
        the hook itself is logged and ignored.
        """
        self._dispatcher.add_error_hook(hook)
        return hook

    def events(self, *, buffer: int = 256) -> EventStream[FeedEvent]:
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
        task = self._start(dispatch_now=True)
        restore = self._stop_on_signals(task) if handle_signals else None
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            await self.close()
            raise
        finally:
            if restore is not None:
                restore()
        if task.cancelled():
            if self._stop_requested:
                return
            raise UsageError("the client's task was cancelled without close(); did a handler re-raise CancelledError?")
        task.result()

    async def __aenter__(self) -> Self:
        """Connect; return once the first connection is authenticated.

        Raises:
            AuthenticationError: The server rejected the token.
            ConnectionFailedError: As for [`run`][chatfeed.Client.run].
        """
        task = self._start(dispatch_now=False)
        assert self._authenticated is not None and self._dispatch_allowed is not None
        self._host = asyncio.current_task()
        try:
            await asyncio.wait([self._authenticated, task], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await self.close()
            raise
        if not self._authenticated.done():
            await self.close()
            if not task.cancelled():
                task.result()  # raises what stopped the client
            raise UsageError("the client was closed while connecting")
        # No await between this and the caller's next line: a stream it opens
        # there is subscribed before the first event is dispatched.
        self._dispatch_allowed.set()
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
        elif exc is None and error is not None and not self._dispatcher.error_raised:
            raise error

    async def close(self) -> None:
        """Stop the client: close the connection, end every task and every event stream.

        Returns promptly from any state. Safe to call more than once. Called
        from a handler, it returns at once and the client stops as soon as
        that handler returns.
        """
        self._state = _State.CLOSED
        self._stop_requested = True
        task = self._task
        if task is None:
            self._dispatcher.end_streams()
        elif task is asyncio.current_task():
            # A handler: the receive loop stops when it returns.
            if self._connection is not None:
                self._connection.stop_receiving()
        elif not task.done():
            await cancel_and_wait(task)
        elif not task.cancelled():
            # The client stopped on a fatal error, which run(), the event
            # streams and the Disconnected event have already reported.
            task.exception()

    def _fatal_error(self) -> ChatfeedError | None:
        """The error that stopped the client, once its task has ended on one."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        error = task.exception()
        return error if isinstance(error, ChatfeedError) else None

    def _never_started(self) -> bool:
        return self._state is _State.UNOPENED

    def _stop_on_signals(self, task: asyncio.Task[None]) -> Callable[[], None]:
        """Make the first SIGINT or SIGTERM stop the client; return what undoes it."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)

        def restore() -> None:
            for signum in signals:
                loop.remove_signal_handler(signum)

        def stop(signum: signal.Signals) -> None:
            logger.info("received %s: closing the client", signum.name)
            restore()  # a second Ctrl-C interrupts as usual
            self._state = _State.CLOSED
            self._stop_requested = True
            task.cancel()

        try:
            for signum in signals:
                loop.add_signal_handler(signum, stop, signum)
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            restore()
            task.cancel()
            raise UsageError(f"handle_signals=True needs the main thread of a Unix process ({exc})") from None
        return restore

    @property
    def connected(self) -> bool:
        """Whether a connection is authenticated right now."""
        return self._connected

    def statistics(self) -> ClientStatistics:
        """Return a snapshot of the client's counters."""
        streams = self._dispatcher.streams()
        return ClientStatistics(
            state=self._state.value,
            connected=self._connected,
            connections=self._connections,
            frames_received=self._frames_received + (self._connection.frames_received if self._connection else 0),
            protocol_errors=self._protocol_errors,
            handler_errors=self._dispatcher.handler_errors,
            event_streams=len(streams),
            buffered_events=sum(stream.pending() for stream in streams),
        )

    # The supervisor

    def _start(self, *, dispatch_now: bool) -> asyncio.Task[None]:
        if self._state is _State.CLOSED:
            raise UsageError("the client is closed; create a new one")
        if self._state is _State.OPEN:
            raise UsageError("the client is already running")
        loop = asyncio.get_running_loop()
        self._state = _State.OPEN
        self._authenticated = loop.create_future()
        self._dispatch_allowed = asyncio.Event()
        if dispatch_now:
            self._dispatch_allowed.set()
        self._task = loop.create_task(self._supervise(), name=f"chatfeed-client {redact_url(self._url)}")
        return self._task

    async def _supervise(self) -> None:
        error: BaseException | None = None
        try:
            await self._connect_forever()
        except Exception as exc:
            error = exc
            raise
        finally:
            self._state = _State.CLOSED
            self._connected = False
            reader_told = self._dispatcher.has_waiting_reader()
            self._dispatcher.end_streams(error)
            host = self._host
            if error is not None and self._in_block and not reader_told and host is not None and not host.done():
                # A task group's rule: the block stops, and __aexit__ raises the
                # error. Unless an events() reader is about to get the error itself.
                self._cancelled_host = True
                host.cancel()

    async def _connect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0  # attempts in a row that failed, or ended before reset_after: the backoff's count
        failed_attempts = 0  # attempts in a row that did not authenticate: max_attempts' count
        auth_failures = 0  # auth_error answers in a row
        lost_at: float | None = None
        while True:
            error, session_start = await self._attempt(lost_at)
            if error is None or self._stop_requested:
                return
            now = loop.time()
            if session_start is not None:
                lost_at = now
                auth_failures = 0
                failed_attempts = 0
                if self._backoff is not None and now - session_start >= self._backoff.reset_after:
                    failures = 0
            else:
                failed_attempts += 1
            failures += 1
            if isinstance(error, AuthenticationError):
                auth_failures += 1
            delay = self._retry_delay(error, failures, failed_attempts, auth_failures)

            if session_start is not None:
                logger.info("connection to %s lost: %s", redact_url(self._url), error)
                lost = error if isinstance(error, ConnectionLostError) else None
                await self._dispatcher.call_handlers(
                    Disconnected(
                        code=lost.code if lost else 1000,
                        reason=lost.reason if lost else "",
                        will_retry=delay is not None,
                        retry_in=delay,
                        error=error,
                    )
                )
                if self._stop_requested and delay is not None:
                    return
            if delay is None:
                # Marked, so that a program that reports the error itself (the
                # command line) can leave this record out.
                marker = {"chatfeed_gave_up": True}
                if failed_attempts:
                    logger.warning(
                        "giving up on %s after %d failed attempt(s): %s",
                        redact_url(self._url),
                        failed_attempts,
                        error,
                        extra=marker,
                    )
                else:
                    logger.warning("giving up on %s: %s", redact_url(self._url), error, extra=marker)
                raise error
            logger.info("reconnecting in %.3f s (attempt %d): %s", delay, failures, error)
            await asyncio.sleep(delay)

    async def _attempt(self, lost_at: float | None) -> tuple[ChatfeedError | None, float | None]:
        """Connect, authenticate and receive until the connection ends.

        Returns:
            The error that ended the attempt (``None`` if close() was called
            from a handler), and when the connection was authenticated
            (``None`` if it never was).
        """
        session_start: float | None = None
        try:
            token = await self._fetch_token()
            connection = await Connection.open(
                self._url,
                secret=token,
                open_timeout=self._open_timeout,
                max_size=self._max_size,
                ssl=self._ssl,
                proxy=self._proxy,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                close_timeout=self._close_timeout,
            )
            self._connection = connection
            try:
                protocol = FeedProtocol()
                await self._authenticate(connection, protocol, token)
                session_start = asyncio.get_running_loop().time()
                await self._announce_connected(lost_at, session_start)
                await self._receive(connection, protocol)
            finally:
                self._connected = False
                self._connection = None
                self._frames_received += connection.frames_received
                await connection.close()
        except ChatfeedError as exc:
            return exc, session_start
        return None, session_start

    def _retry_delay(
        self, error: ChatfeedError, failures: int, failed_attempts: int, auth_failures: int
    ) -> float | None:
        """Return the wait before the next attempt, or ``None`` to give up."""
        backoff = self._backoff
        if backoff is None or backoff.exhausted(failed_attempts):
            return None
        if isinstance(error, AuthenticationError):
            # Only a token function can do better next time, and only so often.
            if not callable(self._token) or auth_failures > self._auth_retries:
                return None
            return backoff.delay(failures)
        verdict = classify(error, connected_before=self._connections > 0)
        if not verdict.retry:
            return None
        return max(backoff.delay(failures), verdict.min_delay)

    async def _fetch_token(self) -> str:
        source = self._token
        if isinstance(source, str):
            return source
        try:
            value = source()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            raise TokenProviderError(f"the token function raised {type(exc).__name__}") from exc
        if not isinstance(value, str):
            raise UsageError(f"the token function must return a str, not a {type(value).__name__}")
        if not value:
            raise UsageError("the token function returned an empty string")
        return value

    async def _authenticate(self, connection: Connection, protocol: FeedProtocol, token: str) -> None:
        await connection.send(protocol.auth_frame(token))
        # A timer that drops the connection, rather than asyncio.wait_for,
        # which before Python 3.12 can swallow a cancellation from close().
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            connection.abort()

        timer = asyncio.get_running_loop().call_later(self._auth_timeout, expire)
        try:
            while protocol.state is not HandshakeState.OPEN:
                try:
                    frame = await connection.recv()
                except ConnectionLostError:
                    if expired:
                        raise AuthTimeoutError(self._auth_timeout) from None
                    raise
                try:
                    protocol.receive(frame)
                except ProtocolError as exc:
                    self._protocol_errors += 1
                    logger.warning("ignored a frame during authentication: %s", exc)
        finally:
            timer.cancel()

    async def _announce_connected(self, lost_at: float | None, now: float) -> None:
        assert self._authenticated is not None
        assert self._dispatch_allowed is not None
        is_reconnect = self._connections > 0
        self._connected = True
        self._connections += 1
        if not self._authenticated.done():
            self._authenticated.set_result(None)
        await self._dispatch_allowed.wait()
        downtime = None if lost_at is None else now - lost_at
        if is_reconnect:
            logger.info("reconnected to %s after %.2f s away", redact_url(self._url), downtime or 0.0)
        else:
            logger.info("connected to %s", redact_url(self._url))
        await self._dispatcher.call_handlers(Connected(is_reconnect=is_reconnect, downtime=downtime))

    async def _receive(self, connection: Connection, protocol: FeedProtocol) -> None:
        receive = protocol.receive
        dispatch = self._dispatcher.dispatch

        # Called for every frame: parse, then deliver, creating a coroutine
        # only when a handler or a full buffer has to be awaited.
        def handle(frame: str | bytes) -> Awaitable[None] | None:
            try:
                event = receive(frame)
            except ProtocolError as exc:
                self._protocol_errors += 1
                logger.warning("dropped a frame that does not fit the protocol: %s", exc)
                return None
            return None if event is None else dispatch(event)

        if not self._stop_requested:
            await connection.receive_forever(handle)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _check_token(token: TokenSource) -> TokenSource:
    if isinstance(token, str):
        if not token:
            raise UsageError("token must not be empty")
        return token
    if callable(token):
        return token
    raise UsageError(f"token must be a str or a function returning one, not a {type(token).__name__}")


def _check_url(url: str, ssl: ssl_module.SSLContext | None) -> str:
    if not isinstance(url, str):
        raise UsageError(f"url must be a str, not a {type(url).__name__}")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise UsageError(f"invalid url {redact_url(url)!r}: {exc}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UsageError(f"url must be a ws:// or wss:// address with a host, not {redact_url(url)!r}")
    if parts.fragment:
        raise UsageError("url must not have a #fragment")
    if parts.scheme == "ws":
        if ssl is not None:
            raise UsageError("ssl is given but the url is ws://; use wss://")
        if not _is_loopback(parts.hostname):
            logger.warning(
                "%s is not encrypted: the token and every message cross the network in clear; use wss://",
                redact_url(url),
            )
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

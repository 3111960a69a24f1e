"""One connection's life: a token, the connection, the auth exchange, then frames to events.

`Session.open` fetches a token, opens the connection and authenticates;
`Session.deliver` pulls frames (``async for frame in connection.frames()``),
parses each into an event and hands it to the dispatcher, until the
connection ends; it returns why. Nothing here decides whether to reconnect:
that is the client's supervisor, with `chatfeed._policy.RetryState`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from ._config import Options, TokenSource
from ._connection import Connection
from ._dispatch import Dispatcher
from ._keepalive import Keepalive
from ._logging import Scrubber
from ._observe import observer_failed
from ._protocol import FRAME_ATTRIBUTE, FeedProtocol, HandshakeState
from .exceptions import AuthTimeoutError, ChatfeedError, ProtocolError, TokenProviderError, UsageError
from .models import FeedEvent, NewChat, NewMessage

__all__ = ["Counters", "Session"]

logger = logging.getLogger("chatfeed")

_FRAMED = frozenset({NewMessage, NewChat})


@dataclasses.dataclass(slots=True)
class Counters:
    """What the sessions of one client have counted, for ``statistics()``."""

    connections: int = 0
    frames_received: int = 0
    protocol_errors: int = 0


class Session:
    """An authenticated connection, ready to deliver events."""

    __slots__ = ("_frames", "_protocol", "authenticated_at", "connection", "lost_at")

    def __init__(self, connection: Connection, protocol: FeedProtocol) -> None:
        self.connection = connection
        self.authenticated_at = 0.0  # set by open(), once the server said auth_success
        # When the connection before this one was lost, if there was one.
        self.lost_at: float | None = None
        self._protocol = protocol
        self._frames: AsyncGenerator[str | bytes, None] = connection.frames()

    @classmethod
    async def open(
        cls,
        options: Options,
        counters: Counters,
        *,
        token: TokenSource,
        authenticating: Callable[[], None] = lambda: None,
        keepalive: Keepalive | None = None,
        feed: str | None = None,
    ) -> Session:
        """Fetch a token, connect and authenticate.

        Args:
            options: The client's options.
            counters: Where frames and protocol errors are counted.
            token: The token, or the function that gives one.
            authenticating: Called once the connection is open, before the
                auth frame is sent.
            keepalive: The keepalive the connection joins, instead of running
                its own (a pool's feeds share one).
            feed: The pool's key of the feed, for the log records.

        Raises:
            ChatfeedError: The attempt failed (its subclass says how).
        """
        protocol = FeedProtocol()  # the first builds the frames' validator, before the network waits
        secret = await fetch_token(token)
        connection = await Connection.open(options, secret=secret, keepalive=keepalive, feed=feed)
        protocol.log_extra = connection.log_extra
        session = cls(connection, protocol)
        try:
            authenticating()
            await _authenticate(session.connection, protocol, session._frames, secret, options.auth_timeout, counters)
        except BaseException:
            await session.close()
            raise
        session.authenticated_at = asyncio.get_running_loop().time()
        counters.connections += 1
        return session

    async def deliver(
        self,
        dispatcher: Dispatcher,
        counters: Counters,
        stopping: Callable[[], bool],
        dispatch: Callable[[Any], Awaitable[None] | None] | None = None,
        observe: Callable[[str | bytes], None] | None = None,
    ) -> ChatfeedError | None:
        """Deliver every event of the connection, in order, then close it.

        Args:
            dispatcher: Where events go, and where a handler's failure is reported.
            counters: Where frames and protocol errors are counted.
            stopping: Whether the client was closed (from a handler).
            dispatch: What delivers an event, when not ``dispatcher.dispatch``
                itself (a client that drops duplicates).
            observe: What each frame is shown to first, token scrubbed (an
                observer's ``frame_received``).

        Returns:
            What ended the connection, or ``None`` when ``stopping()`` turned
            true after a delivery (the client was closed from a handler).
        """
        parse: Callable[[str | bytes], FeedEvent | None] = self._protocol.receive
        if dispatcher.keep_frames:
            parse = _keeping_frames(parse)
        if observe is not None:
            parse = _observing(parse, observe, self.connection.scrub)
        if dispatch is None:
            dispatch = dispatcher.dispatch
        try:
            async for frame in self._frames:
                counters.frames_received += 1
                try:
                    event = parse(frame)
                except ProtocolError as exc:
                    counters.protocol_errors += 1
                    logger.warning(
                        "dropped a frame that does not fit the protocol: %s", exc, extra=self.connection.log_extra
                    )
                    continue
                if event is None:
                    continue
                pending = dispatch(event)
                if pending is None:
                    continue
                # A lone async handler's own coroutine, awaited here without a
                # wrapper (its exception is reported as any handler's is), or
                # chatfeed's for the rest of a delivery that has to wait.
                # Which it was is read now: a pool's other feeds share the
                # dispatcher, and dispatch again while this one waits.
                lone = dispatcher.lone
                try:
                    await pending
                except (Exception, asyncio.CancelledError) as exc:
                    await dispatcher.handler_failed(exc, event, lone)  # raises the client's own cancellation
                if stopping():
                    return None
        except ChatfeedError as exc:  # the connection ended, or the token expired mid-session
            return _detached(exc)
        finally:
            await self.close()
        raise AssertionError("the frames of a connection end only with an error")  # pragma: no cover

    async def close(self) -> None:
        """Close the connection; never raises but the caller's cancellation."""
        try:
            await self._frames.aclose()
        finally:
            await self.connection.close()


async def fetch_token(source: TokenSource) -> str:
    """Return the token to send: the static one, or what the token function gives.

    Raises:
        TokenProviderError: The function raised (its exception is ``__cause__``).
        UsageError: The function returned something other than a non-empty str.
    """
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


async def _authenticate(
    connection: Connection,
    protocol: FeedProtocol,
    frames: AsyncGenerator[str | bytes, None],
    token: str,
    timeout: float,
    counters: Counters,
) -> None:
    await connection.send(protocol.auth_frame(token, scrub=connection.scrub))
    # A timer that fails the connection, rather than asyncio.wait_for, which
    # before Python 3.12 can swallow a cancellation from close().
    # The error is made only if the timer fires: asyncio keeps a cancelled
    # timer, and what it holds, until its deadline would have come.
    timer = asyncio.get_running_loop().call_later(timeout, _expire, connection, timeout)
    try:
        async for frame in frames:
            counters.frames_received += 1
            try:
                protocol.receive(frame)
            except ProtocolError as exc:
                counters.protocol_errors += 1
                logger.warning("ignored a frame during authentication: %s", exc, extra=connection.log_extra)
            if protocol.state is HandshakeState.OPEN:
                return
    finally:
        timer.cancel()


def _keeping_frames(parse: Callable[[str | bytes], FeedEvent | None]) -> Callable[[str | bytes], FeedEvent | None]:
    """Return ``parse``, which also keeps on each message and chat event the frame it came in."""

    def parse_and_keep(frame: str | bytes) -> FeedEvent | None:
        event = parse(frame)
        # Only these: an error or unknown frame may quote the token, and the
        # event the protocol made of it has it scrubbed; its frame has not.
        if event is not None and event.__class__ in _FRAMED:
            object.__setattr__(event, FRAME_ATTRIBUTE, frame)
        return event

    return parse_and_keep


def _observing(
    parse: Callable[[str | bytes], FeedEvent | None], observe: Callable[[str | bytes], None], scrub: Scrubber
) -> Callable[[str | bytes], FeedEvent | None]:
    """Return ``parse``, which first shows each frame to ``observe``, token scrubbed."""

    def observe_and_parse(frame: str | bytes) -> FeedEvent | None:
        try:
            if isinstance(frame, str):
                observe(scrub(frame))
            else:
                text = frame.decode("utf-8", "replace")
                observe(frame if not scrub.leaks(text) else scrub(text).encode())
        except Exception:
            observer_failed(observe, "frame_received")
        return parse(frame)

    return observe_and_parse


def _detached(error: ChatfeedError) -> ChatfeedError:
    """Return ``error`` without its tracebacks (its own and its causes').

    The error outlives its connection: the supervisor keeps it while the next
    connection runs, and ``Disconnected.error`` hands it to the application.
    Its traceback's frames (the receive loop's, websockets') would keep the
    dead connection, its buffers and its transport alive with it.
    """
    seen: set[int] = set()
    links: list[BaseException] = [error]
    while links:
        link = links.pop()
        if id(link) in seen:
            continue
        seen.add(id(link))
        link.__traceback__ = None
        links.extend(chained for chained in (link.__cause__, link.__context__) if chained is not None)
    return error


def _expire(connection: Connection, timeout: float) -> None:
    connection.fail(AuthTimeoutError(timeout))

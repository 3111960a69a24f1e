"""The websockets adapter: one WebSocket connection, with chatfeed's exceptions.

Everything websockets raises is translated here into the exceptions of
`chatfeed.exceptions`, so that nothing above this module knows
websockets' exception tree. Keepalive is chatfeed's own: when a pong is late,
the connection is aborted at once rather than closed politely, because a dead
peer never answers the closing handshake and waiting for it would hold the
reconnect up by a further close timeout.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import ssl as ssl_module
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidProxy,
    InvalidStatus,
    InvalidURI,
    SecurityError,
)
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.uri import parse_uri
from websockets.version import version as websockets_version

from ._frames import FrameSplitter
from ._logging import Scrubber, log_fields, redact_url, redacting_logger
from ._policy import parse_retry_after
from ._version import __version__
from .exceptions import ChatfeedError, ConnectError, ConnectionLostError, HandshakeError, UsageError

if TYPE_CHECKING:
    from ._config import Options
    from ._keepalive import Keepalive

__all__ = ["Connection", "cancel_and_wait"]

logger = logging.getLogger("chatfeed.connection")

_USER_AGENT = f"chatfeed/{__version__} websockets/{websockets_version}"


class _ClientConnection(ClientConnection):
    """websockets' client connection, with three additions of chatfeed's.

    It gives up at once on a reply that is not HTTP: websockets half-closes
    and waits for the server to close the TCP connection, and a peer that
    keeps it open would hold the attempt until open_timeout, which would then
    be retried as if the server were merely slow.

    It counts the reads from the network, which tells the keepalive whether a
    late pong is lost or merely queued behind data.

    And it runs the fast frame path (`chatfeed._frames`) when no extension was
    negotiated: websockets is fed the handshake response alone, so that its
    parser stands at a frame boundary, and from then on a `FrameSplitter`
    takes the bytes, puts whole text frames in websockets' queue as ``str``
    and forwards the rest to websockets' parser.
    """

    arrivals = 0
    _splitter: FrameSplitter | None = None
    _head: bytes = b""

    def data_received(self, data: bytes) -> None:
        self.arrivals += 1
        splitter = self._splitter
        if splitter is not None:
            self._split(splitter, data)
            return
        if self.response is None and _RECEIVE == "fast":
            self._handshake_received(data)
            return
        super().data_received(data)
        if self.response is None and self.protocol.handshake_exc is not None:
            self.transport.abort()

    def _handshake_received(self, data: bytes) -> None:
        # The reply to the opening handshake ends with its first empty line
        # (a 101 has no body): websockets gets up to there, the splitter what follows.
        seen = self._head + data
        end = seen.find(b"\r\n\r\n")
        if end == -1:
            self._head = seen[-3:]
            head, rest = data, b""
        else:
            cut = end + 4 - (len(seen) - len(data))
            head, rest = data[:cut], data[cut:]
        super().data_received(head)
        if self.response is None:
            if self.protocol.handshake_exc is not None:
                self.transport.abort()
            elif rest:
                super().data_received(rest)
            return
        protocol = self.protocol
        max_size = getattr(protocol, "max_message_size", getattr(protocol, "max_size", None))
        if self.response.status_code == 101 and protocol.state is OPEN and not protocol.extensions and max_size:
            # Its text messages go straight into websockets' queue of frames,
            # where the frames websockets parses go too, in wire order.
            queue: collections.deque[Frame | str] = self.recv_messages.frames.queue  # type: ignore[assignment]
            splitter = self._splitter = FrameSplitter(max_size, queue.append, self._forward)
            if rest:
                self._split(splitter, rest)
        elif rest:
            super().data_received(rest)

    def _split(self, splitter: FrameSplitter, data: bytes) -> None:
        splitter.feed(data)
        messages = self.recv_messages
        queue = messages.frames.queue
        if queue:
            waiter = messages.frames.get_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            # What Assembler.put does for the frames it queues itself.
            if messages.high is not None and len(queue) > messages.high and not messages.paused:
                messages.paused = True
                messages.pause()

    def _forward(self, data: bytes) -> bool:
        super().data_received(data)
        return self.protocol.state is OPEN

    def eof_received(self) -> None:
        if self._splitter is not None:
            self._splitter.flush()
        return super().eof_received()

    @property
    def fast(self) -> bool:
        """Whether the fast frame path runs: text messages may then be queued as ``str``."""
        return self._splitter is not None


class Connection:
    """An open WebSocket connection to the feed.

    Read it with ``async for frame in connection.frames()``. When it ends, the
    iteration raises why: the [`ConnectionLostError`][chatfeed.ConnectionLostError]
    of its closing handshake, or the cause given to `fail`.
    """

    __slots__ = ("_cause", "_keepalive", "_ws", "log_extra", "scrub")

    def __init__(
        self,
        ws: _ClientConnection,
        scrub: Scrubber,
        *,
        ping_interval: float | None,
        ping_timeout: float | None,
        keepalive: Keepalive | None = None,
        feed: str | None = None,
    ) -> None:
        self._ws = ws
        self.scrub = scrub
        # The fields of the records about this connection (its pool feed),
        # made once: a record about a frame must not cost a dict per frame.
        self.log_extra = log_fields(feed)
        self._cause: ChatfeedError | None = None
        self._keepalive: asyncio.Task[None] | Keepalive | None = keepalive
        if keepalive is not None:
            keepalive.add(self)
        elif ping_interval is not None:
            self._keepalive = asyncio.get_running_loop().create_task(
                self._run_keepalive(ping_interval, ping_timeout), name="chatfeed-keepalive"
            )

    @property
    def arrivals(self) -> int:
        """How many reads from the network this connection has had: a sign of life."""
        return self._ws.arrivals

    def reading(self) -> bool:
        """Whether the transport is being read (not paused for backpressure)."""
        return self._ws.transport.is_reading()

    async def ping(self) -> Awaitable[float]:
        """Send a ping; return what is done when its pong comes.

        Raises:
            ConnectionClosed: The connection is closed.
        """
        return await self._ws.ping()

    @classmethod
    async def open(
        cls, options: Options, *, secret: str, keepalive: Keepalive | None = None, feed: str | None = None
    ) -> Connection:
        """Open the TCP connection and complete the WebSocket handshake.

        Args:
            options: The client's options.
            secret: The token this connection will send. It is scrubbed from
                everything the server says (close reasons, redirect targets)
                before that reaches an exception or a log record.
            keepalive: The keepalive it joins, instead of running its own.
            feed: The pool's key of its feed, for its log records.

        Raises:
            ConnectError: The server could not be reached (or its TLS certificate
                was refused, or it hung up during the handshake).
            HandshakeError: The server answered, but not with a WebSocket upgrade,
                or redirected to another origin.
        """
        scrub = Scrubber(secret)
        url = options.url
        kwargs: dict[str, Any] = {}
        if options.ssl is not None:
            kwargs["ssl"] = options.ssl
        failure: Exception | None = None
        try:
            ws = await _SameOriginConnect(
                url,
                open_timeout=options.open_timeout,
                max_size=options.max_size,
                compression=options.compression,
                proxy=True if options.proxy is True else options.proxy or None,
                ping_interval=None,  # keepalive is ours, see the module docstring
                close_timeout=options.close_timeout,
                user_agent_header=_USER_AGENT,
                # Its own, which knows the token: websockets logs what the server says.
                logger=redacting_logger("websockets.client", scrub),
                create_connection=_ClientConnection,
                **kwargs,
            )
        except Exception as exc:
            failure = exc
        if failure is not None:
            # Raised here, out of the except block, so that websockets'
            # exception is not even the context unless it is safe to chain.
            error = _translate_open_error(failure, url, options.open_timeout, scrub)
            leaks = isinstance(error, UsageError) or scrub.leaks_in_chain(failure)
            raise error from (None if leaks else failure)
        assert isinstance(ws, _ClientConnection)
        return cls(
            ws,
            scrub,
            ping_interval=options.ping_interval,
            ping_timeout=options.ping_timeout,
            keepalive=keepalive,
            feed=feed,
        )

    async def send(self, text: str) -> None:
        """Send one text frame.

        Raises:
            ConnectionLostError: The connection is closed (or the cause given to `fail`).
        """
        closed: ConnectionClosed | None = None
        try:
            await self._ws.send(text)
        except ConnectionClosed as exc:
            closed = exc
        if closed is not None:
            raise self._ended(closed) from self._safe_cause(closed)

    async def frames(self) -> AsyncGenerator[str | bytes, None]:
        """Yield every frame: ``str`` for a text frame, ``bytes`` for a binary one.

        Text messages that are already queued (the fast path's, and the text
        frames websockets parsed) are taken straight off websockets' queue,
        without the three coroutines per frame that ``recv()`` creates; any
        other message, and every frame on a version of websockets this was not
        tested with (see `_receive_path`), goes through ``recv()``.

        Raises:
            ConnectionLostError: The connection closed, for whatever reason
                (or the cause given to `fail`).
        """
        ws = self._ws
        recv = ws.recv
        closed: ConnectionClosed | None = None
        try:
            # websockets' internals are looked at only past this loop: on a
            # version chatfeed does not know, there may be none of them.
            while _RECEIVE == "recv":
                yield await recv()
            messages = ws.recv_messages
            frames = messages.frames
            queue: collections.deque[Frame | str] = frames.queue  # type: ignore[assignment]
            fast = ws.fast
            low = messages.low or 0  # None only without flow control, when it never pauses
            while True:
                while queue:
                    item = queue.popleft()
                    if isinstance(item, str):  # a text message of the fast path
                        text = item
                    elif item.opcode is Opcode.TEXT and item.fin:
                        try:
                            text = str(item.data, "utf-8")
                        except UnicodeDecodeError:
                            queue.appendleft(item)
                            break  # recv() fails the connection with 1007, as it should
                    else:
                        queue.appendleft(item)
                        break  # binary, or the first of fragments: recv() assembles it
                    if messages.paused and len(queue) <= low:  # as maybe_resume() does, without its calls
                        messages.maybe_resume()
                    yield text
                if queue or not fast or messages.closed:
                    yield await recv()  # the message at the head, or the wait for the next one
                    continue
                # Waiting for the next message as recv() would, where the fast
                # path's text messages, which recv() cannot read, wake us too.
                waiter = frames.get_waiter = ws.loop.create_future()
                try:
                    await waiter
                except EOFError:
                    pass  # the connection is lost: recv() says how
                finally:
                    waiter.cancel()
                    frames.get_waiter = None
        except ConnectionClosed as exc:
            closed = exc
        assert closed is not None
        # Out of the except block: websockets' exception quotes the close
        # reason, and is not even the context unless it is safe to chain.
        raise self._ended(closed) from self._safe_cause(closed)

    async def close(self) -> None:
        """Close the connection, politely if the peer can answer in time.

        Never raises, except the caller's own cancellation; the connection is
        dropped whatever happens.
        """
        transport = self._ws.transport
        try:
            keepalive = self._keepalive
            if isinstance(keepalive, asyncio.Task):
                await cancel_and_wait(keepalive)
            elif keepalive is not None:
                keepalive.remove(self)
            # While reading is paused for backpressure, the server's closing
            # frame would sit unread behind the backlog until close_timeout.
            if transport.is_reading():
                await self._ws.close()  # bounded by close_timeout inside websockets
        except Exception:
            logger.debug("error while closing the connection", exc_info=True, extra=self.log_extra)
        finally:
            transport.abort()

    def fail(self, cause: ChatfeedError) -> None:
        """Drop the connection at once, without a closing handshake; reading it then raises ``cause``.

        The one way a connection is ended for a reason of chatfeed's own (no
        pong, no answer to the auth frame): the reason travels with it.
        """
        if self._cause is None:
            self._cause = cause
        self._ws.transport.abort()

    def _ended(self, exc: ConnectionClosed) -> ChatfeedError:
        """Why the connection ended: the cause given to `fail`, or its closing handshake, scrubbed."""
        if self._cause is not None:
            return self._cause
        rcvd, sent = exc.rcvd, exc.sent
        if rcvd is not None and (sent is None or exc.rcvd_then_sent):
            return ConnectionLostError(rcvd.code, self.scrub(rcvd.reason))
        if sent is not None:
            return ConnectionLostError(sent.code, self.scrub(sent.reason), local=True)
        return ConnectionLostError(1006)

    def _safe_cause(self, exc: BaseException) -> BaseException | None:
        # Chained to websockets' exception (and so to a TCP reset under it)
        # only when its text, which quotes the close reason, does not hold the token.
        return None if self._cause is not None or self.scrub.leaks_in_chain(exc) else exc

    async def _run_keepalive(self, interval: float, timeout: float | None) -> None:
        ws = self._ws
        while True:
            await asyncio.sleep(interval)
            try:
                pong = asyncio.ensure_future(await ws.ping())
            except ConnectionClosed:
                return
            while True:
                arrivals = ws.arrivals
                done, _ = await asyncio.wait([pong], timeout=timeout)
                if done:
                    # Also when the connection closed meanwhile: the next
                    # ping() raises ConnectionClosed and ends the loop.
                    break
                if ws.arrivals == arrivals and ws.transport.is_reading():
                    logger.warning(
                        "no pong within %g s: dropping the connection",
                        timeout,
                        extra={**self.log_extra, "chatfeed_timeout": timeout},
                    )
                    self.fail(ConnectionLostError(1006, "no pong within ping_timeout", local=True))
                    return
                # Data is still arriving, or the client stopped reading because
                # its consumers are behind: the pong is queued behind data, not
                # lost. A dead peer sends nothing at all.


def _receive_path() -> str:
    """How frames are read: ``"fast"``, ``"drain"`` or ``"recv"``.

    The fast frame path and the queue drain rely on websockets' internals:
    ``ClientConnection.recv_messages`` (its ``frames.queue`` and
    ``frames.get_waiter``, ``high``, ``low``, ``paused``, ``pause()`` and
    ``maybe_resume()``), the sans-I/O
    protocol's ``state``, ``extensions`` and maximum message size, and the
    response being parsed in ``data_received``. They are the same from
    websockets 15.0 to 17.x, the versions this is tested with. On any other
    version, frames go through the public ``recv()``, and one line says so.
    ``CHATFEED_RECEIVE=drain`` or ``recv`` chooses a slower path on purpose
    (the test suite runs with each).
    """
    chosen = os.environ.get("CHATFEED_RECEIVE", "fast")
    if chosen not in ("fast", "drain", "recv"):
        raise ValueError(f"CHATFEED_RECEIVE must be fast, drain or recv, not {chosen!r}")
    major = websockets_version.split(".", 1)[0]
    if major in ("15", "16", "17"):
        return chosen
    logger.warning(
        "websockets %s is newer than chatfeed knows: frames are read through recv(), which is slower",
        websockets_version,
    )
    return "recv"


_RECEIVE = _receive_path()


class _SameOriginConnect(connect):
    """websockets' ``connect``, following redirects only within the feed's origin.

    Browsers' WebSocket follows no redirect at all. websockets follows them
    to any host, and the auth frame, so the token, would go there. A redirect
    that keeps scheme, host and port (a new path) is harmless and followed.
    """

    def process_redirect(self, exc: Exception) -> Exception | str:
        if (
            isinstance(exc, InvalidStatus)
            and exc.response.status_code in _REDIRECTS
            and "Location" in exc.response.headers
        ):
            status = exc.response.status_code
            try:
                target = urllib.parse.urljoin(self.uri, exc.response.headers["Location"])
                parse_uri(target)
            except (ValueError, InvalidURI):
                return _RefusedRedirect(status, "", "a redirect to an address that is not valid")
            if _origin(target) != _origin(self.uri):
                return _RefusedRedirect(status, target, "a redirect to another origin")
        return super().process_redirect(exc)


# The statuses websockets follows as redirects.
_REDIRECTS = frozenset({300, 301, 302, 303, 307, 308})


class _RefusedRedirect(Exception):
    def __init__(self, status_code: int, target: str, what: str) -> None:
        super().__init__(status_code, what)
        self.status_code = status_code
        self.target = target
        self.what = what


def _origin(url: str) -> tuple[str, str, int | None]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return ("", url, None)
    scheme = parts.scheme.lower()
    default = {"ws": 80, "http": 80, "wss": 443, "https": 443}.get(scheme)
    return (scheme, (parts.hostname or "").lower(), port or default)


# ssl.SSLError reasons that mean the peer answered something other than TLS.
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"})

_MAY_NOT_SPEAK_TLS = "the server may not be speaking TLS (a wss:// address for a plain ws:// server?)"


def _translate_open_error(exc: Exception, url: str, open_timeout: float, scrub: Scrubber) -> ChatfeedError:
    """Return the chatfeed exception for what ``connect`` raised."""
    if isinstance(exc, _RefusedRedirect):
        where = f" ({scrub(redact_url(exc.target))})" if exc.target else ""
        return HandshakeError(
            exc.status_code,
            detail=(f"{exc.what}{where} refused: chatfeed follows redirects only to the same scheme, host and port"),
        )
    if isinstance(exc, InvalidStatus):
        response = exc.response
        return HandshakeError(response.status_code, retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if isinstance(exc, SecurityError):
        return HandshakeError(None, detail="the WebSocket handshake broke a limit (too many redirects, or too large)")
    if isinstance(exc, InvalidMessage):
        if isinstance(exc.__cause__, EOFError):
            return ConnectError("server closed the connection during the WebSocket handshake")
        return HandshakeError(None)
    if isinstance(exc, InvalidURI):
        return UsageError("the url is not a valid WebSocket address")
    if isinstance(exc, InvalidProxy):
        return UsageError("the proxy is not a valid proxy address")
    if isinstance(exc, InvalidHandshake):
        return HandshakeError(None)
    if isinstance(exc, ssl_module.SSLCertVerificationError):
        return ConnectError(f"TLS certificate verification failed: {exc.verify_message}", tls=True)
    if isinstance(exc, ssl_module.SSLError):
        reason = exc.reason or type(exc).__name__
        hint = f"; {_MAY_NOT_SPEAK_TLS}" if reason in _NOT_TLS_REASONS else ""
        return ConnectError(f"TLS handshake failed ({reason}){hint}", tls=True)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # distinct before Python 3.11
        return ConnectError(f"timed out after {open_timeout:g} s opening the connection")
    if isinstance(exc, ConnectionResetError) and exc.errno is None and _origin(url)[0] == "wss":
        # asyncio's TLS layer reports a connection lost mid-handshake as a bare
        # ConnectionResetError(); a reset from the network carries an errno.
        return ConnectError(f"connection closed during the TLS handshake; {_MAY_NOT_SPEAK_TLS}", tls=True)
    if isinstance(exc, OSError):
        return ConnectError(f"could not connect: {exc.strerror or str(exc) or type(exc).__name__}")
    # Anything else is a reply that websockets could not take in: not worth a retry.
    return HandshakeError(None, detail=f"the handshake failed with {type(exc).__name__}")


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has finished, whatever it raised.

    A cancellation of the caller while it waits is not swallowed.
    """
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        logger.debug("task %s ended with an error while being cancelled", task.get_name(), exc_info=task.exception())

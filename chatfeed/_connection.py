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
import logging
import ssl as ssl_module
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

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
from websockets.version import version as websockets_version

from ._logging import FrameRedactingLogger, Scrubber, redact_url
from ._policy import parse_retry_after
from ._version import __version__
from .exceptions import ChatfeedError, ConnectError, ConnectionLostError, HandshakeError, UsageError

__all__ = ["Connection", "cancel_and_wait"]

logger = logging.getLogger("chatfeed.connection")

_WEBSOCKETS_LOGGER = FrameRedactingLogger(logging.getLogger("websockets.client"))
_USER_AGENT = f"chatfeed/{__version__} websockets/{websockets_version}"


class _ClientConnection(ClientConnection):
    """websockets' client connection, which gives up at once on a reply that is not HTTP.

    When the reply to the opening handshake does not parse, websockets
    half-closes and waits for the server to close the TCP connection; a peer
    that keeps it open would hold the attempt until open_timeout, and the
    timeout would then be retried as if the server were merely slow.
    """

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.response is None and self.protocol.handshake_exc is not None:
            self.transport.abort()


class Connection:
    """An open WebSocket connection to the feed."""

    __slots__ = ("_keepalive", "_ping_timed_out", "_scrub", "_stopping", "_ws", "frames_received")

    def __init__(
        self,
        ws: ClientConnection,
        scrub: Scrubber,
        *,
        ping_interval: float | None,
        ping_timeout: float | None,
    ) -> None:
        self._ws = ws
        self._scrub = scrub
        self._ping_timed_out = False
        self._stopping = False
        self.frames_received = 0
        self._keepalive: asyncio.Task[None] | None = None
        if ping_interval is not None:
            self._keepalive = asyncio.get_running_loop().create_task(
                self._run_keepalive(ping_interval, ping_timeout), name="chatfeed-keepalive"
            )

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        secret: str,
        open_timeout: float,
        max_size: int,
        ssl: ssl_module.SSLContext | None,
        proxy: str | bool | None,
        ping_interval: float | None,
        ping_timeout: float | None,
        close_timeout: float,
    ) -> Connection:
        """Open the TCP connection and complete the WebSocket handshake.

        Args:
            url: The feed's address.
            secret: The token this connection will send. It is scrubbed from
                everything the server says (close reasons, redirect targets)
                before that reaches an exception or a log record.

        Raises:
            ConnectError: The server could not be reached (or its TLS certificate
                was refused, or it hung up during the handshake).
            HandshakeError: The server answered, but not with a WebSocket upgrade,
                or redirected to another origin.
        """
        scrub = Scrubber(secret)
        kwargs: dict[str, Any] = {}
        if ssl is not None:
            kwargs["ssl"] = ssl
        try:
            ws = await _SameOriginConnect(
                url,
                open_timeout=open_timeout,
                max_size=max_size,
                proxy=True if proxy is True else proxy or None,
                ping_interval=None,  # keepalive is ours, see the module docstring
                close_timeout=close_timeout,
                user_agent_header=_USER_AGENT,
                logger=_WEBSOCKETS_LOGGER,
                create_connection=_ClientConnection,
                **kwargs,
            )
        except Exception as exc:
            error = _translate_open_error(exc, url, open_timeout, scrub)
            if error is None:
                raise
            # Not chained when the chain would quote the token back, or the url.
            raise error from (None if isinstance(error, UsageError) or _chain_leaks(exc, scrub) else exc)
        return cls(ws, scrub, ping_interval=ping_interval, ping_timeout=ping_timeout)

    async def send(self, text: str) -> None:
        """Send one text frame.

        Raises:
            ConnectionLostError: The connection is closed.
        """
        try:
            await self._ws.send(text)
        except ConnectionClosed as exc:
            raise self._lost(exc) from self._safe_cause(exc)

    async def recv(self) -> str | bytes:
        """Return the next frame: ``str`` for a text frame, ``bytes`` for a binary one.

        Raises:
            ConnectionLostError: The connection closed, for whatever reason.
        """
        try:
            frame = await self._ws.recv()
        except ConnectionClosed as exc:
            raise self._lost(exc) from self._safe_cause(exc)
        self.frames_received += 1
        return frame

    async def receive_forever(self, handle: Callable[[str | bytes], Awaitable[None] | None]) -> None:
        """Pass every frame to ``handle``, awaiting what it returns, until `stop_receiving`.

        The receive loop of a connection, kept here so that frames come
        straight from websockets, with no wrapper per frame, while its
        exceptions are still translated.

        Raises:
            ConnectionLostError: The connection closed, for whatever reason.
        """
        recv = self._ws.recv
        try:
            while not self._stopping:
                frame = await recv()
                self.frames_received += 1
                pending = handle(frame)
                if pending is not None:
                    await pending
        except ConnectionClosed as exc:
            raise self._lost(exc) from self._safe_cause(exc)

    def stop_receiving(self) -> None:
        """Make `receive_forever` return once the frame in hand is handled."""
        self._stopping = True

    async def close(self) -> None:
        """Close the connection, politely if the peer can answer in time.

        Never raises, except the caller's own cancellation; the connection is
        dropped whatever happens.
        """
        transport = self._ws.transport
        try:
            if self._keepalive is not None:
                await cancel_and_wait(self._keepalive)
            # While reading is paused for backpressure, the server's closing
            # frame would sit unread behind the backlog until close_timeout.
            if transport.is_reading():
                await self._ws.close()  # bounded by close_timeout inside websockets
        except Exception:
            logger.debug("error while closing the connection", exc_info=True)
        finally:
            transport.abort()

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake."""
        self._ws.transport.abort()

    def _lost(self, exc: ConnectionClosed) -> ConnectionLostError:
        """Translate websockets' closed-connection exception, with the close reason scrubbed.

        Chained to websockets' exception (and so to a TCP reset under it)
        only when its text, which quotes the reason, does not hold the token.
        """
        if self._ping_timed_out:
            return ConnectionLostError(1006, "no pong within ping_timeout", local=True)
        rcvd, sent = exc.rcvd, exc.sent
        if rcvd is not None and (sent is None or exc.rcvd_then_sent):
            return ConnectionLostError(rcvd.code, self._scrub(rcvd.reason))
        if sent is not None:
            return ConnectionLostError(sent.code, self._scrub(sent.reason), local=True)
        return ConnectionLostError(1006)

    def _safe_cause(self, exc: BaseException) -> BaseException | None:
        return None if _chain_leaks(exc, self._scrub) else exc

    async def _run_keepalive(self, interval: float, timeout: float | None) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                pong = asyncio.ensure_future(await self._ws.ping())
            except ConnectionClosed:
                return
            while True:
                frames = self.frames_received
                done, _ = await asyncio.wait([pong], timeout=timeout)
                if done:
                    # Also when the connection closed meanwhile: the next
                    # ping() raises ConnectionClosed and ends the loop.
                    break
                if self.frames_received == frames and self._ws.transport.is_reading():
                    logger.warning("no pong within %g s: dropping the connection", timeout)
                    self._ping_timed_out = True
                    self._ws.transport.abort()
                    return
                # Frames are still arriving, or the client stopped reading
                # because its consumers are behind: the pong is queued behind
                # data, not lost. A dead peer sends nothing at all.


class _SameOriginConnect(connect):
    """websockets' ``connect``, following redirects only within the feed's origin.

    Browsers' WebSocket follows no redirect at all. websockets follows them
    to any host, and the auth frame, so the token, would go there. A redirect
    that keeps scheme, host and port (a new path) is harmless and followed.
    """

    def process_redirect(self, exc: Exception) -> Exception | str:
        if isinstance(exc, InvalidStatus) and "Location" in exc.response.headers:
            target = urllib.parse.urljoin(self.uri, exc.response.headers["Location"])
            if _origin(target) != _origin(self.uri):
                return _CrossOriginRedirect(exc.response.status_code, target)
        return super().process_redirect(exc)


class _CrossOriginRedirect(Exception):
    def __init__(self, status_code: int, target: str) -> None:
        super().__init__(status_code, target)
        self.status_code = status_code
        self.target = target


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


def _translate_open_error(exc: Exception, url: str, open_timeout: float, scrub: Scrubber) -> ChatfeedError | None:
    """Return the chatfeed exception for what ``connect`` raised, or ``None`` to let it through."""
    if isinstance(exc, _CrossOriginRedirect):
        return HandshakeError(
            exc.status_code,
            detail=(
                f"redirect to another origin ({scrub(redact_url(exc.target))}) refused: "
                "chatfeed follows redirects only to the same scheme, host and port"
            ),
        )
    if isinstance(exc, InvalidStatus):
        response = exc.response
        return HandshakeError(response.status_code, retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if isinstance(exc, SecurityError):
        if isinstance(exc.__cause__, InvalidStatus):  # a redirect from wss:// to ws://
            return HandshakeError(
                exc.__cause__.response.status_code, detail="redirect from wss:// to ws:// refused: never downgraded"
            )
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
    return None


def _chain_leaks(exc: BaseException, scrub: Scrubber) -> bool:
    """Whether the text of ``exc`` or of an exception it was raised from quotes the secret."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if scrub.leaks(str(current)) or scrub.leaks(repr(current.args)):
            return True
        current = current.__cause__ or current.__context__
    return False


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has finished, whatever it raised.

    A cancellation of the caller while it waits is not swallowed.
    """
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        logger.debug("task %s ended with an error while being cancelled", task.get_name(), exc_info=task.exception())

"""Exceptions raised by chatfeed.

Every exception chatfeed raises on purpose derives from [`ChatfeedError`][chatfeed.ChatfeedError].
Exceptions of the libraries underneath (websockets, pydantic, the OS) are
translated where they occur and chained as ``__cause__``, so they never leak.

```text
ChatfeedError
├── UsageError                  the API was used wrongly; a bug in the caller
├── ProtocolError               a frame that does not fit the protocol
├── AuthenticationError         the server rejected the token (auth_error)
├── TokenProviderError          the token function raised (its exception is __cause__)
├── ClientClosedError           the client closed before an expected event came
└── ConnectionFailedError       the feed could not be reached or was lost
    ├── ConnectError            TCP, DNS or TLS failure before the WebSocket handshake
    ├── HandshakeError          the server did not upgrade to WebSocket (HTTP status)
    ├── AuthTimeoutError        no answer to the auth frame within auth_timeout
    └── ConnectionLostError     the WebSocket closed (close code and reason)
```

Only [`UsageError`][chatfeed.UsageError] means "fix your code"; the others describe the
outside world and carry structured attributes for deciding what to do.
None of them ever includes the token or the content of a frame in its text.
"""

from __future__ import annotations

__all__ = [
    "AuthTimeoutError",
    "AuthenticationError",
    "ChatfeedError",
    "ClientClosedError",
    "ConnectError",
    "ConnectionFailedError",
    "ConnectionLostError",
    "HandshakeError",
    "ProtocolError",
    "TokenProviderError",
    "UsageError",
]


class ChatfeedError(Exception):
    """Base class of every exception chatfeed raises."""


class UsageError(ChatfeedError):
    """The API was used in a way it does not support.

    Raised at the call that is wrong (an unknown event name, a bad argument,
    reusing a closed client), never later from the network loop.
    """


class ProtocolError(ChatfeedError):
    """A frame does not fit the chat feed protocol.

    The message says what was wrong, never what the frame contained: frames
    hold user content.
    """


class AuthenticationError(ChatfeedError):
    """The server answered the auth frame with ``auth_error``.

    Attributes:
        message: The server's explanation, as sent (may be empty).
    """

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(f"authentication failed: {message}" if message else "authentication failed")


class TokenProviderError(ChatfeedError):
    """The function passed as ``token`` raised; its exception is ``__cause__``.

    Treated like a failed connection attempt: retried with backoff, since a
    token refresh often fails for a passing reason.
    """


class ClientClosedError(ChatfeedError):
    """The client was closed before the event an [`Expectation`][chatfeed.Expectation] waits for came."""


class ConnectionFailedError(ChatfeedError):
    """The feed could not be reached, or the connection to it was lost."""


class ConnectError(ConnectionFailedError):
    """The connection failed before the WebSocket handshake completed.

    Refused or reset connections, DNS failures, timeouts and TLS errors.
    The underlying `OSError` or `TimeoutError` is ``__cause__``.

    Attributes:
        tls: True when the TLS handshake failed: an untrusted certificate, or
            a server that does not speak TLS (a ``wss://`` address for a plain
            ``ws://`` server). Retrying the same address cannot succeed, so
            these end the client (see [`Backoff`][chatfeed.Backoff]).
    """

    def __init__(self, message: str, *, tls: bool = False) -> None:
        self.tls = tls
        super().__init__(message)


class HandshakeError(ConnectionFailedError):
    """The server answered the WebSocket handshake with something other than 101.

    Also raised for a redirect that chatfeed does not follow: to another
    origin (scheme, host or port), or from ``wss://`` to ``ws://``.

    Attributes:
        status_code: The HTTP status, or ``None`` when the reply was not HTTP.
        retry_after: Seconds the server asked to wait (``Retry-After``), if any.
        detail: What was wrong beyond the status, when chatfeed knows.
    """

    def __init__(self, status_code: int | None, *, retry_after: float | None = None, detail: str = "") -> None:
        self.status_code = status_code
        self.retry_after = retry_after
        self.detail = detail
        if status_code is None:
            text = (
                "WebSocket handshake failed"
                if detail
                else "server did not answer the WebSocket handshake with valid HTTP"
            )
        else:
            text = f"server rejected the WebSocket handshake with HTTP {status_code}"
        super().__init__(f"{text}: {detail}" if detail else text)


class AuthTimeoutError(ConnectionFailedError):
    """The server did not answer the auth frame within ``auth_timeout``.

    Attributes:
        timeout: The timeout that elapsed, in seconds.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"no answer to the auth frame within {timeout:g} s")


class ConnectionLostError(ConnectionFailedError):
    """The WebSocket connection closed.

    Attributes:
        code: The close code (1006 when the connection dropped without one).
        reason: The close reason, possibly empty.
        local: True when this side closed the connection, because the server
            broke the protocol (an oversize frame, invalid UTF-8) or stopped
            answering pings; False when the server closed it or it dropped.
    """

    def __init__(self, code: int, reason: str = "", *, local: bool = False) -> None:
        self.code = code
        self.reason = reason
        self.local = local
        text = f"connection closed by {'the client' if local else 'the server'} with code {code}"
        if code == 1006 and not local:
            text = "connection dropped without a closing handshake (1006)"
        super().__init__(f"{text}: {reason}" if reason else text)

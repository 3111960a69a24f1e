"""Logging helpers that keep secrets and user content out of log records and error text."""

from __future__ import annotations

import http
import logging
import re
import sys
import urllib.parse
from typing import Any, cast

from websockets.frames import Frame

from .exceptions import ConnectionLostError, HandshakeError
from .models import Chat, Message

__all__ = ["FrameRedactingLogger", "Scrubber", "log_fields", "redact_url", "redacting_logger"]


REDACTED = "***"


class Scrubber:
    """Removes one secret, whole or in part, from text that came from the server.

    A server may quote the token back in a close reason, an ``error`` frame,
    an HTTP reason phrase, a header or a body, whole or cut short. Any run of
    `WINDOW` or more characters of the token is replaced by ``***``: a
    fragment that long identifies the token (a JWT's signature, its payload).
    Only texts from the server go through this, never the feed's events, so
    its cost is paid on error paths alone.

    Example:
        >>> Scrubber("eyJhbGciOi.eyJzdWIiOiIxIn0.c2lnbmF0dXJl")("token c2lnbmF0dXJl revoked")
        'token *** revoked'
    """

    WINDOW = 8
    """The shortest run of the token's characters that is removed; a shorter token is removed only whole."""

    SHORTEST = 4
    """A token shorter than this (a test's ``"t"``) is not looked for: it would hide ordinary words."""

    LONG = 4096
    """In a text longer than this, only runs of 11 or more characters are looked for, at C speed."""

    __slots__ = ("_aligned", "_grams", "_secret")

    def __init__(self, secret: str) -> None:
        self._secret = secret
        # Worked out at the first use: a JWT's runs take kilobytes, and most
        # connections never meet a server text to scrub.
        self._grams: tuple[str, ...] | None = None
        self._aligned: tuple[str, ...] = ()

    def __call__(self, text: str) -> str:
        """Return ``text`` with every part of the secret replaced by ``***``."""
        secret = self._secret
        if len(secret) < self.SHORTEST or not text:
            return text
        if secret in text:
            text = text.replace(secret, REDACTED)
        width = self.WINDOW
        grams = self._grams
        if grams is None:
            grams = self._grams = tuple(dict.fromkeys(secret[i : i + width] for i in range(len(secret) - width + 1)))
            # Every run of WINDOW + 3 characters holds one of these whole.
            self._aligned = grams[::4]
        if not grams or len(text) < width:
            return text
        if len(text) > self.LONG and not any(gram in text for gram in self._aligned):
            return text
        starts: list[int] = []
        for gram in grams:
            start = text.find(gram)
            while start != -1:
                starts.append(start)
                start = text.find(gram, start + 1)
        if not starts:
            return text
        starts.sort()
        pieces: list[str] = []
        shown = 0  # text[:shown] is in pieces, or hidden
        for start in starts:
            if start > shown:
                pieces += (text[shown:start], REDACTED)
            elif not pieces or pieces[-1] is not REDACTED:
                pieces.append(REDACTED)
            shown = max(shown, start + width)
        pieces.append(text[shown:])
        return "".join(pieces)

    def leaks(self, text: str) -> bool:
        """Return whether ``text`` holds the secret or a part of it that `__call__` would remove."""
        return self(text) != text

    def leaks_in_chain(self, exc: BaseException) -> bool:
        """Return whether the text of ``exc``, or of an exception it was raised from or in, quotes the secret."""
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            if self.leaks(str(current)) or self.leaks(repr(current.args)):
                return True
            current = current.__cause__ or current.__context__
        return False


class FrameRedactingLogger:
    """A logger for websockets that keeps secrets and message bodies out of its records.

    websockets logs at DEBUG every frame with the start of its data (the auth
    frame, so the token, and message bodies), the request line (a URL may
    carry a token in its query), every header, and the reason phrase of the
    HTTP status line. Passed as websockets' ``logger``, this adapter logs a
    frame as its opcode and length, a request target without its query
    values, the values of an allow-list of headers only (any other header,
    ``Authorization`` or a ``WWW-Authenticate`` that echoes the token, is
    logged as ``***``), and the standard reason phrase of a status code
    instead of the server's own. Given the connection's `Scrubber`, it also
    scrubs the token from every text it logs: a server may put it anywhere,
    in a redirect's path or an allow-listed header.
    """

    # Not a LoggerAdapter: one is made per connection, and thousands may be open.
    __slots__ = ("_scrub", "logger")

    def __init__(self, logger: logging.Logger, scrub: Scrubber | None = None) -> None:
        self.logger = logger
        self._scrub = scrub

    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(level)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(logging.DEBUG, msg, *args, **kwargs)

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(logging.WARNING, msg, *args, **kwargs)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(logging.ERROR, msg, *args, **kwargs)

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        self.log(logging.ERROR, msg, *args, exc_info=exc_info, **kwargs)

    def critical(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(logging.CRITICAL, msg, *args, **kwargs)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.logger.isEnabledFor(level):
            args = _redact_args(msg, args)
            scrub = self._scrub
            if scrub is not None:
                args = tuple(scrub(arg) if isinstance(arg, str) else arg for arg in args)
                exc_info = kwargs.get("exc_info")
                if exc_info:
                    error = sys.exc_info()[1] if exc_info is True else exc_info
                    if isinstance(error, tuple):
                        error = error[1]
                    if isinstance(error, BaseException) and scrub.leaks_in_chain(error):
                        # A traceback would print the server's words: the type is enough.
                        kwargs["exc_info"] = None
                        msg = f"{msg} ({type(error).__name__}, whose text quotes the token, not shown)"
            kwargs.setdefault("stacklevel", 2)
            self.logger.log(level, msg, *args, **kwargs)


def redacting_logger(name: str, scrub: Scrubber | None = None) -> logging.LoggerAdapter[logging.Logger]:
    """Return a `FrameRedactingLogger` for the logger ``name``, typed as websockets wants its ``logger``."""
    # It has every method of a LoggerAdapter that websockets calls.
    return cast("logging.LoggerAdapter[logging.Logger]", FrameRedactingLogger(logging.getLogger(name), scrub))


# Headers of the WebSocket handshake whose values hold nothing secret and
# help to diagnose a failed upgrade. Every other header's value is hidden.
_LOGGED_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "content-type",
        "date",
        "host",
        "retry-after",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-version",
        "server",
        "transfer-encoding",
        "upgrade",
        "user-agent",
    }
)
_HEADER_MESSAGES = frozenset({"> %s: %s", "< %s: %s"})
_STATUS_MESSAGES = frozenset({"> HTTP/1.1 %d %s", "< HTTP/1.1 %d %s"})


def _redact_args(msg: object, args: tuple[object, ...]) -> tuple[object, ...]:
    if msg in _HEADER_MESSAGES and len(args) == 2:
        name, value = args
        if str(name).lower() in _LOGGED_HEADERS:
            return (name, value)
        return (name, REDACTED)
    if msg in _STATUS_MESSAGES and len(args) == 2:
        return (args[0], _standard_phrase(args[0]))
    return tuple(_redact(arg) for arg in args)


def _standard_phrase(code: object) -> str:
    try:
        return http.HTTPStatus(code).phrase if isinstance(code, int) else "(reason not logged)"
    except ValueError:
        return "(reason not logged)"


def _redact(arg: object) -> object:
    if isinstance(arg, Frame):
        return _summary(arg)
    if isinstance(arg, str) and (arg.startswith("/") or "://" in arg):  # a request target or a URL
        return redact_url(arg)
    return arg


def _summary(frame: Frame) -> str:
    return f"{frame.opcode.name} [{len(frame.data)} bytes, not logged]"


# Secrets in a URL's path (some servers take the token there: ``/ws/<token>``):
# a JWT anywhere in a segment (its header is base64 of '{"', so it starts
# with "eyJ"; it may follow a prefix such as "Bearer "), or a segment that
# is one long opaque run, such as an API key or standard base64 (whose '/'
# arrives as %2F). Ids, words and host names are shorter than 40
# characters, or have other separators; a UUID (36) is kept, since it names
# a resource. A key shorter than 40 characters (32 hex digits) is not
# recognised: put tokens in the auth frame, where chatfeed sends them.
_NEXT_SERVER = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")
_JWT = re.compile(r"eyJ[\w-]{2,}\.[\w-]{2,}\.[\w-]*", re.ASCII)
_OPAQUE = re.compile(r"[\w~+/=.-]{40,}", re.ASCII)


def _redact_path(path: str) -> str:
    segments = path.split("/")
    for i, segment in enumerate(segments):
        # A segment's ;parameters are values, like a query's.
        name, semicolon, _ = segment.partition(";")
        if semicolon:
            segment = segments[i] = f"{name};{REDACTED}"
        plain = urllib.parse.unquote(name)
        if _JWT.search(plain) or _OPAQUE.fullmatch(plain):
            segments[i] = REDACTED
    return "/".join(segments)


def redact_url(url: str) -> str:
    """Return ``url`` (or a request target) without credentials, query values or secrets in its path, for logs.

    A path segment shaped like a JWT or a long opaque key (40 characters or
    more) is replaced by ``***``, and so are a segment's ``;parameters``.
    """
    servers = _NEXT_SERVER.split(url)
    if len(servers) > 1:  # a list of servers (NATS takes one): each its own credentials
        return ",".join(map(redact_url, servers))
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return REDACTED
    scheme, slashes, rest = url.partition("://")
    if slashes and "@" not in parts.netloc and ":" in rest.rpartition("@")[0]:
        # A password with a raw '/', '?' or '#' (base64's '/', say) ends the
        # netloc early: the "user:password@" is read as path or query.
        return redact_url(f"{scheme}://***@{rest.rpartition('@')[2]}")
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        keys = [key for key, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)]
        query = "&".join(f"{key}=***" for key in keys) if keys else REDACTED
    return urllib.parse.urlunsplit((parts.scheme, netloc, _redact_path(parts.path), query, ""))


def log_fields(
    feed: str | None = None,
    *,
    event: object = None,
    chat: str | None = None,
    event_type: str | None = None,
    handler: str | None = None,
    error: BaseException | None = None,
    attempt: int | None = None,
    failed_attempts: int | None = None,
    delay: float | None = None,
    waited: float | None = None,
    timeout: float | None = None,
    downtime: float | None = None,
    url: str | None = None,
    state: str | None = None,
    previous_state: str | None = None,
    events: int | None = None,
    position: str | None = None,
    observer: str | None = None,
    gave_up: bool | None = None,
) -> dict[str, object]:
    """Return the ``extra`` of a log record: each field given, named ``chatfeed_<name>``.

    A field whose value is ``None`` is left out: a lone client's records have
    no ``chatfeed_feed``, a record about an error other than a lost
    connection no ``chatfeed_close_code``. Built on the paths where a record
    is logged (a connection, a retry, an error), never per frame.

    Args:
        feed: The pool's key of the feed the record is about.
        event: The event the record is about: gives ``chatfeed_event_type``,
            ``chatfeed_chat`` (the chat of a message or of a new chat) and,
            unless ``feed`` is given, ``chatfeed_feed``.
        chat: The chat, when there is no event to take it from (a bridge's record).
        event_type: The event's type, when there is no event to take it from.
        handler: The name of the handler (or ``on_error`` hook) concerned.
        error: What failed: gives ``chatfeed_error_type`` (its class name),
            ``chatfeed_close_code`` and ``chatfeed_close_reason`` for a
            `ConnectionLostError` (whose reason is scrubbed of the token when
            it is made), ``chatfeed_status_code`` for a `HandshakeError`.
        attempt: The number of the retry that follows a wait (1 for the first),
            or of a consumer's delivery.
        failed_attempts: The attempts in a row that failed, when giving up.
        delay: Seconds waited before the next attempt.
        waited: Seconds something has been waited for so far (a full buffer).
        timeout: The seconds that elapsed, for a record about a time limit.
        downtime: Seconds without a connection, on a reconnection.
        url: The feed's address; its credentials and query values are redacted here.
        state: The state entered, on a state change.
        previous_state: The state left, on a state change.
        events: How many events the record is about (backfilled, unpublished).
        position: Where an entry is in a bridge's log (a stream sequence, an entry id).
        observer: ``Class.method`` of an observer that raised.
        gave_up: True on the record of a client (or pool feed) giving up.

    Example:
        >>> log_fields("user-17", attempt=2, delay=0.5)
        {'chatfeed_feed': 'user-17', 'chatfeed_attempt': 2, 'chatfeed_delay': 0.5}
    """
    fields: dict[str, object] = {}
    if event is not None:
        if feed is None:
            feed = getattr(event, "feed", None)
        if event_type is None:
            event_type = getattr(event, "type", type(event).__name__)
        if chat is None:
            payload = getattr(event, "payload", None)
            if isinstance(payload, Message):
                chat = payload.chat_id
            elif isinstance(payload, Chat):
                chat = payload.id
    if event_type is not None:
        fields["chatfeed_event_type"] = event_type
    if chat is not None:
        fields["chatfeed_chat"] = chat
    if feed is not None:
        fields["chatfeed_feed"] = feed
    if handler is not None:
        fields["chatfeed_handler"] = handler
    if error is not None:
        fields["chatfeed_error_type"] = type(error).__name__
        if isinstance(error, ConnectionLostError):
            fields["chatfeed_close_code"] = error.code
            fields["chatfeed_close_reason"] = error.reason
        elif isinstance(error, HandshakeError) and error.status_code is not None:
            fields["chatfeed_status_code"] = error.status_code
    if url is not None:
        fields["chatfeed_url"] = redact_url(url)
    for name, value in (
        ("attempt", attempt),
        ("failed_attempts", failed_attempts),
        ("delay", delay),
        ("waited", waited),
        ("timeout", timeout),
        ("downtime", downtime),
        ("state", state),
        ("previous_state", previous_state),
        ("events", events),
        ("position", position),
        ("observer", observer),
        ("gave_up", gave_up),
    ):
        if value is not None:
            fields[f"chatfeed_{name}"] = value
    return fields

"""Logging helpers that keep secrets and user content out of log records."""

from __future__ import annotations

import logging
import urllib.parse
from typing import TYPE_CHECKING, Any

from websockets.frames import Frame

__all__ = ["FrameRedactingLogger", "redact_url"]


if TYPE_CHECKING:
    _LoggerAdapter = logging.LoggerAdapter[logging.Logger]
else:  # subscriptable at run time only from Python 3.11
    _LoggerAdapter = logging.LoggerAdapter


class FrameRedactingLogger(_LoggerAdapter):
    """A logger for websockets that keeps secrets and message bodies out of its records.

    websockets logs at DEBUG every frame with the start of its data (the auth
    frame, so the token, and message bodies), the request line (a URL may
    carry a token in its query) and every header (``Authorization`` holds the
    credentials of a ``wss://user:password@host`` URL). Passed as websockets'
    ``logger``, this adapter logs a frame as its opcode and length, a request
    target without its query values, and sensitive headers without values.
    """

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, None)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            self.logger.log(level, msg, *_redact_args(msg, args), **kwargs)


_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})


def _redact_args(msg: object, args: tuple[object, ...]) -> tuple[object, ...]:
    if msg in ("> %s: %s", "< %s: %s") and len(args) == 2 and str(args[0]).lower() in _SECRET_HEADERS:
        return (args[0], "***")
    return tuple(_redact(arg) for arg in args)


def _redact(arg: object) -> object:
    if isinstance(arg, Frame):
        return _summary(arg)
    if isinstance(arg, str) and (arg.startswith("/") or "://" in arg):  # a request target or a URL
        return redact_url(arg)
    return arg


def _summary(frame: Frame) -> str:
    return f"{frame.opcode.name} [{len(frame.data)} bytes, not logged]"


def redact_url(url: str) -> str:
    """Return ``url`` (or a request target) without credentials or query values, for logs and reprs."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        keys = [key for key, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)]
        query = "&".join(f"{key}=***" for key in keys) if keys else "***"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))

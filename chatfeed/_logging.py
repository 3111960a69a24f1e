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
    """A logger for websockets that never logs the data of a frame.

    websockets logs every frame at DEBUG with the start of its data: the auth
    frame (and so the token) and message bodies. Passed as websockets'
    ``logger``, this adapter replaces each frame by its opcode and length.
    """

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, None)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            args = tuple(_summary(arg) if isinstance(arg, Frame) else arg for arg in args)
            self.logger.log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs


def _summary(frame: Frame) -> str:
    return f"{frame.opcode.name} [{len(frame.data)} bytes, not logged]"


def redact_url(url: str) -> str:
    """Return ``url`` without a password or query values, for logs and reprs."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        keys = [key for key, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)]
        query = "&".join(f"{key}=***" for key in keys) if keys else "***"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))

"""A pool's backfill from a backend's history over HTTP: what ``chatfeed bridge --backfill-url`` uses.

`http_backfill` returns a ``backfill`` function for a [`Pool`][chatfeed.Pool]:
for a gap of feed ``gap.feed``, it sends ``GET <url>?since=<gap.since>`` with
that feed's token as ``Authorization: Bearer``, and gives the messages and
chats of the answer, a JSON array of frames (``{"type": "new_message",
"payload": {...}}``), as `chatfeed.testing.FeedServer` serves them on its
port. The standard library's HTTP client does the request, in a thread:
http and https, the environment's proxy settings, no redirects (they would
carry the token elsewhere).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import ValidationError

from ._delivery import Gap
from ._logging import redact_url
from ._protocol import _validator
from ._version import __version__
from .exceptions import ChatfeedError, ProtocolError, UsageError
from .models import Chat, Message, NewChat, NewMessage

__all__ = ["HistoryError", "http_backfill"]

_MAX_BODY = 64 * 2**20
"""The largest answer read, in bytes: a backfill is what a gap missed, not a database dump."""


class HistoryError(ChatfeedError):
    """The history could not be fetched: the server could not be reached, or answered with an HTTP error.

    Attributes:
        status_code: The HTTP status of the answer, or ``None`` when there was none.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def http_backfill(
    url: str,
    tokens: Mapping[str, str] | Callable[[str], str],
    *,
    timeout: float = 10.0,
    lookback: float = 60.0,
) -> Callable[[Gap], Awaitable[list[Message | Chat]]]:
    """Return a pool's ``backfill`` function (a `chatfeed.Backfill`) that fetches each feed's gap from ``url``.

    Args:
        url: The history's address, ``http://`` or ``https://`` (``…/history``).
        tokens: Each feed's token, by the feed's key: a mapping, or a function of the key.
        timeout: Seconds one request may take, connecting and reading.
        lookback: Seconds before ``gap.since`` the fetch starts from: clocks
            differ, and a message created a little before the watermark may
            have changed (its status) in the gap. The overlap is dropped as
            duplicates. A message changed longer after its creation than this
            is not fetched again: the protocol has no cursor of changes.

    Raises:
        UsageError: ``url`` is not http or https, or ``timeout`` is not a positive number.
            The backfill function raises `UsageError` for a gap of no feed, or
            of a feed with no token; `HistoryError` when the request fails;
            `ProtocolError` when the answer is not an array of frames. Their
            text never holds the token.
    """
    if isinstance(lookback, bool) or not isinstance(lookback, (int, float)) or not 0 <= lookback < float("inf"):
        raise UsageError(f"lookback must be a number of seconds, not {lookback!r}")
    lookback_delta = timedelta(seconds=lookback)
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"the history's URL must be http:// or https://, not {redact_url(str(url))!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise UsageError(f"timeout must be a positive number of seconds, not {timeout!r}")
    lookup: Callable[[str], str] = tokens.__getitem__ if isinstance(tokens, Mapping) else tokens
    opener = urllib.request.build_opener(_NoRedirects)

    async def backfill(gap: Gap) -> list[Message | Chat]:
        feed = gap.feed
        if feed is None:
            raise UsageError("http_backfill is a pool's backfill: the gap names no feed")
        try:
            token = lookup(feed)
        except KeyError:
            raise UsageError(f"no token for feed {feed!r}") from None
        target = url if gap.since is None else _with_since(url, gap.since - lookback_delta)
        body = await asyncio.to_thread(_get, opener, target, token, timeout)
        return _items(body)

    return backfill


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        # The request carries the token: never to wherever a 3xx points.
        return None


def _with_since(url: str, since: datetime) -> str:
    moment = since.astimezone(timezone.utc).replace(tzinfo=None).isoformat() + "Z"
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode({"since": moment})
    return urllib.parse.urlunsplit(parts._replace(query=f"{parts.query}&{query}" if parts.query else query))


def _get(opener: urllib.request.OpenerDirector, target: str, token: str, timeout: float) -> bytes:
    """GET ``target`` with ``token``; return the body of a 2xx answer (blocking: run it in a thread)."""
    request = urllib.request.Request(
        target,
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "User-Agent": f"chatfeed/{__version__}",
        },
    )
    where = redact_url(target)
    try:
        with opener.open(request, timeout=timeout) as response:
            body: bytes = response.read(_MAX_BODY + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        # The reason and the body are the server's words: they may quote the token.
        raise HistoryError(f"the history at {where} answered HTTP {exc.code}", status_code=exc.code) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = type(reason).__name__ if isinstance(reason, BaseException) else "unreachable"
        raise HistoryError(f"cannot fetch the history at {where} ({text})") from None
    except (OSError, ValueError) as exc:  # a timeout while reading, a connection reset, a bad status line
        raise HistoryError(f"cannot fetch the history at {where} ({type(exc).__name__})") from None
    if len(body) > _MAX_BODY:
        raise HistoryError(f"the history at {where} is larger than {_MAX_BODY // 2**20} MiB")
    return body


def _items(body: bytes) -> list[Message | Chat]:
    """Return the messages and chats of a history's answer, in its order; other frames are left out."""
    try:
        frames = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("the history's answer is not JSON") from None
    if not isinstance(frames, list):
        raise ProtocolError("the history's answer is not a JSON array of frames")
    validate = _validator().validate_python
    items: list[Message | Chat] = []
    for index, frame in enumerate(frames):
        try:
            event = validate(frame)
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in error["loc"]) or "frame"
            raise ProtocolError(f"the history's frame {index} does not fit: {error['msg']} at {where}") from None
        if isinstance(event, (NewMessage, NewChat)):
            items.append(event.payload)
    return items

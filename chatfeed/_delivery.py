"""What the client adds between the session and the dispatcher: backfill after a gap, duplicates dropped.

The protocol has no replay. A client given ``backfill=`` calls it after every
reconnect with a [`Gap`][chatfeed.Gap] (``since``: the ``created_at`` of the newest
message or chat delivered so far), delivers what it returns oldest first,
then goes back to the live feed, whose frames waited in the socket meanwhile
(bounded, with backpressure: the connection is simply not read). Items the
live feed had delivered already, and live events the backfill delivered
first, are dropped by the window of identities that [`Dedupe`][chatfeed.Dedupe]
configures, so an overlap between the two costs nothing but a counter.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import math
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Hashable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeAlias

from pydantic import BaseModel

from ._lanes import CANCEL_GRACE
from ._logging import log_fields
from .exceptions import UsageError
from .models import Chat, Message, NewChat, NewMessage

__all__ = ["Backfill", "BackfillItem", "Dedupe", "Delivery", "Gap", "fetch_backfill", "identity"]

logger = logging.getLogger("chatfeed")


@dataclasses.dataclass(frozen=True)
class Gap:
    """A stretch of time the feed may have missed, passed to the ``backfill`` function.

    Attributes:
        since: The ``created_at`` of the newest message or chat delivered
            before the connection was lost (or ``backfill_since`` when nothing
            was delivered yet); ``None`` when there is no such time. Fetch
            what was created from a little before it: clocks differ, and the
            overlap is dropped as duplicates when ``dedupe`` is on.
        is_reconnect: False for the backfill after the first connection
            (with ``backfill_since``), True after a reconnect.
        downtime: Seconds the client was disconnected, or ``None`` for the
            first connection.
        feed: The key of the [`Pool`][chatfeed.Pool] feed that missed
            something, or ``None`` for a [`Client`][chatfeed.Client].
    """

    since: datetime | None
    is_reconnect: bool
    downtime: float | None
    feed: str | None = None


BackfillItem: TypeAlias = Message | Chat
"""What a backfill function gives: the messages and chats the feed missed."""

Backfill: TypeAlias = Callable[
    [Gap],
    "AsyncIterable[BackfillItem] | Awaitable[Iterable[BackfillItem] | AsyncIterable[BackfillItem]] "
    "| Iterable[BackfillItem]",
]
"""A function of a [`Gap`][chatfeed.Gap]: an async generator, or a function (sync or async) returning an iterable."""


@dataclasses.dataclass(frozen=True)
class Dedupe:
    """How long a client remembers what it delivered, to drop it when it comes again.

    An event's identity is a message's ``(id, status)`` (a message whose
    status changes is delivered again) or a chat's ``(id, updated_at)``;
    ``error`` and unknown events have none and are never dropped.

    Args:
        max_ids: The most identities remembered; the least recently seen is
            forgotten first. Each costs about 200 bytes.
        ttl: Seconds an identity is remembered after it was last seen, or
            ``None`` for as long as ``max_ids`` allows. A backfill after a
            long outage fetches what came just before the drop, so a short
            ``ttl`` lets that overlap through.

    Raises:
        UsageError: ``max_ids`` is not a positive int, or ``ttl`` not a
            positive number or ``None``.
    """

    max_ids: int = 10_000
    ttl: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_ids, bool) or not isinstance(self.max_ids, int) or self.max_ids < 1:
            raise UsageError(f"max_ids must be a positive int, not {self.max_ids!r}")
        ttl = self.ttl
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0
        ):
            raise UsageError(f"ttl must be a positive number of seconds or None, not {ttl!r}")


def identity(event: Any) -> Hashable | None:
    """Return what makes ``event`` the same as another, or ``None`` if nothing does."""
    cls = event.__class__
    if cls is NewMessage:
        message = event.payload
        return ("m", message.id, message.status)
    if cls is NewChat:
        chat = event.payload
        return ("c", chat.id, chat.updated_at)
    return None


class _Seen:
    """The identities delivered lately, least recently seen first, each with when it was last seen."""

    __slots__ = ("_ids", "_max_ids", "_ttl")

    def __init__(self, dedupe: Dedupe) -> None:
        self._ids: collections.OrderedDict[Hashable, float] = collections.OrderedDict()
        self._max_ids = dedupe.max_ids
        self._ttl = dedupe.ttl

    def __len__(self) -> int:
        return len(self._ids)

    def repeat(self, event: Any) -> bool:
        """Whether ``event`` was seen already; either way, remember it as seen now."""
        key = identity(event)
        if key is None:
            return False
        ids = self._ids
        now = 0.0
        ttl = self._ttl
        if ttl is not None:
            now = time.monotonic()
            while ids:
                oldest = next(iter(ids.values()))
                if now - oldest < ttl:
                    break
                ids.popitem(last=False)
        if key in ids:
            ids.move_to_end(key)
            ids[key] = now
            return True
        ids[key] = now
        if len(ids) > self._max_ids:
            ids.popitem(last=False)
        return False


class Delivery:
    """Drops duplicates and keeps the watermark, in front of a dispatcher's ``dispatch``.

    Only a client with ``dedupe`` or ``backfill`` delivers through it: the
    others pay nothing for either.
    """

    __slots__ = ("_dispatch", "_dropped", "_seen", "backfilled", "duplicates", "watermark")

    def __init__(
        self,
        dispatch: Callable[[Any], Awaitable[None] | None],
        dedupe: Dedupe | None,
        since: datetime | None,
        dropped: Callable[[Any], None] | None = None,
    ) -> None:
        self._dispatch = dispatch
        self._dropped = dropped  # an observer's duplicate_dropped
        self._seen = None if dedupe is None else _Seen(dedupe)
        self.watermark = since
        self.duplicates = 0
        self.backfilled = 0

    def remembered(self) -> int:
        """Return how many identities the duplicate window holds."""
        return 0 if self._seen is None else len(self._seen)

    def dispatch(self, event: Any) -> Awaitable[None] | None:
        """Dispatch ``event`` unless it is a duplicate, and move the watermark on."""
        seen = self._seen
        if seen is not None and seen.repeat(event):
            self.duplicates += 1
            if self._dropped is not None:
                self._dropped(event)
            return None
        cls = event.__class__
        if cls is NewMessage or cls is NewChat:
            created = event.payload.created_at
            if self.watermark is None or created > self.watermark:
                self.watermark = created
        return self._dispatch(event)


async def fetch_backfill(
    backfill: Backfill, gap: Gap, timeout: float, receivers: set[asyncio.Task[Any]] | None = None
) -> tuple[list[Any], Exception | None]:
    """Call ``backfill`` for ``gap``; return its items as events, oldest first, and what went wrong.

    Items fetched before an error or the timeout are returned too. Items that
    are neither a [`Message`][chatfeed.Message] nor a [`Chat`][chatfeed.Chat] are left out and make
    the error a `TypeError`.
    """
    items: list[Any] = []
    task = asyncio.get_running_loop().create_task(_collect(backfill, gap, items), name="chatfeed-backfill")
    # Its task counts as one that reads the feed: the feed is not read while
    # it runs, so close() from it must not wait for itself, nor an expectation.
    if receivers is not None:
        receivers.add(task)
        task.add_done_callback(receivers.discard)
    error: Exception | None = None
    try:
        done, _ = await asyncio.wait([task], timeout=timeout)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=CANCEL_GRACE)  # a cancellation of ours goes on after
            if not task.done():
                logger.warning(
                    "the backfill function did not end within %g s of being cancelled; left running",
                    CANCEL_GRACE,
                    extra=log_fields(gap.feed, timeout=CANCEL_GRACE),
                )
    if not done:
        error = TimeoutError(f"the backfill did not finish within {timeout:g} s")
    elif task.cancelled():
        error = RuntimeError("the backfill function raised CancelledError")
    else:
        exc = task.exception()
        if exc is not None and not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt and the like
        error = exc
    events: list[Any] = []
    strays: list[Any] = []
    for item in items:
        if isinstance(item, Message):
            events.append(NewMessage.model_construct(type="new_message", payload=item))
        elif isinstance(item, Chat):
            events.append(NewChat.model_construct(type="new_chat", payload=item))
        else:
            strays.append(item)
    if strays:
        stray_error = TypeError(
            f"the backfill gave {len(strays)} item(s) that are neither a chatfeed.Message nor a chatfeed.Chat "
            f"(the first is a {type(strays[0]).__name__}); they were left out"
        )
        if error is None:
            error = stray_error
        else:  # what stopped the backfill is what its owner needs to see first
            logger.warning("%s", stray_error, extra=log_fields(gap.feed, error=stray_error))
    events.sort(key=_created_at)  # stable: items created at the same time keep their order
    for event in events:
        object.__setattr__(event, "source", "backfill")  # not a field: never on the wire, never validated
    return events, error


def _created_at(event: Any) -> datetime:
    created: datetime = event.payload.created_at
    return created


async def _collect(backfill: Backfill, gap: Gap, items: list[Any]) -> None:
    result: Any = backfill(gap)
    if inspect.isawaitable(result):
        result = await result
    if isinstance(result, (str, bytes, Mapping, BaseModel)):
        # Iterable, but not a collection of items: a lone Message would
        # iterate over its fields.
        raise TypeError(
            f"the backfill function returned a {type(result).__name__}; expected an iterable or async iterable "
            "of chatfeed.Message and chatfeed.Chat"
        )
    if isinstance(result, AsyncIterable):
        try:
            async for item in result:
                items.append(item)
        finally:
            aclose = getattr(result, "aclose", None)
            if aclose is not None:
                await aclose()
    elif isinstance(result, Iterable):
        items.extend(result)
    else:
        raise TypeError(
            f"the backfill function returned a {type(result).__name__}; expected an iterable or async iterable "
            "of chatfeed.Message and chatfeed.Chat"
        )

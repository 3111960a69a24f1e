"""Backfill and dedupe without sockets: identities, the window of what was seen, the watermark, fetching a backfill."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import chatfeed
from chatfeed import Chat, Connected, Dedupe, ErrorMessage, Gap, Message, NewChat, NewMessage, UnknownMessage
from chatfeed._delivery import Delivery, _Seen, fetch_backfill, identity
from chatfeed.testing import make_chat, make_message
from tests.conftest import MS

T0 = datetime(2025, 10, 7, 12, 0, tzinfo=timezone.utc)
GAP = Gap(since=T0, is_reconnect=True, downtime=1.5)
WAIT = 5000 * MS
"""A backfill timeout that is never meant to expire: a guard against hangs, not a delay."""


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def message_event(message_id: str = "1", *, status: str | None = "COMPLETED", created: float = 0) -> NewMessage:
    return NewMessage(type="new_message", payload=make_message(id=message_id, status=status, created_at=at(created)))


def chat_event(chat_id: str = "1", *, created: float = 0, updated: float | None = None) -> NewChat:
    updated_at = at(created if updated is None else updated)
    return NewChat(type="new_chat", payload=make_chat(id=chat_id, created_at=at(created), updated_at=updated_at))


def error_event() -> ErrorMessage:
    return ErrorMessage(type="error", message="rate limited")


def unknown_event() -> UnknownMessage:
    return UnknownMessage(type="typing", payload={"chatId": "1"})


class Sink:
    """A dispatch function that records what reaches it."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.events.append(event)


class Clock:
    """A stand-in for ``time.monotonic`` that a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("chatfeed._delivery.time.monotonic", clock)
    return clock


def seen(window: _Seen, *events: Any) -> list[bool]:
    """Whether each event was a repeat, in turn."""
    return [window.repeat(event) for event in events]


# Identity


def test_a_message_is_its_id_and_status() -> None:
    first = message_event("7", status="PENDING", created=1)
    same = NewMessage(type="new_message", payload=first.payload.model_copy(update={"content": "edited"}))
    completed = message_event("7", status="COMPLETED", created=1)
    assert identity(first) == identity(same)
    assert identity(first) != identity(completed)
    assert identity(first) != identity(message_event("8", status="PENDING", created=1))
    assert identity(message_event("7", status=None)) != identity(first)


def test_a_number_id_on_the_wire_is_the_same_message_as_its_string() -> None:
    as_number = chatfeed.parse_server_message(
        json.dumps(
            {
                "type": "new_message",
                "payload": {
                    "id": 7,
                    "chatId": 1,
                    "role": "assistant",
                    "status": "COMPLETED",
                    "createdAt": "2025-10-07T12:00:00Z",
                },
            }
        )
    )
    assert identity(as_number) == identity(message_event("7"))


def test_a_chat_is_its_id_and_updated_at() -> None:
    chat = chat_event("c", created=0, updated=5)
    renamed = NewChat(type="new_chat", payload=chat.payload.model_copy(update={"title": "renamed"}))
    assert identity(chat) == identity(renamed)
    assert identity(chat) != identity(chat_event("c", created=0, updated=6))
    # The same instant written in another zone is the same update.
    elsewhere = chat.payload.model_copy(update={"updated_at": at(5).astimezone(timezone(timedelta(hours=5)))})
    assert identity(chat) == identity(NewChat(type="new_chat", payload=elsewhere))


def test_a_message_and_a_chat_with_the_same_id_differ() -> None:
    assert identity(message_event("1")) != identity(chat_event("1"))


@pytest.mark.parametrize(
    "event",
    [error_event(), unknown_event(), Connected(is_reconnect=False, downtime=None)],
    ids=["error", "unknown", "connected"],
)
def test_other_events_have_no_identity(event: Any) -> None:
    assert identity(event) is None


# The window


def test_the_window_forgets_the_least_recently_seen_beyond_max_ids() -> None:
    window = _Seen(Dedupe(max_ids=3))
    a, b, c, d = (message_event(name) for name in "abcd")
    assert seen(window, a, b, c, d) == [False] * 4
    assert len(window) == 3
    assert seen(window, d, c, b) == [True, True, True]  # a was forgotten; d, c, b now seen in that order
    assert seen(window, a) == [False]  # back, pushing out d, the least recently seen
    assert seen(window, d) == [False]
    assert len(window) == 3


def test_a_hit_makes_an_identity_the_most_recently_seen() -> None:
    window = _Seen(Dedupe(max_ids=2))
    a, b, c = (message_event(name) for name in "abc")
    assert seen(window, a, b, a, c) == [False, False, True, False]  # c pushes out b, not a
    assert seen(window, a) == [True]
    assert seen(window, b) == [False]


def test_max_ids_of_one_remembers_the_last() -> None:
    window = _Seen(Dedupe(max_ids=1))
    a, b = message_event("a"), message_event("b")
    assert seen(window, a, a, b, a, a) == [False, True, False, False, True]


def test_events_without_identity_are_never_repeats_nor_remembered() -> None:
    window = _Seen(Dedupe(max_ids=2))
    error, unknown = error_event(), unknown_event()
    assert seen(window, error, error, unknown, unknown) == [False] * 4
    assert len(window) == 0


def test_an_identity_expires_ttl_seconds_after_it_was_last_seen(clock: Clock) -> None:
    window = _Seen(Dedupe(ttl=10))
    a = message_event("a")
    assert seen(window, a) == [False]
    clock.now += 9.9
    assert seen(window, a) == [True]  # and seen again now
    clock.now += 9.9
    assert seen(window, a) == [True]  # 19.8 s after the first sighting, 9.9 s after the last
    clock.now += 10  # exactly ttl after the last sighting
    assert seen(window, a) == [False]


def test_expired_identities_are_forgotten_oldest_first(clock: Clock) -> None:
    window = _Seen(Dedupe(ttl=10))
    a, b, c = (message_event(name) for name in "abc")
    window.repeat(a)
    clock.now += 5
    window.repeat(b)
    clock.now += 6  # a is 11 s old, b 6 s
    assert seen(window, c) == [False]
    assert len(window) == 2
    assert seen(window, b) == [True]
    assert seen(window, a) == [False]


def test_ttl_and_max_ids_together(clock: Clock) -> None:
    window = _Seen(Dedupe(max_ids=2, ttl=10))
    a, b, c = (message_event(name) for name in "abc")
    assert seen(window, a, b, c) == [False, False, False]
    assert seen(window, a) == [False]  # pushed out by c, long before its ttl
    clock.now += 10
    assert seen(window, c) == [False]  # and c expired
    assert len(window) == 1


def test_without_ttl_the_clock_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> float:
        raise AssertionError("read the clock without a ttl")

    monkeypatch.setattr("chatfeed._delivery.time.monotonic", no_clock)
    window = _Seen(Dedupe(max_ids=10))
    assert seen(window, message_event("a"), message_event("a")) == [False, True]


# Dedupe's arguments


@pytest.mark.parametrize("max_ids", [0, -1, True, False, 1.0, 10.5, "10", None])
def test_max_ids_must_be_a_positive_int(max_ids: Any) -> None:
    with pytest.raises(chatfeed.UsageError, match="max_ids"):
        Dedupe(max_ids=max_ids)


@pytest.mark.parametrize("ttl", [0, 0.0, -1, float("nan"), float("inf"), True, "1", [1]])
def test_ttl_must_be_a_positive_finite_number_or_none(ttl: Any) -> None:
    with pytest.raises(chatfeed.UsageError, match="ttl"):
        Dedupe(ttl=ttl)


@pytest.mark.parametrize(("max_ids", "ttl"), [(1, None), (10_000, None), (5, 0.001), (5, 3), (5, 60.0)])
def test_valid_dedupe_arguments_are_kept(max_ids: int, ttl: float | None) -> None:
    dedupe = Dedupe(max_ids=max_ids, ttl=ttl)
    assert (dedupe.max_ids, dedupe.ttl) == (max_ids, ttl)


def test_defaults_are_ten_thousand_ids_without_ttl() -> None:
    assert Dedupe() == Dedupe(max_ids=10_000, ttl=None)


def test_dedupe_is_on_by_default_with_a_backfill_only() -> None:
    def backfill(gap: Gap) -> list[Message]:
        return []

    assert chatfeed.Client("ws://localhost:3001", token="t")._options.dedupe is None
    assert chatfeed.Client("ws://localhost:3001", token="t", backfill=backfill)._options.dedupe == Dedupe()
    assert chatfeed.Client("ws://localhost:3001", token="t", backfill=backfill, dedupe=False)._options.dedupe is None


@pytest.mark.parametrize("dedupe", ["yes", 1, 0, {"max_ids": 10}])
def test_client_dedupe_must_be_a_dedupe_or_a_bool(dedupe: Any) -> None:
    with pytest.raises(chatfeed.UsageError, match="dedupe"):
        chatfeed.Client("ws://localhost:3001", token="t", dedupe=dedupe)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"backfill": "not a function"}, "backfill must be"),
        ({"backfill": list, "backfill_since": datetime(2025, 10, 7, 12, 0)}, "timezone-aware"),
        ({"backfill": list, "backfill_since": "2025-10-07T12:00:00Z"}, "timezone-aware"),
        ({"backfill_since": T0}, "needs backfill="),
        ({"backfill": list, "backfill_timeout": 0}, "backfill_timeout"),
        ({"backfill": list, "backfill_timeout": -1.0}, "backfill_timeout"),
    ],
)
def test_client_backfill_arguments_are_checked(options: dict[str, Any], match: str) -> None:
    with pytest.raises(chatfeed.UsageError, match=match):
        chatfeed.Client("ws://localhost:3001", token="t", **options)


# Delivery


def test_the_watermark_only_moves_forward() -> None:
    sink = Sink()
    delivery = Delivery(sink, None, at(2))
    assert delivery.watermark == at(2)
    delivery.dispatch(message_event("a", created=1))
    assert delivery.watermark == at(2)
    delivery.dispatch(message_event("b", created=5))
    assert delivery.watermark == at(5)
    delivery.dispatch(message_event("c", created=4))
    assert delivery.watermark == at(5)
    delivery.dispatch(chat_event("d", created=7, updated=9))  # a chat counts by when it was created
    assert delivery.watermark == at(7)
    delivery.dispatch(error_event())
    delivery.dispatch(unknown_event())
    assert delivery.watermark == at(7)
    assert [identity(event) for event in sink.events] == [
        identity(message_event("a")),
        identity(message_event("b")),
        identity(message_event("c")),
        identity(chat_event("d", created=7, updated=9)),
        None,
        None,
    ]


def test_the_watermark_starts_unknown_and_compares_instants_across_zones() -> None:
    delivery = Delivery(Sink(), None, None)
    assert delivery.watermark is None
    plus_five = timezone(timedelta(hours=5))
    later_written_earlier = make_message(id="a", created_at=(at(10)).astimezone(plus_five))
    delivery.dispatch(NewMessage(type="new_message", payload=later_written_earlier))
    delivery.dispatch(message_event("b", created=9))
    assert delivery.watermark == at(10)


def test_duplicates_are_dropped_and_counted() -> None:
    sink = Sink()
    delivery = Delivery(sink, Dedupe(), None)
    first = message_event("a", created=1)
    again = message_event("a", created=1)
    chat = chat_event("c", created=2)
    for event in (first, again, chat, chat, message_event("b", created=3), first):
        delivery.dispatch(event)
    assert sink.events == [first, chat, message_event("b", created=3)]
    assert delivery.duplicates == 3
    assert delivery.remembered() == 3


def test_a_message_whose_status_changes_is_delivered_again() -> None:
    sink = Sink()
    delivery = Delivery(sink, Dedupe(), None)
    pending = message_event("a", status="PENDING")
    completed = message_event("a", status="COMPLETED")
    for event in (pending, completed, completed):
        delivery.dispatch(event)
    assert sink.events == [pending, completed]
    assert delivery.duplicates == 1


def test_errors_and_unknown_events_are_never_dropped() -> None:
    sink = Sink()
    delivery = Delivery(sink, Dedupe(max_ids=1), None)
    error, unknown = error_event(), unknown_event()
    for event in (error, error, unknown, unknown, error):
        delivery.dispatch(event)
    assert sink.events == [error, error, unknown, unknown, error]
    assert delivery.duplicates == 0


def test_a_dropped_duplicate_returns_nothing_to_await_and_the_rest_return_what_dispatch_returns() -> None:
    awaitables: list[Any] = []

    def dispatch(event: Any) -> Any:
        awaitable = asyncio.sleep(0)
        awaitables.append(awaitable)
        return awaitable

    delivery = Delivery(dispatch, Dedupe(), None)
    event = message_event("a")
    try:
        first = delivery.dispatch(event)
        assert first is awaitables[0]
        assert delivery.dispatch(event) is None
        assert len(awaitables) == 1
    finally:
        for awaitable in awaitables:
            awaitable.close()


def test_without_dedupe_every_event_goes_through() -> None:
    sink = Sink()
    delivery = Delivery(sink, None, None)
    event = message_event("a", created=3)
    delivery.dispatch(event)
    delivery.dispatch(event)
    assert sink.events == [event, event]
    assert (delivery.duplicates, delivery.remembered(), delivery.watermark) == (0, 0, at(3))


@pytest.mark.timeout(60)
def test_memory_stays_flat_through_a_million_distinct_messages() -> None:
    # The window holds max_ids identities and nothing else: once it is full
    # (long before 100,000 events), what the client holds must not grow with
    # the events it has seen. Events are built without validation, as
    # distinct objects each time, so that the test measures the window and
    # not pydantic.
    template = dict(make_message(created_at=T0).__dict__)
    new, assign = object.__new__, object.__setattr__

    def event(index: int) -> NewMessage:
        payload = new(Message)
        assign(payload, "__dict__", {**template, "id": str(index)})
        message = new(NewMessage)
        assign(message, "__dict__", {"type": "new_message", "payload": payload})
        return message

    calls = 0

    def dispatch(event: Any) -> None:
        nonlocal calls
        calls += 1

    delivery = Delivery(dispatch, Dedupe(), None)
    deliver = delivery.dispatch
    samples: list[int] = []
    # Traced from before the last 10,000 identities of the first 100,000
    # arrive: each sample then counts a full window, all of it traced.
    for index in range(89_000):
        deliver(event(index))
    tracemalloc.start()
    try:
        for chunk in range(10):
            for index in range(max(chunk * 100_000, 89_000), (chunk + 1) * 100_000):
                deliver(event(index))
            samples.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert calls == 1_000_000
    assert delivery.duplicates == 0
    assert delivery.remembered() == 10_000
    assert len(samples) == 10
    # A byte per event kept would be 900,000 bytes by the end.
    assert max(samples) - samples[0] < 64 * 1024, samples
    assert samples[0] < 10_000 * 400, "the window takes far more than its documented 200 bytes per identity"


# Fetching a backfill


def messages(*created: float, chat: str = "1") -> list[Message]:
    return [make_message(id=f"m{index}", chat_id=chat, created_at=at(when)) for index, when in enumerate(created)]


def payloads(events: list[Any]) -> list[Any]:
    return [event.payload for event in events]


async def test_an_async_generator_is_read_to_its_end() -> None:
    items = messages(0, 1, 2)

    async def backfill(gap: Gap) -> AsyncIterator[Message]:
        for item in items:
            await asyncio.sleep(0)
            yield item

    events, error = await fetch_backfill(backfill, GAP, WAIT)
    assert error is None
    assert payloads(events) == items


async def test_a_sync_function_returning_a_list_or_a_generator() -> None:
    items = messages(0, 1)

    def as_list(gap: Gap) -> list[Message]:
        return items

    def as_generator(gap: Gap) -> Iterator[Message]:
        yield from items

    for backfill in (as_list, as_generator):
        events, error = await fetch_backfill(backfill, GAP, WAIT)
        assert error is None
        assert payloads(events) == items


async def test_an_async_function_returning_an_iterable_or_an_async_iterable() -> None:
    items = messages(0, 1)

    async def as_tuple(gap: Gap) -> tuple[Message, ...]:
        await asyncio.sleep(0)
        return tuple(items)

    async def generate() -> AsyncIterator[Message]:
        for item in items:
            yield item

    async def as_async_iterable(gap: Gap) -> AsyncIterator[Message]:
        return generate()

    events, error = await fetch_backfill(as_tuple, GAP, WAIT)
    assert error is None
    assert payloads(events) == items
    # An async function returning an async iterable.
    events, error = await fetch_backfill(as_async_iterable, GAP, WAIT)
    assert error is None
    assert payloads(events) == items


async def test_an_async_iterable_that_is_no_generator() -> None:
    items = messages(0, 1)

    class Pages:
        def __init__(self) -> None:
            self._items = iter(items)

        def __aiter__(self) -> Pages:
            return self

        async def __anext__(self) -> Message:
            try:
                return next(self._items)
            except StopIteration:
                raise StopAsyncIteration from None

    events, error = await fetch_backfill(lambda gap: Pages(), GAP, WAIT)
    assert error is None
    assert payloads(events) == items


async def test_the_function_gets_the_gap() -> None:
    gaps: list[Gap] = []

    def backfill(gap: Gap) -> list[Message]:
        gaps.append(gap)
        return []

    assert await fetch_backfill(backfill, GAP, WAIT) == ([], None)
    assert gaps == [GAP]


async def test_items_become_events_oldest_first_and_ties_keep_their_order() -> None:
    plus_five = timezone(timedelta(hours=5))
    late_a = make_message(id="late-a", created_at=at(2))
    chat = make_chat(id="tied-chat", created_at=at(1))
    tied = make_message(id="tied-message", created_at=at(1).astimezone(plus_five))  # the same instant
    late_b = make_message(id="late-b", created_at=at(2))
    early = make_message(id="early", created_at=at(0))
    also_tied = make_chat(id="also-tied", created_at=at(1), updated_at=at(9))
    events, error = await fetch_backfill(lambda gap: [late_a, chat, tied, late_b, early, also_tied], GAP, WAIT)
    assert error is None
    assert payloads(events) == [early, chat, tied, also_tied, late_a, late_b]
    assert [type(event) for event in events] == [NewMessage, NewChat, NewMessage, NewChat, NewMessage, NewMessage]
    assert [event.type for event in events] == [
        "new_message",
        "new_chat",
        "new_message",
        "new_chat",
        "new_message",
        "new_message",
    ]


async def test_backfilled_events_say_so_and_serialise_like_live_ones() -> None:
    item = make_message(id="m", created_at=at(0))
    [event], error = await fetch_backfill(lambda gap: [item], GAP, WAIT)
    assert error is None
    live = NewMessage(type="new_message", payload=item)
    assert event.source == "backfill"
    assert live.source == "live"
    assert NewMessage.source == "live"  # the class is untouched
    assert "source" not in event.model_dump_json()
    assert "source" not in event.model_dump_json(by_alias=True)
    assert event.model_dump_json(by_alias=True) == live.model_dump_json(by_alias=True)
    assert "source" not in event.model_dump()
    assert event == live


async def test_items_of_the_wrong_type_are_left_out_with_a_type_error() -> None:
    good = messages(0, 1)
    chat = make_chat(id="c", created_at=at(0.5))
    # A common slip: events, or raw JSON, instead of the messages themselves.
    strays: list[Any] = ["junk", NewMessage(type="new_message", payload=good[0]), {"id": "x"}, None]

    def backfill(gap: Gap) -> list[Any]:
        return [good[1], strays[0], chat, strays[1], strays[2], good[0], strays[3]]

    events, error = await fetch_backfill(backfill, GAP, WAIT)
    assert payloads(events) == [good[0], chat, good[1]]
    assert isinstance(error, TypeError)
    assert "4 item(s)" in str(error)
    assert "str" in str(error)


async def test_a_function_that_returns_no_iterable_is_a_type_error() -> None:
    for result in (None, 42):

        def backfill(gap: Gap, result: Any = result) -> Any:
            return result

        events, error = await fetch_backfill(backfill, GAP, WAIT)
        assert events == []
        assert isinstance(error, TypeError), result
        assert f"returned a {type(result).__name__}" in str(error)


@pytest.mark.parametrize("lone", [make_message(created_at=T0), make_chat(created_at=T0)], ids=["message", "chat"])
async def test_a_lone_message_or_chat_instead_of_an_iterable_is_named_in_the_error(lone: Message | Chat) -> None:
    # A pydantic model iterates over its fields: returning one message where a
    # list was meant must not read as "9 items that are tuples".
    def backfill(gap: Gap) -> Any:
        return lone

    events, error = await fetch_backfill(backfill, GAP, WAIT)
    assert events == []
    assert isinstance(error, TypeError)
    assert f"returned a {type(lone).__name__}" in str(error)


async def test_a_function_that_raises_keeps_what_it_gave_before() -> None:
    items = messages(1, 0)

    async def backfill(gap: Gap) -> AsyncIterator[Message]:
        for item in items:
            yield item
        raise ConnectionError("the REST API is down")

    def raises_at_once(gap: Gap) -> list[Message]:
        raise ValueError("bad gap")

    events, error = await fetch_backfill(backfill, GAP, WAIT)
    assert payloads(events) == [items[1], items[0]]
    assert isinstance(error, ConnectionError)
    assert str(error) == "the REST API is down"

    events, error = await fetch_backfill(raises_at_once, GAP, WAIT)
    assert events == []
    assert isinstance(error, ValueError)


async def test_what_the_function_raised_is_not_lost_when_it_also_gave_items_of_the_wrong_type() -> None:
    # Two things went wrong; the one the application most needs to see (its
    # REST call failed) must reach the on_error hooks, at least as the cause.
    down = ConnectionError("the REST API is down")

    async def backfill(gap: Gap) -> AsyncIterator[Any]:
        yield make_message(created_at=at(0))
        yield "junk"
        raise down

    events, error = await fetch_backfill(backfill, GAP, WAIT)
    assert len(events) == 1
    assert error is not None
    assert down in (error, error.__cause__, error.__context__), repr(error)


async def test_a_timeout_is_not_lost_when_the_function_also_gave_items_of_the_wrong_type() -> None:
    async def backfill(gap: Gap) -> AsyncIterator[Any]:
        yield "junk"
        await asyncio.Event().wait()
        yield make_message()

    events, error = await fetch_backfill(backfill, GAP, 20 * MS)
    assert events == []
    assert error is not None
    assert any(isinstance(each, TimeoutError) for each in (error, error.__cause__, error.__context__)), repr(error)


async def test_a_function_that_raises_cancelled_error_is_reported_not_taken_for_a_cancellation() -> None:
    async def backfill(gap: Gap) -> AsyncIterator[Message]:
        yield make_message(created_at=at(0))
        raise asyncio.CancelledError

    events, error = await fetch_backfill(backfill, GAP, WAIT)
    assert len(events) == 1
    assert isinstance(error, RuntimeError)
    assert "CancelledError" in str(error)


async def test_a_timeout_keeps_what_was_fetched_and_closes_the_generator() -> None:
    items = messages(0, 1)
    closed: list[bool] = []

    async def backfill(gap: Gap) -> AsyncIterator[Message]:
        try:
            for item in items:
                yield item
            await asyncio.Event().wait()  # the third page never comes
            yield make_message()
        finally:
            closed.append(True)

    timeout = 50 * MS
    loop = asyncio.get_running_loop()
    started = loop.time()
    events, error = await fetch_backfill(backfill, GAP, timeout)
    elapsed = loop.time() - started
    assert payloads(events) == items
    assert isinstance(error, TimeoutError)
    assert f"{timeout:g} s" in str(error)
    assert closed == [True]
    assert timeout <= elapsed < timeout + WAIT / 5
    assert backfill_tasks() == []


async def test_a_timeout_of_an_async_function_returning_a_list_keeps_nothing() -> None:
    async def backfill(gap: Gap) -> list[Message]:
        await asyncio.Event().wait()
        return messages(0)

    events, error = await fetch_backfill(backfill, GAP, 20 * MS)
    assert events == []
    assert isinstance(error, TimeoutError)


def backfill_tasks() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "chatfeed-backfill" and not task.done()]


async def test_cancelling_the_caller_cancels_the_fetch_and_propagates() -> None:
    started = asyncio.Event()
    closed: list[bool] = []

    async def backfill(gap: Gap) -> AsyncIterator[Message]:
        try:
            yield make_message()
            started.set()
            await asyncio.Event().wait()
            yield make_message()
        finally:
            closed.append(True)

    fetching = asyncio.create_task(fetch_backfill(backfill, GAP, WAIT))
    await asyncio.wait_for(started.wait(), WAIT)
    assert len(backfill_tasks()) == 1
    fetching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(fetching, WAIT)
    assert fetching.cancelled()
    assert closed == [True]
    assert backfill_tasks() == []

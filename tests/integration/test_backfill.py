"""Backfill after a gap, and dedupe, against a real FeedServer: what was missed first, once, then the live feed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import pytest

import chatfeed
from chatfeed import Chat, Gap, Message
from chatfeed.testing import FeedServer, make_chat, make_message

from ..conftest import MS
from .conftest import WAIT, Counter, Recorder, chatfeed_tasks, make_client, running

pytestmark = pytest.mark.timeout(20)

T0 = datetime(2025, 10, 7, 12, 0, tzinfo=timezone.utc)

Mode = Literal["run", "async with"]
MODES = ["run", "async with"]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def message(message_id: str, seconds: float, chat_id: str = "1", **fields: Any) -> Message:
    return make_message(id=message_id, chat_id=chat_id, created_at=at(seconds), content=message_id, **fields)


def chat(chat_id: str, seconds: float, **fields: Any) -> Chat:
    return make_chat(id=chat_id, created_at=at(seconds), **fields)


async def push(server: FeedServer, *items: Message | Chat) -> None:
    for item in items:
        if isinstance(item, Message):
            await server.push_message(item)
        else:
            await server.push_chat(item)


@contextlib.asynccontextmanager
async def started(client: chatfeed.Client, mode: Mode) -> AsyncIterator[None]:
    """Run ``client`` for the duration of the block, with ``run()`` in a task or with ``async with``."""
    if mode == "run":
        async with running(client):
            yield
    else:
        async with client:
            yield


class History:
    """The server's history as a backfill source: records each gap; a test can hold the call open.

    Args:
        server: Whose history to fetch.
        overlap: How far before ``gap.since`` to fetch from.
        hold: Keep each call waiting until the test sets `release`.
        fetch_late: Fetch when released rather than when called.
    """

    def __init__(
        self,
        server: FeedServer,
        *,
        overlap: timedelta = timedelta(0),
        hold: bool = False,
        fetch_late: bool = False,
    ) -> None:
        self.server = server
        self.overlap = overlap
        self.fetch_late = fetch_late
        self.gaps: list[Gap] = []
        self.called = Counter()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, gap: Gap) -> list[Message | Chat]:
        self.gaps.append(gap)
        self.called.bump()
        since = None if gap.since is None else gap.since - self.overlap
        items = self.server.history(since=since)
        await self.release.wait()
        if self.fetch_late:
            items = self.server.history(since=since)
        return items


def record_feed(client: chatfeed.Client) -> Recorder:
    """Record, in order, the client's lifecycle events and its messages and chats."""
    feed = Recorder()
    for event in ("connected", "disconnected", "new_message", "new_chat"):
        client.on(event)(feed)
    return feed


def describe(events: list[Any]) -> list[tuple[Any, ...]]:
    """Each event as a short tuple: ``("connected", is_reconnect)``, ``("disconnected",)``, or ``(source, id)``."""
    described: list[tuple[Any, ...]] = []
    for event in events:
        if isinstance(event, chatfeed.Connected):
            described.append(("connected", event.is_reconnect))
        elif isinstance(event, chatfeed.Disconnected):
            described.append(("disconnected",))
        elif isinstance(event, (chatfeed.NewMessage, chatfeed.NewChat)):
            described.append((event.source, event.payload.id))
        else:
            described.append((event.source, event.type))
    return described


def delivered(events: list[Any]) -> list[tuple[Any, ...]]:
    """The ``(source, id)`` of the messages and chats among ``events``."""
    return [entry for entry in describe(events) if entry[0] in ("live", "backfill")]


async def wait_for_id(recorder: Recorder, item_id: str) -> None:
    """Wait until an event whose payload has ``item_id`` was recorded."""

    def arrived() -> bool:
        return any(getattr(getattr(event, "payload", None), "id", None) == item_id for event in recorder.events)

    while not arrived():
        await recorder.wait_for(len(recorder.events) + 1)


# Order


@pytest.mark.parametrize("mode", MODES)
async def test_after_a_reconnect_the_backfill_comes_first_then_the_live_feed(server: FeedServer, mode: Mode) -> None:
    history = History(server, hold=True)
    client = make_client(server.url, backfill=history, dedupe=True)
    feed = record_feed(client)
    backfills_when_connected: list[int] = []

    @client.on("connected")
    def count_backfills(event: chatfeed.Connected) -> None:
        backfills_when_connected.append(len(history.gaps))

    async with started(client, mode):
        await feed.wait_for(1)
        await push(server, chat("a", 0), message("a1", 1, "a"), chat("b", 2), message("b1", 3, "b"))
        await feed.wait_for(5)

        await server.stop()  # a deploy: what is pushed now reaches nobody
        await push(server, message("a2", 4, "a"), message("b2", 5, "b"), chat("c", 6))
        await push(server, message("a3", 7, "a"), message("c1", 8, "c"))
        await server.start()

        await history.called.wait_for(1)
        frames = client.statistics().frames_received
        # Pushed after the reconnect, while the backfill runs: they wait in the socket.
        await push(server, message("b3", 9, "b"), message("a4", 10, "a"), message("c2", 11, "c"))
        await asyncio.sleep(50 * MS)  # the observation window: nothing is read meanwhile
        assert client.statistics().frames_received == frames
        assert len(feed.events) == 7
        history.release.set()
        await feed.wait_for(15)
        statistics = client.statistics()

    assert describe(feed.events) == [
        ("connected", False),
        ("live", "a"),
        ("live", "a1"),
        ("live", "b"),
        ("live", "b1"),
        ("disconnected",),
        ("connected", True),
        ("backfill", "a2"),
        ("backfill", "b2"),
        ("backfill", "c"),
        ("backfill", "a3"),
        ("backfill", "c1"),
        ("live", "b3"),
        ("live", "a4"),
        ("live", "c2"),
    ]
    assert backfills_when_connected == [0, 0]  # Connected handlers run before the backfill
    [gap] = history.gaps
    assert gap.since == at(3)
    assert gap.is_reconnect
    reconnected = feed.events[6]
    assert gap.downtime is not None
    assert gap.downtime > 0
    assert gap.downtime == reconnected.downtime
    # b1 came again from the backfill (history's since is inclusive), and was dropped.
    assert (statistics.backfilled_events, statistics.duplicates_dropped, statistics.backfill_errors) == (5, 1, 0)


async def test_gap_since_is_the_newest_created_at_delivered_before_the_drop(server: FeedServer) -> None:
    history = History(server)
    client = make_client(server.url, backfill=history)
    feed = record_feed(client)
    async with running(client):
        await server.wait_for_clients()
        server.drop_connections()  # nothing delivered yet
        await history.called.wait_for(1)
        # Newest first, then older ones: since is the newest, not the last.
        await push(server, message("newest", 5), message("older", 3), chat("chat", 4, updated_at=at(9)))
        await wait_for_id(feed, "chat")
        server.drop_connections()
        await history.called.wait_for(2)
        await push(server, message("after", 6))
        await wait_for_id(feed, "after")
    first, second = history.gaps
    assert (first.since, first.is_reconnect) == (None, True)
    assert first.downtime is not None
    assert (second.since, second.is_reconnect) == (at(5), True)
    assert second.downtime is not None


async def test_gap_since_moves_on_with_what_the_backfill_delivered(server: FeedServer) -> None:
    history = History(server)
    client = make_client(server.url, backfill=history, dedupe=True)
    feed = record_feed(client)
    async with running(client):
        await server.wait_for_clients()
        await push(server, message("m0", 0))
        await wait_for_id(feed, "m0")
        await server.stop()
        await push(server, message("m1", 1), message("m2", 2))
        await server.start()
        await wait_for_id(feed, "m2")
        server.drop_connections()
        await history.called.wait_for(2)
        await push(server, message("m3", 3))
        await wait_for_id(feed, "m3")
    assert [gap.since for gap in history.gaps] == [at(0), at(2)]
    assert delivered(feed.events) == [("live", "m0"), ("backfill", "m1"), ("backfill", "m2"), ("live", "m3")]


# The first connection


@pytest.mark.parametrize("kind", ["async generator", "sync function", "async function"])
async def test_backfill_since_fills_the_first_connection_for_handlers_and_events(server: FeedServer, kind: str) -> None:
    await push(server, message("too old", 0), message("m1", 1), chat("c2", 2), message("m3", 3, "c2"))
    gaps: list[Gap] = []

    async def async_generator(gap: Gap) -> AsyncIterator[Message | Chat]:
        gaps.append(gap)
        for item in server.history(since=gap.since):
            await asyncio.sleep(0)
            yield item

    def sync_function(gap: Gap) -> list[Message | Chat]:
        gaps.append(gap)
        return server.history(since=gap.since)

    async def async_function(gap: Gap) -> list[Message | Chat]:
        gaps.append(gap)
        await asyncio.sleep(0)
        return server.history(since=gap.since)

    backfills: dict[str, chatfeed.Backfill] = {
        "async generator": async_generator,
        "sync function": sync_function,
        "async function": async_function,
    }
    client = make_client(server.url, backfill=backfills[kind], backfill_since=at(1))
    handled = Recorder()
    client.on(chatfeed.ServerMessage)(handled)
    async with client:
        # A buffer of one: the backfill waits for the reader, as the live feed would.
        async with client.events(buffer=1) as stream:
            streamed = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(3)]
            await server.push_message(message("m4", 4))
            streamed.append(await asyncio.wait_for(anext(stream), WAIT))
        await handled.wait_for(4)
        statistics = client.statistics()

    expected = [("backfill", "m1"), ("backfill", "c2"), ("backfill", "m3"), ("live", "m4")]
    assert describe(streamed) == expected
    assert describe(handled.events) == expected
    assert [getattr(event, "payload", None) for event in streamed[:3]] == server.history(since=at(1))[:3]
    assert gaps == [Gap(since=at(1), is_reconnect=False, downtime=None)]
    assert (statistics.backfilled_events, statistics.duplicates_dropped, statistics.connections) == (3, 0, 1)


async def test_source_is_not_part_of_the_wire_json(server: FeedServer) -> None:
    await push(server, message("m1", 1), chat("c2", 2))
    client = make_client(server.url, backfill=lambda gap: server.history(since=gap.since), backfill_since=at(0))
    async with client, client.events() as stream:
        backfilled = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(2)]
        await server.push_message(message("m3", 3))
        live = await asyncio.wait_for(anext(stream), WAIT)
    for event in [*backfilled, live]:
        assert "source" not in event.model_dump_json()
        assert set(json.loads(event.model_dump_json(by_alias=True))) == {"type", "payload"}
        assert "source" not in event.model_dump()
    assert [event.source for event in [*backfilled, live]] == ["backfill", "backfill", "live"]
    # A backfilled event is the event the feed would have sent.
    assert backfilled[0] == chatfeed.NewMessage(type="new_message", payload=message("m1", 1))
    assert chatfeed.NewMessage.source == chatfeed.NewChat.source == "live"


async def test_without_backfill_since_the_first_connection_is_not_backfilled(server: FeedServer) -> None:
    await push(server, message("old", 0))
    history = History(server)
    client = make_client(server.url, backfill=history)
    feed = record_feed(client)
    async with running(client):
        await server.wait_for_clients()
        await push(server, message("live", 1))
        await wait_for_id(feed, "live")
        assert history.gaps == []
        server.drop_connections()
        await history.called.wait_for(1)
        await push(server, message("again", 2))
        await wait_for_id(feed, "again")
    # The backfill gives "live" again (since is inclusive): dedupe, on by
    # default with a backfill, drops it.
    assert delivered(feed.events) == [("live", "live"), ("live", "again")]
    assert [gap.since for gap in history.gaps] == [at(1)]


# Dedupe


@pytest.mark.parametrize("dedupe", [True, False])
async def test_dedupe_drops_the_overlap_of_a_backfill_with_what_was_delivered(server: FeedServer, dedupe: bool) -> None:
    history = History(server, overlap=timedelta(seconds=1.5))
    client = make_client(server.url, backfill=history, dedupe=dedupe)
    feed = record_feed(client)
    async with running(client):
        await server.wait_for_clients()
        await push(server, *(message(f"m{index}", index) for index in range(5)))
        await wait_for_id(feed, "m4")
        await server.stop()
        await push(server, message("m5", 5), message("m6", 6))
        await server.start()
        await history.called.wait_for(1)
        await push(server, message("m7", 7))
        await wait_for_id(feed, "m7")
        statistics = client.statistics()

    live = [("live", f"m{index}") for index in range(5)]
    if dedupe:
        assert delivered(feed.events) == [*live, ("backfill", "m5"), ("backfill", "m6"), ("live", "m7")]
        assert (statistics.duplicates_dropped, statistics.backfilled_events) == (2, 2)
    else:
        overlap = [("backfill", name) for name in ("m3", "m4", "m5", "m6")]
        assert delivered(feed.events) == [*live, *overlap, ("live", "m7")]
        assert (statistics.duplicates_dropped, statistics.backfilled_events) == (0, 4)
    assert history.gaps[0].since == at(4)


async def test_dedupe_drops_live_frames_that_the_backfill_delivered_first(server: FeedServer) -> None:
    history = History(server, hold=True, fetch_late=True)
    client = make_client(server.url, backfill=history, dedupe=True)
    feed = record_feed(client)
    async with running(client):
        await server.wait_for_clients()
        await push(server, message("m0", 0))
        await wait_for_id(feed, "m0")
        await server.stop()
        await push(server, message("m1", 1))
        await server.start()
        await history.called.wait_for(1)
        # In the socket and, by the time the backfill fetches, in the history too.
        await push(server, message("m2", 2), message("m3", 3))
        history.release.set()
        await wait_for_id(feed, "m3")
        await push(server, message("m4", 4))  # behind the live copies of m2 and m3
        await wait_for_id(feed, "m4")
        statistics = client.statistics()
    assert delivered(feed.events) == [
        ("live", "m0"),
        ("backfill", "m1"),
        ("backfill", "m2"),
        ("backfill", "m3"),
        ("live", "m4"),
    ]
    assert (statistics.duplicates_dropped, statistics.backfilled_events) == (3, 3)  # m0, then m2 and m3 live


@pytest.mark.parametrize("dedupe", [True, chatfeed.Dedupe(max_ids=100, ttl=60), False], ids=["on", "sized", "off"])
async def test_dedupe_on_the_live_feed_drops_repeats_but_never_errors_or_unknown_events(
    server: FeedServer, dedupe: bool | chatfeed.Dedupe
) -> None:
    client = make_client(server.url, dedupe=dedupe)
    everything = Recorder()
    client.on(chatfeed.ServerMessage)(everything)
    pending = message("m", 0, status="PENDING")
    completed = message("m", 0, status="COMPLETED")
    first = chat("c", 1, updated_at=at(1))
    renamed = chat("c", 1, updated_at=at(2), title="renamed")
    typing = json.dumps({"type": "typing", "payload": {"chatId": "c"}})
    async with running(client):
        await server.wait_for_clients()
        await push(server, pending, pending, completed, completed, first, first, renamed)
        await server.push_error("busy")
        await server.push_error("busy")
        await server.send_raw(typing)
        await server.send_raw(typing)
        await push(server, message("last", 3))
        await wait_for_id(everything, "last")
        statistics = client.statistics()

    kinds = [
        (event.type, getattr(getattr(event, "payload", None), "status", None) or getattr(event, "message", None))
        for event in everything.events
    ]
    if dedupe:
        assert [event.type for event in everything.events] == [
            "new_message",
            "new_message",
            "new_chat",
            "new_chat",
            "error",
            "error",
            "typing",
            "typing",
            "new_message",
        ]
        assert kinds[:2] == [("new_message", "PENDING"), ("new_message", "COMPLETED")]
        assert [event.payload.updated_at for event in everything.events[2:4]] == [at(1), at(2)]
        assert statistics.duplicates_dropped == 3
    else:
        assert len(everything.events) == 12
        assert statistics.duplicates_dropped == 0
    assert (statistics.backfilled_events, statistics.backfill_errors) == (0, 0)


# Failures


def missed(server: FeedServer, gap: Gap) -> list[Message | Chat]:
    """What the server pushed after ``gap.since``, not at it."""
    return [item for item in server.history(since=gap.since) if gap.since is None or item.created_at > gap.since]


@pytest.mark.parametrize("failure", ["raises", "times out", "wrong type"])
async def test_a_failed_backfill_is_reported_keeps_what_it_fetched_and_the_feed_goes_on(
    server: FeedServer, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    calls = Counter()
    closed: list[bool] = []

    async def raises(gap: Gap) -> AsyncIterator[Message | Chat]:
        calls.bump()
        for item in missed(server, gap):
            yield item
        raise ConnectionError("the REST API is down")

    async def times_out(gap: Gap) -> AsyncIterator[Message | Chat]:
        calls.bump()
        try:
            for item in missed(server, gap):
                yield item
            await asyncio.Event().wait()  # the next page never comes
        finally:
            closed.append(True)

    def wrong_type(gap: Gap) -> list[Any]:
        calls.bump()
        return [*missed(server, gap), {"id": "raw JSON"}]

    backfill: Callable[[Gap], Any] = {"raises": raises, "times out": times_out, "wrong type": wrong_type}[failure]
    expected = {"raises": ConnectionError, "times out": TimeoutError, "wrong type": TypeError}[failure]
    client = make_client(server.url, backfill=backfill, backfill_timeout=200 * MS)
    feed = record_feed(client)
    reported: list[tuple[Exception, Any]] = []
    client.on_error(lambda exc, subject: reported.append((exc, subject)))
    async with running(client):
        await server.wait_for_clients()
        await push(server, message("m0", 0))
        await wait_for_id(feed, "m0")
        await server.stop()
        await push(server, message("m1", 1), message("m2", 2))
        await server.start()
        await calls.wait_for(1)
        await push(server, message("m3", 3))
        await wait_for_id(feed, "m3")
        assert client.connected
        assert calls.value == 1  # not retried on the same connection
        first_round = client.statistics()

        server.drop_connections()  # the next reconnect tries again
        await calls.wait_for(2)
        await push(server, message("m4", 4))
        await wait_for_id(feed, "m4")
        second_round = client.statistics()

    assert describe(feed.events) == [
        ("connected", False),
        ("live", "m0"),
        ("disconnected",),
        ("connected", True),
        ("backfill", "m1"),
        ("backfill", "m2"),
        ("live", "m3"),
        ("disconnected",),
        ("connected", True),
        ("live", "m4"),
    ]
    assert [type(exc) for exc, _ in reported] == [expected, expected]
    gaps = [subject for _, subject in reported]
    assert all(isinstance(gap, Gap) for gap in gaps)
    assert [gap.since for gap in gaps] == [at(0), at(3)]
    assert (first_round.backfill_errors, first_round.backfilled_events, first_round.handler_errors) == (1, 2, 0)
    assert second_round.backfill_errors == 2
    warnings = [
        record
        for record in caplog.get_records("call")
        if record.name == "chatfeed" and record.levelno == logging.WARNING and "backfill failed" in record.getMessage()
    ]
    assert len(warnings) == 2
    if failure == "times out":
        assert closed == [True, True]


async def test_a_handler_that_raises_on_a_backfilled_event_is_a_handler_error_not_a_backfill_error(
    server: FeedServer,
) -> None:
    await push(server, message("m1", 1), message("m2", 2))
    client = make_client(server.url, backfill=lambda gap: server.history(since=gap.since), backfill_since=at(0))
    reported: list[tuple[Exception, Any]] = []
    client.on_error(lambda exc, subject: reported.append((exc, subject)))
    feed = record_feed(client)

    @client.on("new_message")
    def fail_on_m1(event: chatfeed.NewMessage) -> None:
        if event.payload.id == "m1":
            raise ValueError("bug in the handler")

    async with running(client):
        await wait_for_id(feed, "m2")
        await push(server, message("m3", 3))
        await wait_for_id(feed, "m3")
        statistics = client.statistics()
    assert delivered(feed.events) == [("backfill", "m1"), ("backfill", "m2"), ("live", "m3")]
    [(exc, subject)] = reported
    assert isinstance(exc, ValueError)
    assert isinstance(subject, chatfeed.NewMessage)
    assert subject.source == "backfill"
    assert (statistics.handler_errors, statistics.backfill_errors, statistics.backfilled_events) == (1, 0, 2)


# Closing


@pytest.mark.parametrize("mode", MODES)
async def test_close_during_a_slow_backfill_returns_promptly_and_leaves_no_task(server: FeedServer, mode: Mode) -> None:
    started_fetching = Counter()
    finished: list[bool] = []

    async def slow(gap: Gap) -> AsyncIterator[Message]:
        try:
            started_fetching.bump()
            await asyncio.Event().wait()
            yield make_message()
        finally:
            finished.append(True)

    client = make_client(server.url, backfill=slow, backfill_since=at(0))
    loop = asyncio.get_running_loop()
    if mode == "run":
        task = asyncio.create_task(client.run())
        await started_fetching.wait_for(1)
        closing_at = loop.time()
        await asyncio.wait_for(client.close(), WAIT)
        closed_after = loop.time() - closing_at
        await asyncio.wait_for(task, WAIT)  # run() returns normally
    else:
        async with client:
            await started_fetching.wait_for(1)
            closing_at = loop.time()
            await asyncio.wait_for(client.close(), WAIT)
            closed_after = loop.time() - closing_at
    assert closed_after < 500 * MS
    assert finished == [True]
    assert chatfeed_tasks() == []
    statistics = client.statistics()
    assert (statistics.state, statistics.backfill_errors, statistics.backfilled_events) == ("closed", 0, 0)

"""Observers of a client and a pool, against a real FeedServer: each moment, in order, with its arguments.

`Recording` (in ``_observers``) overrides every method of `chatfeed.Observer`
and keeps each call as a tuple; the tests check the exact sequence a user
meets: a connection's life, frames with the token scrubbed, duplicates and
backfills, each handler call timed, a stream or a handler that holds the feed
up, a pool's feeds by key, and an observer that fails in every method.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import chatfeed
import chatfeed.sync
from chatfeed import Chat, Gap, Message, _observe
from chatfeed.exceptions import ConnectionLostError, UsageError
from chatfeed.testing import FeedServer, make_message

from ..conftest import FAST, MS, OTHER_TOKEN, SECRET, SIGNATURE, TOKEN
from ._observers import Broken, Call, Recording, Started, handler_calls
from .conftest import WAIT, Counter, Recorder, ThreadedFeedServer, content, make_client, running

pytestmark = pytest.mark.timeout(20)

T0 = datetime(2025, 10, 7, 12, 0, tzinfo=timezone.utc)

LIFE = ("attached", "connecting", "connected", "disconnected", "state_changed")
"""The moments of a connection's life (the others are about frames and events)."""


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def frame_of(message_id: str, text: str = "hi", seconds: float = 0) -> str:
    """A ``new_message`` frame as a backend sends it: the exact text a `frame_received` must get."""
    created = at(seconds).isoformat().replace("+00:00", "Z")
    payload = {"id": message_id, "chatId": "c1", "role": "assistant", "content": text, "createdAt": created}
    return json.dumps({"type": "new_message", "payload": payload}, separators=(",", ":"))


def message(message_id: str, seconds: float, chat_id: str = "c1") -> Message:
    return make_message(id=message_id, chat_id=chat_id, created_at=at(seconds), content=message_id)


def ids(calls: list[Call], name: str) -> list[str]:
    """The ids of the messages in the calls of ``name`` (whose third item is the event)."""
    return [call[2].payload.id for call in calls if call[0] == name]


def make_pool(url: str, **options: Any) -> chatfeed.Pool:
    options.setdefault("reconnect", FAST)
    options.setdefault("auth_timeout", 2000 * MS)
    options.setdefault("open_timeout", 2000 * MS)
    options.setdefault("close_timeout", 500 * MS)
    return chatfeed.Pool(url, **options)


# A connection's life


async def test_a_client_reports_its_life_in_order(server: FeedServer) -> None:
    observer = Recording()
    client = make_client(server.url, observer=observer)
    assert observer.calls == [("attached", client)]  # at once, with the client itself
    lifecycle = Recorder()
    client.on("connected")(lifecycle)
    client.on("disconnected")(lifecycle)
    messages = Recorder()
    client.on("new_message")(messages)
    frame = frame_of("m1", "hello")
    async with client:
        await server.send_raw(frame)
        [event] = await messages.wait_for(1)
        await server.close_connections(4000, "bye")
        await lifecycle.wait_for(3)
        await observer.wait_for_calls("connected", 2)
    _, lost, reconnected = lifecycle.events

    life = [call for call in observer.calls if call[0] not in ("handler_started", "handler_finished")]
    assert life == [
        ("attached", client),
        ("state_changed", None, "connecting"),
        ("connecting", None, 1),
        ("state_changed", None, "authenticating"),
        ("state_changed", None, "open"),
        ("connected", None, False, None),
        ("frame_received", None, frame),
        ("event_received", None, event),
        ("disconnected", None, 4000, "bye", lost.error, lost.retry_in),
        ("state_changed", None, "backing_off"),
        ("state_changed", None, "connecting"),
        ("connecting", None, 1),  # the first attempt since the connection was up
        ("state_changed", None, "authenticating"),
        ("state_changed", None, "open"),
        ("connected", None, True, reconnected.downtime),
        ("state_changed", None, "closed"),
    ]
    assert life[7][2] is event  # the very object the handler got
    assert isinstance(lost.error, ConnectionLostError)
    assert lost.retry_in is not None
    assert 0 < lost.retry_in <= FAST.maximum
    assert reconnected.downtime is not None
    assert reconnected.downtime > 0


async def test_failed_attempts_count_up_and_are_no_disconnection(server: FeedServer) -> None:
    observer = Recording()
    server.reject_handshakes(503, times=2)
    client = make_client(server.url, observer=observer)
    async with client:
        await observer.wait_for_calls("connected", 1)
    assert observer.of(*LIFE) == [
        ("attached", client),
        ("state_changed", None, "connecting"),
        ("connecting", None, 1),
        ("state_changed", None, "backing_off"),
        ("state_changed", None, "connecting"),
        ("connecting", None, 2),
        ("state_changed", None, "backing_off"),
        ("state_changed", None, "connecting"),
        ("connecting", None, 3),
        ("state_changed", None, "authenticating"),
        ("state_changed", None, "open"),
        ("connected", None, False, None),
        ("state_changed", None, "closed"),
    ]


async def test_a_connection_not_retried_reports_no_retry_and_closes(server: FeedServer) -> None:
    observer = Recording()
    client = make_client(server.url, observer=observer)
    async with running(client) as task:
        await observer.wait_for_calls("connected", 1)
        await server.close_connections(4500, "go away")
        with pytest.raises(ConnectionLostError):
            await asyncio.wait_for(asyncio.shield(task), WAIT)
    [(_, feed, code, reason, error, retry_in)] = observer.of("disconnected")
    assert (feed, code, reason, retry_in) == (None, 4500, "go away", None)
    assert isinstance(error, ConnectionLostError)
    assert observer.of(*LIFE)[-2:] == [observer.of("disconnected")[0], ("state_changed", None, "closed")]
    assert len(observer.of("connecting")) == 1


# The token


async def test_frames_quoting_the_token_reach_the_observer_with_it_scrubbed(server: FeedServer) -> None:
    observer = Recording()
    client = make_client(server.url, observer=observer)
    quoting = frame_of("m1", f"your token is {TOKEN}, keep it")
    partly = frame_of("m2", f"it ends in {SIGNATURE}!")
    plain = frame_of("m3", "nothing secret")
    got = Counter()
    client.on(chatfeed.ServerMessage)(lambda event: got.bump())
    async with client:
        await server.send_raw(quoting)
        await server.push_error(f"token {TOKEN} revoked")
        await server.send_raw(partly)
        await server.send_raw(quoting.encode())  # a binary frame
        await server.send_raw(plain.encode())
        await server.send_raw(json.dumps({"type": "token_expiring", "token": TOKEN}))  # an unknown type
        await got.wait_for(6)
        await server.close_connections(4000, f"bye {TOKEN}")
        await observer.wait_for_calls("connected", 2)

    frames = [call[2] for call in observer.of("frame_received")]
    assert frames == [
        quoting.replace(TOKEN, "***"),
        '{"type": "error", "message": "token *** revoked"}',
        partly.replace(SIGNATURE, "***"),
        quoting.replace(TOKEN, "***").encode(),  # still bytes, as the wire carried it
        plain.encode(),
        '{"type": "token_expiring", "token": "***"}',
    ]
    assert frames[0] == frame_of("m1", "your token is ***, keep it")
    # The events of server texts (an error, an unknown type) are scrubbed as their frames are.
    events = [call[2] for call in observer.of("event_received")]
    error_event, unknown_event = events[1], events[5]
    assert isinstance(error_event, chatfeed.ErrorMessage)
    assert error_event.message == "token *** revoked"
    assert isinstance(unknown_event, chatfeed.UnknownMessage)
    assert SECRET not in repr(unknown_event) and "***" in repr(unknown_event)
    [(_, _, code, reason, error, _)] = observer.of("disconnected")
    assert (code, reason) == (4000, "bye ***")
    for call in observer.of("frame_received", "disconnected"):
        assert SECRET not in repr(call) and SIGNATURE not in repr(call)
    assert SECRET not in str(error) and SIGNATURE not in str(error)


# Duplicates and backfills


async def test_a_duplicate_is_reported_dropped_and_not_received(server: FeedServer) -> None:
    observer = Recording()
    client = make_client(server.url, observer=observer, dedupe=True)
    handled = Recorder()
    client.on("new_message")(handled)
    async with client:
        for frame in (frame_of("m1"), frame_of("m1"), frame_of("m2", seconds=1)):
            await server.send_raw(frame)
        await handled.wait_for(2)
    moments = [(call[0], call[2].payload.id) for call in observer.of("event_received", "duplicate_dropped")]
    assert moments == [("event_received", "m1"), ("duplicate_dropped", "m1"), ("event_received", "m2")]
    dropped = observer.of("duplicate_dropped")[0]
    assert dropped[1] is None
    assert dropped[2] is not handled.events[0]  # the second copy, not the one delivered
    assert client.statistics().duplicates_dropped == 1


async def test_a_first_backfill_is_reported_before_its_events(server: FeedServer) -> None:
    for item in (message("old", 0), message("b1", 1), message("b2", 2)):
        await server.push_message(item)
    observer = Recording()
    client = make_client(
        server.url, observer=observer, backfill=lambda gap: server.history(gap.since), backfill_since=at(1)
    )
    handled = Recorder()
    client.on("new_message")(handled)
    async with client:
        await handled.wait_for(2)
        await server.push_message(message("live", 3))
        await handled.wait_for(3)
    moments = [
        (call[0], call[2].payload.id) if call[0] == "event_received" else call
        for call in observer.of("backfilled", "event_received", "connected")
    ]
    assert moments == [
        ("connected", None, False, None),
        ("backfilled", None, Gap(since=at(1), is_reconnect=False, downtime=None), 2, None),
        ("event_received", "b1"),
        ("event_received", "b2"),
        ("event_received", "live"),
    ]
    assert [call[2].source for call in observer.of("event_received")] == ["backfill", "backfill", "live"]


async def test_a_backfill_after_a_reconnect_reports_its_gap_and_the_overlap_it_dropped(server: FeedServer) -> None:
    observer = Recording()
    client = make_client(server.url, observer=observer, backfill=lambda gap: server.history(gap.since), dedupe=True)
    handled = Recorder()
    client.on("new_message")(handled)
    async with client:
        await server.push_message(message("m1", 1))
        await handled.wait_for(1)
        await server.stop()  # what is pushed now reaches nobody, but is in the history
        await server.push_message(message("m2", 2))
        await server.push_message(message("m3", 3))
        await server.start()
        await handled.wait_for(3)
    [(_, feed, gap, events, error)] = observer.of("backfilled")
    [_, reconnected] = observer.of("connected")
    assert (feed, events, error) == (None, 3, None)  # m1 again (since is inclusive), m2, m3
    assert gap == Gap(since=at(1), is_reconnect=True, downtime=reconnected[3])
    assert gap.downtime is not None
    assert gap.downtime > 0
    moments = [(call[0], call[2].payload.id) for call in observer.of("event_received", "duplicate_dropped")]
    assert moments == [
        ("event_received", "m1"),
        ("duplicate_dropped", "m1"),
        ("event_received", "m2"),
        ("event_received", "m3"),
    ]


async def test_a_failed_backfill_is_reported_with_its_error_and_what_it_fetched(server: FeedServer) -> None:
    await server.push_message(message("b1", 1))
    failure = RuntimeError("history service down")

    async def backfill(gap: Gap) -> AsyncIterator[Message | Chat]:
        for item in server.history(gap.since):
            yield item
        raise failure

    observer = Recording()
    client = make_client(server.url, observer=observer, backfill=backfill, backfill_since=at(0))
    handled = Recorder()
    client.on("new_message")(handled)
    async with client:
        await handled.wait_for(1)
        await server.push_message(message("live", 2))
        await handled.wait_for(2)  # the client goes on
    [(_, feed, gap, events, error)] = observer.of("backfilled")
    assert (feed, gap, events) == (None, Gap(since=at(0), is_reconnect=False, downtime=None), 1)
    assert error is failure
    assert ids(observer.of("event_received"), "event_received") == ["b1", "live"]
    assert client.statistics().backfill_errors == 1


# Handler calls


class Gate:
    """What a handler waits on: set by the test, with the times on both sides."""

    def __init__(self) -> None:
        self.entered = Counter()
        self.release = asyncio.Event()
        self.entered_at = 0.0


@pytest.mark.parametrize(
    ("kind", "concurrency"),
    [("async", 1), ("async", 4), ("sync", 1), ("sync returning a coroutine", 1)],
    ids=["async-inline", "async-lanes", "sync-inline", "sync-returning-a-coroutine-inline"],
)
async def test_each_handler_call_is_timed_and_its_error_given(server: FeedServer, kind: str, concurrency: int) -> None:
    observer = Recording()
    client = make_client(server.url, observer=observer)
    gate = Gate()
    failures: dict[str, Exception] = {}
    done = Counter()
    errors: list[BaseException] = []

    inner: dict[str, float] = {}  # each call's time as the handler itself measures it

    async def handle_async(event: chatfeed.NewMessage) -> None:
        began = time.perf_counter()
        text = content(event)
        try:
            if text == "slow":
                gate.entered_at = time.perf_counter()
                gate.entered.bump()
                await gate.release.wait()
            if text.startswith("boom"):
                failures[text] = RuntimeError(text)
                raise failures[text]
        finally:
            inner[text] = time.perf_counter() - began
            done.bump()

    def handle_sync(event: chatfeed.NewMessage) -> None:
        began = time.perf_counter()
        text = content(event)
        try:
            if text.startswith("boom"):
                failures[text] = RuntimeError(text)
                raise failures[text]
        finally:
            inner[text] = time.perf_counter() - began
            done.bump()

    def handle_returning_a_coroutine(event: chatfeed.NewMessage) -> Any:
        return handle_async(event)

    handler = {
        "async": handle_async,
        "sync": handle_sync,
        "sync returning a coroutine": handle_returning_a_coroutine,
    }[kind]
    if concurrency == 1:
        client.on("new_message")(handler)
    else:
        client.on("new_message", concurrency=concurrency)(handler)
    client.on_error(lambda exc, event: errors.append(exc))
    waits = kind != "sync"
    texts = ["fast", "boom1", "slow", "after"] if waits else ["fast", "boom1", "after"]
    async with client:
        pushed_at = time.perf_counter()
        for text in texts:
            await server.push_message(content=text, chat_id="c1")
        if waits:
            await gate.entered.wait_for(1)
            await asyncio.sleep(20 * MS)  # what the handler's duration must show; not a synchronisation
            released_at = time.perf_counter()
            gate.release.set()
        await done.wait_for(len(texts))
        await observer.wait_for_calls("handler_finished", len(texts))
    finished_at = time.perf_counter()

    calls = handler_calls(observer)
    assert [(feed, content(event), name) for feed, event, name, *_ in calls] == [
        (None, text, handler.__qualname__) for text in texts
    ]
    by_text = {content(event): (token, duration, error) for _, event, _, token, duration, error in calls}
    for text, (token, duration, error) in by_text.items():
        assert isinstance(token, Started)
        assert 0 < inner[text] <= duration <= finished_at - pushed_at, text
        assert error is failures.get(text), text  # the very exception raised, or None
    assert errors == [failures["boom1"]]  # on_error got it too: the client goes on
    if waits:
        slow = by_text["slow"][1]
        assert slow >= released_at - gate.entered_at >= 20 * MS
        assert all(duration < slow for text, (_, duration, _) in by_text.items() if text != "slow")


async def test_a_pool_handler_call_is_reported_with_its_feed() -> None:
    async with FeedServer(tokens=[TOKEN, OTHER_TOKEN]) as server:
        observer = Recording()
        pool = make_pool(server.url, observer=observer)
        pool.add("a", token=TOKEN)
        pool.add("b", token=OTHER_TOKEN)
        seen = Counter()

        async def handle(event: chatfeed.NewMessage, feed: str) -> None:
            seen.bump()
            if feed == "b":
                raise ValueError(feed)

        pool.on("new_message")(handle)
        pool.on_error(lambda exc, event: None)
        async with pool:
            await server.push_message(content="to both")
            await seen.wait_for(2)
            await observer.wait_for_calls("handler_finished", 2)
    calls = sorted(handler_calls(observer), key=lambda call: str(call[0]))
    assert [(feed, event.feed, name) for feed, event, name, *_ in calls] == [
        ("a", "a", handle.__qualname__),
        ("b", "b", handle.__qualname__),
    ]
    assert calls[0][5] is None
    assert isinstance(calls[1][5], ValueError)


# Backpressure


async def test_an_unread_stream_engages_backpressure_until_it_is_read(server: FeedServer) -> None:
    observer = Recording()
    client = make_client(server.url, observer=observer)
    async with client, client.events(buffer=2) as stream:
        for number in range(5):
            await server.push_message(content=str(number))
        # Two in the buffer, the third waits for room: the feed is not read.
        await observer.wait_for_calls("backpressure", 1)
        assert observer.of("backpressure") == [("backpressure", None, True, "events")]
        received = [content(await asyncio.wait_for(anext(stream), WAIT)) for _ in range(5)]
        await observer.wait_for(lambda: observer.of("backpressure")[-1][2] is False)
    assert received == ["0", "1", "2", "3", "4"]
    engaged = [call[2] for call in observer.of("backpressure")]
    assert engaged[:2] == [True, False]
    assert engaged == [True, False] * (len(engaged) // 2)  # each engagement ends, and none nests
    assert {call[1:2] + call[3:] for call in observer.of("backpressure")} == {(None, "events")}


async def test_a_full_concurrent_handler_engages_backpressure_under_its_name(server: FeedServer) -> None:
    observer = Recording()
    client = make_client(server.url, observer=observer)
    release = asyncio.Event()
    done = Counter()

    async def slow_handler(event: chatfeed.NewMessage) -> None:
        await release.wait()
        done.bump()

    client.on("new_message", concurrency=2, max_pending=2)(slow_handler)
    async with client:
        for number in range(4):
            await server.push_message(content=str(number), chat_id=f"c{number}")
        await observer.wait_for_calls("backpressure", 1)
        assert observer.of("backpressure") == [("backpressure", None, True, slow_handler.__qualname__)]
        release.set()
        await done.wait_for(4)
        await observer.wait_for(lambda: observer.of("backpressure")[-1][2] is False)
    engaged = [call[2] for call in observer.of("backpressure")]
    assert engaged == [True, False] * (len(engaged) // 2)
    assert {call[3] for call in observer.of("backpressure")} == {slow_handler.__qualname__}


# A pool


async def test_a_pool_attaches_once_and_gives_every_moment_its_feed_key() -> None:
    async with FeedServer(tokens=[TOKEN, OTHER_TOKEN]) as server:
        observer = Recording()
        pool = make_pool(server.url, observer=observer, dedupe=True)
        assert observer.calls == [("attached", pool)]
        pool.add("a", token=TOKEN)
        pool.add("b", token=OTHER_TOKEN)
        seen = Counter()
        pool.on("new_message")(lambda event, feed: seen.bump())
        async with pool:
            await server.send_raw(frame_of("m1"))
            await server.send_raw(frame_of("m1"))
            await seen.wait_for(2)
            await observer.wait_for(lambda: len(observer.of("duplicate_dropped")) == 2)
            server.drop_connections()
            await observer.wait_for(lambda: len(observer.of("connected")) == 4)
    assert observer.of("attached") == [("attached", pool)]
    moments = {(call[0], call[1]) for call in observer.calls if call[0] != "attached"}
    expected = {
        "connecting",
        "connected",
        "disconnected",
        "state_changed",
        "frame_received",
        "event_received",
        "duplicate_dropped",
        "handler_started",
        "handler_finished",
    }
    assert moments == {(name, feed) for name in expected for feed in ("a", "b")}
    for feed in ("a", "b"):
        states = [call[2] for call in observer.of("state_changed") if call[1] == feed]
        assert states[:3] == ["connecting", "authenticating", "open"]
        assert states[-1] == "closed"
        assert next(call[2:] for call in observer.of("connected") if call[1] == feed) == (False, None)
        [received] = [call for call in observer.of("event_received") if call[1] == feed]
        assert received[2].feed == feed


# An observer that fails


async def test_an_observer_raising_everywhere_breaks_nothing_and_is_logged_once_per_method(
    server: FeedServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_observe, "_FAILED", set())  # what failed once is remembered for the process
    observer = Broken()
    client = make_client(server.url, observer=observer, dedupe=True)
    handled = Recorder()
    client.on("new_message")(handled)
    client.on("connected")(handled)
    async with client, client.events(buffer=1) as stream:
        for number in range(3):
            await server.push_message(content=str(number), created_at=at(number))
        await server.send_raw(frame_of("dup"))
        await server.send_raw(frame_of("dup"))
        streamed = [content(await asyncio.wait_for(anext(stream), WAIT)) for _ in range(4)]
        server.drop_connections()
        await handled.wait_for(6)
    assert [content(event) for event in handled.events if isinstance(event, chatfeed.NewMessage)] == [
        "0",
        "1",
        "2",
        "hi",
    ]
    assert streamed == ["0", "1", "2", "hi"]
    assert [event.is_reconnect for event in handled.events if isinstance(event, chatfeed.Connected)] == [False, True]

    reports = [record for record in caplog.records if "observer Broken." in record.getMessage()]
    levels: dict[str, list[int]] = {}
    for record in reports:
        name = record.getMessage().split("observer Broken.")[1].split(" ")[0]
        levels.setdefault(name, []).append(record.levelno)
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)
    called = {call[0] for call in observer.calls}
    assert set(levels) == called
    assert called >= {
        "attached",
        "connecting",
        "connected",
        "disconnected",
        "state_changed",
        "frame_received",
        "event_received",
        "duplicate_dropped",
        "handler_started",
        "handler_finished",
        "backpressure",
    }
    for name, seen in levels.items():
        assert seen == [logging.ERROR] + [logging.DEBUG] * (len(seen) - 1), name
        assert len(seen) == len(observer.of(name)), name
    assert len(levels["frame_received"]) > 1  # later failures were there, at DEBUG
    # A failed handler_started gives handler_finished None, not a token.
    assert {call[6] for call in observer.of("handler_finished")} == {None}


# Several observers, and only some moments


class Tagged(Recording):
    """Records into a log it shares with other observers, tagged with its name."""

    def __init__(self, tag: str, log: list[tuple[str, str]]) -> None:
        super().__init__()
        self.tag = tag
        self.log = log

    def _add(self, *call: Any) -> None:
        super()._add(*call)
        self.log.append((self.tag, call[0]))


async def test_several_observers_are_each_called_in_order(server: FeedServer) -> None:
    log: list[tuple[str, str]] = []
    first, second = Tagged("first", log), Tagged("second", log)
    client = make_client(server.url, observer=[first, second])
    handled = Recorder()
    client.on("new_message")(handled)
    async with client:
        await server.push_message(content="x")
        await handled.wait_for(1)
    assert first.names() == second.names()
    assert "handler_finished" in first.names()
    expected = []
    for name in first.names():
        # handler_finished unwinds the starts, like nested context managers.
        order = ("second", "first") if name == "handler_finished" else ("first", "second")
        expected += [(tag, name) for tag in order]
    assert log == expected
    [(_, _, _, _, _, _, token_of_first)] = first.of("handler_finished")
    [(_, _, _, _, _, _, token_of_second)] = second.of("handler_finished")
    assert token_of_first is first.of("handler_started")[0][4]
    assert token_of_second is second.of("handler_started")[0][4]


class OnlyConnected(chatfeed.Observer):
    """Overrides `connected` alone, and notes every other hook of its own that chatfeed looks up."""

    HOOKS = frozenset(name for name in vars(chatfeed.Observer) if not name.startswith("_"))

    def __init__(self) -> None:
        self.connections: list[tuple[str | None, bool, float | None]] = []
        self.looked_up: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        if name in OnlyConnected.HOOKS and name != "connected":
            object.__getattribute__(self, "looked_up").append(name)
        return object.__getattribute__(self, name)

    def connected(self, feed: str | None, *, is_reconnect: bool, downtime: float | None) -> None:
        self.connections.append((feed, is_reconnect, downtime))


async def test_an_observer_of_one_moment_is_never_asked_about_another(server: FeedServer) -> None:
    observer = OnlyConnected()
    assert "handler_started" in OnlyConnected.HOOKS and "attached" in OnlyConnected.HOOKS
    client = make_client(server.url, observer=observer, dedupe=True, backfill=lambda gap: server.history(gap.since))
    handled = Recorder()
    client.on("new_message")(handled)
    async with client, client.events(buffer=1) as stream:
        for number in range(3):
            await server.push_message(content=str(number), created_at=at(number))
        server.drop_connections()
        for _ in range(3):
            await asyncio.wait_for(anext(stream), WAIT)
        await handled.wait_for(3)
        await server.push_message(content="after", created_at=at(9))
        await handled.wait_for(4)
    assert [(feed, is_reconnect) for feed, is_reconnect, _ in observer.connections] == [(None, False), (None, True)]
    assert observer.looked_up == []
    hooks = client._hooks
    assert hooks is not None
    assert hooks.connected is not None
    assert [name for name in hooks.__slots__ if name not in ("connected", "observers") and getattr(hooks, name)] == []


# observer=


@pytest.mark.parametrize(
    "observer",
    [object(), "observer", b"observer", Recording, [Recording(), object()], {Recording()}, 42],
    ids=["object", "str", "bytes", "the class", "a list with a stranger", "a set", "int"],
)
def test_an_observer_that_is_not_one_is_a_usage_error(observer: Any) -> None:
    with pytest.raises(UsageError, match="observer"):
        chatfeed.Client("ws://127.0.0.1:9", token=TOKEN, observer=observer)
    with pytest.raises(UsageError, match="observer"):
        chatfeed.Pool("ws://127.0.0.1:9", observer=observer)


async def test_no_observer_in_a_list_is_no_observer(server: FeedServer) -> None:
    client = make_client(server.url, observer=[])
    handled = Recorder()
    client.on("new_message")(handled)
    async with client:
        await server.push_message(content="x")
        await handled.wait_for(1)
    assert client._hooks is None
    observer = Recording()
    client = make_client(server.url, observer=(observer,))  # any sequence
    assert observer.calls == [("attached", client)]


# The sync client


def test_the_sync_client_reports_in_its_own_thread() -> None:
    observer = Recording()
    with ThreadedFeedServer(tokens=[TOKEN]) as feed:
        client = chatfeed.sync.Client(feed.server.url, token=TOKEN, reconnect=FAST, observer=observer)
        assert observer.calls == [("attached", client._client)]
        with client:
            stream = client.events()
            asyncio.run_coroutine_threadsafe(feed.server.push_message(content="x"), feed._loop).result(WAIT)
            event = next(stream)
            stream.close()
    assert [call[:3] for call in observer.of("connected")] == [("connected", None, False)]
    assert observer.of("event_received") == [("event_received", None, event)]
    assert observer.of("state_changed")[-1] == ("state_changed", None, "closed")
    assert observer.threads == {threading.current_thread().name, "chatfeed-sync"}  # attached here, the rest there


HANDLING: contextvars.ContextVar[str] = contextvars.ContextVar("handling", default="")


def test_what_handler_started_makes_current_is_current_in_a_sync_handler_run_in_another_thread() -> None:
    # A tracing span made current by handler_started (in the loop's task) is the parent of
    # the spans the handler opens, also when chatfeed.sync runs the handler in run()'s thread.
    class Tagging(chatfeed.Observer):
        def handler_started(self, feed: str | None, event: Any, *, handler: str) -> object:
            return HANDLING.set(f"handling {event.payload.id}")

        def handler_finished(self, feed: str | None, event: Any, **details: Any) -> None:
            HANDLING.reset(details["started"])

    seen: list[str] = []
    with ThreadedFeedServer(tokens=[TOKEN]) as feed:
        client = chatfeed.sync.Client(feed.server.url, token=TOKEN, reconnect=FAST, observer=Tagging())

        @client.on("new_message")
        def handle(event: chatfeed.NewMessage) -> None:
            seen.append(HANDLING.get())
            client.close()

        @client.on("connected")
        def push(event: chatfeed.Connected) -> None:
            asyncio.run_coroutine_threadsafe(feed.server.push_message(id="m1"), feed._loop).result(WAIT)

        client.run()  # returns once the handler has closed the client
    assert seen == ["handling m1"]

"""Observers of a bridge and of a consumer, with real brokers: each record's fate, each event's.

A bridge reports each record the broker acknowledged (``published``, stored
or already there), each refusal (``publish_failed``) and its window filling up
(``backpressure`` with ``where="bridge"``); a consumer reports each event
fetched, each handler call, and each event's fate (``acknowledged``,
``redelivery``, ``dead_lettered``). The sinks here are the real ones, wrapped
to refuse or hold publishes on purpose.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pytest

from chatfeed import NewMessage
from chatfeed.bridge import Bridge, Record, Sink, encode
from chatfeed.bridge.testing import RedisServer
from chatfeed.testing import FeedServer, make_message

from ..integration._observers import Recording, handler_calls
from ._brokers import EPOCH, Broker, make_pool, message_frame, token_of, wait_for

pytestmark = pytest.mark.timeout(20)

MAX_DELIVER = 3


class Wrapped:
    """A real sink that refuses its first ``refusals`` publishes, and holds each publish while ``gate`` is clear."""

    def __init__(self, sink: Sink, *, refusals: int = 0) -> None:
        self.sink = sink
        self.refusals = refusals
        self.refused: list[ConnectionError] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0

    async def open(self) -> None:
        await self.sink.open()

    async def publish(self, record: Record) -> bool:
        if len(self.refused) < self.refusals:
            self.refused.append(ConnectionError(f"refused on purpose ({len(self.refused) + 1})"))
            raise self.refused[-1]
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return await self.sink.publish(record)

    async def load_watermarks(self, feeds: Sequence[str]) -> dict[str, datetime]:
        return await self.sink.load_watermarks(feeds)

    async def save_watermarks(self, marks: Mapping[str, datetime]) -> None:
        await self.sink.save_watermarks(marks)

    async def close(self) -> None:
        await self.sink.close()


def one_feed_pool(server: FeedServer) -> Any:
    pool = make_pool(server.url)
    pool.add("u0", token=token_of("u0"))
    return pool


USERS = {token_of("u0"): "u0"}


# The bridge


async def test_a_bridge_reports_each_record_published_once_and_a_duplicate_as_not_stored(broker: Broker) -> None:
    observer = Recording()
    async with FeedServer(users=USERS, compression=None) as server:
        bridge = Bridge(one_feed_pool(server), broker.sink(), observer=observer)
        assert observer.calls == [("attached", bridge)]
        async with bridge:
            first = message_frame("1", "c", offset=1)
            for frame in (first, message_frame("2", "c", offset=2), first):  # the last, a backend's retry
                await server.send_raw(frame, user_id="u0")
            await wait_for(lambda: bridge.statistics().published == 3 and bridge.statistics().held == 0, 5)
    published = observer.of("published")
    assert [(record.feed, record.type, record.chat, stored) for _, record, stored, _ in published] == [
        ("u0", "new_message", "c", True),
        ("u0", "new_message", "c", True),
        ("u0", "new_message", "c", False),
    ]
    assert published[0][1].dedup == published[2][1].dedup != published[1][1].dedup
    assert [record.created for _, record, _, _ in published] == [
        EPOCH.replace(microsecond=1000),
        EPOCH.replace(microsecond=2000),
        EPOCH.replace(microsecond=1000),
    ]
    assert all(duration >= 0 for *_, duration in published)
    assert observer.of("publish_failed", "backpressure") == []
    assert {call[0] for call in observer.calls} == {"attached", "published"}  # the feeds' moments are the pool's


async def test_a_refused_publish_is_reported_with_each_attempt_then_published(broker: Broker) -> None:
    observer = Recording()
    sink = Wrapped(broker.sink(), refusals=3)
    async with FeedServer(users=USERS, compression=None) as server:
        bridge = Bridge(one_feed_pool(server), sink, observer=observer, retry_initial=0.001, retry_maximum=0.005)
        async with bridge:
            await server.send_raw(message_frame("1", "c", offset=1), user_id="u0")
            await observer.wait_for_calls("published", 1)
            await server.send_raw(message_frame("2", "c", offset=2), user_id="u0")
            await observer.wait_for_calls("published", 2)
    failed = observer.of("publish_failed")
    [first, second] = observer.of("published")
    assert [(record, error, attempt) for _, record, error, attempt in failed] == [
        (first[1], sink.refused[0], 1),
        (first[1], sink.refused[1], 2),
        (first[1], sink.refused[2], 3),
    ]
    assert observer.names()[1:] == ["publish_failed"] * 3 + ["published"] * 2
    assert (first[2], second[2]) == (True, True)
    assert first[3] > second[3]  # the retries are in the first one's duration
    assert bridge.statistics().retries == 3


async def test_a_full_window_engages_backpressure_until_the_broker_takes_records(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    observer = Recording()
    sink = Wrapped(broker.sink())
    async with FeedServer(users=USERS, compression=None) as server:
        bridge = Bridge(one_feed_pool(server), sink, window=2, observer=observer)
        async with bridge:
            sink.gate.clear()  # the broker holds every publish
            for number in range(5):
                await server.send_raw(message_frame(str(number), "c", offset=number), user_id="u0")
            await observer.wait_for_calls("backpressure", 1)
            assert bridge.statistics().held == 2
            assert observer.of("backpressure", "published") == [("backpressure", None, True, "bridge")]
            sink.gate.set()
            await wait_for(lambda: bridge.statistics().published == 5, 5)
    engaged = [(feed, on, where) for _, feed, on, where in observer.of("backpressure")]
    assert engaged[:2] == [(None, True, "bridge"), (None, False, "bridge")]
    assert engaged == [(None, True, "bridge"), (None, False, "bridge")] * (len(engaged) // 2)
    # Released once a record was stored and made room.
    names = observer.names()
    assert names.index("published") < names.index("backpressure", names.index("backpressure") + 1)


async def test_a_full_window_shared_by_several_feeds_is_engaged_once_and_released_once_all_are_read(
    broker: Broker,
) -> None:
    # The window is every feed's: backpressure is one state, not one per waiting feed.
    users = {token_of(f"u{index}"): f"u{index}" for index in range(3)}
    observer = Recording()
    sink = Wrapped(broker.sink())
    async with FeedServer(users=users, compression=None) as server:
        pool = make_pool(server.url)
        for user in users.values():
            pool.add(user, token=token_of(user))
        bridge = Bridge(pool, sink, window=2, observer=observer)
        async with bridge:
            sink.gate.clear()
            for number in range(4):
                for user in users.values():
                    await server.send_raw(message_frame(f"{user}-{number}", "c", offset=number), user_id=user)
            await observer.wait_for_calls("backpressure", 1)
            # Every feed is blocked now (one record each at most is read past the full window).
            await wait_for(lambda: bridge.statistics().received >= 2 + len(users), 5)
            assert observer.of("backpressure") == [("backpressure", None, True, "bridge")]
            sink.gate.set()
            await wait_for(lambda: bridge.statistics().published == 12, 5)
    engaged = [on for _, _, on, _ in observer.of("backpressure")]
    assert engaged == [True, False] * (len(engaged) // 2), engaged


# The consumer


async def fill(broker: Broker, count: int, *, start: int = 0) -> list[str]:
    """Put ``count`` messages of feeds u0 and u1 into the log; return their ids."""
    sink = broker.sink()
    await sink.open()
    try:
        for number in range(start, start + count):
            feed = f"u{number % 2}"
            message = make_message(id=str(number), chat_id=f"{feed}-c", created_at=EPOCH)
            assert await sink.publish(encode(NewMessage(type="new_message", payload=message), feed))
    finally:
        await sink.close()
    return [str(number) for number in range(start, start + count)]


async def test_a_consumer_reports_each_event_each_call_and_each_fate(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="chatfeed.bridge")  # the handler's failures, expected
    ids = await fill(broker, 6)
    failing = {"3"}
    observer = Recording()
    consumer = broker.consumer(
        "watched", observer=observer, max_deliver=MAX_DELIVER, retry_delay=0.05, retry_maximum=0.2
    )
    assert observer.calls == [("attached", consumer)]
    errors: list[Exception] = []

    @consumer.on("new_message")
    async def handle(event: NewMessage, feed: str) -> None:
        if event.payload.id in failing:
            errors.append(RuntimeError(f"refused {event.payload.id}"))
            raise errors[-1]

    assert consumer.statistics().state == "unopened"
    async with consumer:
        assert consumer.statistics().state == "running"
        await observer.wait_for(
            lambda: len(observer.of("acknowledged")) == len(ids) - 1 and len(observer.of("dead_lettered")) == 1
        )
        statistics = consumer.statistics()
    assert (statistics.state, statistics.broker_up) == ("running", True)
    assert consumer.statistics().state == "closed"

    def feed_of(id: str) -> str:
        return f"u{int(id) % 2}"

    received = [(feed, event.payload.id) for _, feed, event in observer.of("event_received")]
    assert sorted(received) == sorted([(feed_of(id), id) for id in ids] + [("u1", "3")] * (MAX_DELIVER - 1))
    acknowledged = [(feed, event.payload.id) for _, feed, event in observer.of("acknowledged")]
    assert sorted(acknowledged) == sorted((feed_of(id), id) for id in ids if id not in failing)
    redeliveries = [
        (feed, event.payload.id, attempt, delay) for _, feed, event, attempt, delay in observer.of("redelivery")
    ]
    assert redeliveries == [("u1", "3", 1, 0.05), ("u1", "3", 2, 0.1)]
    [(_, feed, event, attempts)] = observer.of("dead_lettered")
    assert (feed, event.payload.id, attempts) == ("u1", "3", MAX_DELIVER)

    calls = handler_calls(observer)
    assert len(calls) == len(ids) - 1 + MAX_DELIVER
    for feed, event, name, _, duration, error in calls:
        assert (feed, event.feed, name) == (feed_of(event.payload.id), feed, handle.__qualname__)
        assert duration >= 0
        assert (error is not None) == (event.payload.id in failing)
    assert [error for *_, error in calls if error is not None] == errors
    # Each event's fate comes after its handler's call.
    names = observer.names()
    assert names.index("handler_finished") < names.index("acknowledged")


@pytest.mark.parametrize("held_by", ["max_in_flight", "lanes"])
async def test_a_consumer_whose_events_are_all_held_reports_backpressure_until_one_is_done(
    broker: Broker, held_by: str
) -> None:
    # max_in_flight 2 with four lanes: the fetch loop waits for room ("consumer");
    # max_pending 1 of a handler with two lanes: the loop waits for the lanes (the handler's name).
    await fill(broker, 6)
    observer = Recording()
    wide = held_by == "max_in_flight"
    consumer = broker.consumer("held", observer=observer, max_in_flight=2 if wide else 64, batch=2)
    release = asyncio.Event()

    @consumer.on("new_message", concurrency=4 if wide else 2, max_pending=16 if wide else 1)
    async def handle(event: NewMessage, feed: str) -> None:
        await release.wait()

    where = "consumer" if wide else handle.__qualname__
    async with consumer:
        await observer.wait_for_calls("backpressure", 1)
        [(_, _, engaged, reported_where)] = observer.of("backpressure")
        assert (engaged, reported_where) == (True, where)
        release.set()
        await observer.wait_for(lambda: len(observer.of("acknowledged")) == 6)
    calls = [(on, at) for _, _, on, at in observer.of("backpressure")]
    assert calls == [(True, where), (False, where)] * (len(calls) // 2), calls


async def test_a_consumer_says_when_the_broker_is_down(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker("redis", redis_server.url)
    await fill(broker, 2)
    observer = Recording()
    consumer = broker.consumer("down", observer=observer, connect_timeout=0.2)

    @consumer.on("new_message")
    async def handle(event: NewMessage, feed: str) -> None:
        pass

    async with consumer:
        await observer.wait_for(lambda: len(observer.of("acknowledged")) == 2)
        assert consumer.statistics().broker_up
        await asyncio.to_thread(redis_server.stop)
        await wait_for(lambda: not consumer.statistics().broker_up, 5)
        await asyncio.to_thread(redis_server.start)
        await wait_for(lambda: consumer.statistics().broker_up, 5)
        await fill(broker, 1, start=2)
        # Fetched and handled; not waited on: its acknowledgement may fail on a connection the restart broke.
        await observer.wait_for(lambda: "2" in [call[2].payload.id for call in observer.of("event_received")])
    assert consumer.statistics().state == "closed"


async def test_after_a_redis_restart_the_next_event_is_acknowledged(redis_server: RedisServer) -> None:
    # The first acknowledgement after the restart goes out on a pooled connection the restart
    # broke; given up, the event would stay pending until the consumer stops, then come back.
    broker = Broker("redis", redis_server.url)
    await fill(broker, 2)
    consumer = broker.consumer("restart", connect_timeout=0.2)

    @consumer.on("new_message")
    async def handle(event: NewMessage, feed: str) -> None:
        pass

    async with consumer:
        await wait_for(lambda: consumer.statistics().acked == 2, 5)
        await asyncio.to_thread(redis_server.stop)
        await wait_for(lambda: not consumer.statistics().broker_up, 5)
        await asyncio.to_thread(redis_server.start)
        await wait_for(lambda: consumer.statistics().broker_up, 5)
        await fill(broker, 1, start=2)
        await wait_for(lambda: consumer.statistics().acked == 3, 5)

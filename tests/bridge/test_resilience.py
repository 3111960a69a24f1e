"""What the last review found: a failed backfill at a restart, bad broker settings, a consumer that stops early."""

from __future__ import annotations

import asyncio
import collections
from datetime import datetime, timezone

import pytest

import chatfeed
from chatfeed import UsageError
from chatfeed.bridge import Bridge, Consumer, JetStreamSink, RedisStreamSink
from chatfeed.bridge.testing import NatsServer, RedisServer
from chatfeed.testing import FeedServer

from ._brokers import Broker, wait_for
from .test_bridge_semantics import USERS, FlakySink, eventually, make_pool, push
from .test_consumer import fill


async def test_a_failed_backfill_keeps_the_watermark_at_its_gap_and_the_next_start_fetches_it() -> None:
    sink = FlakySink()
    async with FeedServer(users=USERS) as server:
        history_up = False

        def backfill(gap: chatfeed.Gap) -> list[chatfeed.Message | chatfeed.Chat]:
            if not history_up:
                raise ConnectionError("the history is down")
            return server.history(gap.since, user_id=gap.feed)

        for user in USERS.values():  # the history knows a user's messages by the user's chats
            for number in range(3):
                await server.push_chat(user_id=user, id=f"{user}-c{number}")
        first = Bridge(make_pool(server, backfill=backfill), sink, watermark_interval=0.01)
        history_up = True
        async with first:  # no saved watermark: nothing to backfill at the first start
            await push(server, 2)
            await sink.wait_for(8)
            await eventually(lambda: len(sink.marks) == len(USERS))
        marks: dict[str, datetime] = dict(sink.marks)
        missed = await push(server, 2)  # while no bridge runs

        history_up = False  # the second start cannot fetch the gap...
        second = Bridge(make_pool(server, backfill=backfill), sink, watermark_interval=0.01)
        async with second:
            later = await push(server, 2)  # ...and live events go on meanwhile
            await sink.wait_for(8 + len(later))
        # close() saves what moved: nothing did, though later events were published.
        assert sink.marks == marks
        assert second.statistics().unpublished == 0

        history_up = True  # the third start fetches it
        third = Bridge(make_pool(server, backfill=backfill), sink)
        async with third:
            await sink.wait_for(8 + len(later) + len(missed))
    stored = {record.dedup for record in sink.log}
    assert len(stored) == len(sink.log) == 8 + len(later) + len(missed)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda url: RedisStreamSink(url.rpartition(":")[0] + ":99999/0"), "refused|not a Redis URL"),
        (lambda url: RedisStreamSink(url.rpartition("/")[0] + "/99"), "refused the connection"),
    ],
)
async def test_a_redis_sink_set_up_wrong_is_a_usage_error_at_once(
    redis_session: RedisServer, make: object, match: str
) -> None:
    sink = make(redis_session.url)  # type: ignore[operator]
    async with FeedServer(users=USERS) as server:
        bridge = Bridge(make_pool(server), sink, start_timeout=30)
        with pytest.raises(UsageError, match=match):
            await asyncio.wait_for(bridge.start(), 5)  # not retried for start_timeout


async def test_a_jetstream_sink_set_up_wrong_is_a_usage_error_at_once(nats_session: NatsServer) -> None:
    url = nats_session.url
    async with FeedServer(users=USERS) as server:
        bad_name = Bridge(make_pool(server), JetStreamSink(url, stream="bad.name", prefix="badname"))
        with pytest.raises(UsageError, match="stream name"):
            await asyncio.wait_for(bad_name.start(), 5)
        first = Bridge(make_pool(server), JetStreamSink(url, stream="OVERLAP_A", prefix="overlap", bucket=False))
        async with first:
            pass
        # Another stream over the same subjects: JetStream refuses it.
        second = Bridge(make_pool(server), JetStreamSink(url, stream="OVERLAP_B", prefix="overlap", bucket=False))
        with pytest.raises(UsageError, match="refused to create the stream OVERLAP_B"):
            await asyncio.wait_for(second.start(), 5)


async def test_a_consumer_of_a_missing_stream_leaves_nothing_behind(nats_session: NatsServer) -> None:
    import nats

    consumer = Consumer(nats_session.url, durable="x", stream="NEVER_MADE", prefix="nevermade")
    with pytest.raises(chatfeed.bridge.BrokerUnavailableError, match="no stream NEVER_MADE"):
        await consumer.start()
    client = await nats.connect(nats_session.url)
    try:
        names = {info.config.name for info in await client.jetstream().streams_info()}
    finally:
        await client.close()
    assert "NEVER_MADE_DEAD" not in names


async def test_what_a_closed_consumer_did_not_finish_comes_back_at_once(broker: Broker) -> None:
    ids = await fill(broker, 40)
    # The broker's own timers are long: only the consumer's close can bring the events back quickly.
    slow = {"ack_wait": 30.0} if broker.kind == "nats" else {"claim_after": 30.0}
    first = broker.consumer("early", batch=40, drain_timeout=0.05, **slow)
    started = asyncio.Event()

    @first.on("new_message")
    async def stuck(event: chatfeed.NewMessage, feed: str) -> None:
        started.set()
        await asyncio.Event().wait()  # never finishes: cancelled by close()

    async with first:
        await asyncio.wait_for(started.wait(), 5)
        # One event in the stuck handler, the rest of its batch fetched and waiting behind it.
        await wait_for(lambda: first.statistics().received > 1, 5)
    assert first.statistics().acked == 0

    handled: collections.Counter[str] = collections.Counter()
    second = broker.consumer("early", **slow)

    @second.on("new_message")
    async def handle(event: chatfeed.NewMessage, feed: str) -> None:
        handled[event.payload.id] += 1

    async with second:
        await wait_for(lambda: len(handled) == len(ids), 5)  # well before the broker's 30 s
    assert sorted(handled, key=int) == ids
    assert set(handled.values()) == {1}


async def test_what_an_events_stream_closed_early_held_comes_back_to_the_running_consumer(broker: Broker) -> None:
    ids = await fill(broker, 10)
    handled: collections.Counter[str] = collections.Counter()
    slow = {"ack_wait": 30.0} if broker.kind == "nats" else {"claim_after": 30.0}  # the broker's own timers: long
    consumer = broker.consumer("early-stream", **slow)

    @consumer.on("new_message")
    async def handle(event: chatfeed.NewMessage, feed: str) -> None:
        handled[event.payload.id] += 1

    stream = consumer.events(buffer=16)
    async with consumer:
        async with stream:
            async for _ in stream:
                break  # the rest of what the stream held goes back to the log...
        # ...and comes back to this consumer, the only one: each event is acknowledged in the end.
        await wait_for(lambda: consumer.statistics().acked == len(ids) and consumer.statistics().in_flight == 0, 5)
    assert set(handled) == set(ids)
    assert await broker.pending("early-stream") == 0


async def test_a_failed_backfill_of_a_feed_that_had_nothing_yet_keeps_its_watermark_at_the_start() -> None:
    sink = FlakySink()

    def backfill(gap: chatfeed.Gap) -> list[chatfeed.Message]:
        raise ConnectionError("the history is down")

    async with FeedServer(users=USERS) as server:
        pool = make_pool(server, backfill=backfill, reconnect=chatfeed.Backoff(initial=0.01))
        reconnected = asyncio.Event()
        back: set[str] = set()

        @pool.on("connected")
        def connected(event: chatfeed.Connected, feed: str) -> None:
            if event.is_reconnect:
                back.add(feed)
                if len(back) == len(USERS):
                    reconnected.set()

        async with Bridge(pool, sink, watermark_interval=60) as bridge:
            server.drop_connections()  # before any event: the reconnect's gap has no start
            await asyncio.wait_for(reconnected.wait(), 5)
            later = await push(server, 1)
            await sink.wait_for(len(later))
        assert bridge.statistics().published == len(later)
    # Not the newest published: the start of time, so that a restart fetches everything again.
    assert sink.marks["user-0"] == datetime(1970, 1, 1, tzinfo=timezone.utc)


async def test_a_redis_consumer_never_takes_back_an_entry_another_consumer_claimed(redis_session: RedisServer) -> None:
    import redis.asyncio

    from chatfeed.bridge import RedisStreamSource

    broker = Broker("redis", redis_session.url)
    await fill(broker, 1)
    source = RedisStreamSource(redis_session.url, "stolen", prefix=broker.prefix, claim_after=30.0)
    await source.open()
    client = redis.asyncio.from_url(redis_session.url)
    try:
        (delivery,) = await source.fetch(10)
        stream, entry = delivery.position.split("#")
        await client.xclaim(stream, "stolen", "other", 0, [entry])  # claimed by another consumer meanwhile
        await delivery.extend()
        await delivery.release()
        (pending,) = await client.xpending_range(stream, "stolen", "-", "+", 10)
        assert pending["consumer"] == b"other"  # still the other's, and not made idle
        assert int(pending["time_since_delivered"]) < 30_000
    finally:
        await client.aclose()
        await source.close()

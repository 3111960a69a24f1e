"""Regressions of the bridge's and the consumer's review fixes, each against a real broker."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import time
from collections.abc import Hashable

import pytest

from chatfeed import NewMessage, UsageError
from chatfeed.bridge import Bridge, RedisStreamSink
from chatfeed.bridge.testing import NatsServer, RedisServer
from chatfeed.testing import FeedServer

from ._brokers import Broker, check_envelopes, make_pool, message_frame, token_of, wait_for
from .test_consumer import MAX_DELIVER, fast, fill

HANDLER_TIME = 2.5
"""How long a slow handler takes: longer than the broker's ack wait (or claim_after), the scenario's."""


@pytest.fixture
def redis_broker(redis_session: RedisServer) -> Broker:
    return Broker("redis", redis_session.url)


@pytest.fixture
def nats_broker(nats_session: NatsServer) -> Broker:
    return Broker("nats", nats_session.url)


# The consumer survives its handlers


async def test_a_handler_raising_cancelled_error_fails_its_event_and_the_consumer_goes_on(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="chatfeed.bridge")  # the handler's failures, expected
    ids = await fill(broker, 10)
    calls: collections.Counter[str] = collections.Counter()
    consumer = fast(broker, "cancelled")

    @consumer.on("new_message")  # inline: concurrency=1
    async def handle(event: NewMessage, feed: str) -> None:
        calls[event.payload.id] += 1
        if event.payload.id == "3":
            raise asyncio.CancelledError  # as if something it awaited was cancelled: not the consumer's own

    async with consumer:
        await wait_for(
            lambda: (
                consumer.statistics().acked == len(ids) - 1
                and consumer.statistics().dead_lettered == 1
                and consumer.statistics().in_flight == 0
            ),
            5,
        )
    assert calls == {id: MAX_DELIVER if id == "3" else 1 for id in ids}
    ((data, reason),) = await broker.dead_letters("cancelled")
    assert [envelope.id for envelope in check_envelopes([data])] == ["3"]
    assert "CancelledError" in reason
    assert await broker.pending("cancelled") == 0


async def test_a_failing_key_function_fails_its_event_and_the_consumer_goes_on(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="chatfeed.bridge")
    ids = await fill(broker, 10)
    keyed: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    consumer = fast(broker, "keyless")

    def key(event: NewMessage) -> Hashable:
        keyed[event.payload.id] += 1
        if event.payload.id == "3":
            raise LookupError("no key for this one, on purpose")
        return (event.feed, event.payload.chat_id)

    @consumer.on("new_message", concurrency=4, key=key)
    async def handle(event: NewMessage, feed: str) -> None:
        calls[event.payload.id] += 1

    async with consumer:
        await wait_for(
            lambda: (
                consumer.statistics().acked == len(ids) - 1
                and consumer.statistics().dead_lettered == 1
                and consumer.statistics().in_flight == 0
            ),
            5,
        )
        statistics = consumer.statistics()
    assert keyed["3"] == MAX_DELIVER, "the event was not redelivered up to max_deliver"
    assert calls == {id: 1 for id in ids if id != "3"}
    assert (statistics.retried, statistics.handler_errors) == (MAX_DELIVER - 1, MAX_DELIVER)
    ((data, reason),) = await broker.dead_letters("keyless")
    assert [envelope.id for envelope in check_envelopes([data])] == ["3"]
    assert "LookupError" in reason and "key function" in reason
    assert await broker.pending("keyless") == 0


async def test_an_entry_nested_100000_deep_is_dead_lettered_as_unreadable(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="chatfeed.bridge")
    deep = b"[" * 100_000 + b"]" * 100_000
    ids = await fill(broker, 3)
    await broker.append_raw(deep)
    ids += await fill(broker, 3, start=3)
    calls: collections.Counter[str] = collections.Counter()
    consumer = fast(broker, "deep")

    @consumer.on("new_message")
    async def handle(event: NewMessage, feed: str) -> None:
        calls[event.payload.id] += 1

    async with consumer:
        await wait_for(
            lambda: (
                consumer.statistics().acked == len(ids)
                and consumer.statistics().dead_lettered == 1
                and consumer.statistics().in_flight == 0
            ),
            5,
        )
    assert calls == dict.fromkeys(ids, 1)
    ((data, reason),) = await broker.dead_letters("deep")
    assert data == deep
    assert reason.startswith("unreadable")
    assert await broker.pending("deep") == 0


# Redis: the consumer's reads


async def test_a_redis_consumer_restarted_under_its_name_handles_all_it_left_pending(
    redis_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="chatfeed")  # the first run's calls, cancelled on purpose
    broker = redis_broker
    ids = await fill(broker, 300, feeds=1, chats=1)  # one chat: all in one partition, more than a batch
    options = {"name": "worker-1", "max_in_flight": 512, "batch": 128, "claim_after": 30.0}
    first = broker.consumer("sweep", drain_timeout=0.1, **options)
    release = asyncio.Event()  # never set: the first run's calls block until close() cancels them

    @first.on("new_message", concurrency=4)
    async def block(event: NewMessage, feed: str) -> None:
        await release.wait()

    async with first:
        await wait_for(lambda: first.statistics().received == len(ids), 5)
    assert first.statistics().acked == 0
    assert await broker.pending("sweep") == len(ids)

    handled: collections.Counter[str] = collections.Counter()
    second = broker.consumer("sweep", **options)

    @second.on("new_message")
    async def handle(event: NewMessage, feed: str) -> None:
        handled[event.payload.id] += 1

    async with second:
        await wait_for(lambda: second.statistics().acked == len(ids) and second.statistics().in_flight == 0, 5)
    assert handled == dict.fromkeys(ids, 1)
    assert await broker.pending("sweep") == 0


async def test_a_redis_consumer_holds_at_most_max_in_flight_across_partitions(redis_broker: Broker) -> None:
    broker = redis_broker
    broker.partitions = 16
    ids = await fill(broker, 60, feeds=4, chats=10)
    consumer = broker.consumer("bounded", max_in_flight=10, claim_after=30.0)
    release = asyncio.Event()
    peak = 0

    @consumer.on("new_message", concurrency=64)
    async def handle(event: NewMessage, feed: str) -> None:
        await release.wait()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, consumer.statistics().in_flight)
            await asyncio.sleep(0)

    async with consumer:
        sampler = asyncio.create_task(sample())
        try:
            # A fetch is counted at once: past 10, the fetch loop waits for room.
            await wait_for(lambda: consumer.statistics().received >= 10, 5)
            blocked = consumer.statistics()
            release.set()
            await wait_for(lambda: consumer.statistics().acked == len(ids), 10)
        finally:
            sampler.cancel()
            await asyncio.wait([sampler])
    # A read takes one entry from each of as many partitions as there is room for.
    assert blocked.in_flight == 10
    assert peak <= 10, f"{peak} in flight, more than max_in_flight"
    assert await broker.pending("bounded") == 0


# Handlers longer than the broker's patience


async def test_a_jetstream_handler_longer_than_ack_wait_handles_each_event_once(nats_broker: Broker) -> None:
    broker = nats_broker
    ids = await fill(broker, 4, feeds=1, chats=4)  # one chat each: handled side by side
    calls: collections.Counter[str] = collections.Counter()
    consumer = broker.consumer("patient", ack_wait=1.0, heartbeat=0.3)

    @consumer.on("new_message", concurrency=4)
    async def handle(event: NewMessage, feed: str) -> None:
        calls[event.payload.id] += 1
        await asyncio.sleep(HANDLER_TIME)

    async with consumer:
        await wait_for(lambda: consumer.statistics().acked == len(ids), 5)
        statistics = consumer.statistics()
    assert statistics.received == len(ids), "an event was delivered again while its handler ran"
    assert calls == dict.fromkeys(ids, 1)
    assert await broker.pending("patient") == 0


async def test_redis_handlers_longer_than_claim_after_handle_each_event_once_in_the_group(
    redis_broker: Broker,
) -> None:
    broker = redis_broker
    ids = await fill(broker, 4, feeds=1, chats=4)
    calls: collections.Counter[str] = collections.Counter()
    consumers = [broker.consumer("patient", claim_after=1.0, heartbeat=0.3) for _ in range(2)]
    for consumer in consumers:

        @consumer.on("new_message", concurrency=4)
        async def handle(event: NewMessage, feed: str) -> None:
            calls[event.payload.id] += 1
            await asyncio.sleep(HANDLER_TIME)

    async with consumers[0], consumers[1]:
        await wait_for(lambda: sum(consumer.statistics().acked for consumer in consumers) == len(ids), 5)
        received = sum(consumer.statistics().received for consumer in consumers)
    assert received == len(ids), "an event was claimed by the other consumer while its handler ran"
    assert calls == dict.fromkeys(ids, 1)
    assert await broker.pending("patient") == 0


# The bridge


async def test_closing_a_bridge_into_a_frozen_redis_ends_within_seconds(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="chatfeed.bridge")  # publishes and the last save fail, expected
    broker = Broker("redis", redis_server.url)
    pid = redis_server.pid
    assert pid is not None
    async with FeedServer(users={token_of("u0"): "u0"}, compression=None) as server:
        pool = make_pool(server.url)
        pool.add("u0", token=token_of("u0"))
        sink = broker.sink(command_timeout=1.0)
        bridge = Bridge(pool, sink, drain_timeout=0.5, watermark_interval=60, retry_maximum=0.2)
        await bridge.start()
        frozen = False
        try:
            for number in range(20):
                await server.send_raw(message_frame(str(number), f"c{number % 3}", offset=number), user_id="u0")
            await wait_for(lambda: bridge.statistics().published == 20, 5)
            os.kill(pid, signal.SIGSTOP)
            frozen = True
            for number in range(20, 40):
                await server.send_raw(message_frame(str(number), f"c{number % 3}", offset=number), user_id="u0")
            await wait_for(lambda: bridge.statistics().received == 40, 5)
            began = time.monotonic()
            await asyncio.wait_for(bridge.close(), 8)
            took = time.monotonic() - began
        finally:
            if frozen:
                os.kill(pid, signal.SIGCONT)
            await bridge.close()
    assert took < 5.0, f"close() took {took:.1f} s"
    assert bridge.statistics().published < 40


async def test_a_bridge_closed_while_starting_ends_run_and_never_connects(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker("redis", redis_server.url)
    redis_server.stop()
    async with FeedServer(users={token_of("u0"): "u0"}, compression=None) as server:
        pool = make_pool(server.url)
        pool.add("u0", token=token_of("u0"))
        bridge = Bridge(pool, broker.sink(connect_timeout=0.2), start_timeout=None)
        task = asyncio.create_task(bridge.run())
        try:
            await wait_for(lambda: any("trying again" in record.getMessage() for record in caplog.records), 5)
            await asyncio.wait_for(bridge.close(), 2)
            await asyncio.wait_for(task, 2)  # returns, raising nothing
        finally:
            task.cancel()
            await asyncio.wait([task])
        await asyncio.to_thread(redis_server.start)
        # A start loop left running would reach it within its next retry (at most 0.4 s by now).
        await asyncio.sleep(0.6)
        async with broker.redis() as client:
            clients = await client.client_list()
    assert [entry["cmd"] for entry in clients] == ["client|list"], clients


async def test_a_record_jetstream_refuses_is_counted_and_skipped_and_its_chat_goes_on(
    nats_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    broker = nats_broker
    async with broker.nats() as client:
        await client.jetstream(timeout=5).add_stream(
            name=broker.stream, subjects=[f"{broker.prefix}.>"], max_msg_size=1024
        )
    secret = "too long " * 200
    async with FeedServer(users={token_of("u0"): "u0"}, compression=None) as server:
        pool = make_pool(server.url)
        pool.add("u0", token=token_of("u0"))
        async with Bridge(pool, broker.sink()) as bridge:
            await server.send_raw(message_frame("long", "c", content=secret), user_id="u0")
            await server.send_raw(message_frame("short", "c", offset=1), user_id="u0")
            await wait_for(lambda: bridge.statistics().published == 1 and bridge.statistics().held == 0, 5)
            statistics = bridge.statistics()
    assert (statistics.received, statistics.published, statistics.rejected) == (2, 1, 1)
    assert [envelope.id for envelope in check_envelopes(await broker.read_log())] == ["short"]
    rejections = [record.getMessage() for record in caplog.records if "never store" in record.getMessage()]
    assert len(rejections) == 1
    assert "message size exceeds maximum allowed" in rejections[0]
    assert not any("too long" in record.getMessage() for record in caplog.records)


async def test_a_redis_sink_of_another_partition_count_is_a_usage_error_at_once(redis_broker: Broker) -> None:
    broker = redis_broker
    first = RedisStreamSink(broker.url, prefix=broker.prefix, partitions=16)
    await first.open()
    await first.close()
    async with FeedServer(users={token_of("u0"): "u0"}, compression=None) as server:
        pool = make_pool(server.url)
        pool.add("u0", token=token_of("u0"))
        bridge = Bridge(pool, RedisStreamSink(broker.url, prefix=broker.prefix, partitions=8), start_timeout=3)
        began = time.monotonic()
        with pytest.raises(UsageError, match="16 partitions, not 8"):
            await bridge.start()
        assert time.monotonic() - began < 1.0

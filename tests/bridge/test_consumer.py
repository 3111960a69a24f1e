"""Consumers: acknowledged once on success, redelivered up to max_deliver then dead-lettered, shared, in order."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import pytest

from chatfeed import NewMessage
from chatfeed.bridge import Consumer, encode
from chatfeed.testing import make_message

from ._brokers import EPOCH, Broker, check_envelopes, wait_for

MAX_DELIVER = 3


async def fill(broker: Broker, count: int, *, feeds: int = 2, chats: int = 3, start: int = 0) -> list[str]:
    """Put ``count`` messages into the log through a sink; return their ids in order."""
    sink = broker.sink()
    await sink.open()
    ids = []
    try:
        for number in range(start, start + count):
            feed = f"u{number % feeds}"
            message = make_message(id=str(number), chat_id=f"{feed}-c{number % chats}", created_at=EPOCH)
            assert await sink.publish(encode(NewMessage(type="new_message", payload=message), feed))
            ids.append(str(number))
    finally:
        await sink.close()
    return ids


def fast(broker: Broker, durable: str, **options: Any) -> Consumer:
    options.setdefault("max_deliver", MAX_DELIVER)
    options.setdefault("retry_delay", 0.05)
    options.setdefault("retry_maximum", 0.2)
    return broker.consumer(durable, **options)


async def test_failing_events_are_redelivered_up_to_max_deliver_then_dead_lettered(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="chatfeed.bridge")  # the handler's failures, expected
    ids = await fill(broker, 60)
    failing = {id for id in ids if id.endswith("7")}
    calls: collections.Counter[str] = collections.Counter()
    consumer = fast(broker, "work")

    @consumer.on("new_message")
    async def handle(event: NewMessage, feed: str) -> None:
        calls[event.payload.id] += 1
        assert feed == f"u{int(event.payload.id) % 2}"
        if event.payload.id in failing:
            raise RuntimeError("refused on purpose")

    async with consumer:
        await wait_for(
            lambda: (
                consumer.statistics().acked == len(ids) - len(failing)
                and consumer.statistics().dead_lettered == len(failing)
                and consumer.statistics().in_flight == 0
            ),
            15,
        )
        statistics = consumer.statistics()
    assert {id: calls[id] for id in failing} == dict.fromkeys(failing, MAX_DELIVER)
    assert {id: calls[id] for id in ids if id not in failing} == dict.fromkeys(set(ids) - failing, 1)
    assert statistics.retried == len(failing) * (MAX_DELIVER - 1)
    letters = await broker.dead_letters("work")
    assert sorted(envelope.id or "" for envelope in check_envelopes([data for data, _ in letters])) == sorted(failing)
    assert all("RuntimeError" in reason and "handle" in reason for _, reason in letters)
    assert await broker.pending("work") == 0


async def test_two_consumers_of_one_durable_share_the_work(broker: Broker) -> None:
    ids = await fill(broker, 200)
    handled: dict[str, list[str]] = {"a": [], "b": []}
    consumers = {}
    for name in handled:
        consumer = fast(broker, "shared", batch=8, max_in_flight=16)

        def record(name: str) -> Any:
            async def handle(event: NewMessage, feed: str) -> None:
                handled[name].append(event.payload.id)
                await asyncio.sleep(0.001)

            return handle

        consumer.on("new_message")(record(name))
        consumers[name] = consumer
    async with consumers["a"], consumers["b"]:
        await wait_for(lambda: len(handled["a"]) + len(handled["b"]) >= len(ids), 15)
        await wait_for(lambda: all(c.statistics().in_flight == 0 for c in consumers.values()), 5)
    assert sorted(handled["a"] + handled["b"], key=int) == ids
    assert handled["a"] and handled["b"], "one consumer did all the work"
    assert await broker.pending("shared") == 0


async def test_events_yields_feed_and_event_and_acknowledges(broker: Broker) -> None:
    ids = await fill(broker, 30)
    consumer = fast(broker, "stream")
    seen = []
    async with consumer:
        async with consumer.events() as events:
            async for feed, event in events:
                assert isinstance(event, NewMessage)
                assert event.feed == feed
                seen.append(event.payload.id)
                if len(seen) == len(ids):
                    break
        await wait_for(lambda: consumer.statistics().acked == len(ids) and consumer.statistics().in_flight == 0, 5)
    assert sorted(seen, key=int) == ids  # each once (partitions interleave; per-chat order is tested below)
    assert await broker.pending("stream") == 0


async def test_an_unreadable_entry_is_dead_lettered_at_once_and_the_consumer_goes_on(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await fill(broker, 5)
    await broker.append_raw(b"\x00not an envelope")
    ids += await fill(broker, 5, start=5)
    calls: collections.Counter[str] = collections.Counter()
    consumer = fast(broker, "sturdy")

    @consumer.on("new_message")
    async def handle(event: NewMessage, feed: str) -> None:
        calls[event.payload.id] += 1

    async with consumer:
        await wait_for(lambda: consumer.statistics().acked == len(ids) and consumer.statistics().dead_lettered == 1, 10)
        await wait_for(lambda: consumer.statistics().in_flight == 0, 5)
    assert sum(calls.values()) == len(ids)
    ((data, reason),) = await broker.dead_letters("sturdy")
    assert data == b"\x00not an envelope"
    assert reason.startswith("unreadable")
    assert await broker.pending("sturdy") == 0
    assert not any("not an envelope" in record.getMessage() for record in caplog.records)


async def test_one_consumer_with_concurrency_8_keeps_each_chats_order(broker: Broker) -> None:
    ids = await fill(broker, 300, feeds=3, chats=5)
    order: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    running = 0
    most = 0
    consumer = fast(broker, "ordered")

    @consumer.on("new_message", concurrency=8)
    async def handle(event: NewMessage, feed: str) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001 * (int(event.payload.id) % 3))
        order[(feed, event.payload.chat_id)].append(int(event.payload.id))
        running -= 1

    async with consumer:
        await wait_for(lambda: consumer.statistics().acked == len(ids), 15)
    assert sum(map(len, order.values())) == len(ids)
    for chat, numbers in order.items():
        assert numbers == sorted(numbers), chat
    assert most > 1, "the handler never ran concurrently"
    assert await broker.pending("ordered") == 0

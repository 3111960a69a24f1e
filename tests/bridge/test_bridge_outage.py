"""A broker outage: the bridge holds at most its window, loses nothing, stores nothing twice; the feeds stay up."""

from __future__ import annotations

import asyncio
import logging
import time
import tracemalloc

import pytest

from chatfeed.bridge import Bridge, BrokerUnavailableError
from chatfeed.bridge.testing import NatsServer, RedisServer
from chatfeed.testing import FeedServer

from ._brokers import Broker, by_chat, check_envelopes, make_pool, message_frame, token_of, wait_for

FEEDS = 20
CHATS = 3
WINDOW = 256
OUTAGE = 3.0
"""How long the broker is down: a real duration, the scenario's."""


async def test_broker_down_for_3_seconds_loses_nothing_and_holds_at_most_the_window(
    own: tuple[Broker, NatsServer | RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    broker, process = own
    users = {token_of(f"u{index}"): f"u{index}" for index in range(FEEDS)}
    pushed: dict[str, int] = dict.fromkeys(users.values(), 0)
    held: list[int] = []
    async with FeedServer(users=users, compression=None) as server:
        pool = make_pool(server.url)
        for user in users.values():
            pool.add(user, token=token_of(user))
        sink = broker.sink(publish_timeout=0.5) if broker.kind == "nats" else broker.sink()
        async with Bridge(pool, sink, window=WINDOW, retry_maximum=0.2) as bridge:

            async def push_for(user: str) -> None:
                while True:
                    number = pushed[user]
                    frame = message_frame(f"{user}-{number}", f"{user}-c{number % CHATS}", offset=number)
                    await server.send_raw(frame, user_id=user)
                    pushed[user] = number + 1
                    await asyncio.sleep(0.002)

            async def sample() -> None:
                while True:
                    held.append(bridge.statistics().held)
                    await asyncio.sleep(0.005)

            pushers = [asyncio.create_task(push_for(user)) for user in users.values()]
            sampler = asyncio.create_task(sample())
            try:
                await wait_for(lambda: bridge.statistics().published >= 500, 10)
                tracemalloc.start()
                try:
                    await asyncio.to_thread(process.stop)
                    down_at = time.monotonic()
                    await wait_for(lambda: not bridge.statistics().broker_up, 5)
                    await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                held_during = max(held)
                received_during = bridge.statistics().received
                await asyncio.to_thread(process.start)
                await wait_for(lambda: bridge.statistics().broker_up, 10)
                # And a little more traffic after the outage.
                target = bridge.statistics().received + 200
                await wait_for(lambda: bridge.statistics().received >= target, 10)
            finally:
                for task in (*pushers, sampler):
                    task.cancel()
                await asyncio.wait([*pushers, sampler])
            total = sum(pushed.values())
            await wait_for(lambda: bridge.statistics().received == total and bridge.statistics().held == 0, 10)
            statistics = bridge.statistics()
        pool_statistics = pool.statistics()

    envelopes = check_envelopes(await broker.read_log())
    assert len(envelopes) == total
    assert len({envelope.dedup for envelope in envelopes}) == total
    for (feed, chat), ids in by_chat(envelopes).items():
        assert chat is not None
        which = int(chat.rpartition("c")[2])
        assert ids == [f"{feed}-{number}" for number in range(which, pushed[feed], CHATS)], (feed, chat)
    assert max(held) <= WINDOW
    assert held_during == WINDOW, "the window never filled: the outage was not felt"
    assert statistics.retries > 0
    assert pool_statistics.reconnects == 0
    assert pool_statistics.connections == FEEDS
    assert pool_statistics.failed == 0
    print(
        f"\n{broker.kind}: {total} events, {received_during} received before the broker came back, "
        f"held at most {max(held)} (window {WINDOW}), traced peak during the outage {peak / 2**20:.2f} MiB, "
        f"retries {statistics.retries}, duplicates {statistics.duplicates}"
    )
    assert peak < 16 * 2**20


async def test_an_unreachable_broker_at_start_is_a_one_line_error(
    own: tuple[Broker, NatsServer | RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    broker, process = own
    process.stop()
    async with FeedServer(users={token_of("u0"): "u0"}, compression=None) as server:
        pool = make_pool(server.url)
        pool.add("u0", token=token_of("u0"))
        sink = broker.sink(connect_timeout=0.2)
        began = time.monotonic()
        with pytest.raises(BrokerUnavailableError) as caught:
            await asyncio.wait_for(Bridge(pool, sink, start_timeout=0.5).start(), 5)
        assert time.monotonic() - began < 2.0
    assert "\n" not in str(caught.value)
    assert broker.url.rpartition(":")[0] in str(caught.value)
    records = [record for record in caplog.records if record.name.startswith("chatfeed")]
    assert all(record.exc_info is None for record in records)
    assert len([record for record in records if record.levelno >= logging.WARNING]) <= 1


async def test_a_broker_that_comes_up_within_start_timeout_lets_the_bridge_start(
    own: tuple[Broker, NatsServer | RedisServer],
) -> None:
    broker, process = own
    process.stop()
    async with FeedServer(users={token_of("u0"): "u0"}, compression=None) as server:
        pool = make_pool(server.url)
        pool.add("u0", token=token_of("u0"))
        bridge = Bridge(pool, broker.sink(connect_timeout=0.2), start_timeout=10)

        async def start_later() -> None:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(process.start)

        starter = asyncio.create_task(start_later())
        async with bridge:
            await starter
            await server.send_raw(message_frame("1", "c"), user_id="u0")
            await wait_for(lambda: bridge.statistics().published == 1, 5)
    assert [envelope.id for envelope in check_envelopes(await broker.read_log())] == ["1"]

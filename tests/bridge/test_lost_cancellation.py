"""Closing a bridge ends its periodic tasks even when their cancellation is lost in a broker call.

Before Python 3.12, ``asyncio.wait_for`` returns the result of a call that
completes as it is cancelled, and drops the cancellation. nats-py waits for
every reply in one, redis-py for every command's write: a task cancelled while
it waits there goes on. These tests use a sink and a coordinator in memory
whose call ends that way (deterministically), and open no socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pytest

from chatfeed import NewMessage, Pool
from chatfeed.bridge import Bridge, Consumer, Group
from chatfeed.bridge._envelope import Record, encode
from chatfeed.bridge._group import Lease
from chatfeed.testing import make_message


async def _lose_the_cancellation(entered: asyncio.Event) -> None:
    """Wait for a broker's answer that comes with the caller's cancellation: the call returns, as it did."""
    entered.set()
    with contextlib.suppress(asyncio.CancelledError):  # as asyncio.wait_for does when the call is done as it wakes
        await asyncio.Event().wait()


class MemorySink:
    """A sink that stores nothing; its first watermark save loses the cancellation of its caller."""

    def __init__(self) -> None:
        self.saving = asyncio.Event()
        self.saves = 0

    async def open(self) -> None:
        pass

    async def publish(self, record: Record) -> bool:
        return True

    async def load_watermarks(self, feeds: Sequence[str]) -> dict[str, datetime]:
        return {}

    async def save_watermarks(self, marks: Mapping[str, datetime]) -> None:
        self.saves += 1
        if self.saves == 1:
            await _lose_the_cancellation(self.saving)

    async def close(self) -> None:
        pass


class MemoryCoordinator:
    """A group of one worker; the heartbeat of its second round loses the cancellation of its caller."""

    ttl = 0.3

    def __init__(self) -> None:
        self.joining = asyncio.Event()
        self.joins = 0

    async def open(self, *, create: bool = True) -> None:
        pass

    async def join(self, worker: str) -> None:
        self.joins += 1
        if self.joins == 2:  # the first is the bridge's start
            await _lose_the_cancellation(self.joining)

    async def leave(self, worker: str) -> None:
        pass

    async def workers(self) -> list[str]:
        return []

    async def acquire(self, feed: str, worker: str) -> Lease | None:
        return None

    async def renew(self, lease: Lease) -> bool:
        return False

    async def release(self, lease: Lease) -> None:
        pass

    async def holders(self) -> dict[str, tuple[str, int]]:
        return {}

    async def ages(self) -> dict[str, float]:
        return {}

    async def announce_ready(self, feed: str, worker: str) -> None:
        pass

    async def ready_for(self, feed: str) -> str | None:
        return None

    async def close(self) -> None:
        pass


async def _close_within(bridge: Bridge, task: asyncio.Task[None] | None, seconds: float) -> bool:
    """Close ``bridge``; False if that took longer than ``seconds`` (``task`` is then stopped, for the teardown)."""
    closing = asyncio.ensure_future(bridge.close())
    done, _ = await asyncio.wait([closing], timeout=seconds)
    while not closing.done():  # the task lost its cancellation: cancelled again, now in its sleep
        assert task is not None
        task.cancel()
        await asyncio.wait([closing], timeout=0.1)
    return bool(done)


@pytest.mark.timeout(10)
async def test_closing_a_bridge_ends_its_watermark_saves_when_their_cancellation_is_lost() -> None:
    sink = MemorySink()
    bridge = Bridge(Pool("ws://127.0.0.1:9"), sink, watermark_interval=0.01)
    await bridge.start()
    bridge._published_max["feed"] = datetime.now(timezone.utc)  # a watermark to save
    bridge._unsaved.add("feed")
    await sink.saving.wait()
    assert await _close_within(bridge, bridge._flusher, 2.0), "close() waited for the watermark saves forever"


@pytest.mark.timeout(10)
async def test_closing_a_bridge_ends_its_group_rounds_when_their_cancellation_is_lost() -> None:
    coordinator = MemoryCoordinator()
    group = Group(coordinator, {}, worker="w1")
    bridge = Bridge(Pool("ws://127.0.0.1:9"), MemorySink(), group=group)
    await bridge.start()
    await coordinator.joining.wait()  # a round waits for the broker
    assert await _close_within(bridge, group._task, 2.0), "close() waited for the group's rounds forever"


class MemorySource:
    """A log with nothing in it; its second fetch loses the cancellation of its caller."""

    def __init__(self) -> None:
        self.fetching = asyncio.Event()
        self.fetches = 0

    async def open(self) -> None:
        pass

    async def fetch(self, count: int) -> list[Any]:
        self.fetches += 1
        if self.fetches == 2:
            await _lose_the_cancellation(self.fetching)
        else:
            await asyncio.sleep(0.01)
        return []

    async def close(self) -> None:
        pass


@pytest.mark.timeout(10)
async def test_closing_a_consumer_ends_its_fetches_when_their_cancellation_is_lost() -> None:
    source = MemorySource()
    consumer = Consumer("redis://127.0.0.1:9", durable="lost", heartbeat=0.01)
    consumer._source = source  # what it reads from: in memory, no socket

    @consumer.on("new_message")
    async def handle(event: Any, feed: str) -> None:
        pass

    await consumer.start()
    await source.fetching.wait()
    fetcher = consumer._fetcher
    closing = asyncio.ensure_future(consumer.close())
    done, _ = await asyncio.wait([closing], timeout=2.0)
    while not closing.done():  # for the teardown: cancelled again, now that it has lost the first
        assert fetcher is not None
        fetcher.cancel()
        await asyncio.wait([closing], timeout=0.1)
    assert done, "close() waited for the fetches forever"


class DownSink(MemorySink):
    """A broker that is down: every publish fails; the first loses the cancellation of its caller first."""

    def __init__(self) -> None:
        super().__init__()
        self.publishing = asyncio.Event()
        self.publishes = 0

    async def publish(self, record: Record) -> bool:
        self.publishes += 1
        if self.publishes == 1:
            await _lose_the_cancellation(self.publishing)
        raise ConnectionError("the broker is down")


@pytest.mark.timeout(10)
async def test_a_publish_that_lost_its_cancellation_at_close_stops_retrying() -> None:
    sink = DownSink()
    bridge = Bridge(Pool("ws://127.0.0.1:9"), sink, drain_timeout=0.05, retry_initial=0.01, retry_maximum=0.02)
    await bridge.start()
    await bridge._take(NewMessage(type="new_message", payload=make_message(id="m1", chat_id="c1")), "feed")
    await sink.publishing.wait()
    workers = list(bridge._lanes._workers)
    assert len(workers) == 1
    await bridge.close()  # gives up on the record after drain_timeout, and cancels its publish
    done, _ = await asyncio.wait(workers, timeout=2.0)
    retries = sink.publishes
    while not done:  # for the teardown: cancelled again, in its sleep this time
        workers[0].cancel()
        done, _ = await asyncio.wait(workers, timeout=0.1)
    assert retries < 20, f"the publish went on retrying after close(): {retries} tries"


class _SlowDelivery:
    """One event being handled; saying it is still in progress loses the cancellation of the caller once."""

    def __init__(self, data: bytes, extending: asyncio.Event) -> None:
        self.data = data
        self.attempt = 1
        self.position = "1"
        self.extending = extending
        self.extends = 0

    async def extend(self) -> None:
        self.extends += 1
        if self.extends == 1:
            await _lose_the_cancellation(self.extending)

    async def ack(self) -> None:
        pass

    async def retry(self, delay: float) -> None:
        pass

    async def release(self) -> None:
        pass

    async def dead_letter(self, reason: str) -> None:
        pass


class OneEventSource(MemorySource):
    """A log of one event, fetched once."""

    def __init__(self) -> None:
        super().__init__()
        record = encode(NewMessage(type="new_message", payload=make_message(id="m1", chat_id="c1")), "feed")
        self.delivery = _SlowDelivery(record.data, asyncio.Event())

    async def fetch(self, count: int) -> list[Any]:
        self.fetches += 1
        await asyncio.sleep(0.01)
        return [self.delivery] if self.fetches == 1 else []


@pytest.mark.timeout(10)
async def test_closing_a_consumer_ends_its_heartbeats_when_their_cancellation_is_lost() -> None:
    source = OneEventSource()
    consumer = Consumer("redis://127.0.0.1:9", durable="lost", heartbeat=0.02, drain_timeout=0.05)
    consumer._source = source  # what it reads from: in memory, no socket

    @consumer.on("new_message")
    async def handle(event: Any, feed: str) -> None:
        await asyncio.Event().wait()  # a long call: its event is said to be in progress meanwhile

    await consumer.start()
    await source.delivery.extending.wait()
    extender = consumer._extender
    closing = asyncio.ensure_future(consumer.close())
    done, _ = await asyncio.wait([closing], timeout=2.0)
    while not closing.done():  # for the teardown: cancelled again, now that it has lost the first
        assert extender is not None
        extender.cancel()
        await asyncio.wait([closing], timeout=0.1)
    assert done, "close() waited for the heartbeats forever"

"""The bridge's own promises, through a sink that fails on purpose.

`FlakySink` is a real `Sink`: an in-memory log that stores each dedup id once,
and that a test makes refuse publishes, lose their acknowledgement after
storing (the record is in the log but the bridge is told it failed), or hold
them. Through it, with a real FeedServer and Pool: per-chat order in the log
whatever fails, every event stored once, the window bounds what is held, the
watermark never passes an event that is not stored, and close() drains.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import pytest

import chatfeed
from chatfeed.bridge import Bridge, Envelope, Record, Sink
from chatfeed.exceptions import UsageError
from chatfeed.testing import FeedServer

from ..integration.conftest import WAIT

USERS = {f"token-{number}": f"user-{number}" for number in range(4)}
_SERIALS = itertools.count()


class FlakySink:
    """An in-memory log behind the `Sink` protocol, with failures on demand."""

    def __init__(self, *, seed: int = 0) -> None:
        self.log: list[Record] = []
        self.ids: set[str] = set()
        self.marks: dict[str, datetime] = {}
        self.saved_marks: list[dict[str, datetime]] = []
        self.fail_rate = 0.0  # refused before storing
        self.lose_ack_rate = 0.0  # stored, then reported as failed
        self.gate: asyncio.Event | None = None  # when set to a cleared event, publishes wait for it
        self.publishes = 0
        self.in_flight: set[tuple[str, str | None]] = set()
        self.same_chat_at_once = 0  # publishes that began while another of their chat was in flight
        self.closed = False
        self._random = random.Random(seed)
        self._changed = asyncio.Event()

    async def open(self) -> None:
        pass

    async def publish(self, record: Record) -> bool:
        self.publishes += 1
        lane = (record.feed, record.chat)
        if lane in self.in_flight:
            self.same_chat_at_once += 1
        self.in_flight.add(lane)
        try:
            await asyncio.sleep(0)  # a round trip: the other lanes' publishes run meanwhile
            if self.gate is not None:
                await self.gate.wait()
            if self._random.random() < self.fail_rate:
                raise ConnectionError("refused on purpose")
            stored = record.dedup not in self.ids
            if stored:
                self.ids.add(record.dedup)
                self.log.append(record)
                self._changed.set()
            if self._random.random() < self.lose_ack_rate:
                raise TimeoutError("acknowledgement lost on purpose")
            return stored
        finally:
            self.in_flight.discard(lane)

    async def load_watermarks(self, feeds: Sequence[str]) -> dict[str, datetime]:
        return {feed: self.marks[feed] for feed in feeds if feed in self.marks}

    async def save_watermarks(self, marks: Mapping[str, datetime]) -> None:
        self.marks.update(marks)
        self.saved_marks.append(dict(marks))

    async def close(self) -> None:
        self.closed = True

    async def wait_for(self, count: int) -> None:
        async def stored() -> None:
            while len(self.log) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(stored(), WAIT)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Return once ``predicate()`` holds: the bridge's own counters have no event to wait on."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def make_pool(server: FeedServer, **options: object) -> chatfeed.Pool:
    pool = chatfeed.Pool(server.url, **options)  # type: ignore[arg-type]
    for token, user in USERS.items():
        pool.add(user, token=token)
    return pool


async def push(server: FeedServer, count: int, *, chats: int = 3) -> list[tuple[str, str, str]]:
    """Push ``count`` messages to each user over ``chats`` chats; return (user, chat, id) in push order."""
    pushed = []
    for number in range(count):
        serial = next(_SERIALS)
        for user in USERS.values():
            chat = f"{user}-c{number % chats}"
            message = await server.push_message(user_id=user, chat_id=chat, id=f"{user}-{serial}")
            pushed.append((user, chat, message.id))
    return pushed


def per_chat(records: list[Record]) -> dict[tuple[str, str | None], list[str]]:
    order: dict[tuple[str, str | None], list[str]] = {}
    for record in records:
        envelope = Envelope.decode(record.data)
        order.setdefault((envelope.feed, envelope.chat), []).append(str(envelope.id))
    return order


def test_flaky_sink_is_a_sink() -> None:
    assert isinstance(FlakySink(), Sink)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_per_chat_order_and_once_each_whatever_the_broker_does(seed: int) -> None:
    sink = FlakySink(seed=seed)
    sink.fail_rate = 0.3
    sink.lose_ack_rate = 0.2
    async with FeedServer(users=USERS) as server:
        bridge = Bridge(make_pool(server), sink, window=32, concurrency=8, retry_initial=0.001, retry_maximum=0.005)
        async with bridge:
            pushed = await push(server, 40)
            await sink.wait_for(len(pushed))
        stats = bridge.statistics()
    expected: dict[tuple[str, str | None], list[str]] = {}
    for user, chat, identity in pushed:
        expected.setdefault((user, chat), []).append(identity)
    assert per_chat(sink.log) == expected  # every message once, and each chat in the order pushed
    assert stats.published == len(pushed)
    assert stats.retries > 0 and stats.duplicates > 0  # the failures happened, and lost acks came back as duplicates
    assert stats.held == 0 and sink.closed
    assert sink.same_chat_at_once == 0


async def test_the_window_bounds_what_is_held_and_the_feeds_wait() -> None:
    sink = FlakySink()
    sink.gate = asyncio.Event()  # the broker holds every publish
    async with FeedServer(users=USERS) as server:
        pool = make_pool(server)
        bridge = Bridge(pool, sink, window=10, concurrency=4)
        async with bridge:
            pushed = await push(server, 30)
            await eventually(lambda: bridge.statistics().held >= 10)
            for _ in range(5):  # and it stays so: the feeds are not read meanwhile
                await asyncio.sleep(0.01)
                assert bridge.statistics().held == 10  # never more, though 120 were pushed
                # At most one publish per worker in flight, each of a different chat.
                assert sink.publishes == len(sink.in_flight) <= 4
            sink.gate.set()
            await sink.wait_for(len(pushed))
            assert pool.statistics().reconnects == 0
    assert len(sink.log) == len(pushed)
    assert sink.same_chat_at_once == 0


async def test_the_watermark_never_passes_an_event_not_yet_stored() -> None:
    sink = FlakySink()
    async with FeedServer(users=USERS) as server:
        pool = make_pool(server)
        bridge = Bridge(pool, sink, window=100, concurrency=4, watermark_interval=0.01)
        async with bridge:
            await push(server, 5)
            await sink.wait_for(20)
            await eventually(lambda: len(sink.marks) == len(USERS))
            stored_marks = dict(sink.marks)
            for feed, mark in stored_marks.items():
                assert mark == max(r.created for r in sink.log if r.feed == feed and r.created is not None)
            sink.gate = asyncio.Event()  # the broker stops storing
            held = await push(server, 3)
            await eventually(lambda: bridge.statistics().held >= len(held))
            for _ in range(3):  # a few save intervals: nothing moves while nothing is stored
                await asyncio.sleep(0.02)
            assert sink.marks == stored_marks
            sink.gate.set()
            await sink.wait_for(20 + len(held))
    # At the end, each feed's saved watermark is its newest stored event.
    for feed, mark in sink.marks.items():
        assert mark == max(r.created for r in sink.log if r.feed == feed and r.created is not None)


async def test_close_saves_the_oldest_unstored_event_as_the_watermark() -> None:
    sink = FlakySink()
    async with FeedServer(users=USERS) as server:
        pool = make_pool(server)
        bridge = Bridge(pool, sink, window=100, concurrency=4, drain_timeout=0.05, watermark_interval=60)
        await bridge.start()
        await push(server, 2)
        await sink.wait_for(8)
        sink.gate = asyncio.Event()  # from now on nothing is stored
        stuck = await push(server, 2)
        await eventually(lambda: bridge.statistics().held >= len(stuck))
        await bridge.close()
        oldest: dict[str, str] = {}
        for user, _, identity in stuck:
            oldest.setdefault(user, identity)
        for user, identity in oldest.items():
            message = next(m for m in server.history() if m.id == identity)
            assert sink.marks[user] == message.created_at  # a bridge started again backfills from it: nothing lost


async def test_a_restarted_bridge_resumes_each_feed_from_its_watermark() -> None:
    sink = FlakySink()
    async with FeedServer(users=USERS) as server:

        def backfill(gap: chatfeed.Gap) -> list[chatfeed.Message | chatfeed.Chat]:
            return server.history(gap.since, user_id=gap.feed)

        first = Bridge(make_pool(server, backfill=backfill), sink, watermark_interval=0.01)
        async with first:
            for user in USERS.values():  # the history knows a user's messages by the user's chats
                for number in range(3):
                    await server.push_chat(user_id=user, id=f"{user}-c{number}")
            await push(server, 3)
            await sink.wait_for(24)
        missed = await push(server, 2)  # no bridge runs: only the backfill can bring them
        second = Bridge(make_pool(server, backfill=backfill), sink)
        async with second:
            await sink.wait_for(24 + len(missed))
        assert second.statistics().duplicates >= len(USERS)  # the watermark's own event, fetched again
    assert len(sink.log) == 24 + len(missed)
    backfilled = [Envelope.decode(r.data) for r in sink.log[24:]]
    assert {e.source for e in backfilled} == {"backfill"}
    assert sorted(str(e.id) for e in backfilled) == sorted(identity for _, _, identity in missed)


async def test_bad_arguments_are_usage_errors() -> None:
    async with FeedServer(users=USERS) as server:
        pool = make_pool(server)
        with pytest.raises(UsageError, match="window"):
            Bridge(pool, FlakySink(), window=0)
        with pytest.raises(UsageError, match="sink"):
            Bridge(pool, object())  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="pool"):
            Bridge(object(), FlakySink())  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="watermark_interval"):
            Bridge(pool, FlakySink(), watermark_interval=-1)
        bridge = Bridge(pool, FlakySink())
        async with bridge:
            with pytest.raises(UsageError, match="starts once"):
                await bridge.start()
            with pytest.raises(UsageError, match="not started"):
                Bridge(pool, FlakySink())

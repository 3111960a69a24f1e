"""Issue 14's proof: bridge workers in a group share the feeds, and a crash, a join or a SIGTERM loses nothing.

The CLI tests run ``chatfeed bridge --group`` processes against a FeedServer
of this process (its ``/history`` is the backfill) and a broker of the
session, under a continuous stream of messages; the log is read back at the
end: every event pushed once, no dedup id twice, each chat in push order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chatfeed.bridge import Bridge, Envelope, Group, JetStreamCoordinator, RedisCoordinator
from chatfeed.bridge._assign import owner
from chatfeed.bridge._envelope import Record
from chatfeed.bridge._group import Coordinator, _is_up
from chatfeed.testing import FeedServer

from ._brokers import Broker, make_pool, token_of
from ._group_helpers import Cluster, WatchedFeedServer, check_order, moved

FEEDS = int(os.environ.get("CHATFEED_GROUP_FEEDS", "150"))
"""Feeds of the CLI scenarios: 150 in the suite (which must stay under two minutes on two cores); .ci/run
also runs the issue's 3 x 600 (1,800), one scenario at a time, about 90 s."""

TTL = 2.0
SETTLE = 30.0
"""How long a group may take to settle (start, join, leave): make before break, one round every TTL / 3."""


@pytest.fixture
async def server(caplog: pytest.LogCaptureFixture) -> AsyncIterator[WatchedFeedServer]:
    # Thousands of connections and frames: the server's own debug lines would be most of the test's time.
    caplog.set_level(logging.WARNING, logger="websockets")
    async with WatchedFeedServer(users={}) as server:
        yield server


@pytest.fixture
async def cluster(broker: Broker, server: WatchedFeedServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(broker, server, tmp_path, FEEDS, TTL)
    try:
        yield cluster
    finally:
        await cluster.close()


async def started(cluster: Cluster, names: list[str]) -> dict[str, str]:
    """Start workers ``names``, settle, push every feed's chats; return the holders once every watermark is saved."""
    for name in names:
        await cluster.start(name)
    holders, took = await cluster.settle(names, SETTLE)
    print(f"{len(names)} workers x {len(cluster.users)} feeds settled in {took:.1f} s")
    await cluster.push_chats()
    await cluster.wait_for_watermarks(SETTLE)
    return holders


async def streaming(cluster: Cluster) -> asyncio.Future[None]:
    return asyncio.ensure_future(cluster.stream(per_tick=5, tick=0.01))


async def stop(stream: asyncio.Future[None]) -> None:
    stream.cancel()
    await asyncio.wait([stream])


@pytest.mark.timeout(90)
async def test_kill_9_a_worker_its_feeds_are_held_again_within_ttl_plus_5_s_and_nothing_is_lost(
    cluster: Cluster,
) -> None:
    await started(cluster, ["w1", "w2", "w3"])
    stream = await streaming(cluster)
    try:
        await cluster.streamed(300)  # mid-stream: the workers publish (about 0.6 s)
        killed = time.monotonic()
        await cluster.workers["w1"].kill()
        _, took = await cluster.settle(["w2", "w3"], TTL + 5)
        print(f"kill -9: the dead worker's feeds held again {took:.2f} s after (TTL {TTL:g} s)")
        assert time.monotonic() - killed <= TTL + 5
        await cluster.streamed(250)  # and the stream goes on
    finally:
        await stop(stream)
    log = await cluster.complete_log(SETTLE)
    cluster.check_log(log)
    print(f"log: {len(log)} events, {len(cluster.pushed)} pushed")
    assert any(envelope.source == "backfill" for envelope in log)  # what nobody was connected for


@pytest.mark.timeout(90)
async def test_a_fourth_worker_takes_about_a_quarter_and_the_handoff_loses_nothing_and_keeps_order(
    cluster: Cluster,
) -> None:
    before = await started(cluster, ["w1", "w2", "w3"])
    stream = await streaming(cluster)
    try:
        await cluster.streamed(250)
        await cluster.start("w4")
        after, took = await cluster.settle(["w1", "w2", "w3", "w4"], SETTLE)
        await cluster.streamed(250)
    finally:
        await stop(stream)
    fraction = moved(before, after) / len(after)
    print(f"join: {fraction:.1%} of the feeds moved, settled in {took:.1f} s")
    assert fraction <= 1 / 4 + 0.05
    assert all(before[feed] == worker for feed, worker in after.items() if worker != "w4")  # only to the new one
    log = await cluster.complete_log(SETTLE)
    cluster.check_log(log)


@pytest.mark.timeout(90)
async def test_sigterm_hands_the_feeds_over_make_before_break_and_exits_0(
    cluster: Cluster, server: WatchedFeedServer
) -> None:
    before = await started(cluster, ["w1", "w2", "w3"])
    leaving = {cluster.users[feed] for feed, worker in before.items() if worker == "w3"}
    stream = await streaming(cluster)
    try:
        await cluster.streamed(250)
        terminated = time.monotonic()
        status = await cluster.workers["w3"].finish(signal.SIGTERM, SETTLE)
        _, took = await cluster.settle(["w1", "w2"], SETTLE)
        gap = server.longest_gap(leaving, terminated)
        await cluster.streamed(250)
    finally:
        await stop(stream)
    print(f"SIGTERM: exit {status}, {len(leaving)} feeds moved in {took:.1f} s; longest gap {gap * 1000:.0f} ms")
    assert status == 0, cluster.workers["w3"].err
    assert gap < 0.2, "a feed had no connection for longer than a reconnect"
    log = await cluster.complete_log(SETTLE)
    cluster.check_log(log)


# Fencing, in one process


class RecordingSink:
    """A sink that notes when each publish starts, by feed."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.calls: list[tuple[float, str, str]] = []  # (time.monotonic(), feed, dedup)

    async def open(self) -> None:
        await self.sink.open()

    async def publish(self, record: Record) -> bool:
        self.calls.append((time.monotonic(), record.feed, record.dedup))
        stored: bool = await self.sink.publish(record)
        return stored

    async def load_watermarks(self, feeds: Any) -> Any:
        return await self.sink.load_watermarks(feeds)

    async def save_watermarks(self, marks: Any) -> None:
        await self.sink.save_watermarks(marks)

    async def close(self) -> None:
        await self.sink.close()


FENCE_TTL = 1.0


def coordinator_for(broker: Broker, group: str) -> Coordinator:
    if broker.kind == "nats":
        return JetStreamCoordinator(broker.url, group, ttl=FENCE_TTL)
    return RedisCoordinator(broker.url, group, prefix=broker.prefix, ttl=FENCE_TTL)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("w2_stays", [True, False], ids=["then-shares", "then-takes-back"])
async def test_a_worker_whose_renewals_stop_publishes_nothing_after_ttl_2_and_the_next_holder_loses_nothing(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, w2_stays: bool
) -> None:
    users = {f"feed-{number}": f"user-{number}" for number in range(4)}
    group = f"fence{time.monotonic_ns()}"
    async with FeedServer(users={token_of(user): user for user in users.values()}) as server:

        def backfill(gap: Any) -> Any:
            return server.history(gap.since, user_id=users[gap.feed])

        def bridge(name: str) -> tuple[Bridge, Group, RecordingSink]:
            coordinator = coordinator_for(broker, group)
            # A short handoff_timeout: what this test proves is the fence, not the handoffs of the closes
            # at its end. (Its timeout in CI's Python 3.10 run was a close() that waited forever for rounds
            # whose cancellation asyncio.wait_for had lost: see test_lost_cancellation.py.)
            member = Group(
                coordinator, {feed: token_of(user) for feed, user in users.items()}, worker=name, handoff_timeout=3.0
            )
            sink = RecordingSink(broker.sink())
            made = Bridge(make_pool(server.url, backfill=backfill), sink, group=member, watermark_interval=0.1)
            return made, member, sink

        pushed: list[tuple[str, str]] = []
        numbers = iter(range(1, 1_000_000))

        async def push(rounds: int) -> None:
            for _ in range(rounds):
                for feed, user in users.items():
                    number = str(next(numbers))
                    await server.push_message(id=number, chat_id=f"{user}-chat", user_id=user)
                    pushed.append((feed, number))
                await asyncio.sleep(0.01)

        async def log_has_everything() -> list[Envelope]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                log = [Envelope.decode(data) for data in await broker.read_log()]
                if {(envelope.feed, envelope.id) for envelope in log} >= set(pushed):
                    return log
                assert loop.time() < deadline, f"{len(set(pushed))} pushed, {len(log)} in the log"
                await asyncio.sleep(0.05)

        first, first_group, first_sink = bridge("w1")
        async with first:
            while len(server._by_user) < len(users):  # noqa: ASYNC110  # every feed connected
                await asyncio.sleep(0.01)
            for feed, user in users.items():
                await server.push_chat(id=f"{user}-chat", user_id=user)
                pushed.append((feed, f"{user}-chat"))
            await push(5)
            await log_has_everything()
            assert first_group.held == sorted(users)

            # w1's renewals hang (a long pause, a partition): its group's round stops at the first one.
            thaw = asyncio.Event()
            frozen_at: list[float] = []
            renew = first_group.coordinator.renew

            async def frozen(lease: Any) -> bool:
                if not frozen_at:
                    frozen_at.append(time.monotonic())
                await thaw.wait()
                return await renew(lease)

            monkeypatch.setattr(first_group.coordinator, "renew", frozen)
            while not frozen_at:  # noqa: ASYNC110  # the next round
                await asyncio.sleep(0.01)
            fence = max(first_group._valid_until.values())
            assert fence - frozen_at[0] <= FENCE_TTL / 2

            second, second_group, second_sink = bridge("w2")
            async with second:
                pusher = asyncio.ensure_future(push(1_000_000))
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while second_group.held != sorted(users):
                    assert loop.time() < deadline, f"w2 holds {second_group.held}"
                    await asyncio.sleep(0.02)
                taken = time.monotonic()
                await asyncio.sleep(0.5)  # w1 still has the feeds connected, and receives this
                pusher.cancel()
                await asyncio.wait([pusher])
                await log_has_everything()
                late = [call for call in first_sink.calls if call[0] > fence + 0.01]
                print(
                    f"fence: w1 froze at 0, could publish until {fence - frozen_at[0]:.2f} s, "
                    f"w2 took every feed at {taken - frozen_at[0]:.2f} s; w1 published {len(late)} after its fence"
                )
                assert late == [], "the stale worker published after its lease's validity"
                assert first.statistics().received > first.statistics().published  # it had records, held back

                # w1 thaws: its renewals fail and it drops the feeds; then it takes back its share (w2 stays,
                # make before break) or every feed (w2 has left: their leases are free), and publishes for them.
                if not w2_stays:
                    await second.close()
                thaw.set()
                share = sorted(feed for feed in users if not w2_stays or owner(feed, ["w1", "w2"]) == "w1")
                deadline = loop.time() + 10
                while first_group.held != share:
                    assert loop.time() < deadline, f"w1 holds {first_group.held}"
                    await asyncio.sleep(0.02)
                await push(5)
                log = await log_has_everything()
                # What w1 held of its first hold was dropped, not kept for its second: nothing stays held.
                deadline = loop.time() + 5
                while first.statistics().held:
                    assert loop.time() < deadline, f"w1 still holds {first.statistics().held} records"
                    await asyncio.sleep(0.02)
                assert sorted((envelope.feed, envelope.id) for envelope in log) == sorted(pushed)
                assert len({envelope.dedup for envelope in log}) == len(log)
                check_order(log)
                assert second_sink.calls


@pytest.mark.timeout(30)
async def test_an_event_pushed_after_the_lease_is_taken_but_before_the_feed_is_connected_is_backfilled(
    broker: Broker,
) -> None:
    # A feed the group has never bridged is bridged from the moment its lease is taken: what the
    # chat server pushed before the first connection was authenticated comes from the history.
    user = "late-user"
    group = f"late{time.monotonic_ns()}"
    async with FeedServer(users={token_of(user): user}) as server:
        taken = asyncio.Event()
        connect = asyncio.Event()

        async def token() -> str:
            taken.set()  # the lease is held: the pool asks for the token
            await connect.wait()
            return token_of(user)

        def backfill(gap: Any) -> Any:
            return server.history(gap.since, user_id=user)

        member = Group(coordinator_for(broker, group), {"late-feed": token}, worker="w1")
        bridge = Bridge(make_pool(server.url, backfill=backfill), broker.sink(), group=member)
        starting = asyncio.ensure_future(bridge.start())  # returns once the feed has authenticated
        try:
            await asyncio.wait_for(taken.wait(), 10)
            assert member.held == ["late-feed"]
            await server.push_chat(id="early-chat", user_id=user)
            connect.set()
            await asyncio.wait_for(starting, 10)
            await server.push_chat(id="live-chat", user_id=user)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                ids = sorted(envelope.id or "" for envelope in map(Envelope.decode, await broker.read_log()))
                if ids == ["early-chat", "live-chat"] or loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert ids == ["early-chat", "live-chat"]
        finally:
            connect.set()
            await asyncio.wait([starting])
            await bridge.close()


class FlakyLoadSink(RecordingSink):
    """A sink whose next ``fail_loads`` watermark loads fail, as when the broker blinks while feeds are added."""

    def __init__(self, sink: Any) -> None:
        super().__init__(sink)
        self.fail_loads = 0
        self.failed = 0

        self.failed_at: list[float] = []

    async def load_watermarks(self, feeds: Any) -> Any:
        if self.fail_loads:
            self.fail_loads -= 1
            self.failed += 1
            self.failed_at.append(time.monotonic())
            raise ConnectionError("the broker blinked")
        return await super().load_watermarks(feeds)


@pytest.mark.timeout(40)
async def test_a_feed_whose_add_failed_as_it_was_taken_over_is_added_by_a_later_round_and_bridged(
    broker: Broker,
) -> None:
    # w2 holds every feed; w1 joins and takes its share; w1 leaves, and w2's first four tries to
    # take that share back fail while adding the feeds to its pool. The fifth round adds them.
    failures = 4
    users = {f"feed-{number}": f"user-{number}" for number in range(6)}
    feeds = {feed: token_of(user) for feed, user in users.items()}
    group = f"repair{time.monotonic_ns()}"
    async with FeedServer(users={token_of(user): user for user in users.values()}) as server:
        loop = asyncio.get_running_loop()

        async def until(condition: Any, what: Any) -> None:
            deadline = loop.time() + 15
            while not condition():
                assert loop.time() < deadline, what()
                await asyncio.sleep(0.02)

        flaky = FlakyLoadSink(broker.sink())
        w2_group = Group(coordinator_for(broker, group), feeds, worker="w2", handoff_timeout=3.0)
        async with Bridge(make_pool(server.url), flaky, group=w2_group) as w2:
            await until(lambda: w2_group.held == sorted(users), lambda: f"w2 holds {w2_group.held}")
            w1_group = Group(coordinator_for(broker, group), feeds, worker="w1", handoff_timeout=3.0)
            share = sorted(feed for feed in users if owner(feed, ["w1", "w2"]) == "w1")
            assert share, "w1 has a share of these feeds"
            async with Bridge(make_pool(server.url), broker.sink(), group=w1_group):
                await until(lambda: w1_group.held == share, lambda: f"w1 holds {w1_group.held}")
                await until(lambda: not any(feed in w2.pool for feed in share), lambda: "w2 still has w1's share")
                flaky.fail_loads = failures
            await until(lambda: w2_group.held == sorted(users), lambda: f"w2 holds {w2_group.held}")
            await until(lambda: flaky.failed == failures, lambda: f"{flaky.failed} loads failed")
            # A round that failed after its renewals is tried again at its time (every ttl / 3), not every
            # ttl / 20 as one that could not renew: the broker is not asked to renew everything 7 times as often.
            spans = [later - earlier for earlier, later in itertools.pairwise(flaky.failed_at)]
            assert all(span > FENCE_TTL / 3 * 0.8 for span in spans), spans
            await until(lambda: all(_is_up(w2.pool, feed) for feed in users), lambda: "not every feed is up")
            for user in users.values():
                await server.push_chat(id=f"{user}-chat", user_id=user)

            async def logged() -> set[str]:
                return {Envelope.decode(data).id or "" for data in await broker.read_log()}

            deadline = loop.time() + 10
            while (ids := await logged()) != {f"{user}-chat" for user in users.values()}:
                assert loop.time() < deadline, f"in the log: {sorted(ids)}"
                await asyncio.sleep(0.05)

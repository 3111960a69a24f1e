"""Issue 14, the deployment page's "chat server is down" row: a group of two workers while the chat server is away.

Two in-process bridges of one group share 30 feeds of a FeedServer under a
stream of messages, each feed backfilled over HTTP from the server's own
``/history`` (as ``chatfeed bridge --backfill-url`` does: the history is away
with the feed). The chat server drops every connection (TCP reset) and stops
listening, then starts again on the same port with its history. Messages are
pushed right up to the drop, and one to every feed just after it, which no
connection can have received: those come by backfill only.

- Two workers, no handoff: every feed reconnects with backoff and backfills
  its gap; no lease moves (they have nothing to do with the chat server).
- A worker joins while the server is away: it cannot connect its feeds, so it
  never says it is ready; the holder lets its share go anyway after
  ``handoff_timeout``, the newcomer takes the leases, and once the server is
  back it connects them and backfills from the watermarks.

Either way the log has every event pushed, once, each chat in push order, and
neither worker stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from chatfeed import Backoff
from chatfeed._http_backfill import http_backfill
from chatfeed.bridge import Bridge, Envelope, Group, JetStreamCoordinator, RedisCoordinator
from chatfeed.bridge._group import Coordinator, Lease, _key

from ._brokers import Broker, make_pool, token_of
from ._group_helpers import Cluster, WatchedFeedServer

FEEDS = 30
TTL = 2.0
DOWN = 2.0
"""How long the chat server is away in the first scenario: the leases (TTL 2 s) are renewed throughout."""
HANDOFF = 1.5
"""The holder's handoff_timeout in the second scenario: it lets a feed go this long after it saw the newcomer."""
RECONNECT = Backoff(initial=0.05, maximum=0.4, reset_after=1.0)
"""The feeds' backoff: a wait of up to 0.4 s between refused attempts, so 30 feeds try about 150 times a second."""
BACK_WITHIN = 5.0
"""Every feed has a connection again within this of the server's return: a backoff wait, a handshake, a backfill."""


@pytest.fixture
async def server(caplog: pytest.LogCaptureFixture) -> AsyncIterator[WatchedFeedServer]:
    caplog.set_level(logging.WARNING, logger="websockets")
    async with WatchedFeedServer(users={}) as server:
        yield server


class Recorded:
    """A coordinator that notes when its worker joined, let leases go, and said it was ready."""

    def __init__(self, inner: JetStreamCoordinator | RedisCoordinator) -> None:
        self.inner = inner
        self.ttl = inner.ttl
        self.joined: float | None = None  # before the first join was sent: nobody saw the worker earlier
        self.released: dict[str, float] = {}  # feed: before its release was sent
        self.announced: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # fence_of (Redis) where the inner coordinator has one

    async def open(self, *, create: bool = True) -> None:
        await self.inner.open(create=create)

    async def join(self, worker: str) -> None:
        if self.joined is None:
            self.joined = time.monotonic()
        await self.inner.join(worker)

    async def leave(self, worker: str) -> None:
        await self.inner.leave(worker)

    async def workers(self) -> list[str]:
        return await self.inner.workers()

    async def acquire(self, feed: str, worker: str) -> Lease | None:
        return await self.inner.acquire(feed, worker)

    async def renew(self, lease: Lease) -> bool:
        return await self.inner.renew(lease)

    async def release(self, lease: Lease) -> None:
        self.released.setdefault(lease.feed, time.monotonic())
        await self.inner.release(lease)

    async def holders(self) -> dict[str, tuple[str, int]]:
        return await self.inner.holders()

    async def ages(self) -> dict[str, float]:
        return await self.inner.ages()

    async def announce_ready(self, feed: str, worker: str) -> None:
        self.announced.append(feed)
        await self.inner.announce_ready(feed, worker)

    async def ready_for(self, feed: str) -> str | None:
        return await self.inner.ready_for(feed)

    async def close(self) -> None:
        await self.inner.close()


def coordinator_for(broker: Broker, group: str) -> JetStreamCoordinator | RedisCoordinator:
    if broker.kind == "nats":
        return JetStreamCoordinator(broker.url, group, ttl=TTL)
    return RedisCoordinator(broker.url, group, prefix=broker.prefix, ttl=TTL)


async def wait_until(what: str, check: Callable[[], Awaitable[bool] | bool], timeout: float) -> float:
    """Poll ``check`` until it is true; return how long it took."""
    began = time.monotonic()
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return time.monotonic() - began
        assert time.monotonic() - began < timeout, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(0.01)


class Scene:
    """The cluster, its in-process workers, and a stream of messages that stops between two pushes."""

    def __init__(self, broker: Broker, server: WatchedFeedServer, tmp: Path) -> None:
        self.broker = broker
        self.server = server
        self.cluster = Cluster(broker, server, tmp, FEEDS, TTL)
        self.users = self.cluster.users
        self.tokens = {feed: token_of(user) for feed, user in self.users.items()}
        self.bridges: dict[str, Bridge] = {}
        self.coordinators: dict[str, Recorded] = {}
        self.runs: dict[str, asyncio.Future[None]] = {}
        self.look: Coordinator = coordinator_for(broker, self.cluster.group)  # the test's own look at the group
        self._numbers = itertools.count(1)
        self._streaming = asyncio.Event()
        self._stream: asyncio.Future[None] | None = None

    async def start(self, name: str, handoff_timeout: float) -> None:
        coordinator = self.coordinators[name] = Recorded(coordinator_for(self.broker, self.cluster.group))
        group = Group(coordinator, self.tokens, worker=name, handoff_timeout=handoff_timeout)
        # The history over HTTP, from the chat server itself: away while it is.
        backfill = http_backfill(f"http://127.0.0.1:{self.server.port}/history", self.tokens)
        # The watermarks where Cluster reads them: the stream's default bucket, as the CLI's.
        sink = self.broker.sink(bucket=True) if self.broker.kind == "nats" else self.broker.sink()
        pool = make_pool(self.server.url, backfill=backfill, reconnect=RECONNECT)
        bridge = self.bridges[name] = Bridge(pool, sink, group=group, watermark_interval=0.2)
        self.runs[name] = asyncio.ensure_future(bridge.run())

    def published(self) -> int:
        return sum(bridge.statistics().published for bridge in self.bridges.values())

    async def push(self, feed: str) -> None:
        number = next(self._numbers)
        user = self.users[feed]
        chat = f"{user}{'ab'[number // FEEDS % 2]}"
        await self.server.push_message(id=str(number), chat_id=chat, user_id=user)
        self.cluster.pushed.append((feed, "new_message", str(number)))

    async def _run_stream(self) -> None:
        feeds = itertools.cycle(self.users)
        while self._streaming.is_set():
            for _ in range(5):
                await self.push(next(feeds))
            await asyncio.sleep(0.01)

    async def stream(self) -> None:
        """Start pushing 5 messages every 10 ms, to the feeds in turn; wait until 100 more are published."""
        self._streaming.set()
        self._stream = asyncio.ensure_future(self._run_stream())
        count = self.published()
        await wait_until("publishing", lambda: self.published() > count + 100, 10)

    async def pause(self) -> None:
        """Stop pushing, after a whole push (a cancelled push could be in the history and not in `pushed`)."""
        self._streaming.clear()
        if self._stream is not None:
            await self._stream

    async def leases(self) -> dict[str, tuple[str, int]]:
        """Every feed's lease: its holder and fencing token, by feed."""
        held = await self.look.holders()
        names = {_key(feed) if self.broker.kind == "nats" else feed: feed for feed in self.users}
        return {names[key]: lease for key, lease in held.items() if key in names}

    async def go_away(self) -> list[tuple[str, str, str]]:
        """Reset every connection, push one message to every feed, and stop listening; return those messages."""
        self.server.drop_connections()
        # Created while the connections die: no connection receives them; only a backfill can.
        start = len(self.cluster.pushed)
        for feed in self.users:
            await self.push(feed)
        await self.server.stop()
        return self.cluster.pushed[start:]

    async def come_back(self) -> float:
        """Listen again (same port, same history), push to every feed; return when every feed has a connection."""
        await self.server.start()
        back = time.monotonic()
        for feed in self.users:
            await self.push(feed)
        users = set(self.users.values())
        await wait_until("every feed connected again", lambda: users <= self.server._by_user.keys(), BACK_WITHIN)
        return time.monotonic() - back

    async def close(self) -> dict[str, bool]:
        """Stop the stream and the workers; return which had stopped by themselves before."""
        await self.pause()
        ended = {name: run.done() for name, run in self.runs.items()}
        await asyncio.gather(*(bridge.close() for bridge in self.bridges.values()))
        if self.runs:
            await asyncio.wait(list(self.runs.values()), timeout=10)
        await self.look.close()
        await self.cluster.close()
        return ended

    async def check(self, ended: dict[str, bool], unseen: list[tuple[str, str, str]]) -> list[Envelope]:
        """Nothing lost, nothing twice, order kept; what no connection received came by backfill."""
        assert ended == dict.fromkeys(self.runs, False), "a worker stopped"
        assert [run.exception() for run in self.runs.values()] == [None] * len(self.runs)
        log = await self.cluster.complete_log(10)
        self.cluster.check_log(log)  # every event once, no dedup id twice, each chat in push order
        sources = {(envelope.feed, envelope.type, envelope.id): envelope.source for envelope in log}
        assert {sources[event] for event in unseen} == {"backfill"}
        return log


def no_errors(caplog: pytest.LogCaptureFixture) -> None:
    records = [record for record in caplog.records if record.name.startswith("chatfeed")]
    assert [r.getMessage() for r in records if r.exc_info is not None or r.levelno >= logging.ERROR] == []


@pytest.mark.timeout(40)
async def test_a_group_through_a_chat_server_outage_reconnects_backfills_and_moves_no_lease(
    broker: Broker, server: WatchedFeedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatfeed")
    scene = Scene(broker, server, tmp_path)
    try:
        for name in ("w1", "w2"):
            await scene.start(name, handoff_timeout=3.0)
        await scene.cluster.settle(["w1", "w2"], 10)
        await scene.look.open()
        await scene.cluster.push_chats()
        await scene.cluster.wait_for_watermarks(10)
        await scene.stream()
        before = await scene.leases()

        await scene.pause()  # nothing reaches a chat server that is away: pushed up to the drop, and after
        down = time.monotonic()
        unseen = await scene.go_away()
        await asyncio.sleep(max(0.0, DOWN - (time.monotonic() - down)))
        took = await scene.come_back()
        away = time.monotonic() - down - took
        await scene.stream()
        after = await scene.leases()
    finally:
        ended = await scene.close()

    print(f"\n{broker.kind}: the chat server away {away:.2f} s; every feed connected again {took:.2f} s after")
    assert after == before, "a lease moved"  # same holder, same fencing token: renewed throughout
    assert before.keys() == set(scene.users)
    log = await scene.check(ended, unseen)
    no_errors(caplog)
    print(f"log: {len(log)} events, {len(scene.cluster.pushed)} pushed")


@pytest.mark.timeout(40)
async def test_a_handoff_while_the_chat_server_is_away_lets_go_after_handoff_timeout_and_loses_nothing(
    broker: Broker, server: WatchedFeedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatfeed")
    scene = Scene(broker, server, tmp_path)
    owners = scene.cluster.assignment(["w1", "w2"])
    moving = sorted(feed for feed, worker in owners.items() if worker == "w2")
    try:
        await scene.start("w1", handoff_timeout=HANDOFF)
        await scene.cluster.settle(["w1"], 10)
        await scene.look.open()
        await scene.cluster.push_chats()
        await scene.cluster.wait_for_watermarks(10)
        await scene.stream()
        before = await scene.leases()

        await scene.pause()
        down = time.monotonic()
        unseen = await scene.go_away()
        await scene.start("w2", handoff_timeout=HANDOFF)  # its feeds cannot connect: it is never ready

        async def moved() -> bool:
            held = await scene.leases()
            return all(held.get(feed, ("",))[0] == owners[feed] for feed in scene.users)

        await wait_until("w2 holds its share", moved, HANDOFF + TTL + 5)
        after = await scene.leases()
        released = dict(scene.coordinators["w1"].released)  # not those w1 lets go of when it closes
        took = await scene.come_back()
        away = time.monotonic() - down - took
        await scene.stream()
    finally:
        ended = await scene.close()

    joined = scene.coordinators["w2"].joined
    assert joined is not None
    assert sorted(released) == moving  # w1 let go of w2's share, and only of it
    waited = sorted(at - joined for at in released.values())
    print(
        f"\n{broker.kind}: {len(moving)} of {FEEDS} feeds handed over {waited[0]:.2f}-{waited[-1]:.2f} s after w2 "
        f"joined (handoff_timeout {HANDOFF:g} s, rounds every {TTL / 3:.2f} s); the chat server away {away:.2f} s, "
        f"every feed connected again {took:.2f} s after"
    )
    assert waited[0] >= HANDOFF, "a feed was let go before handoff_timeout"
    # Let go at w1's first round handoff_timeout after the round that saw w2: two rounds late at most (and load).
    assert waited[-1] < HANDOFF + 2 * TTL / 3 + 1.0
    assert scene.coordinators["w2"].announced == []  # never ready: nothing of it could connect
    # Said, in a line per round (not per feed), with the feeds' count.
    unready = [
        record.getMessage() for record in caplog.records if "without their next holder ready" in record.getMessage()
    ]
    assert 1 <= len(unready) <= 3, unready
    assert sum(int(message.split()[1]) for message in unready) == len(moving), unready
    assert all(after[feed] == before[feed] for feed in scene.users if owners[feed] == "w1")
    assert all(after[feed][0] == "w2" and after[feed][1] != before[feed][1] for feed in moving)
    log = await scene.check(ended, unseen)
    no_errors(caplog)
    print(f"log: {len(log)} events, {len(scene.cluster.pushed)} pushed")

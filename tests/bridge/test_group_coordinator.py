"""The group coordinators' leases and heartbeats, against the real brokers."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from chatfeed import UsageError
from chatfeed.bridge._group import Coordinator, JetStreamCoordinator, RedisCoordinator
from chatfeed.bridge.testing import NatsServer, RedisServer

TTL = 0.6


@pytest.fixture(params=["nats", "redis"])
async def coordinators(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Coordinator, Coordinator]]:
    server: NatsServer | RedisServer = request.getfixturevalue(f"{request.param}_session")
    group = f"g{secrets.token_hex(4)}"
    made: list[Coordinator] = []
    for _ in range(2):
        coordinator: Coordinator = (
            JetStreamCoordinator(server.url, group, ttl=TTL)
            if request.param == "nats"
            else RedisCoordinator(server.url, group, prefix=f"t{group}", ttl=TTL)
        )
        await coordinator.open()
        made.append(coordinator)
    yield made[0], made[1]
    for coordinator in made:
        await coordinator.close()


async def test_one_holder_at_a_time_and_each_acquisition_a_larger_token(
    coordinators: tuple[Coordinator, Coordinator],
) -> None:
    a, b = coordinators
    lease = await a.acquire("feed.1 x", "w1")
    assert lease is not None
    assert await b.acquire("feed.1 x", "w2") is None  # held
    assert await a.renew(lease)
    assert await b.holders() == {"feed.1 x": ("w1", lease.token)}
    await a.release(lease)
    second = await b.acquire("feed.1 x", "w2")
    assert second is not None and second.token > lease.token
    assert not await a.renew(lease)  # the old holder's renewal fails: it must stop publishing
    await a.release(lease)  # and its release does not free the new holder's lease
    assert await a.acquire("feed.1 x", "w1") is None


async def test_a_lease_and_a_heartbeat_expire_after_ttl(coordinators: tuple[Coordinator, Coordinator]) -> None:
    a, b = coordinators
    await a.join("w1")
    await b.join("w2")
    assert await a.workers() == ["w1", "w2"]
    lease = await a.acquire("feed-2", "w1")
    assert lease is not None
    for _ in range(3):  # renewed, it outlives its ttl
        await asyncio.sleep(TTL / 3)
        assert await a.renew(lease)
        await b.join("w2")
    assert await b.acquire("feed-2", "w2") is None
    await asyncio.sleep(TTL * 2)  # w1 stops: its heartbeat and lease age out
    await b.join("w2")
    assert await b.workers() == ["w2"]
    taken = await b.acquire("feed-2", "w2")
    assert taken is not None and taken.token > lease.token
    assert not await a.renew(lease)


async def test_a_redis_sink_refuses_a_record_whose_lease_is_another_workers(redis_session: RedisServer) -> None:
    import chatfeed
    from chatfeed.bridge import FencedError, RedisStreamSink, encode
    from chatfeed.testing import make_message

    group = f"g{secrets.token_hex(4)}"
    prefix = f"t{group}"
    coordinator = RedisCoordinator(redis_session.url, group, prefix=prefix, ttl=5)
    sink = RedisStreamSink(redis_session.url, prefix=prefix, partitions=2)
    await coordinator.open()
    await sink.open()
    try:
        lease = await coordinator.acquire("alice", "w1")
        assert lease is not None
        record = encode(chatfeed.NewMessage(type="new_message", payload=make_message(id="1")), "alice")
        record.fence = coordinator.fence_of(lease)
        assert await sink.publish(record) is True  # the holder writes
        await coordinator.release(lease)
        taken = await coordinator.acquire("alice", "w2")  # another worker holds it now
        assert taken is not None
        stale = encode(chatfeed.NewMessage(type="new_message", payload=make_message(id="2")), "alice")
        stale.fence = coordinator.fence_of(lease)  # what the old holder still believes
        with pytest.raises(FencedError, match="another worker"):
            await sink.publish(stale)
        fresh = encode(chatfeed.NewMessage(type="new_message", payload=make_message(id="2")), "alice")
        fresh.fence = coordinator.fence_of(taken)
        assert await sink.publish(fresh) is True  # refused for the stale one, not stored: the new holder's goes in
    finally:
        await sink.close()
        await coordinator.close()


async def test_a_lone_group_worker_closing_publishes_what_it_held(redis_session: RedisServer) -> None:
    import chatfeed
    from chatfeed.bridge import Bridge, Group
    from chatfeed.testing import FeedServer

    from .test_bridge_semantics import USERS, FlakySink, push

    sink = FlakySink()
    sink.gate = asyncio.Event()  # the broker holds every publish
    group = f"g{secrets.token_hex(4)}"
    coordinator = RedisCoordinator(redis_session.url, group, prefix=f"t{group}", ttl=TTL)
    async with FeedServer(users=USERS) as server:
        tokens = dict(zip(USERS.values(), USERS, strict=True))
        member = Group(coordinator, tokens, worker="w1")
        # Two publishes in flight: the rest wait their turn, and need a valid lease when it comes.
        bridge = Bridge(chatfeed.Pool(server.url), sink, group=member, concurrency=2, drain_timeout=3)
        async with bridge:
            assert len(bridge.pool) == len(USERS)  # it holds every feed: it is alone
            while any(feed._state.value != "open" for feed in bridge.pool._feeds.values()):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            held = await push(server, 2)
            while bridge.statistics().held < len(held):  # noqa: ASYNC110  # no event to wait on
                await asyncio.sleep(0.01)
            closing = asyncio.ensure_future(bridge.close())
            await asyncio.sleep(TTL)  # longer than ttl/2: the rounds must go on renewing while it drains
            sink.gate.set()
            await asyncio.wait_for(closing, 10)
    assert bridge.statistics().unpublished == 0
    assert len(sink.log) == len(held)


async def test_ages_and_status_show_each_workers_feeds_and_how_old_their_leases_are(
    coordinators: tuple[Coordinator, Coordinator],
) -> None:
    import subprocess
    import sys

    a, _ = coordinators
    await a.join("w1")
    lease = await a.acquire("alice", "w1")
    assert lease is not None
    await asyncio.sleep(0.2)
    ages = await a.ages()
    assert set(ages) == {"alice"} and 0.1 <= ages["alice"] < TTL
    if isinstance(a, JetStreamCoordinator):
        args = ["--to", a.url, "--lease-ttl", str(TTL)]
    else:
        assert isinstance(a, RedisCoordinator)
        args = ["--to", a.url, "--prefix", a._base.split(":group:")[0]]

    async def keep_alive() -> None:  # the worker goes on while the status command starts (slowly, on a busy machine)
        while True:
            await asyncio.sleep(TTL / 6)
            await a.join("w1")
            assert await a.renew(lease)

    alive = asyncio.ensure_future(keep_alive())
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "chatfeed", "bridge", "--status", "--group", a.group, "-v", *args],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    finally:
        alive.cancel()
        await asyncio.wait([alive])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"group {a.group}: 1 bridge(s), 1 feed(s) held"
    assert lines[1].startswith("  w1: 1 feed(s), oldest renewal ")
    assert lines[2].startswith(f"    alice (lease {lease.token}, renewed ")
    # The age is the group's, whatever TTL the status command was given: renewed every TTL / 6 here.
    age = float(lines[1].split("oldest renewal ")[1].split()[0].rstrip("s"))
    assert 0 <= age < TTL, lines[1]


@pytest.mark.timeout(30)
async def test_every_live_worker_is_listed_while_they_all_heartbeat(
    coordinators: tuple[Coordinator, Coordinator],
) -> None:
    # Listed through a consumer (nats-py's kv.keys()), keys written meanwhile were missed: a worker
    # then thought itself alone, took others' feeds, or left without waiting for its successors.
    first, _ = coordinators
    # A TTL of its own, long: what this checks (a consistent listing) does not depend on it, and a
    # request timeout of ttl / 2 = 0.3 s failed on a loaded machine.
    assert isinstance(first, (JetStreamCoordinator, RedisCoordinator))
    a, b = (
        JetStreamCoordinator(first.url, first.group, ttl=10.0)
        if isinstance(first, JetStreamCoordinator)
        else _redis_like(first, first.group, ttl=10.0)
        for _ in range(2)
    )
    await a.open(create=False)
    await b.open(create=False)
    names = [f"w{number:02}" for number in range(30)]
    for name in names:
        await b.join(name)
    stop = asyncio.Event()

    async def heartbeats() -> None:
        while not stop.is_set():
            await asyncio.gather(*(b.join(name) for name in names))

    beating = asyncio.ensure_future(heartbeats())
    try:
        short = []
        for _ in range(100):
            listed = await a.workers()
            if listed != names:
                short.append(len(listed))
    finally:
        stop.set()
        await asyncio.wait([beating])
        await a.close()
        await b.close()
    assert short == [], f"{len(short)} of 100 listings missed workers (they had {short} of {len(names)})"


async def test_a_group_whose_workers_all_left_still_exists_and_one_never_made_does_not(
    coordinators: tuple[Coordinator, Coordinator],
) -> None:
    # What --status opens: a group whose last worker left (or crashed, its leases expired) is a group
    # with no bridges, not a typo; a name no worker ever used is an error, on either broker.
    a, _ = coordinators
    assert isinstance(a, (JetStreamCoordinator, RedisCoordinator))
    await a.join("w1")
    lease = await a.acquire("alice", "w1")
    assert lease is not None
    await a.release(lease)
    await a.leave("w1")
    left = type(a)(a.url, a.group, ttl=TTL) if isinstance(a, JetStreamCoordinator) else _redis_like(a, a.group)
    await left.open(create=False)
    try:
        assert await left.workers() == []
        assert await left.holders() == {}
        assert await left.ages() == {}  # a released lease's delete marker is not a lease
    finally:
        await left.close()
    never = (
        JetStreamCoordinator(a.url, f"n{secrets.token_hex(4)}", ttl=TTL)
        if isinstance(a, JetStreamCoordinator)
        else _redis_like(a, f"n{secrets.token_hex(4)}")
    )
    with pytest.raises(UsageError, match="there is no group"):
        await never.open(create=False)


def _redis_like(coordinator: Coordinator, group: str, ttl: float = TTL) -> RedisCoordinator:
    """A Redis coordinator of ``group`` under the same prefix as ``coordinator``."""
    assert isinstance(coordinator, RedisCoordinator)
    return RedisCoordinator(coordinator.url, group, prefix=coordinator._base.split(":group:")[0], ttl=ttl)

"""Pool: many feeds in one process, against real servers on loopback.

A feed's failure is its own; handlers and ``events()`` get each event with its
feed's key; a client's delivery guarantees hold per feed; one keepalive task
and one connection ramp serve every feed; ``close()`` works from any state and
leaves no task behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

import chatfeed
from chatfeed import Gap
from chatfeed._connection import _ClientConnection
from chatfeed._pool import Ramp
from chatfeed.testing import FeedServer

from ..conftest import BAD_TOKEN, FAST, MS, OTHER_TOKEN, SECRET, SIGNATURE, TOKEN
from .conftest import (
    WAIT,
    Counter,
    Recorder,
    ThreadedFeedServer,
    chatfeed_tasks,
    content,
    make_client,
    raw_server,
    unfinished_tasks,
    url_of,
    wait_until,
    watch_log,
)

pytestmark = pytest.mark.timeout(20)


def token_of(user: str) -> str:
    """A test token for ``user`` (holding the secret, as every test token does)."""
    return f"eyJhbGciOiJIUzI1NiJ9.{SECRET}-{user}.{SIGNATURE}"


def make_pool(url: str, **options: Any) -> chatfeed.Pool:
    """A pool with make_client's test-friendly defaults: fast backoff, short timeouts."""
    options.setdefault("reconnect", FAST)
    options.setdefault("auth_timeout", 2000 * MS)
    options.setdefault("open_timeout", 2000 * MS)
    options.setdefault("close_timeout", 500 * MS)
    return chatfeed.Pool(url, **options)


class Seen:
    """A pool handler that records each ``(feed, event)`` it is called with, for a test to wait on."""

    def __init__(self) -> None:
        self.recorder = Recorder()

    def __call__(self, event: Any, feed: str) -> None:
        self.recorder((feed, event))

    @property
    def pairs(self) -> list[tuple[str, Any]]:
        return self.recorder.events

    async def wait_for(self, count: int) -> list[tuple[str, Any]]:
        """Wait until ``count`` calls have come; return them all."""
        return await self.recorder.wait_for(count)

    async def wait_until(self, predicate: Callable[[list[tuple[str, Any]]], bool]) -> None:
        await wait_until(lambda: predicate(self.pairs), self.recorder)

    def of(self, feed: str) -> list[Any]:
        """The events of one feed, in the order the handler got them."""
        return [event for key, event in self.pairs if key == feed]

    def keys(self) -> list[str]:
        return [key for key, _ in self.pairs]


def contents(events: list[Any]) -> list[str]:
    return [content(event) for event in events]


def task_names() -> collections.Counter[str]:
    """The names of chatfeed's running tasks, counted."""
    return collections.Counter(task.get_name() for task in chatfeed_tasks())


def node_message(number: int, chat_id: int, text: str, role: str = "assistant") -> dict[str, Any]:
    """A ``new_message`` frame as a Node backend writes it: integer ids, camelCase, nulls."""
    payload = {
        "id": number,
        "chatId": chat_id,
        "role": role,
        "content": text,
        "precis": None,
        "audioUrl": None,
        "fallbackUsed": False,
        "status": "COMPLETED",
        "createdAt": "2025-10-07T12:00:00.000Z",
    }
    return {"type": "new_message", "payload": payload}


class Backend:
    """A backend written by someone else (not FeedServer): each token is a user, and frames go to one user.

    It answers an unknown token with an ``auth_error`` whose message is null,
    which is still a rejection.

    Attributes:
        url: Where it listens, once started with `serve`.
        silent: Users whose auth frame gets no answer.
        close_after_auth: Users whose connection it closes right after
            ``auth_success``, with this code and reason.
        received: Records the user (or ``None`` for an unknown token) of each auth frame.
        authenticated: Records the user of each ``auth_success`` sent.
    """

    def __init__(self, users: Iterable[str]) -> None:
        self.users = {token_of(user): user for user in users}
        self.url = ""
        self.silent: set[str] = set()
        self.close_after_auth: dict[str, tuple[int, str]] = {}
        self.received = Recorder()
        self.authenticated = Recorder()
        self._connections: dict[str, ServerConnection] = {}

    async def _handle(self, ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            auth = json.loads(await ws.recv())
            user = self.users.get(auth.get("token")) if auth.get("type") == "auth" else None
            self.received(user)
            if user is None:
                await ws.send(json.dumps({"type": "auth_error", "message": None}))
                await ws.close(1008, "invalid token")
                return
            if user in self.silent:
                await ws.wait_closed()
                return
            welcome = json.dumps({"type": "auth_success", "payload": {"userId": user}})
            if user in self.close_after_auth:
                await ws.send(welcome)
                await ws.close(*self.close_after_auth[user])
                return
            # Registered first: a client that has authenticated can be sent to at once.
            self._connections[user] = ws
            self.authenticated(user)
            try:
                await ws.send(welcome)
                await ws.wait_closed()
            finally:
                if self._connections.get(user) is ws:
                    del self._connections[user]

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[Backend]:
        async with raw_server(self._handle) as server:
            self.url = url_of(server)
            yield self

    async def send(self, user: str, frame: Mapping[str, Any]) -> None:
        """Send one frame to the user's connection."""
        await self._connections[user].send(json.dumps(frame))

    async def close(self, user: str, code: int, reason: str = "") -> None:
        """Close the user's connection with ``code``."""
        await self._connections.pop(user).close(code, reason)


@contextlib.asynccontextmanager
async def backend(*users: str) -> AsyncIterator[Backend]:
    """A `Backend` serving ``users`` (each with `token_of` its name), on loopback."""
    async with Backend(users).serve() as running:
        yield running


async def close_within(pool: chatfeed.Pool, seconds: float = WAIT) -> None:
    await asyncio.wait_for(pool.close(), seconds)


# Starting: async with waits for every feed added so far


async def test_async_with_returns_once_every_feed_is_up() -> None:
    keys = ["user-1", "user-2", "user-3"]
    async with FeedServer(tokens=[token_of(key) for key in keys]) as server:
        pool = make_pool(server.url)
        connected = Seen()
        pool.on("connected")(connected)
        for key in keys:
            pool.add(key, token=token_of(key))
        assert (pool.feeds(), len(pool), "user-2" in pool, "user-4" in pool) == (keys, 3, True, False)
        assert pool.statistics().feeds == 3
        async with pool:
            stats = pool.statistics()
            assert (stats.up, stats.failed) == (3, 0)
            assert (stats.connecting, stats.authenticating, stats.backing_off) == (0, 0, 0)
            assert (stats.connections, stats.reconnects) == (3, 0)
            assert server.clients == 3
            await connected.wait_for(3)
        assert sorted(connected.keys()) == keys
        for key, event in connected.pairs:
            assert event.feed == key
            assert not event.is_reconnect
        assert sorted(server.received_tokens) == sorted(token_of(key) for key in keys)
        assert chatfeed_tasks() == []


async def test_async_with_waits_for_a_slow_feed() -> None:
    async with FeedServer(tokens=[TOKEN, OTHER_TOKEN]) as server:
        pool = make_pool(server.url)
        connected = Seen()
        pool.on("connected")(connected)
        release = asyncio.Event()

        async def slow_token() -> str:
            await release.wait()
            return OTHER_TOKEN

        pool.add("quick", token=TOKEN)
        pool.add("slow", token=slow_token)
        enter = asyncio.create_task(pool.__aenter__())
        try:
            await connected.wait_for(1)
            done, _ = await asyncio.wait([enter], timeout=200 * MS)
            assert not done, "async with returned before every feed had authenticated"
            assert pool.statistics("slow").state == "connecting"
            release.set()
            assert await asyncio.wait_for(enter, WAIT) is pool
            assert pool.statistics().up == 2
        finally:
            await close_within(pool)
            await asyncio.wait([enter], timeout=WAIT)


async def test_async_with_returns_when_the_feed_it_waits_for_is_removed() -> None:
    # Defect: remove() takes the key out of the feeds __aenter__ waits for
    # without waking it, so __aenter__ waited forever, even through close().
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        connected = Seen()
        pool.on("connected")(connected)

        async def never() -> str:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        pool.add("up", token=TOKEN)
        pool.add("stuck", token=never)
        enter = asyncio.create_task(pool.__aenter__())
        try:
            await connected.wait_for(1)
            await asyncio.wait_for(pool.remove("stuck"), WAIT)
            done, _ = await asyncio.wait([enter], timeout=WAIT)
            assert done, "async with still waits for a feed that was removed"
            assert enter.result() is pool
        finally:
            await close_within(pool)
            if not enter.done():
                enter.cancel()
            await asyncio.wait([enter], timeout=WAIT)


async def test_async_with_returns_when_every_feed_has_failed() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        stopped = Seen()
        pool.on("feed_stopped")(stopped)
        pool.add("x", token=BAD_TOKEN)
        pool.add("y", token=BAD_TOKEN)
        async with pool:  # no error: a feed's failure is reported, not raised
            await stopped.wait_for(2)
            assert pool.statistics().failed == 2
        assert sorted(stopped.keys()) == ["x", "y"]


async def test_an_empty_pool_starts_at_once_and_runs_until_closed() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        async with pool:
            assert pool.statistics().feeds == 0
        other = make_pool(server.url)
        run = asyncio.create_task(other.run())
        done, _ = await asyncio.wait([run], timeout=100 * MS)
        assert not done, "run() of a pool without feeds returned by itself"
        await close_within(other)
        await asyncio.wait_for(run, WAIT)  # returns, without an error


# Adding and removing while running


async def test_a_feed_added_while_running_starts_and_a_removed_one_stops_alone() -> None:
    async with FeedServer(tokens=[TOKEN, OTHER_TOKEN]) as server:
        pool = make_pool(server.url)
        messages, connected, disconnected = Seen(), Seen(), Seen()
        pool.on("new_message")(messages)
        pool.on("connected")(connected)
        pool.on("disconnected")(disconnected)
        pool.add("a", token=TOKEN)
        async with pool:
            pool.add("b", token=OTHER_TOKEN)
            assert pool.feeds() == ["a", "b"]
            await connected.wait_for(2)
            assert connected.keys() == ["a", "b"]
            await server.wait_for_clients(2)
            await server.push_message(content="to both")
            await messages.wait_for(2)

            await asyncio.wait_for(pool.remove("a"), WAIT)
            assert (pool.feeds(), "a" in pool, pool.statistics().feeds) == (["b"], False, 1)
            with pytest.raises(chatfeed.UsageError, match="no feed 'a'"):
                pool.statistics("a")
            await server.push_message(content="to b only")
            await messages.wait_for(3)
            assert pool.statistics("b").state == "open"
        assert sorted(messages.keys()[:2]) == ["a", "b"]
        assert [(key, content(event)) for key, event in messages.pairs[2:]] == [("b", "to b only")]
        assert disconnected.pairs == [], "removing a feed is not a disconnection"
        assert server.handshakes == 2


async def test_a_removed_key_can_be_added_again() -> None:
    async with FeedServer(tokens=[TOKEN, OTHER_TOKEN]) as server:
        pool = make_pool(server.url)
        connected = Seen()
        pool.on("connected")(connected)
        pool.add("a", token=BAD_TOKEN)
        async with pool:
            assert pool.statistics().failed == 1
            await pool.remove("a")
            assert pool.statistics().failed == 0
            pool.add("a", token=TOKEN)
            [(key, event)] = await connected.wait_for(1)
            assert (key, event.feed) == ("a", "a")
            assert pool.statistics().up == 1


# run() ends only on close()


async def test_run_goes_on_when_every_feed_has_failed_and_takes_new_feeds() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        stopped, connected = Seen(), Seen()
        pool.on("feed_stopped")(stopped)
        pool.on("connected")(connected)
        pool.add("x", token=BAD_TOKEN)
        pool.add("y", token=BAD_TOKEN)
        run = asyncio.create_task(pool.run())
        try:
            await stopped.wait_for(2)
            done, _ = await asyncio.wait([run], timeout=200 * MS)
            assert not done, "run() ended when its feeds had all failed"
            stats = pool.statistics()
            assert (stats.feeds, stats.failed, stats.up) == (2, 2, 0)
            pool.add("z", token=TOKEN)
            [(key, _)] = await connected.wait_for(1)
            assert key == "z"
        finally:
            await close_within(pool)
        await asyncio.wait_for(run, WAIT)  # returns, without an error
        assert chatfeed_tasks() == []


# close() from any state, leaving no task


@pytest.fixture
def feed() -> Iterator[ThreadedFeedServer]:
    with ThreadedFeedServer(tokens=[TOKEN, OTHER_TOKEN]) as feed:
        yield feed


async def close_promptly(
    pool: chatfeed.Pool, before: set[asyncio.Task[Any]], run: asyncio.Task[None] | None = None
) -> None:
    """Close ``pool`` within a second; check that ``run`` and an open stream end, and that no task is left."""
    stream = pool.events()
    await close_within(pool, 1000 * MS)
    if run is not None:
        await asyncio.wait_for(run, WAIT)  # returns, without an error
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), WAIT)
    assert unfinished_tasks(before) == []
    stats = pool.statistics()
    assert (stats.up, stats.connecting, stats.authenticating, stats.backing_off) == (0, 0, 0, 0)
    assert pool.statistics(pool.feeds()[0]).state == "closed"
    await close_within(pool, 1000 * MS)  # again: nothing to do


async def test_close_an_unopened_pool(feed: ThreadedFeedServer) -> None:
    before = asyncio.all_tasks()
    pool = make_pool(feed.server.url)
    pool.add("a", token=TOKEN)
    await close_within(pool, 1000 * MS)
    assert unfinished_tasks(before) == []
    with pytest.raises(chatfeed.UsageError, match="closed"):
        await pool.__aenter__()
    with pytest.raises(chatfeed.UsageError, match="closed"):
        await pool.run()
    assert feed.server.handshakes == 0


async def test_close_while_a_token_function_is_pending(feed: ThreadedFeedServer) -> None:
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def slow_token() -> str:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return TOKEN

    before = asyncio.all_tasks()
    pool = make_pool(feed.server.url)
    pool.add("a", token=slow_token)
    run = asyncio.create_task(pool.run())
    await asyncio.wait_for(entered.wait(), WAIT)
    assert pool.statistics().connecting == 1
    await close_promptly(pool, before, run)
    assert cancelled.is_set()


async def test_close_while_authenticating(feed: ThreadedFeedServer) -> None:
    feed.server.silent = True
    before = asyncio.all_tasks()
    pool = make_pool(feed.server.url, auth_timeout=30_000 * MS)
    pool.add("a", token=TOKEN)
    pool.add("b", token=OTHER_TOKEN)
    run = asyncio.create_task(pool.run())
    await feed.call(lambda: feed.server.wait_for_auth_frames(2, timeout=WAIT))
    assert pool.statistics().authenticating == 2
    await close_promptly(pool, before, run)


async def test_close_while_running(feed: ThreadedFeedServer) -> None:
    before = asyncio.all_tasks()
    pool = make_pool(feed.server.url)  # default ping_interval: the keepalive task runs
    connected = Seen()
    pool.on("connected")(connected)
    pool.add("a", token=TOKEN)
    pool.add("b", token=OTHER_TOKEN)
    pool.add("bad", token=BAD_TOKEN)
    run = asyncio.create_task(pool.run())
    await connected.wait_for(2)
    assert task_names()["chatfeed-keepalive"] == 1
    await close_promptly(pool, before, run)


async def test_close_after_async_with_and_while_backing_off(feed: ThreadedFeedServer) -> None:
    before = asyncio.all_tasks()
    pool = make_pool(feed.server.url)
    disconnected = Seen()
    pool.on("disconnected")(disconnected)
    pool.add("a", token=TOKEN)
    pool.add("b", token=OTHER_TOKEN)
    async with pool:
        await feed.call(lambda: feed.server.close_connections(1013, "overloaded"))  # waits of 5 s at least
        await disconnected.wait_for(2)
        assert pool.statistics().backing_off == 2
        await close_promptly(pool, before)


async def test_close_while_async_with_waits() -> None:
    with ThreadedFeedServer(tokens=[TOKEN]) as feed:
        feed.server.silent = True
        before = asyncio.all_tasks()
        pool = make_pool(feed.server.url, auth_timeout=30_000 * MS)
        pool.add("a", token=TOKEN)
        enter = asyncio.create_task(pool.__aenter__())
        await feed.call(lambda: feed.server.wait_for_auth_frames(1, timeout=WAIT))
        await close_within(pool, 1000 * MS)
        done, _ = await asyncio.wait([enter], timeout=WAIT)
        assert done, "async with still waits after close()"
        # Either outcome is defensible: the block entered on a closed pool, or a UsageError.
        if enter.exception() is not None:
            assert isinstance(enter.exception(), chatfeed.UsageError)
        assert unfinished_tasks(before) == []


async def test_close_right_after_async_with_starts() -> None:
    # Defect: close() cancels the feeds' tasks before their first step; their
    # `finally` never runs, so __aenter__ waited forever for them to settle.
    with ThreadedFeedServer(tokens=[TOKEN]) as feed:
        before = asyncio.all_tasks()
        pool = make_pool(feed.server.url)
        pool.add("a", token=TOKEN)
        enter = asyncio.create_task(pool.__aenter__())
        close = asyncio.create_task(pool.close())
        try:
            done, _ = await asyncio.wait([enter, close], timeout=WAIT)
            assert close in done
            assert enter in done, "async with waits forever when close() comes before the feeds' first step"
            assert unfinished_tasks(before) == []
        finally:
            enter.cancel()
            await asyncio.wait([enter, close], timeout=WAIT)


async def test_cancelling_run_closes_the_pool(feed: ThreadedFeedServer) -> None:
    before = asyncio.all_tasks()
    pool = make_pool(feed.server.url)
    connected = Seen()
    pool.on("connected")(connected)
    pool.add("a", token=TOKEN)
    pool.add("b", token=OTHER_TOKEN)
    run = asyncio.create_task(pool.run())
    await connected.wait_for(2)
    run.cancel()
    await asyncio.wait([run], timeout=WAIT)
    assert run.cancelled()
    assert unfinished_tasks(before) == []
    with pytest.raises(chatfeed.UsageError, match="closed"):
        pool.add("c", token=TOKEN)


async def test_a_second_close_returns_once_no_task_is_left(feed: ThreadedFeedServer) -> None:
    before = asyncio.all_tasks()
    pool = make_pool(feed.server.url)
    connected = Seen()
    pool.on("connected")(connected)
    pool.add("a", token=TOKEN)
    pool.add("b", token=OTHER_TOKEN)
    async with pool:
        await connected.wait_for(2)
        first = asyncio.create_task(pool.close())
        await asyncio.sleep(0)  # a yield, not a timed wait: the first close() starts
        await close_within(pool, 1000 * MS)
        left = [task for task in unfinished_tasks(before) if task is not first]
        await asyncio.wait_for(first, WAIT)
    assert left == [], "close() returned while the pool's tasks still ran (another close() was under way)"


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_close_from_a_handler_returns_and_the_pool_stops(feed: ThreadedFeedServer, concurrency: int) -> None:
    # As Client.close() does from a handler: it returns at once, and the pool
    # stops once the handler has returned. Defect: from an inline handler,
    # close() raised CancelledError into the handler (it cancelled and awaited
    # the handler's own task); from a concurrent one, it waited for its own
    # call until drain_timeout ran out, then was cancelled.
    before = asyncio.all_tasks()
    pool = make_pool(feed.server.url, drain_timeout=2000 * MS)
    connected = Seen()
    pool.on("connected")(connected)
    outcome: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()

    @pool.on("new_message", concurrency=concurrency)
    async def stop(event: chatfeed.NewMessage, key: str) -> None:
        if outcome:
            return
        called_at = loop.time()
        try:
            await pool.close()
        except BaseException as exc:
            outcome.append((type(exc).__name__, loop.time() - called_at))
            raise
        outcome.append(("returned", loop.time() - called_at))

    pool.add("a", token=TOKEN)
    pool.add("b", token=OTHER_TOKEN)
    run = asyncio.create_task(pool.run())
    try:
        await connected.wait_for(2)
        await feed.call(lambda: feed.server.wait_for_clients(2, timeout=WAIT))
        await feed.call(lambda: feed.server.push_message())
        done, _ = await asyncio.wait([run], timeout=WAIT)
        assert done, "run() did not return after close() from a handler"
        [(how, took)] = outcome
        assert how == "returned", f"close() from a handler (concurrency={concurrency}) raised {how} after {took:.3f} s"
        assert took < 1000 * MS, f"close() from a handler took {took:.3f} s"
        assert run.result() is None
        assert unfinished_tasks(before) == []
    finally:
        await close_within(pool)
        await asyncio.wait([run], timeout=WAIT)


# A feed's failure is its own


async def test_a_rejected_static_token_stops_its_feed_alone(caplog: pytest.LogCaptureFixture) -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        stopped, messages = Seen(), Seen()
        pool.on("feed_stopped")(stopped)
        pool.on("new_message")(messages)
        pool.add("good", token=TOKEN)
        pool.add("bad", token=BAD_TOKEN)
        with watch_log("giving up") as gave_up:
            async with pool:
                [(key, event)] = await stopped.wait_for(1)
                assert (key, event.feed) == ("bad", "bad")
                assert isinstance(event, chatfeed.FeedStopped)
                assert isinstance(event.error, chatfeed.AuthenticationError)
                stats = pool.statistics()
                assert (stats.feeds, stats.up, stats.failed) == (2, 1, 1)
                assert pool.statistics("bad").state == "closed"
                assert pool.statistics("good").state == "open"
                await server.wait_for_clients(1)
                await server.push_message(content="still here")
                [(key, message)] = await messages.wait_for(1)
                assert (key, content(message)) == ("good", "still here")
        assert server.received_tokens.count(BAD_TOKEN) == 1, "a static token was retried"
        assert [message for message in gave_up.messages if "'bad'" in message], gave_up.messages


async def test_a_token_function_that_keeps_raising_stops_its_feed_once_retries_run_out() -> None:
    calls = Counter()

    def broken() -> str:
        calls.bump()
        raise RuntimeError("vault unreachable")

    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url, reconnect=chatfeed.Backoff(initial=5 * MS, maximum=20 * MS, max_attempts=3))
        stopped, messages = Seen(), Seen()
        pool.on("feed_stopped")(stopped)
        pool.on("new_message")(messages)
        pool.add("good", token=TOKEN)
        pool.add("broken", token=broken)
        async with pool:
            [(key, event)] = await stopped.wait_for(1)
            assert key == "broken"
            assert isinstance(event.error, chatfeed.TokenProviderError)
            assert isinstance(event.error.__cause__, RuntimeError)
            assert calls.value == 3
            assert pool.statistics().failed == 1
            await server.wait_for_clients(1)
            await server.push_message(content="still here")
            [(key, _)] = await messages.wait_for(1)
            assert key == "good"


async def test_a_token_function_whose_fresh_tokens_are_rejected_stops_its_feed_alone() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url, auth_retries=1)
        stopped = Seen()
        pool.on("feed_stopped")(stopped)
        pool.add("good", token=TOKEN)
        pool.add("expired", token=lambda: BAD_TOKEN)
        async with pool:
            [(key, event)] = await stopped.wait_for(1)
            assert key == "expired"
            assert isinstance(event.error, chatfeed.AuthenticationError)
            assert pool.statistics("good").connected
        assert server.received_tokens.count(BAD_TOKEN) == 2  # the first answer, and one retry


async def test_a_feed_closed_with_a_fatal_code_stops_alone() -> None:
    async with backend("a", "b") as server:
        pool = make_pool(server.url)
        stopped, disconnected, messages = Seen(), Seen(), Seen()
        pool.on("feed_stopped")(stopped)
        pool.on("disconnected")(disconnected)
        pool.on("new_message")(messages)
        pool.add("a", token=token_of("a"))
        pool.add("b", token=token_of("b"))
        async with pool:
            stopped_b = pool.expect("feed_stopped", feed="b", timeout=WAIT)
            await server.close("b", 1008, "policy violation")
            event = await stopped_b
            assert event.feed == "b"
            assert isinstance(event.error, chatfeed.ConnectionLostError)
            assert event.error.code == 1008
            [(key, lost)] = disconnected.pairs
            assert (key, lost.feed, lost.code, lost.will_retry) == ("b", "b", 1008, False)
            await server.send("a", node_message(1, 1, "a goes on"))
            [(key, message)] = await messages.wait_for(1)
            assert (key, content(message)) == ("a", "a goes on")
            stats = pool.statistics()
            assert (stats.up, stats.failed) == (1, 1)
        assert [key for key, _ in stopped.pairs] == ["b"]


# Handlers, events() and expect() know each event's feed


async def test_a_server_written_by_someone_else_sends_each_user_their_own_messages() -> None:
    async with backend("alice", "bob") as server:
        pool = make_pool(server.url)
        stopped = Seen()
        pool.on("feed_stopped")(stopped)
        pool.add("alice", token=token_of("alice"))
        pool.add("bob", token=token_of("bob"))
        pool.add("mallory", token=token_of("mallory"))  # a token the backend does not know
        async with pool:
            stream = pool.events()
            await server.send("alice", node_message(1, 10, "for alice, 1"))
            await server.send("bob", node_message(2, 20, "for bob"))
            await server.send("alice", node_message(3, 10, "for alice, 2"))
            received = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(3)]
            await stream.aclose()
        assert sorted(server.authenticated.events) == ["alice", "bob"]
        by_feed: dict[str, list[str]] = collections.defaultdict(list)
        for key, event in received:
            assert event.feed == key
            assert isinstance(event, chatfeed.NewMessage)
            by_feed[key].append(f"{event.payload.id}:{event.payload.chat_id}:{event.payload.content}")
        assert by_feed == {"alice": ["1:10:for alice, 1", "3:10:for alice, 2"], "bob": ["2:20:for bob"]}
        [(key, event)] = stopped.pairs  # an auth_error with a null message is a rejection, not a timeout
        assert key == "mallory"
        assert isinstance(event.error, chatfeed.AuthenticationError)


async def test_handlers_get_every_kind_of_event_with_its_feed() -> None:
    async with backend("a", "b") as server:
        pool = make_pool(server.url)
        seen = Seen()
        for name in ("new_message", "new_chat", "error", "unknown", "connected", "disconnected"):
            pool.on(name)(seen)
        anything = Seen()
        pool.on(chatfeed.ServerMessage)(anything)
        failures: list[tuple[str, str | None]] = []

        @pool.on("new_chat")
        def broken(event: chatfeed.NewChat, feed: str) -> None:
            raise ValueError("a handler's bug")

        @pool.on_error
        def report(exc: Exception, event: Any) -> None:
            failures.append((type(exc).__name__, event.feed))

        pool.add("a", token=token_of("a"))
        pool.add("b", token=token_of("b"))
        async with pool:
            await seen.wait_for(2)  # both connected
            await server.send("a", node_message(1, 1, "hi"))
            await seen.wait_until(lambda pairs: len(pairs) == 3)
            at = "2025-10-07T12:00:00Z"
            chat = {"id": 5, "userId": 7, "title": "t", "summary": None, "createdAt": at, "updatedAt": at}
            await server.send("b", {"type": "new_chat", "payload": chat})
            await seen.wait_until(lambda pairs: len(pairs) == 4)
            await server.send("a", {"type": "error", "message": "slow down"})
            await seen.wait_until(lambda pairs: len(pairs) == 5)
            await server.send("b", {"type": "typing", "payload": {"chatId": 5}})
            await seen.wait_until(lambda pairs: len(pairs) == 6)
            await server.close("b", 1012, "restart")
            await seen.wait_for(8)  # b's Disconnected, then its Connected again
        described = [(key, event.feed, event.type) for key, event in seen.pairs]
        assert sorted(described[:2]) == [("a", "a", "connected"), ("b", "b", "connected")]
        assert described[2:] == [
            ("a", "a", "new_message"),
            ("b", "b", "new_chat"),
            ("a", "a", "error"),
            ("b", "b", "typing"),
            ("b", "b", "disconnected"),
            ("b", "b", "connected"),
        ]
        assert seen.pairs[-1][1].is_reconnect
        assert [(key, event.type) for key, event in anything.pairs] == [
            ("a", "new_message"),
            ("b", "new_chat"),
            ("a", "error"),
            ("b", "typing"),
        ]
        assert failures == [("ValueError", "b")]
        assert pool.statistics().handler_errors == 1


async def test_events_yield_server_events_only_each_with_its_feeds_key() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        pool.add("good", token=TOKEN)
        pool.add("bad", token=BAD_TOKEN)
        stream = pool.events()  # before the start: it sees the Connected and FeedStopped, were they streamed
        async with pool:
            assert pool.statistics().event_streams == 1
            await server.wait_for_clients(1)
            await server.push_message(content="one")
            await server.push_chat(title="two")
            first = await asyncio.wait_for(anext(stream), WAIT)
            second = await asyncio.wait_for(anext(stream), WAIT)
            assert stream.pending() == 0
        assert [(key, event.type) for key, event in (first, second)] == [("good", "new_message"), ("good", "new_chat")]
        assert first[1].feed == "good"
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), WAIT)


async def test_expect_an_event_of_one_feed_or_of_any() -> None:
    async with backend("a", "b") as server:
        pool = make_pool(server.url)
        read = Seen()
        pool.on("new_message")(read)
        pool.add("a", token=token_of("a"))
        pool.add("b", token=token_of("b"))
        async with pool:
            of_any = pool.expect("new_message", timeout=WAIT)
            of_b = pool.expect("new_message", feed="b", timeout=WAIT)
            answer_in_b = pool.expect(
                chatfeed.NewMessage, feed="b", where=lambda e: e.payload.role == "assistant", timeout=WAIT
            )
            assert pool.statistics().expectations == 3
            await server.send("a", node_message(1, 1, "a: question", role="user"))
            await read.wait_for(1)
            await server.send("a", node_message(2, 1, "a: answer"))
            await read.wait_for(2)
            await server.send("b", node_message(3, 2, "b: question", role="user"))
            await server.send("b", node_message(4, 2, "b: answer"))
            events = [await event for event in (of_any, of_b, answer_in_b)]
            assert [(event.feed, content(event)) for event in events] == [
                ("a", "a: question"),
                ("b", "b: question"),
                ("b", "b: answer"),
            ]
            connected_again = pool.expect("connected", feed="a", where=lambda e: e.is_reconnect, timeout=WAIT)
            await server.close("a", 1012)
            assert (await connected_again).feed == "a"
            left_open = pool.expect("new_message", feed="b")
        with pytest.raises(chatfeed.ClientClosedError):
            await asyncio.wait_for(left_open.wait(), WAIT)


async def test_expect_for_one_feed_rejects_an_async_where_as_the_client_does() -> None:
    # Defect: with feed=, the pool wraps `where` in a sync test, so the
    # dispatcher no longer sees that it is async: the coroutine it returns is
    # truthy, takes the first event of the feed, and is never awaited.
    async def is_answer(event: chatfeed.NewMessage) -> bool:
        return event.payload.role == "assistant"

    pool = make_pool("ws://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError, match="sync"):
        pool.expect("new_message", where=is_answer)  # type: ignore[call-overload]
    with pytest.raises(chatfeed.UsageError, match="sync"):
        pool.expect("new_message", feed="a", where=is_answer)  # type: ignore[call-overload]


# A client's delivery guarantees, per feed


async def test_each_feed_gets_every_event_in_order_through_handlers_and_events() -> None:
    count = 200
    keys = ["a", "b", "c"]
    async with FeedServer(tokens=[token_of(key) for key in keys]) as server:
        pool = make_pool(server.url)
        seen = Seen()
        pool.on("new_message")(seen)
        for key in keys:
            pool.add(key, token=token_of(key))
        async with pool:
            stream = pool.events(buffer=16)

            async def read_all() -> list[tuple[str, chatfeed.FeedEvent]]:
                return [await anext(stream) for _ in range(count * len(keys))]

            reader = asyncio.create_task(read_all())
            await server.wait_for_clients(len(keys))
            for index in range(count):
                await server.push_message(content=str(index))
            streamed = await asyncio.wait_for(reader, WAIT)
            await seen.wait_for(count * len(keys))
        expected = [str(index) for index in range(count)]
        for key in keys:
            assert contents(seen.of(key)) == expected, f"feed {key}: handler order"
            assert contents([event for k, event in streamed if k == key]) == expected, f"feed {key}: events() order"


async def test_a_slow_events_reader_holds_up_every_feed_and_nothing_is_dropped() -> None:
    count = 100
    buffer = 2
    async with backend("a", "b") as server:
        pool = make_pool(server.url, ping_interval=None)
        pool.add("a", token=token_of("a"))
        pool.add("b", token=token_of("b"))
        async with pool:
            stream = pool.events(buffer=buffer)
            for index in range(count):
                await server.send("a", node_message(index, 1, f"a{index}"))
                await server.send("b", node_message(index, 2, f"b{index}"))
            # Observation windows, time for a pool that reads on to show it: on
            # a slow machine they can only make the assertions easier to meet.
            await asyncio.sleep(300 * MS)
            stalled = pool.statistics()
            await asyncio.sleep(300 * MS)
            later = pool.statistics()
            assert stalled.buffered_events == buffer
            assert later.frames_received == stalled.frames_received, "the pool read on with its buffer full"
            # Per feed: auth_success, and at most the buffer plus one event waiting for room.
            assert stalled.frames_received <= 2 + buffer + 2, stalled.frames_received
            received = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(2 * count)]
            assert pool.statistics().frames_received == 2 + 2 * count
        for key in ("a", "b"):
            assert [content(event) for k, event in received if k == key] == [f"{key}{i}" for i in range(count)]


class Gates:
    """A slow pool handler: each call waits until the test opens its chat's gate."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.started: list[tuple[str, str]] = []
        self.finished: list[tuple[str, str]] = []
        self.started_count = Counter()
        self.finished_count = Counter()
        self.running = 0
        self.most_running = 0

    async def __call__(self, event: chatfeed.NewMessage, feed: str) -> None:
        message = event.payload
        self.started.append((feed, message.content))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.started_count.bump()
        try:
            await self.gates[message.chat_id].wait()
        finally:
            self.running -= 1
        self.finished.append((feed, message.content))
        self.finished_count.bump()

    def open(self, *chats: str) -> None:
        for chat in chats:
            self.gates[chat].set()


async def test_concurrent_handler_lanes_are_shared_by_every_feed_and_ordered_within_a_chat() -> None:
    async with backend("a", "b") as server:
        pool = make_pool(server.url)
        handler = Gates()
        pool.on("new_message", concurrency=2)(handler)
        pool.add("a", token=token_of("a"))
        pool.add("b", token=token_of("b"))
        async with pool:
            read_a3 = pool.expect("new_message", feed="a", where=lambda e: e.payload.content == "a3", timeout=WAIT)
            read_b3 = pool.expect("new_message", feed="b", where=lambda e: e.payload.content == "b3", timeout=WAIT)
            for number, text in enumerate(["a1", "a2", "a3"]):
                await server.send("a", node_message(number, 1, text))
            for number, text in enumerate(["b1", "b2"]):
                await server.send("b", node_message(10 + number, 2, text))
            await server.send("b", node_message(20, 3, "b3"))
            await read_a3
            await read_b3  # every event is in the lanes now
            # Two calls at once over the whole pool, not two per feed: chat 3,
            # whose lane is free, waits all the same.
            await handler.started_count.wait_for(2)
            assert sorted(handler.started) == [("a", "a1"), ("b", "b1")]
            stats = pool.statistics().handlers[0]
            assert (stats.running, stats.queued) == (2, 4)
            handler.open("2", "3")  # b's chats go on while a's chat 1 stays stuck
            await handler.finished_count.wait_for(3)
            assert sorted(handler.finished) == [("b", "b1"), ("b", "b2"), ("b", "b3")]
            assert [text for _, text in handler.finished if text in ("b1", "b2")] == ["b1", "b2"]
            assert handler.running == 1  # a1, stuck
            handler.open("1")
            await handler.finished_count.wait_for(6)
            stats = pool.statistics().handlers[0]
            assert (stats.concurrency, stats.running, stats.queued) == (2, 0, 0)
        assert handler.most_running == 2
        assert [text for key, text in handler.finished if key == "a"] == ["a1", "a2", "a3"]


async def test_backfill_and_dedupe_are_per_feed() -> None:
    async with FeedServer(tokens=[TOKEN, OTHER_TOKEN]) as server:
        gaps: list[Gap] = []

        def backfill(gap: Gap) -> list[chatfeed.Message | chatfeed.Chat]:
            gaps.append(gap)
            return server.history(since=gap.since)

        pool = make_pool(server.url, backfill=backfill, dedupe=True)
        seen, connected = Seen(), Seen()
        pool.on("new_message")(seen)
        pool.on("connected")(connected)
        pool.add("a", token=TOKEN)
        pool.add("b", token=OTHER_TOKEN)
        async with pool:
            await server.wait_for_clients(2)
            first = await server.push_message(content="first")
            await seen.wait_for(2)  # each feed has it: the windows are the feeds' own
            server.drop_connections()
            await server.push_message(content="missed")  # to nobody: no client is connected
            await seen.wait_for(4)
            await server.wait_for_clients(2)
            await server.push_message(content="after")
            await seen.wait_for(6)
            stats = pool.statistics()
            assert (stats.reconnects, stats.backfilled_events, stats.duplicates_dropped) == (2, 2, 2)
            feed_stats = pool.statistics("a")
            assert (feed_stats.backfilled_events, feed_stats.duplicates_dropped) == (1, 1)
        for key in ("a", "b"):
            assert [(event.source, content(event)) for event in seen.of(key)] == [
                ("live", "first"),
                ("backfill", "missed"),
                ("live", "after"),
            ], key
        assert sorted(gap.feed or "" for gap in gaps) == ["a", "b"]
        assert sorted(key for key, event in connected.pairs if event.is_reconnect) == ["a", "b"]
        assert all(gap.is_reconnect and gap.since == first.created_at for gap in gaps)


async def test_every_feed_comes_back_after_the_server_drops_them_all() -> None:
    keys = [f"user-{number}" for number in range(5)]
    async with FeedServer(tokens=[token_of(key) for key in keys]) as server:
        pool = make_pool(server.url)
        connected, disconnected = Seen(), Seen()
        pool.on("connected")(connected)
        pool.on("disconnected")(disconnected)
        for key in keys:
            pool.add(key, token=token_of(key))
        async with pool:
            server.drop_connections()
            await connected.wait_for(10)
            stats = pool.statistics()
            assert (stats.up, stats.connections, stats.reconnects) == (5, 10, 5)
            assert all(pool.statistics(key).connections == 2 for key in keys)
        assert sorted(key for key, event in connected.pairs if event.is_reconnect) == keys
        assert sorted(key for key, event in disconnected.pairs if event.will_retry) == keys


# One keepalive for every feed


async def test_one_keepalive_task_serves_every_feed() -> None:
    keys = [f"user-{number}" for number in range(10)]
    async with FeedServer(tokens=[token_of(key) for key in keys]) as server:
        pool = make_pool(server.url)
        for key in keys:
            pool.add(key, token=token_of(key))
        async with pool:
            names = task_names()
            assert names["chatfeed-keepalive"] == 1
            assert names["chatfeed-feed"] == 10
            assert set(names) <= {"chatfeed-keepalive", "chatfeed-feed", "chatfeed-ping"}, names
        assert chatfeed_tasks() == []


async def test_a_frozen_connection_is_dropped_by_the_shared_keepalive_and_its_feed_reconnects() -> None:
    # A close_timeout far beyond the ping budget: waiting for the dead peer's
    # closing handshake would make the reconnect come too late.
    ping = 100 * MS
    keys = ["a", "b", "c"]
    async with FeedServer(tokens=[token_of(key) for key in keys]) as server:
        pool = make_pool(server.url, ping_interval=ping, ping_timeout=ping, close_timeout=10_000 * MS)
        connected, disconnected = Seen(), Seen()
        pool.on("connected")(connected)
        pool.on("disconnected")(disconnected)
        for key in keys:
            pool.add(key, token=token_of(key))
        loop = asyncio.get_running_loop()
        async with pool:
            server.freeze_connections()
            frozen_at = loop.time()
            await connected.wait_for(6)
            back_after = loop.time() - frozen_at
            assert task_names()["chatfeed-keepalive"] == 1
            assert pool.statistics().reconnects == 3
        assert sorted(disconnected.keys()) == keys
        for _, lost in disconnected.pairs:
            assert (lost.code, lost.error.local) == (1006, True)
            assert "pong" in lost.reason
        assert back_after < 2 * ping + 1000 * MS


async def test_the_shared_keepalive_leaves_a_live_feed_alone() -> None:
    ping = 50 * MS
    async with FeedServer(tokens=[TOKEN, OTHER_TOKEN]) as server:
        pool = make_pool(server.url, ping_interval=ping, ping_timeout=ping)
        disconnected, seen = Seen(), Seen()
        pool.on("disconnected")(disconnected)
        pool.on("new_message")(seen)
        pool.add("a", token=TOKEN)
        pool.add("b", token=OTHER_TOKEN)
        async with pool:
            await server.wait_for_clients(2)
            for _ in range(20):
                await server.push_message()
                await asyncio.sleep(ping / 2)  # a paced feed spanning several ping periods
            await seen.wait_for(40)
        assert disconnected.pairs == []
        assert server.handshakes == 2


async def test_the_shared_keepalive_leaves_alone_a_feed_held_up_by_a_slow_reader() -> None:
    count = 200
    ping = 50 * MS
    async with backend("a", "b") as server:
        pool = make_pool(server.url, ping_interval=ping, ping_timeout=ping)
        disconnected = Seen()
        pool.on("disconnected")(disconnected)
        pool.add("a", token=token_of("a"))
        pool.add("b", token=token_of("b"))
        async with pool:
            stream = pool.events(buffer=1)

            async def send_all() -> None:
                for index in range(count):
                    await server.send("a", node_message(index, 1, f"a{index}"))
                    await server.send("b", node_message(index, 2, f"b{index}"))

            sender = asyncio.create_task(send_all())
            await asyncio.sleep(10 * ping)  # a reader busy elsewhere for many ping periods; the feeds back up
            assert pool.statistics().frames_received <= 2 + 1 + 2, "the pool read on while its reader was busy"
            received = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(2 * count)]
            await asyncio.wait_for(sender, WAIT)
            assert disconnected.pairs == [], "the keepalive dropped a feed because its reader was slow"
        for key in ("a", "b"):
            assert [content(event) for k, event in received if k == key] == [f"{key}{i}" for i in range(count)]
        assert sorted(server.authenticated.events) == ["a", "b"]


# The connection ramp


async def test_connect_rate_spreads_the_connections_at_start_and_after_a_mass_disconnection() -> None:
    # 10 feeds at 20 per second: 9 gaps of 50 ms. A ramp that did nothing
    # would connect them all within a few milliseconds.
    keys = [f"user-{number}" for number in range(10)]
    async with FeedServer(tokens=[token_of(key) for key in keys]) as server:
        pool = make_pool(server.url, connect_rate=20)
        loop = asyncio.get_running_loop()
        times: dict[bool, list[float]] = {False: [], True: []}

        @pool.on("connected")
        def record(event: chatfeed.Connected, feed: str) -> None:
            times[event.is_reconnect].append(loop.time())

        connected = Seen()
        pool.on("connected")(connected)
        for key in keys:
            pool.add(key, token=token_of(key))
        async with pool:
            server.drop_connections()
            await connected.wait_for(20)
        for is_reconnect, spread in times.items():
            span = max(spread) - min(spread)
            assert span >= 0.3, f"{'reconnects' if is_reconnect else 'connections'} within {span:.3f} s"


# Statistics


async def test_statistics_count_the_feeds_by_state() -> None:
    async with backend("up", "silent", "overloaded") as server:
        server.silent.add("silent")
        server.close_after_auth["overloaded"] = (1013, "try again later")  # a wait of 5 s at least
        pool = make_pool(server.url, auth_timeout=30_000 * MS)
        stopped, connected, disconnected = Seen(), Seen(), Seen()
        pool.on("feed_stopped")(stopped)
        pool.on("connected")(connected)
        pool.on("disconnected")(disconnected)
        entered = asyncio.Event()

        async def stuck() -> str:
            entered.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        for key in ("up", "silent", "overloaded", "bad"):
            pool.add(key, token=token_of(key))
        pool.add("stuck", token=stuck)
        run = asyncio.create_task(pool.run())
        try:
            stream = pool.events()
            await stopped.wait_for(1)
            await disconnected.wait_for(1)
            await wait_until(lambda: "silent" in server.received.events, server.received)
            await connected.wait_until(lambda pairs: "up" in [key for key, _ in pairs])
            await asyncio.wait_for(entered.wait(), WAIT)
            expectation = pool.expect("new_message")
            stats = pool.statistics()
            assert (stats.feeds, stats.up, stats.connecting, stats.authenticating) == (5, 1, 1, 1)
            assert (stats.backing_off, stats.failed) == (1, 1)
            assert (stats.connections, stats.reconnects) == (2, 0)
            assert (stats.event_streams, stats.expectations) == (1, 1)
            states = {key: pool.statistics(key).state for key in pool.feeds()}
            assert states == {
                "up": "open",
                "silent": "authenticating",
                "overloaded": "backing_off",
                "bad": "closed",
                "stuck": "connecting",
            }
            assert [key for key in pool.feeds() if pool.statistics(key).connected] == ["up"]
            per_feed = [pool.statistics(key) for key in pool.feeds()]
            assert stats.frames_received == sum(feed.frames_received for feed in per_feed)
            assert pool.statistics("overloaded").connections == 1
            with pytest.raises(chatfeed.UsageError, match="no feed 'nobody'"):
                pool.statistics("nobody")
            expectation.cancel()
            await stream.aclose()
        finally:
            await close_within(pool)
            await asyncio.wait([run], timeout=WAIT)
        stats = pool.statistics()
        assert (stats.up, stats.connecting, stats.authenticating, stats.backing_off, stats.failed) == (0, 0, 0, 0, 1)


# Usage errors


@pytest.mark.parametrize("key", ["", 17, None, b"user"])
async def test_a_feeds_key_must_be_a_non_empty_str(key: Any) -> None:
    pool = make_pool("ws://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError, match="non-empty str"):
        pool.add(key, token=TOKEN)
    assert len(pool) == 0


@pytest.mark.parametrize("token", ["", 17, None])
async def test_a_feeds_token_must_be_a_str_or_a_function(token: Any) -> None:
    pool = make_pool("ws://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError, match="token"):
        pool.add("a", token=token)
    assert len(pool) == 0


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan"), True, "10", None])
async def test_connect_rate_must_be_a_positive_finite_number(rate: Any) -> None:
    with pytest.raises(chatfeed.UsageError, match="connect_rate"):
        make_pool("ws://127.0.0.1:9", connect_rate=rate)


async def test_a_pool_checks_the_options_a_client_does() -> None:
    with pytest.raises(chatfeed.UsageError):
        chatfeed.Pool("http://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError):
        make_pool("ws://127.0.0.1:9", ping_interval=-1)
    pool = make_pool("ws://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError, match="inline"):
        pool.on("feed_stopped", concurrency=2)(lambda event, feed: None)  # type: ignore[call-overload]
    with pytest.raises(chatfeed.UsageError, match="did you mean 'new_message'"):
        pool.on("new_mesage")  # type: ignore[call-overload]


async def test_a_misspelt_feed_stopped_is_named_in_the_usage_error() -> None:
    # Defect: the pool resolves names through the client's table, so the
    # error lists the client's names, leaves "feed_stopped" out, and has no hint.
    pool = make_pool("ws://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError, match="did you mean 'feed_stopped'"):
        pool.on("feed_stoped")  # type: ignore[call-overload]
    with pytest.raises(chatfeed.UsageError, match="'feed_stopped'"):
        pool.expect("stopped")  # type: ignore[call-overload]


async def test_usage_errors_of_the_feeds_and_of_a_closed_pool() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        pool.add("a", token=TOKEN)
        with pytest.raises(chatfeed.UsageError, match="already has a feed 'a'"):
            pool.add("a", token=OTHER_TOKEN)
        with pytest.raises(chatfeed.UsageError, match="no feed 'b'"):
            await pool.remove("b")
        with pytest.raises(chatfeed.UsageError, match="no feed 'b'"):
            pool.statistics("b")
        with pytest.raises(chatfeed.UsageError, match="buffer"):
            pool.events(buffer=0)
        async with pool:
            with pytest.raises(chatfeed.UsageError, match="already running"):
                await pool.__aenter__()
            run = asyncio.create_task(pool.run())  # run() inside async with: until close()
            await asyncio.sleep(0)
            with pytest.raises(chatfeed.UsageError, match="already running"):
                await pool.run()
            with pytest.raises(chatfeed.UsageError, match="no feed 'b'"):
                await pool.remove("b")
        await asyncio.wait_for(run, WAIT)  # returns, without an error
        with pytest.raises(chatfeed.UsageError, match="closed"):
            pool.add("b", token=TOKEN)
        with pytest.raises(chatfeed.UsageError, match="closed"):
            pool.events()
        with pytest.raises(chatfeed.UsageError, match="closed"):
            pool.expect("new_message")
        with pytest.raises(chatfeed.UsageError, match="closed"):
            await pool.run()
        with pytest.raises(chatfeed.UsageError, match="closed"):
            async with pool:
                pass
        assert pool.statistics("a").state == "closed"
        await pool.remove("a")  # a closed pool's feeds can still be taken out
        assert len(pool) == 0


async def test_reading_the_events_of_a_pool_never_started_is_a_usage_error() -> None:
    pool = make_pool("ws://127.0.0.1:9")
    stream = pool.events()
    with pytest.raises(chatfeed.UsageError, match="never started"):
        await asyncio.wait_for(anext(stream), WAIT)
    await stream.aclose()


# Review fixes


async def test_a_cancelled_block_cancels_the_handlers_at_once() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url, drain_timeout=3600.0)  # a drain would hang the test
        pool.add("a", token=TOKEN)
        started = asyncio.Event()
        cancelled = asyncio.Event()

        @pool.on("new_message", concurrency=2)
        async def stuck(event: chatfeed.NewMessage, feed: str) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def block() -> None:
            async with pool:
                await server.push_message(content="x")
                await asyncio.Event().wait()

        task = asyncio.create_task(block())
        await asyncio.wait_for(started.wait(), WAIT)
        task.cancel()
        await asyncio.wait_for(asyncio.wait([task]), WAIT)
        assert task.cancelled() and cancelled.is_set()
        assert chatfeed_tasks() == []


async def test_a_feed_can_remove_itself_from_its_own_handler_and_be_added_again() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        pool.add("a", token=TOKEN)
        readded = asyncio.Event()

        @pool.on("new_message")
        async def renew(event: chatfeed.NewMessage, feed: str) -> None:
            await pool.remove(feed)  # returns at once: the feed stops after this handler
            pool.add(feed, token=TOKEN)
            readded.set()

        async with pool:
            await server.push_message(content="renew")
            await asyncio.wait_for(readded.wait(), WAIT)
            back = pool.expect("connected", feed="a", timeout=WAIT)
            await back
            assert pool.statistics().up == 1
        assert chatfeed_tasks() == []


async def test_an_expectation_of_one_feed_ends_with_that_feeds_fate() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        pool.add("a", token=TOKEN)
        pool.add("b", token=TOKEN)
        async with pool:
            with pytest.raises(chatfeed.UsageError, match="no feed 'nobody'"):
                pool.expect("new_message", feed="nobody")
            of_b = pool.expect("new_message", feed="b")
            await pool.remove("b")
            with pytest.raises(chatfeed.ClientClosedError, match="removed"):
                await of_b.wait(timeout=WAIT)
            server.tokens.discard(TOKEN)  # every reconnect is now rejected: "a" stops
            of_a = pool.expect("new_message", feed="a")
            stopped = pool.expect("feed_stopped", feed="a")
            server.drop_connections()
            assert (await stopped.wait(timeout=WAIT)).feed == "a"
            with pytest.raises(chatfeed.AuthenticationError):
                await of_a.wait(timeout=WAIT)


async def test_the_default_lanes_are_per_feed_and_chat() -> None:
    # Chat ids may be unique per user only: two feeds' chat "1" are not one lane.
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        pool.add("a", token=TOKEN)
        pool.add("b", token=TOKEN)
        both_running = asyncio.Event()
        running: set[str] = set()
        release = asyncio.Event()

        @pool.on("new_message", concurrency=4)
        async def slow(event: chatfeed.NewMessage, feed: str) -> None:
            running.add(feed)
            if running == {"a", "b"}:
                both_running.set()
            await release.wait()

        async with pool:
            await server.push_message(chat_id="1", content="to both feeds")
            await asyncio.wait_for(both_running.wait(), WAIT)
            release.set()


def live_connections() -> weakref.WeakSet[_ClientConnection]:
    """The client connections alive in this process, held weakly."""
    gc.collect()
    return weakref.WeakSet(obj for obj in gc.get_objects() if type(obj) is _ClientConnection)  # not its weak proxies


async def test_a_lost_connection_is_let_go_once_its_feed_is_back(caplog: pytest.LogCaptureFixture) -> None:
    # The error of the lost connection (kept by the supervisor, and in
    # Disconnected.error) and the shared keepalive must not hold it: at
    # 10,000 feeds, one storm would otherwise double the memory.
    # (websockets' log records name their connection, and pytest keeps the
    # records: none are made here.)
    caplog.set_level(logging.WARNING, logger="websockets")
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url, ping_interval=3600.0)
        disconnected: list[chatfeed.Disconnected] = []
        back = Counter()
        pool.on("disconnected")(lambda event, feed: disconnected.append(event))
        pool.on("connected")(lambda event, feed: back.bump() if event.is_reconnect else None)
        for key in "abc":
            pool.add(key, token=TOKEN)
        client = make_client(server.url)
        client.on("connected")(lambda event: back.bump() if event.is_reconnect else None)
        # Only this test's connections are looked at: one that an earlier
        # test in this process leaked would say nothing about this one.
        others = live_connections()
        async with pool, client:
            lost = live_connections() - others
            assert len(lost) == 4
            server.drop_connections()
            await back.wait_for(4)
            assert pool.statistics().up == 3 and client.connected
            assert len(disconnected) == 3  # kept by the application, with their errors
            back_up = live_connections() - others
            assert not lost, f"{len(lost)} lost connection(s) still alive"
            assert len(back_up) == 4


async def test_a_handler_error_while_another_feed_dispatched_is_reported_not_fatal() -> None:
    # The dispatcher is shared: feed b dispatches while feed a's lone async
    # handler still runs; a's exception must still be known as a's handler's.
    async with FeedServer(users={"token-a": "a", "token-b": "b"}) as server:
        pool = make_pool(server.url)
        pool.add("a", token="token-a")
        pool.add("b", token="token-b")
        b_handled = asyncio.Event()
        reported = asyncio.Event()
        stopped: list[str] = []

        @pool.on("new_message")
        async def handle(event: chatfeed.NewMessage, feed: str) -> None:
            if feed == "a":
                await b_handled.wait()
                raise ValueError("a handler bug")
            b_handled.set()

        pool.on("feed_stopped")(lambda event, feed: stopped.append(feed))
        pool.on_error(lambda exc, event: reported.set())
        async with pool:
            await server.push_message(content="a1", user_id="a")
            await server.push_message(content="b1", user_id="b")
            await asyncio.wait_for(reported.wait(), WAIT)
            again = pool.expect("new_message", feed="a", timeout=WAIT)
            await server.push_message(content="a2", user_id="a")
            assert (await again).payload.content == "a2"  # feed a goes on
            assert stopped == [] and pool.statistics().handler_errors >= 1


async def test_close_from_a_handler_ends_the_streams_and_stops_every_feed() -> None:
    async with FeedServer(users={"token-a": "a", "token-b": "b"}) as server:
        pool = make_pool(server.url)
        pool.add("a", token="token-a")
        pool.add("b", token="token-b")
        after_close: list[str] = []

        @pool.on("new_message")
        async def stop(event: chatfeed.NewMessage, feed: str) -> None:
            if pool.statistics().up == 0:
                after_close.append(feed)
            if event.payload.content == "stop":
                await pool.close()  # returns at once

        async with pool:
            stream = pool.events()
            await server.push_message(content="stop", user_id="a")
            # The stream yields what it holds, then ends, instead of waiting forever.
            seen = [event.payload.content async for _, event in stream if isinstance(event, chatfeed.NewMessage)]
            assert seen == ["stop"]
            await server.push_message(content="late", user_id="b")  # feed b was stopped too
        assert after_close == []
        assert chatfeed_tasks() == []


async def test_a_feed_that_removed_itself_is_waited_for_by_close() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        pool = make_pool(server.url)
        pool.add("a", token=TOKEN)
        removed = asyncio.Event()

        @pool.on("new_message")
        async def leave(event: chatfeed.NewMessage, feed: str) -> None:
            await pool.remove(feed)
            removed.set()

        async with pool:
            await server.push_message(content="bye")
            await asyncio.wait_for(removed.wait(), WAIT)
        assert chatfeed_tasks() == []


async def test_the_ramp_gives_a_cancelled_waiters_turn_to_the_next() -> None:
    ramp = Ramp(1.0)  # a turn per second: nothing here may wait for one
    await ramp.wait()  # the first goes at once
    waiters = [asyncio.create_task(ramp.wait()) for _ in range(5)]
    last = asyncio.create_task(ramp.wait())
    await asyncio.sleep(0)  # each is queued
    for waiter in waiters:
        waiter.cancel()
    await asyncio.wait(waiters)
    ramp._let_one_through()  # the timer's job, done now: the cancelled turns are skipped
    await asyncio.wait_for(last, WAIT)
    ramp.close()


async def test_a_late_ramp_timer_lets_every_due_turn_through() -> None:
    # On a busy loop the timer fires late: the turns due by then all go, so
    # that the rate holds on average instead of drifting down.
    ramp = Ramp(10.0)
    await ramp.wait()
    waiters = [asyncio.create_task(ramp.wait()) for _ in range(4)]
    await asyncio.sleep(0)
    ramp._next = asyncio.get_running_loop().time() - 0.25  # three turns are due: -0.25, -0.15, -0.05
    ramp._let_one_through()
    await asyncio.sleep(0)
    assert [waiter.done() for waiter in waiters] == [True, True, True, False]
    ramp.close()
    for waiter in waiters:
        waiter.cancel()
    await asyncio.wait(waiters)


async def test_removing_a_feed_that_waits_for_room_leaves_the_others_waiting() -> None:
    # Every feed waiting for room in a full stream waits on one shared future:
    # cancelling one feed (remove) must not cancel the others' wait.
    async with FeedServer(users={"token-a": "a", "token-b": "b"}) as server:
        pool = make_pool(server.url)
        pool.add("a", token="token-a")
        pool.add("b", token="token-b")
        handled: collections.Counter[str] = collections.Counter()
        both_wait = asyncio.Event()

        @pool.on("new_message")
        def count(event: chatfeed.NewMessage, feed: str) -> None:
            # Handlers run before the streams: once a has handled its second
            # event (its first fills the buffer) and b its first, both are
            # about to wait for room, before this test runs again.
            handled[feed] += 1
            if handled["a"] >= 2 and handled["b"] >= 1:
                both_wait.set()

        async with pool:
            stream = pool.events(buffer=1)
            for user in ("a", "b"):
                for text in ("1", "2", "3"):
                    await server.push_message(content=f"{user}{text}", user_id=user)
            await asyncio.wait_for(both_wait.wait(), WAIT)
            await pool.remove("a")
            seen: list[str] = []
            while len([text for text in seen if text.startswith("b")]) < 3:
                _, event = await asyncio.wait_for(anext(stream), WAIT)
                assert isinstance(event, chatfeed.NewMessage)
                seen.append(event.payload.content)
            assert [text for text in seen if text.startswith("b")] == ["b1", "b2", "b3"]
            assert pool.statistics().failed == 0

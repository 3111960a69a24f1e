"""chatfeed.sync.Pool: the blocking pool, against real servers running in other threads.

As in test_sync.py, test functions are sync and the servers run on loops of
their own, in other threads. Every test checks that no thread is left behind,
and every pool that no task was.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from typing_extensions import assert_type

import chatfeed
import chatfeed.sync

from ..conftest import BAD_TOKEN, FAST, MS, SECRET, SIGNATURE
from .conftest import WAIT, content
from .test_sync import PROMPTLY, Feed, chatfeed_threads, in_thread, watch_log

pytestmark = pytest.mark.timeout(20)

USERS = ("alice", "bob", "carol", "dave")


def token_of(user: str) -> str:
    """A test token for ``user`` (holding the secret, as every test token does)."""
    return f"eyJhbGciOiJIUzI1NiJ9.{SECRET}-{user}.{SIGNATURE}"


POOLS: list[chatfeed.sync.Pool] = []


def make_pool(url: str, *users: str, **options: Any) -> chatfeed.sync.Pool:
    """A sync pool with test-friendly defaults and a feed per user, checked at the end of the test."""
    options.setdefault("reconnect", FAST)
    options.setdefault("auth_timeout", 2000 * MS)
    options.setdefault("open_timeout", 2000 * MS)
    options.setdefault("close_timeout", 500 * MS)
    pool = chatfeed.sync.Pool(url, **options)
    for user in users:
        pool.add(user, token=token_of(user))
    POOLS.append(pool)
    return pool


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    before = set(threading.enumerate())
    POOLS.clear()
    yield
    pools, POOLS[:] = list(POOLS), []
    for pool in pools:
        pool.close()  # a no-op for those the test closed; it must be harmless
        assert pool._mode == "closed"
        assert pool._portal.leftovers == 0, "tasks were still running on the pool's loop when it closed"
    left = [thread for thread in threading.enumerate() if thread not in before and thread.is_alive()]
    assert not left, f"threads left running: {left}"


@pytest.fixture
def feed() -> Iterator[Feed]:
    with Feed(users={token_of(user): user for user in USERS}) as feed:
        yield feed


def push(feed: Feed, user: str, *contents: str) -> None:
    for text in contents:
        feed.do(functools.partial(feed.server.push_message, content=text, user_id=user))


# with and events()


def test_with_returns_once_every_feed_is_up_or_stopped_and_events_yield_key_and_event(feed: Feed) -> None:
    pool = make_pool(feed.url, "alice", "bob")
    pool.add("mallory", token=BAD_TOKEN)
    assert chatfeed_threads() == [], "the thread starts at first use, not in __init__ or add()"
    assert len(pool) == 3 and "bob" in pool and pool.feeds() == ["alice", "bob", "mallory"]
    with pool:
        stats = pool.statistics()
        assert_type(stats, chatfeed.PoolStatistics)
        assert (stats.feeds, stats.up, stats.failed) == (3, 2, 1)
        assert_type(pool.statistics("alice"), chatfeed.ClientStatistics)
        assert chatfeed_threads() == ["chatfeed-sync"]
        stream = pool.events(timeout=WAIT)
        assert_type(stream, chatfeed.sync.PoolEventStream)
        push(feed, "alice", "a1", "a2")
        push(feed, "bob", "b1")
        received = [(key, content(event)) for key, event in (next(stream), next(stream), next(stream))]
        assert [pair for pair in received if pair[0] == "alice"] == [("alice", "a1"), ("alice", "a2")]
        assert sorted(received) == [("alice", "a1"), ("alice", "a2"), ("bob", "b1")]
        stream.timeout = 50 * MS
        with pytest.raises(TimeoutError, match="no event within"):
            next(stream)
        push(feed, "bob", "b2")
        stream.timeout = WAIT
        key, event = next(stream)
        assert (key, content(event)) == ("bob", "b2")
    assert chatfeed_threads() == []
    assert repr(pool).startswith("<chatfeed.sync.Pool url=") and repr(pool).endswith("closed>")
    feed.wait_for_clients(0)


def test_events_of_the_blocks_first_line_miss_nothing_and_end_when_the_pool_closes(feed: Feed) -> None:
    pool = make_pool(feed.url, "alice")
    subscribed, both = threading.Event(), threading.Event()

    def read() -> list[str]:
        with pool:
            push(feed, "alice", "first")  # before events(): held for the block's first call
            stream = pool.events()
            subscribed.set()
            received = []
            for _, event in stream:
                received.append(content(event))
                if len(received) == 2:
                    both.set()
            return received

    reader, outcome = in_thread(read)
    assert subscribed.wait(WAIT)
    push(feed, "alice", "second")
    assert both.wait(WAIT)
    pool.close()  # from another thread: the iteration ends
    reader.join(WAIT)
    assert outcome == [["first", "second"]]


def test_remove_blocks_until_the_feed_has_stopped_and_feeds_can_be_added_while_running(feed: Feed) -> None:
    pool = make_pool(feed.url, "alice", "bob")
    with pool:
        stream = pool.events(timeout=WAIT)
        bob_waits = pool.expect("new_message", feed="bob")
        pool.remove("bob")
        feed.wait_for_clients(1)
        assert "bob" not in pool and pool.feeds() == ["alice"]
        with pytest.raises(chatfeed.ClientClosedError):
            bob_waits.wait(WAIT)
        with pytest.raises(chatfeed.UsageError, match="no feed 'bob'"):
            pool.remove("bob")
        connected = pool.expect("connected", where=lambda event: event.feed == "carol")  # no feed "carol" yet
        pool.add("carol", token=token_of("carol"))
        assert connected.wait(WAIT).feed == "carol"
        push(feed, "carol", "c1")
        push(feed, "alice", "a1")
        received = {(key, content(event)) for key, event in (next(stream), next(stream))}
        assert received == {("carol", "c1"), ("alice", "a1")}


def test_expect_one_feeds_event_typed_by_where(feed: Feed) -> None:
    with make_pool(feed.url, "alice", "bob") as pool:
        with pool.expect("new_message", feed="bob", where=lambda e: e.payload.content.startswith("b")) as reply:
            assert_type(reply, chatfeed.sync.Expectation[chatfeed.NewMessage])
            push(feed, "alice", "b-but-alice")
            push(feed, "bob", "x", "b-bob")
            event = reply.wait(WAIT)
        assert (event.feed, event.payload.content) == ("bob", "b-bob")
        with pytest.raises(chatfeed.UsageError, match="no feed 'zed'"):
            pool.expect("new_message", feed="zed")
        with pytest.raises(TimeoutError):
            pool.expect("new_chat", timeout=50 * MS).wait()


def test_from_the_pools_own_thread_blocking_calls_are_refused_and_close_returns_at_once(feed: Feed) -> None:
    with make_pool(feed.url, "alice") as pool:

        def removes(event: chatfeed.NewMessage) -> bool:
            pool.remove("alice")
            return True  # pragma: no cover

        def closes(event: chatfeed.NewMessage) -> bool:
            pool.close()
            return True

        refused = pool.expect("new_message", where=removes)
        closing = pool.expect("new_message", where=closes)
        push(feed, "alice", "a1")
        with pytest.raises(chatfeed.UsageError, match=r"chatfeed\.sync\.Pool was called from its own thread"):
            refused.wait(WAIT)
        assert closing.wait(WAIT).feed == "alice"
        feed.wait_for_clients(0)  # closed, though the block goes on
    assert chatfeed_threads() == []


# Arguments, and a pool never started


def test_arguments_are_checked_at_once_and_a_pool_never_started_closes_without_a_thread() -> None:
    before = set(threading.enumerate())
    with pytest.raises(chatfeed.UsageError, match="connect_rate"):
        chatfeed.sync.Pool("ws://127.0.0.1:9", connect_rate=0)
    with pytest.raises(chatfeed.UsageError, match="ping_interval"):
        chatfeed.sync.Pool("ws://127.0.0.1:9", ping_interval=-1)
    pool = make_pool("ws://127.0.0.1:9", "alice")
    with pytest.raises(chatfeed.UsageError, match="non-empty str"):
        pool.add("", token="t")
    with pytest.raises(chatfeed.UsageError, match="already has a feed"):
        pool.add("alice", token="t")
    with pytest.raises(chatfeed.UsageError, match="unknown event"):
        pool.on("nope")  # type: ignore[call-overload]

    async def answer(event: chatfeed.NewMessage, feed: str) -> None:
        pass  # pragma: no cover

    with pytest.raises(chatfeed.UsageError, match=r"is async.*chatfeed\.Pool"):
        pool.on("new_message")(answer)  # type: ignore[type-var]

    with pytest.raises(chatfeed.UsageError, match=r"one at a time.*chatfeed\.Pool"):
        pool.on("new_message", concurrency=4)  # type: ignore[call-overload]
    assert pool.statistics().feeds == 1
    assert set(threading.enumerate()) == before
    pool.close()
    pool.close()
    assert set(threading.enumerate()) == before
    with pytest.raises(chatfeed.UsageError, match="closed"):
        pool.add("bob", token="t")
    with pytest.raises(chatfeed.UsageError, match="closed"):
        pool.run()
    with pytest.raises(chatfeed.UsageError, match="closed"):
        pool.events()


def test_with_refuses_a_pool_with_handlers_and_on_refuses_a_pool_in_with(feed: Feed) -> None:
    pool = make_pool(feed.url, "alice")
    pool.on("new_message")(lambda event, feed: None)
    with pytest.raises(chatfeed.UsageError, match=r"called by run\(\)"), pool:
        pass
    with make_pool(feed.url) as other:
        with pytest.raises(chatfeed.UsageError, match=r"called by run\(\)"):
            other.on("new_message")(lambda event, feed: None)
        with pytest.raises(chatfeed.UsageError, match="already running"):
            other.run()


# run() and handlers


def test_run_calls_every_feeds_handlers_in_this_thread_one_at_a_time_in_order_per_feed(feed: Feed) -> None:
    users = USERS
    pool = make_pool(feed.url, *users)
    pool.add("mallory", token=BAD_TOKEN)
    here: set[int] = set()
    active, most = [0], [0]
    handled: dict[str, list[str]] = {user: [] for user in users}
    stopped: list[str] = []
    done, stopped_too = threading.Event(), threading.Event()
    up: set[str] = set()

    @pool.on("connected")
    def connected(event: chatfeed.Connected, key: str) -> None:
        up.add(key)
        if up == set(users):
            for user in users:  # all at once: every feed has calls waiting for their turn
                push(feed, user, *(f"{user}-{number}" for number in range(5)))

    @pool.on("feed_stopped")
    def feed_stopped(event: chatfeed.FeedStopped, key: str) -> None:
        assert isinstance(event.error, chatfeed.ChatfeedError)
        stopped.append(key)
        stopped_too.set()

    @pool.on("new_message")
    def slow(event: chatfeed.NewMessage, key: str) -> None:
        here.add(threading.get_ident())
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(5 * MS)
        handled[key].append(event.payload.content)
        active[0] -= 1
        if sum(map(len, handled.values())) == 5 * len(users):
            done.set()

    runner, outcome = in_thread(pool.run)
    assert done.wait(WAIT)
    assert stopped_too.wait(WAIT)
    pool.close()
    runner.join(WAIT)
    assert outcome == [None]
    assert here == {runner.ident}
    assert most == [1]
    assert handled == {user: [f"{user}-{number}" for number in range(5)] for user in users}
    assert stopped == ["mallory"]


def test_handler_errors_go_to_on_error_hooks_in_this_thread(feed: Feed) -> None:
    pool = make_pool(feed.url, "alice")
    hooked: list[tuple[str, str | None, int]] = []

    @pool.on("connected")
    def connected(event: chatfeed.Connected, key: str) -> None:
        push(feed, key, "boom", "fine")

    @pool.on("new_message")
    def handler(event: chatfeed.NewMessage, key: str) -> None:
        if event.payload.content == "boom":
            raise ValueError("boom")
        pool.close()

    @pool.on_error
    def hook(exc: Exception, event: Any) -> None:
        hooked.append((str(exc), event.feed, threading.get_ident()))

    runner, outcome = in_thread(pool.run)
    runner.join(WAIT)
    assert outcome == [None]
    assert hooked == [("boom", "alice", runner.ident)]
    assert pool.statistics().handler_errors == 1


def test_close_from_another_thread_lets_the_running_handler_finish_and_calls_no_other(feed: Feed) -> None:
    pool = make_pool(feed.url, "alice", "bob")
    started, release = threading.Event(), threading.Event()
    handled: list[str] = []
    up: set[str] = set()

    @pool.on("connected")
    def connected(event: chatfeed.Connected, key: str) -> None:
        up.add(key)
        if len(up) == 2:
            push(feed, "alice", "a1", "a2")

    @pool.on("new_message")
    def slow(event: chatfeed.NewMessage, key: str) -> None:
        if event.payload.content == "a1":
            push(feed, "bob", "b1")  # bob's call waits for its turn behind this one
            started.set()
            assert release.wait(WAIT)
        handled.append(event.payload.content)

    runner, outcome = in_thread(pool.run)
    assert started.wait(WAIT)
    time.sleep(100 * MS)  # bob's call has been handed over
    with watch_log("once handler") as waiting:
        closer, closed = in_thread(pool.close, name="closer")
        assert waiting.wait(WAIT)
    release.set()  # close() waits for the handler it cannot interrupt
    closer.join(WAIT)
    runner.join(WAIT)
    assert closed == [None] and outcome == [None]
    assert handled == ["a1"]
    feed.wait_for_clients(0)


def test_close_from_a_handler_ends_run_and_the_other_feeds_calls_are_not_made(feed: Feed) -> None:
    pool = make_pool(feed.url, "alice", "bob")
    handled: list[str] = []
    up: set[str] = set()

    @pool.on("connected")
    def connected(event: chatfeed.Connected, key: str) -> None:
        up.add(key)
        if len(up) == 2:
            push(feed, "alice", "stop")

    @pool.on("new_message")
    def handler(event: chatfeed.NewMessage, key: str) -> None:
        handled.append(event.payload.content)
        if event.payload.content == "stop":
            push(feed, "bob", "b1")
            time.sleep(100 * MS)  # bob's call has been handed over
            pool.close()

    started = time.monotonic()
    pool.run()
    assert time.monotonic() - started < WAIT
    assert handled == ["stop"]
    assert chatfeed_threads() == []


def test_close_from_another_thread_while_run_waits_returns_promptly(feed: Feed) -> None:
    pool = make_pool(feed.url, "alice", "bob")
    connected = pool.expect("connected", feed="bob")
    runner, outcome = in_thread(pool.run)
    connected.wait(WAIT)
    started = time.monotonic()
    pool.close()
    took = time.monotonic() - started
    runner.join(PROMPTLY)
    assert not runner.is_alive() and outcome == [None]
    assert took < PROMPTLY, f"close() took {took:.3f} s"
    feed.wait_for_clients(0)


def test_a_handler_may_remove_its_own_feed_and_run_goes_on(feed: Feed) -> None:
    pool = make_pool(feed.url, "alice", "bob")
    handled: list[tuple[str, str]] = []

    @pool.on("new_message")
    def handler(event: chatfeed.NewMessage, key: str) -> None:
        handled.append((key, event.payload.content))
        if event.payload.content == "leave":
            pool.remove(key)
            push(feed, "bob", "b1")
        elif key == "bob":
            pool.close()

    up = pool.expect("connected", feed="bob")
    runner, outcome = in_thread(pool.run)
    up.wait(WAIT)
    push(feed, "alice", "leave")
    runner.join(WAIT)
    assert outcome == [None]
    assert handled == [("alice", "leave"), ("bob", "b1")]


_INTERRUPTED_PROGRAM = """
import sys, time
from chatfeed.sync import Pool

url, mode, *tokens = sys.argv[1:]
pool = Pool(url)
for number, token in enumerate(tokens):
    pool.add(f"user{number}", token=token)
up = set()

@pool.on("connected")
def ready(event, feed):
    up.add(feed)
    if mode == "in a handler" or len(up) == len(tokens):
        print("connected", flush=True)
    while mode == "in a handler":
        time.sleep(0.05)  # interrupted here

pool.run()
print("stopped cleanly", flush=True)
"""


@pytest.mark.parametrize("mode", ["waiting", "in a handler"])
def test_ctrl_c_closes_the_pool_and_run_returns(feed: Feed, mode: str) -> None:
    tokens = [token_of("alice"), token_of("bob")]
    with subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_PROGRAM, feed.url, mode, *tokens],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as program:
        try:
            assert program.stdout is not None
            # In a handler: the first feed's never returns, and the second's waits its turn.
            assert program.stdout.readline() == b"connected\n"
            program.send_signal(signal.SIGINT)
            stdout, stderr = program.communicate(timeout=WAIT)
        finally:
            if program.returncode is None:
                program.kill()
                program.wait()
    assert program.returncode == 0, stderr.decode()
    assert stdout == b"stopped cleanly\n"
    assert b"Traceback" not in stderr
    feed.wait_for_clients(0)

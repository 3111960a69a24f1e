"""chatfeed.sync: the blocking client, against real servers running in other threads.

Test functions are sync, as the client's users are. The servers run on event
loops of their own, in other threads (ThreadedFeedServer, LoopThread), so
that nothing here runs a loop the client could lean on. Every test checks
that no thread is left behind, and every client that no task was.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import chatfeed
import chatfeed.sync
from chatfeed._logging import redacting_logger

from ..conftest import BAD_TOKEN, FAST, MS, TOKEN
from .conftest import WAIT, ThreadedFeedServer, content

T = TypeVar("T")

EXAMPLES = Path(__file__).parents[2] / "examples"

PROMPTLY = 1000 * MS
"""How long close() may take to return when nothing holds it up: a bound, not a delay."""


class Feed(ThreadedFeedServer):
    """A FeedServer on a loop of its own, driven from sync code."""

    def __enter__(self) -> Feed:
        super().__enter__()
        return self

    def do(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await ``make()`` on the server's loop and return what it gives."""

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(WAIT)

    @property
    def url(self) -> str:
        return self.server.url

    def push(self, *contents: str) -> None:
        for text in contents:
            self.do(functools.partial(self.server.push_message, content=text))

    def drop(self) -> None:
        self._loop.call_soon_threadsafe(self.server.drop_connections)

    def wait_for_clients(self, count: int) -> None:
        self.do(lambda: self.server.wait_for_clients(count, timeout=WAIT))


class LoopThread:
    """An event loop in a thread, for a bare websockets server that FeedServer cannot imitate."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-loop", daemon=True)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT)
        self._loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(WAIT)

    @contextlib.contextmanager
    def raw_server(self, handler: Callable[[ServerConnection], Awaitable[None]]) -> Iterator[str]:
        async def start() -> Server:
            server: Server = await serve(handler, "127.0.0.1", 0, logger=redacting_logger("websockets.server"))
            return server

        server = self.run(start())
        try:
            host, port = server.sockets[0].getsockname()[:2]
            yield f"ws://{host}:{port}"
        finally:

            async def stop() -> None:
                server.close()
                await server.wait_closed()

            self.run(stop())


CLIENTS: list[chatfeed.sync.Client] = []


def make_client(url: str, **options: Any) -> chatfeed.sync.Client:
    """A sync client with test-friendly defaults, checked at the end of the test."""
    options.setdefault("token", TOKEN)
    options.setdefault("reconnect", FAST)
    options.setdefault("auth_timeout", 2000 * MS)
    options.setdefault("open_timeout", 2000 * MS)
    options.setdefault("close_timeout", 500 * MS)
    client = chatfeed.sync.Client(url, **options)
    CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    before = set(threading.enumerate())
    CLIENTS.clear()
    yield
    clients, CLIENTS[:] = list(CLIENTS), []
    for client in clients:
        client.close()  # a no-op for those the test closed; it must be harmless
        assert client.statistics().state in ("closed", "unopened")
        assert client._portal.leftovers == 0, "tasks were still running on the client's loop when it closed"
    left = [thread for thread in threading.enumerate() if thread not in before and thread.is_alive()]
    assert not left, f"threads left running: {left}"


@pytest.fixture
def feed() -> Iterator[Feed]:
    with Feed(tokens=[TOKEN]) as feed:
        yield feed


def in_thread(target: Callable[[], object], name: str = "test-worker") -> tuple[threading.Thread, list[object]]:
    """Start ``target`` in a thread; the list gets what it returned, or what it raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread, outcome


class _LogWatcher(logging.Handler):
    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.seen.set()

    def wait(self, timeout: float) -> bool:
        return self.seen.wait(timeout)


@contextlib.contextmanager
def watch_log(needle: str) -> Iterator[_LogWatcher]:
    """Let a test wait, in any thread, for a record of the ``chatfeed`` logger containing ``needle``."""
    watcher = _LogWatcher(needle)
    logger = logging.getLogger("chatfeed")
    logger.addHandler(watcher)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)


def chatfeed_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("chatfeed")]


# Iterating in a with block


def test_with_returns_once_authenticated_and_events_come_in_order(feed: Feed) -> None:
    client = make_client(feed.url)
    assert chatfeed_threads() == [], "the thread starts at first use, not in __init__"
    with client:
        assert client.connected
        assert chatfeed_threads() == ["chatfeed-sync"]
        stream = client.events()
        feed.push("a", "b", "c")
        received = []
        for event in stream:
            received.append(content(event))
            if len(received) == 3:
                break
        assert received == ["a", "b", "c"]
    assert not client.connected
    assert client.statistics().state == "closed"
    assert chatfeed_threads() == []


def test_events_end_when_the_client_closes_after_what_they_hold(feed: Feed) -> None:
    client = make_client(feed.url)
    with client:
        stream = client.events()
        arrived = client.expect("new_message", where=lambda e: e.payload.content == "b")
        feed.push("a", "b")
        arrived.wait(WAIT)
    # Closed: the stream yields what it held, then ends, without a loop to read it on.
    assert [content(event) for event in stream] == ["a", "b"]


def test_events_timeout_raises_timeout_error_and_the_iterator_stays_usable(feed: Feed) -> None:
    with make_client(feed.url) as client:
        stream = client.events(timeout=50 * MS)
        with pytest.raises(TimeoutError, match="no event within"):
            next(stream)
        feed.push("after the timeout")
        stream.timeout = WAIT
        assert content(next(stream)) == "after the timeout"
        assert client.statistics().event_streams == 1


def test_a_stream_nothing_refers_to_any_more_unsubscribes(feed: Feed) -> None:
    with make_client(feed.url) as client:
        stream = client.events(timeout=WAIT)
        feed.push("a", "b")
        for event in stream:
            assert content(event) == "a"
            break
        assert client.statistics().event_streams == 1
        del stream  # as leaving `for event in client.events():` with break does
        assert client.statistics().event_streams == 0
        with client.events() as scoped:
            assert client.statistics().event_streams == 1
        assert client.statistics().event_streams == 0
        assert list(scoped) == []


def test_a_stream_closed_from_another_thread_ends_the_read_waiting_in_this_one(feed: Feed) -> None:
    with make_client(feed.url) as client:
        stream = client.events()
        closer, _ = in_thread(stream.close)
        assert list(stream) == []
        closer.join(WAIT)
        assert client.statistics().event_streams == 0


def test_a_stream_read_by_two_threads_at_once_is_a_usage_error(feed: Feed) -> None:
    with make_client(feed.url) as client:
        stream = client.events(timeout=WAIT)
        # What a thread waiting in next() holds.
        with stream._reading, pytest.raises(chatfeed.UsageError, match="another thread is already reading"):
            next(stream)
        feed.push("one")
        assert content(next(stream)) == "one"


def test_unread_stream_stops_the_client_reading_the_socket_and_loses_nothing() -> None:
    # As the async client's test: the server sends many large frames, then a
    # ping. While nobody calls next(), the client must neither take frames off
    # the connection (beyond the stream's buffer and the one being delivered)
    # nor read as far as the ping; once the stream is read, everything arrives,
    # in order, and the pong goes back.
    count = 100
    # Incompressible, so that it fills the socket buffers.
    fillers = [base64.b64encode(os.urandom(48 * 1024)).decode() for _ in range(count)]
    pong_received = threading.Event()

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps({"type": "auth_success"}))
        for index in range(count):
            await ws.send(json.dumps({"type": "error", "message": f"{index}:{fillers[index]}"}))
        pong = await ws.ping()
        with contextlib.suppress(ConnectionClosed):
            await pong
            pong_received.set()
            await ws.wait_closed()

    with LoopThread() as loop, loop.raw_server(handler) as url, make_client(url, ping_interval=None) as client:
        stream = client.events(buffer=1)
        # The observation window: on a slow machine it can only make the
        # assertions easier to meet, never fail a correct client.
        assert not pong_received.wait(500 * MS), "the client read the whole feed although nobody called next()"
        stalled_frames = client.statistics().frames_received
        # auth_success, the event in the buffer, the event waiting for room
        assert stalled_frames <= 3, f"the client took {stalled_frames} frames off a connection nobody reads"
        received = []
        for event in stream:
            assert isinstance(event, chatfeed.ErrorMessage)
            received.append(int(event.message.partition(":")[0]))
            if len(received) == count:
                break
        assert pong_received.wait(WAIT)
    assert received == list(range(count))


def test_reconnects_after_the_server_drops_and_events_go_on(feed: Feed) -> None:
    with make_client(feed.url) as client:
        stream = client.events(timeout=WAIT)
        feed.push("before")
        assert content(next(stream)) == "before"
        with client.expect("connected", where=lambda e: e.is_reconnect) as reconnected:
            feed.drop()
            assert reconnected.wait(WAIT).downtime is not None
        feed.wait_for_clients(1)
        feed.push("after")
        assert content(next(stream)) == "after"
        assert client.statistics().connections == 2


# Errors


def test_an_auth_failure_is_raised_from_with_and_leaves_no_thread(feed: Feed) -> None:
    client = make_client(feed.url, token=BAD_TOKEN)
    with pytest.raises(chatfeed.AuthenticationError), client:
        pytest.fail("the block must not run")  # pragma: no cover
    assert chatfeed_threads() == []
    assert client.statistics().state == "closed"
    with pytest.raises(chatfeed.UsageError, match="closed; create a new one"), client:
        pass  # pragma: no cover


def test_an_auth_failure_is_raised_from_run(feed: Feed) -> None:
    client = make_client(feed.url, token=BAD_TOKEN)
    connected: list[object] = []
    client.on("connected")(connected.append)
    with pytest.raises(chatfeed.AuthenticationError):
        client.run()
    assert connected == []
    assert chatfeed_threads() == []
    with pytest.raises(chatfeed.UsageError, match="closed; create a new one"):
        client.run()


def test_a_fatal_error_ends_events_with_it_and_with_does_not_raise_it_again(feed: Feed) -> None:
    with make_client(feed.url, reconnect=False) as client:
        stream = client.events()
        feed.drop()
        with pytest.raises(chatfeed.ConnectionLostError):
            next(stream)
        assert list(stream) == []


def test_a_fatal_error_while_the_block_did_something_else_is_raised_on_leaving_it(feed: Feed) -> None:
    client = make_client(feed.url, reconnect=False)
    with pytest.raises(chatfeed.ConnectionLostError), client:  # noqa: PT012  (the block is what is tested)
        lost = client.expect("disconnected")
        feed.drop()
        assert lost.wait(WAIT).will_retry is False


def test_run_raises_the_error_that_stopped_the_client(feed: Feed) -> None:
    client = make_client(feed.url, reconnect=False)
    lost: list[bool] = []
    client.on("connected")(lambda event: feed.drop())
    client.on("disconnected")(lambda event: lost.append(event.will_retry))
    with pytest.raises(chatfeed.ConnectionLostError):
        client.run()
    assert lost == [False]
    assert chatfeed_threads() == []


def test_arguments_are_checked_at_once_and_start_nothing() -> None:
    with pytest.raises(chatfeed.UsageError, match="ping_interval"):
        chatfeed.sync.Client("ws://127.0.0.1:9", token=TOKEN, ping_interval=-1)
    client = make_client("ws://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError, match="timeout"):
        client.events(timeout=0)
    with pytest.raises(chatfeed.UsageError, match="unknown event"):
        client.on("new_mesage")  # type: ignore[call-overload]
    assert chatfeed_threads() == []


def test_a_client_never_started_closes_without_a_thread_and_twice() -> None:
    client = make_client("ws://127.0.0.1:9")
    client.close()
    client.close()
    assert chatfeed_threads() == []
    assert client.statistics().state == "closed"
    assert client._portal.started is False
    with pytest.raises(chatfeed.UsageError, match="closed"):
        client.events()
    with pytest.raises(chatfeed.UsageError, match="closed"):
        client.expect("new_message")


def test_reading_events_of_a_client_never_started_is_a_usage_error() -> None:
    client = make_client("ws://127.0.0.1:9")
    stream = client.events()
    with pytest.raises(chatfeed.UsageError, match="never started"):
        next(stream)
    client.close()
    assert list(stream) == []


def test_async_handlers_and_concurrency_are_refused_with_a_hint() -> None:
    client = make_client("ws://127.0.0.1:9")

    async def answer(event: chatfeed.NewMessage) -> None:
        pass  # pragma: no cover

    with pytest.raises(chatfeed.UsageError, match=r"is async.*chatfeed\.Client"):
        client.on("new_message")(answer)  # type: ignore[type-var]
    with pytest.raises(chatfeed.UsageError, match=r"is async"):
        client.on_error(answer)  # type: ignore[type-var]
    with pytest.raises(chatfeed.UsageError, match=r"one at a time.*chatfeed\.Client"):
        client.on("new_message", concurrency=8)  # type: ignore[call-overload]
    with pytest.raises(chatfeed.UsageError, match="concurrency must be 1"):
        client.on("new_message", concurrency=0)  # type: ignore[call-overload]


def test_with_refuses_a_client_with_handlers_and_on_refuses_a_client_in_with(feed: Feed) -> None:
    client = make_client(feed.url)
    client.on("new_message")(lambda event: None)
    with pytest.raises(chatfeed.UsageError, match=r"called by run\(\)"), client:
        pass  # pragma: no cover
    with make_client(feed.url) as other:
        with pytest.raises(chatfeed.UsageError, match=r"called by run\(\)"):
            other.on("new_message")(lambda event: None)
        with pytest.raises(chatfeed.UsageError, match="already running"):
            other.run()


# run() and handlers


def test_run_calls_handlers_in_this_thread_in_order_with_lifecycle_events(feed: Feed) -> None:
    client = make_client(feed.url)
    seen: list[tuple[str, str]] = []
    threads: set[int] = set()

    @client.on("connected")
    def connected(event: chatfeed.Connected) -> None:
        threads.add(threading.get_ident())
        seen.append(("connected", "again" if event.is_reconnect else "first"))
        if not event.is_reconnect:
            feed.push("1", "2")
        else:
            feed.push("3")

    @client.on("new_message")
    def message(event: chatfeed.NewMessage) -> None:
        threads.add(threading.get_ident())
        seen.append(("message", event.payload.content))
        if event.payload.content == "2":
            feed.drop()
        elif event.payload.content == "3":
            client.close()

    @client.on(chatfeed.ServerMessage)
    def every(event: chatfeed.ServerMessage) -> None:
        seen.append(("server message", event.type))

    @client.on("disconnected")
    def disconnected(event: chatfeed.Disconnected) -> None:
        threads.add(threading.get_ident())
        seen.append(("disconnected", "will retry" if event.will_retry else "for good"))

    client.run()
    assert seen == [
        ("connected", "first"),
        ("message", "1"),
        ("server message", "new_message"),
        ("message", "2"),
        ("server message", "new_message"),
        ("disconnected", "will retry"),
        ("connected", "again"),
        ("message", "3"),
        ("server message", "new_message"),
    ]
    assert threads == {threading.get_ident()}
    assert chatfeed_threads() == []
    assert client.statistics().state == "closed"


def test_handler_errors_go_to_on_error_hooks_in_this_thread_and_are_logged(
    feed: Feed, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(feed.url)
    errors: list[tuple[str, str, int]] = []
    handled: list[str] = []

    @client.on("connected")
    def connected(event: chatfeed.Connected) -> None:
        feed.push("1", "2", "3")

    @client.on("new_message")
    def fail_on_odd(event: chatfeed.NewMessage) -> None:
        if int(event.payload.content) % 2:
            raise ValueError(f"odd: {event.payload.content}")

    @client.on("new_message")
    def count(event: chatfeed.NewMessage) -> None:
        handled.append(event.payload.content)
        if len(handled) == 3:
            client.close()

    @client.on_error
    def report(exc: Exception, event: Any) -> None:
        errors.append((repr(exc), event.payload.content, threading.get_ident()))

    client.run()
    here = threading.get_ident()
    assert errors == [("ValueError('odd: 1')", "1", here), ("ValueError('odd: 3')", "3", here)]
    assert handled == ["1", "2", "3"]  # a failing handler stops nothing else
    assert client.statistics().handler_errors == 2
    logged = [record for record in caplog.records if record.getMessage().startswith("handler ")]
    assert [record.getMessage() for record in logged] == [
        "handler test_handler_errors_go_to_on_error_hooks_in_this_thread_and_are_logged.<locals>.fail_on_odd "
        "raised on a new_message event"
    ] * 2
    assert all(record.exc_info and "fail_on_odd" in caplog.handler.format(record) for record in logged)


def test_a_handler_that_waits_for_an_expectation_or_reads_events_is_told_why_it_cannot(feed: Feed) -> None:
    client = make_client(feed.url)
    errors: list[Exception] = []
    stream = client.events()

    @client.on("connected")
    def wait_in_handler(event: chatfeed.Connected) -> None:
        try:
            client.expect("new_message").wait(WAIT)
        finally:
            try:
                next(stream)
            finally:
                client.close()

    client.on_error(lambda exc, event: errors.append(exc))
    client.run()
    assert len(errors) == 1
    assert isinstance(errors[0], chatfeed.UsageError)
    assert "in a handler would wait for ever" in str(errors[0])
    assert "reading events()" in str(errors[0])  # the second one, raised from the finally
    assert "waiting for an expectation" in str(errors[0].__context__)


def test_a_handler_returning_an_awaitable_is_reported(feed: Feed) -> None:
    client = make_client(feed.url)
    errors: list[Exception] = []

    async def later() -> None:
        pass  # pragma: no cover

    def connected(event: chatfeed.Connected) -> Any:
        client.close()
        return later()

    client.on("connected")(connected)
    client.on_error(lambda exc, event: errors.append(exc))
    client.run()
    assert len(errors) == 1 and isinstance(errors[0], chatfeed.UsageError)
    assert "returned an awaitable" in str(errors[0])


def test_handlers_registered_while_run_runs_get_the_next_events(feed: Feed) -> None:
    client = make_client(feed.url)
    late: list[str] = []

    def late_handler(event: chatfeed.NewMessage) -> None:
        late.append(event.payload.content)
        client.close()

    @client.on("connected")
    def connected(event: chatfeed.Connected) -> None:
        client.on("new_message")(late_handler)
        feed.push("x")

    client.run()
    assert late == ["x"]


# close() from elsewhere


def test_close_from_another_thread_while_run_waits_returns_promptly(feed: Feed) -> None:
    client = make_client(feed.url)
    connected = client.expect("connected")
    runner, outcome = in_thread(client.run)
    connected.wait(WAIT)
    started = time.monotonic()
    client.close()
    took = time.monotonic() - started
    runner.join(PROMPTLY)
    assert not runner.is_alive() and outcome == [None]
    assert took < PROMPTLY, f"close() took {took:.3f} s"
    assert chatfeed_threads() == []
    feed.wait_for_clients(0)


def test_close_from_another_thread_while_events_block_returns_promptly(feed: Feed) -> None:
    client = make_client(feed.url)
    subscribed, first = threading.Event(), threading.Event()

    def read() -> list[str]:
        with client:
            stream = client.events()
            subscribed.set()
            received = []
            for event in stream:
                received.append(content(event))
                first.set()
            return received

    reader, outcome = in_thread(read)
    assert subscribed.wait(WAIT)
    feed.push("1")
    assert first.wait(WAIT)
    started = time.monotonic()
    client.close()
    took = time.monotonic() - started
    reader.join(PROMPTLY)
    assert not reader.is_alive() and outcome == [["1"]]
    assert took < PROMPTLY, f"close() took {took:.3f} s"


def test_close_from_another_thread_lets_the_running_handler_finish_and_calls_no_other(feed: Feed) -> None:
    client = make_client(feed.url)
    started, release = threading.Event(), threading.Event()
    handled: list[str] = []

    @client.on("connected")
    def connected(event: chatfeed.Connected) -> None:
        feed.push("1", "2", "3")

    @client.on("new_message")
    def slow(event: chatfeed.NewMessage) -> None:
        started.set()
        assert release.wait(WAIT)
        handled.append(event.payload.content)

    runner, outcome = in_thread(client.run)
    assert started.wait(WAIT)
    with watch_log("once handler") as waiting:
        closer, closed = in_thread(client.close, name="closer")
        assert waiting.wait(WAIT)
    release.set()  # close() waits for the handler it cannot interrupt
    closer.join(WAIT)
    runner.join(WAIT)
    assert closed == [None] and outcome == [None]
    assert handled == ["1"]


def test_close_while_connecting_from_another_thread_ends_with(feed: Feed) -> None:
    feed.server.silent = True  # the auth frame gets no answer
    client = make_client(feed.url, auth_timeout=WAIT)
    entered, outcome = in_thread(client.__enter__)
    feed.do(lambda: feed.server.wait_for_auth_frames(1, timeout=WAIT))
    client.close()
    entered.join(WAIT)
    assert isinstance(outcome[0], chatfeed.UsageError) and "closed while connecting" in str(outcome[0])


# expect()


def test_expect_gets_an_event_that_came_before_wait_and_is_typed_by_where(feed: Feed) -> None:
    with make_client(feed.url) as client:
        reply = client.expect("new_message", where=lambda e: e.payload.content == "b", timeout=WAIT)
        assert not reply.done()
        feed.push("a", "b")
        event = reply.wait()
        assert event.payload.content == "b"
        assert reply.done() and reply.wait() is event  # waiting again gives the same event
        assert client.statistics().expectations == 0
        assert repr(reply) == "<chatfeed.sync.Expectation NewMessage done>"
    assert reply.wait() is event  # even once the client and its loop are gone


def test_expect_times_out_can_be_cancelled_and_ends_when_the_client_closes(feed: Feed) -> None:
    with make_client(feed.url) as client:
        with pytest.raises(TimeoutError):
            client.expect("new_chat").wait(50 * MS)
        with pytest.raises(TimeoutError, match="of expect"):
            client.expect("new_chat", timeout=50 * MS).wait()
        with client.expect("new_chat") as scoped:
            pass
        with pytest.raises(concurrent.futures.CancelledError):
            scoped.wait()
        left_pending = client.expect("new_chat")
        assert client.statistics().expectations == 1
    with pytest.raises(chatfeed.ClientClosedError):
        left_pending.wait()


def test_an_expectation_dropped_without_waiting_is_forgotten(feed: Feed) -> None:
    with make_client(feed.url) as client:
        client.expect("new_chat")
        assert client.statistics().expectations == 0
        kept = client.expect("new_chat")
        assert client.statistics().expectations == 1
        del kept
        assert client.statistics().expectations == 0


def test_an_expectation_that_failed_in_the_frame_holding_it_lets_it_and_the_client_go(feed: Feed) -> None:
    # The error a wait raised goes back up through the caller's frame, which
    # holds the expectation, and the ended expectation keeps that error.
    # What its finalizer holds must not lead there: the finalizer, kept
    # until the expectation goes, would keep it, and the client with its
    # last connection, for ever.
    def wait_in_a_frame() -> tuple[weakref.ref[chatfeed.sync.Expectation[Any]], weakref.ref[chatfeed.sync.Client]]:
        client = make_client(feed.url)
        with client:
            reply = client.expect("new_chat")
            with pytest.raises(TimeoutError):
                reply.wait(50 * MS)
        CLIENTS.remove(client)  # closed, as the fixture would check; it must not keep it either
        return weakref.ref(reply), weakref.ref(client)

    reply, client = wait_in_a_frame()
    gc.collect()
    assert reply() is None
    assert client() is None


def test_from_the_clients_own_thread_close_returns_at_once_and_blocking_calls_are_refused(feed: Feed) -> None:
    refused: list[Exception] = []

    def blocking_call(event: chatfeed.NewMessage) -> bool:
        try:
            client.statistics()  # not blocking: allowed anywhere
            client.expect("new_chat")
        except chatfeed.UsageError as exc:
            refused.append(exc)
        return True

    def closing(event: chatfeed.NewMessage) -> bool:
        client.close()
        return True

    with make_client(feed.url) as client:
        stream = client.events()
        probe = client.expect("new_message", where=blocking_call)
        closed = client.expect("new_message", where=closing)
        feed.push("a")
        assert content(closed.wait(WAIT)) == "a"
        assert [content(event) for event in stream] == ["a"]  # then the end: the client closed
        assert client.statistics().state == "closed"
        assert probe.done()
    assert len(refused) == 1 and "would wait for itself" in str(refused[0])


def test_a_where_that_raises_is_what_wait_raises(feed: Feed) -> None:
    def broken(event: chatfeed.NewMessage) -> bool:
        raise KeyError("no such chat")

    with make_client(feed.url) as client:
        reply = client.expect("new_message", where=broken)
        feed.push("a")
        with pytest.raises(KeyError, match="no such chat"):
            reply.wait(WAIT)


# Where the calling thread runs a loop, or is interrupted


def test_works_from_a_thread_that_runs_an_event_loop(feed: Feed) -> None:
    async def notebook_cell() -> list[str]:
        # A blocking call from a coroutine, as in a Jupyter cell: the loop of
        # this thread is running, and the client must not use it.
        with make_client(feed.url) as client:
            stream = client.events(timeout=WAIT)
            reply = client.expect("new_message", where=lambda e: e.payload.content == "b")
            feed.push("a", "b")
            reply.wait(WAIT)
            return [content(next(stream)), content(next(stream))]

    assert asyncio.run(notebook_cell()) == ["a", "b"]


def test_run_from_a_thread_that_runs_an_event_loop(feed: Feed) -> None:
    client = make_client(feed.url)
    here: list[int] = []

    @client.on("connected")
    def connected(event: chatfeed.Connected) -> None:
        here.append(threading.get_ident())
        client.close()

    async def main() -> None:
        client.run()

    asyncio.run(main())
    assert here == [threading.get_ident()]


_INTERRUPTED_PROGRAM = """
import signal, sys, time
from chatfeed.sync import Client

url, token, mode = sys.argv[1:]
client = Client(url, token=token)
if mode == "sigterm":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the guide's recipe

if mode == "reading events":
    try:
        with client:
            print("connected", flush=True)
            for event in client.events():
                pass
    except KeyboardInterrupt:  # with lets it through, having closed the client
        print("stopped cleanly", flush=True)
    sys.exit(0)

@client.on("connected")
def ready(event):
    print("connected", flush=True)
    while mode == "in a handler":
        time.sleep(0.05)  # interrupted here

client.run()
print("stopped cleanly", flush=True)
"""


@pytest.mark.parametrize(
    ("mode", "signum"),
    [
        ("waiting", signal.SIGINT),
        ("in a handler", signal.SIGINT),
        ("sigterm", signal.SIGTERM),
        ("reading events", signal.SIGINT),
    ],
)
def test_ctrl_c_closes_the_client_and_run_returns(feed: Feed, mode: str, signum: signal.Signals) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_PROGRAM, feed.url, TOKEN, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as program:
        try:
            assert program.stdout is not None
            assert program.stdout.readline() == b"connected\n"
            program.send_signal(signum)
            stdout, stderr = program.communicate(timeout=WAIT)
        finally:
            if program.returncode is None:
                program.kill()
                program.wait()
    assert program.returncode == 0, stderr.decode()
    assert stdout == b"stopped cleanly\n"
    assert b"Traceback" not in stderr
    feed.wait_for_clients(0)


# The example


def test_the_example_runs_as_a_program() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "sync_client.py")],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "-- iterating",
        "  first",
        "  second",
        "  no event within 0.2 s",
        "-- waiting for a reply",
        "  reply in chat 7: 6 x 7 = 42",
        "-- handlers and run()",
        "  connected, in MainThread",
        "  handled 'one', in MainThread",
        "  handled 'two', in MainThread",
        "  handled 'three', in MainThread",
        "  run() returned: closed, 3 messages, threads left: []",
    ]

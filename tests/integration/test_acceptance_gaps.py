"""Acceptance checks for issue 2 that the rest of the suite leaves untested or tests weakly.

Each test names the requirement it covers. All of them talk to real servers on
loopback and synchronise on events; the only timed wait is the observation
window of the backpressure test, which can only make that test pass more
easily on a slow machine, never fail a correct library.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

import chatfeed
from chatfeed.testing import FeedServer, make_message

from ..conftest import BAD_TOKEN, FAST, MS, TOKEN
from .conftest import WAIT, Counter, Recorder, content, free_port, make_client, raw_server, running, tcp_server, url_of

T = TypeVar("T")


class LogWatcher(logging.Handler):
    """Counts records of the ``chatfeed`` logger whose message contains ``needle``."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.messages: list[str] = []
        self.counter = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.needle in message:
            self.messages.append(message)
            self.counter.bump()


@contextlib.contextmanager
def watch_log(needle: str) -> Iterator[LogWatcher]:
    watcher = LogWatcher(needle)
    logger = logging.getLogger("chatfeed")
    logger.addHandler(watcher)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)


def unfinished_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks of this loop, other than the current one, started after ``before`` and still running."""
    current = asyncio.current_task()
    return [task for task in asyncio.all_tasks() - before if task is not current and not task.done()]


class ThreadedFeedServer:
    """A FeedServer running on its own event loop in another thread.

    The test's loop then holds only the client's tasks, so "close() leaves no
    task running" can be checked against every task, not just named ones.
    """

    def __init__(self, **options: Any) -> None:
        self.server = FeedServer(**options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="feed-server", daemon=True)

    def __enter__(self) -> ThreadedFeedServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(WAIT)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(WAIT)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(WAIT)
            self._loop.close()

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await make()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self._loop))

    def call_soon(self, func: Callable[[], object]) -> None:
        self._loop.call_soon_threadsafe(func)


# "auth_error is terminal: ... the connection is closed" -- by the client, even
# when the server leaves it open (the existing test only checks server.clients,
# which is 0 for a rejected token whatever the client does).


async def test_auth_error_makes_the_client_close_a_connection_the_server_leaves_open() -> None:
    closed = asyncio.Event()
    handshakes = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal handshakes
        handshakes += 1
        await ws.recv()
        await ws.send(json.dumps({"type": "auth_error", "message": "Invalid token"}))
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
        closed.set()

    async with raw_server(handler) as server:
        client = make_client(url_of(server), token=BAD_TOKEN)
        with pytest.raises(chatfeed.AuthenticationError) as caught:
            await asyncio.wait_for(client.run(), WAIT)
        # Still inside the server's context: only the client can have closed it.
        await asyncio.wait_for(closed.wait(), WAIT)
    assert caught.value.message == "Invalid token"
    assert handshakes == 1


# "With a token callable, the client ... retries, at most a bounded number of
# times in a row (default 1), then raises." The default is never exercised.


async def test_token_function_gets_one_retry_after_auth_error_by_default(server: FeedServer) -> None:
    calls = 0

    def always_bad() -> str:
        nonlocal calls
        calls += 1
        return BAD_TOKEN

    client = make_client(server.url, token=always_bad)
    with pytest.raises(chatfeed.AuthenticationError):
        await asyncio.wait_for(client.run(), WAIT)
    assert calls == 2
    assert server.received_tokens == [BAD_TOKEN, BAD_TOKEN]


# "The initial connection is retried the same way (a server that is down at
# start-up is the commonest case)" and "retry ... refused ... connections".
# The existing test starts the server in the same step as the client, so the
# client may never meet a refused connection.


async def test_server_down_at_start_up_is_retried_after_refused_connections() -> None:
    port = free_port()
    client = make_client(f"ws://127.0.0.1:{port}")
    connected = Recorder()
    client.on("connected")(connected)
    with watch_log("reconnecting in") as retries:
        async with running(client) as task:
            await retries.counter.wait_for(2)  # two refused attempts, for sure
            assert not task.done()
            async with FeedServer(tokens=[TOKEN], port=port) as server:
                [first] = await connected.wait_for(1)
                assert server.clients == 1
    assert all("could not connect" in message for message in retries.messages[:2])
    assert first == chatfeed.Connected(is_reconnect=False, downtime=None)


# "retry ... timeouts" during the opening handshake (tested only with
# reconnect=False, where it raises).


async def test_open_timeout_is_retried() -> None:
    async with tcp_server(lambda writer: None) as (url, accepted):
        client = make_client(url, open_timeout=50 * MS)
        async with running(client) as task:
            await accepted.wait_for(3)
            assert not task.done()
            assert not client.connected


# "retry ... reset connections": a peer that resets every connection during the
# handshake keeps the client trying, never stops it.


async def test_connections_reset_during_the_handshake_are_retried() -> None:
    async with tcp_server(lambda writer: writer.transport.abort()) as (url, accepted):
        client = make_client(url)
        async with running(client) as task:
            await accepted.wait_for(3)
            assert not task.done()


# "close() returns promptly from any state (connecting, ...)". The existing
# test synchronises with asyncio.sleep(0.05) and may close before connecting.


async def test_close_while_the_tcp_connection_is_open_but_the_handshake_unanswered() -> None:
    before = asyncio.all_tasks()
    async with tcp_server(lambda writer: None) as (url, accepted):
        client = make_client(url, open_timeout=30.0)
        task = asyncio.create_task(client.run())
        await accepted.wait_for(1)
        await asyncio.wait_for(client.close(), 1.0)
        await asyncio.wait_for(task, WAIT)
    assert unfinished_tasks(before) == []


async def test_close_while_an_async_token_function_is_pending(server: FeedServer) -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow_token() -> str:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return TOKEN

    before = asyncio.all_tasks()
    client = make_client(server.url, token=slow_token)
    task = asyncio.create_task(client.run())
    await asyncio.wait_for(entered.wait(), WAIT)
    await asyncio.wait_for(client.close(), 1.0)
    await asyncio.wait_for(task, WAIT)
    assert cancelled.is_set()
    assert unfinished_tasks(before) == []
    assert server.handshakes == 0


# "close() ... leaves no task running": checked against every task of the loop,
# not only tasks whose name starts with "chatfeed". The server runs on another
# loop, so that its own tasks do not count.


@pytest.mark.parametrize("state", ["dispatching", "authenticating", "backing-off", "connected"])
async def test_close_leaves_no_task_of_any_name_running(state: str) -> None:
    with ThreadedFeedServer(tokens=[TOKEN]) as feed:
        if state == "authenticating":
            feed.server.silent = True
        before = asyncio.all_tasks()
        client = make_client(
            feed.server.url,
            ping_interval=1.0,  # a keepalive task runs
            auth_timeout=30.0,
            reconnect=chatfeed.Backoff(initial=30.0, maximum=30.0) if state == "backing-off" else FAST,
        )
        connected, disconnected = Recorder(), Recorder()
        client.on("connected")(connected)
        client.on("disconnected")(disconnected)
        in_handler = asyncio.Event()

        @client.on("new_message")
        async def stuck(event: chatfeed.NewMessage) -> None:
            in_handler.set()
            await asyncio.Event().wait()

        stream = client.events()
        task = asyncio.create_task(client.run())
        if state == "authenticating":
            # The auth frame has arrived: the client is past the WebSocket
            # handshake (wait_for_handshakes would not say so) and waits for
            # the answer. FeedServer has no public wait for this.
            await feed.call(lambda: feed.server._wait_until(lambda: bool(feed.server.received_tokens), WAIT))
        else:
            await connected.wait_for(1)
        if state == "dispatching":
            await feed.call(lambda: feed.server.push_message())
            await asyncio.wait_for(in_handler.wait(), WAIT)
        if state == "backing-off":
            feed.call_soon(feed.server.drop_connections)
            [lost] = await disconnected.wait_for(1)
            assert lost.will_retry
        await asyncio.wait_for(client.close(), 1.0)
        await asyncio.wait_for(task, WAIT)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), WAIT)
        assert unfinished_tasks(before) == []


# "A full buffer makes the client stop reading from the socket (TCP
# backpressure) rather than drop anything." The existing test asserts only
# that the events() buffer holds <= 1 event right after the server wrote, which
# holds trivially and also for a client that queues frames without bound
# elsewhere. Here the server sends many large frames and then a ping: while
# nobody reads the stream, the client must neither take frames off the
# connection (beyond the stream buffer and the one being delivered) nor read
# as far as the ping; once the stream is read, everything arrives, in order,
# and the pong comes back.


async def test_unread_stream_stops_the_client_reading_the_socket_and_loses_nothing() -> None:
    count = 100
    # Incompressible: with permessage-deflate, repetitive text would shrink the
    # whole feed into one TCP read, which websockets parses in one go.
    fillers = [base64.b64encode(os.urandom(48 * 1024)).decode() for _ in range(count)]
    pong_received = asyncio.Event()

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

    async with raw_server(handler) as server:
        client = make_client(url_of(server), ping_interval=None)
        async with client:
            stream = client.events(buffer=1)
            observe = asyncio.create_task(pong_received.wait())
            done, _ = await asyncio.wait([observe], timeout=500 * MS)
            stalled_frames = client.statistics().frames_received
            assert not done, "the client read the whole feed although nobody read its events() stream"
            assert stalled_frames <= 3, f"the client took {stalled_frames} frames off a connection nobody reads"
            received = []
            async for event in stream:
                assert isinstance(event, chatfeed.ErrorMessage)
                received.append(int(event.message.partition(":")[0]))
                if len(received) == count:
                    break
            await asyncio.wait_for(observe, WAIT)
    assert received == list(range(count))


# "Frames up to max_size (default 1 MiB) are accepted; a larger one closes that
# connection (1009) and is reported." Only a custom max_size is tested.


async def test_default_max_size_is_one_mebibyte(server: FeedServer) -> None:
    client = make_client(server.url)
    seen, lifecycle = Recorder(), Recorder()
    client.on("error")(seen)
    client.on("connected")(lifecycle)
    client.on("disconnected")(lifecycle)

    def error_frame(size: int) -> str:
        empty = json.dumps({"type": "error", "message": ""})
        frame = json.dumps({"type": "error", "message": "x" * (size - len(empty))})
        assert len(frame.encode()) == size
        return frame

    async with running(client):
        await lifecycle.wait_for(1)
        await server.send_raw(error_frame(2**20))
        await seen.wait_for(1)
        await server.send_raw(error_frame(2**20 + 1))
        await lifecycle.wait_for(3)
    lost = lifecycle.events[1]
    assert isinstance(lost, chatfeed.Disconnected)
    assert (lost.code, lost.will_retry) == (1009, True)
    assert lifecycle.events[2].is_reconnect
    assert len(seen.events) == 1


# "an exception in one handler ... never stops ... the connection".


async def test_handlers_that_always_raise_keep_the_connection(server: FeedServer) -> None:
    client = make_client(server.url)

    @client.on("new_message")
    def broken(event: chatfeed.NewMessage) -> None:
        raise RuntimeError("bug")

    @client.on("connected")
    async def broken_too(event: chatfeed.Connected) -> None:
        raise RuntimeError("bug")

    async with client:
        stream = client.events()
        for index in range(5):
            await server.push_message(content=str(index))
        received = [content(await asyncio.wait_for(anext(stream), WAIT)) for _ in range(5)]
        assert client.connected
    assert received == [str(index) for index in range(5)]
    assert server.handshakes == 1


# "async with client: followed directly by async for event in client.events():
# sees every server message sent after auth_success, even one that arrived in
# the same packet", written exactly so (no stream variable).


async def test_async_for_directly_after_async_with_sees_frames_from_the_auth_packet() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        payload = make_message(content="same packet").model_dump(by_alias=True, mode="json")
        for frame in ({"type": "auth_success"}, {"type": "new_message", "payload": payload}):
            ws.protocol.send_text(json.dumps(frame).encode())
        ws.send_data()
        await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server))
        got: list[str] = []
        async with client:
            async for event in client.events():
                got.append(content(event))
                break
    assert got == ["same packet"]

"""Helpers for tests against real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

import chatfeed
from chatfeed._logging import redacting_logger
from chatfeed.testing import FeedServer

from ..conftest import FAST, MS, TOKEN

T = TypeVar("T")

WAIT = 5000 * MS
"""How long a test waits for something that should happen almost at once: a guard against hangs, not a delay."""


class Recorder:
    """A handler that records the events it gets and lets a test wait for them."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed: asyncio.Future[None] | None = None

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[Any]:
        """Wait until ``count`` events have arrived; return them all."""
        await wait_until(lambda: len(self.events) >= count, self, timeout)
        return self.events

    async def _next_change(self) -> None:
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        await self._changed


async def wait_until(predicate: Callable[[], bool], recorder: Recorder, timeout: float = WAIT) -> None:
    async def wait() -> None:
        while not predicate():
            await recorder._next_change()

    await asyncio.wait_for(wait(), timeout)


def make_client(url: str, **options: Any) -> chatfeed.Client:
    """A client with test-friendly defaults: fast backoff, short timeouts."""
    options.setdefault("token", TOKEN)
    options.setdefault("reconnect", FAST)
    options.setdefault("auth_timeout", 2000 * MS)
    options.setdefault("open_timeout", 2000 * MS)
    options.setdefault("close_timeout", 500 * MS)
    return chatfeed.Client(url, **options)


@contextlib.asynccontextmanager
async def running(client: chatfeed.Client) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``client.run()`` in a task for the duration of the block, then close it."""
    task = asyncio.create_task(client.run())
    try:
        yield task
    finally:
        await asyncio.wait_for(client.close(), WAIT)
        await asyncio.wait([task], timeout=WAIT)
        assert task.done(), "run() did not return after close()"
        if not task.cancelled():
            task.exception()  # retrieved: the test asserts on it if it cares


def content(event: object) -> str:
    """The content of a ``new_message`` event (and a check that it is one)."""
    assert isinstance(event, chatfeed.NewMessage)
    return event.payload.content


def chatfeed_tasks() -> list[asyncio.Task[Any]]:
    """Tasks that chatfeed started and that are still running."""
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("chatfeed") and not task.done()]


@contextlib.asynccontextmanager
async def raw_server(handler: Callable[[ServerConnection], Awaitable[None]]) -> AsyncIterator[Server]:
    """A bare websockets server on loopback, for servers FeedServer cannot imitate."""
    # Frames logged by a bare websockets server would show the client's token.
    logger = redacting_logger("websockets.server")
    async with serve(handler, "127.0.0.1", 0, logger=logger) as server:
        yield server


def free_port() -> int:
    """A loopback port that nothing listens on (at the time of the call)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def url_of(server: Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"ws://{host}:{port}"


class Counter:
    """A count that a test can wait on without sleeping."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.value += 1
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = WAIT) -> None:
        async def wait() -> None:
            while self.value < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)


class LogWatcher(logging.Handler):
    """Keeps the records of the ``chatfeed`` logger whose message contains ``needle``, for a test to wait on."""

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
    """Watch the ``chatfeed`` logger for records containing ``needle`` for the duration of the block."""
    watcher = LogWatcher(needle)
    logger = logging.getLogger("chatfeed")
    logger.addHandler(watcher)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)


@contextlib.asynccontextmanager
async def tcp_server(on_accept: Callable[[asyncio.StreamWriter], None]) -> AsyncIterator[tuple[str, Counter]]:
    """A plain TCP server on loopback that counts connections and lets ``on_accept`` treat each."""
    accepted = Counter()
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        on_accept(writer)
        accepted.bump()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        yield f"ws://{host}:{port}", accepted
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


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
        """Await ``make()`` on the server's loop."""

        async def run() -> T:
            return await make()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self._loop))

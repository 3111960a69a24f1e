"""One keepalive for many connections: a single task pings each in turn and drops those that went silent.

A [`Client`][chatfeed.Client]'s connection runs its own keepalive task. The
feeds of a [`Pool`][chatfeed.Pool] share one `Keepalive` instead: every
connection is pinged once per ``interval`` (the pings of thousands of
connections spread over the interval as the connections came), and one whose
pong has not come within ``timeout``, while nothing at all arrived from it
and it was being read, is dropped as dead, by the same rule as the client's
own keepalive. A dead connection is therefore dropped within ``interval +
timeout`` of its last sign of life, as a client's is. (Skipping the ping of a
connection that received data within the interval saves a ping but doubles
that bound: the data may have come just before the path died.) A ping is
sent by a task that lives as long as sending it takes; nothing else runs per
connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from .exceptions import ConnectionLostError

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["Keepalive"]

logger = logging.getLogger("chatfeed")

_TICKS_PER_INTERVAL = 20


class _Member:
    """A connection in the ping queue; ``connection`` is None once it was removed, so that nothing holds it."""

    __slots__ = ("connection",)

    def __init__(self, connection: Connection) -> None:
        self.connection: Connection | None = connection


class _Watch:
    """A ping in flight: what sends it, then its pong, and what had arrived when it went out."""

    __slots__ = ("arrivals", "deadline", "pong", "sending")

    def __init__(self, sending: asyncio.Task[Awaitable[float]], arrivals: int, deadline: float) -> None:
        self.sending: asyncio.Task[Awaitable[float]] | None = sending
        self.pong: Awaitable[float] | None = None
        self.arrivals = arrivals
        self.deadline = deadline


class Keepalive:
    """Pings the connections added to it, each once per ``interval``; drops those silent for ``timeout``.

    Args:
        interval: Seconds between two pings of one connection.
        timeout: Seconds to wait for a pong, or ``None`` never to drop a connection.
    """

    __slots__ = ("_due", "_members", "_task", "_watches", "interval", "timeout")

    def __init__(self, interval: float, timeout: float | None) -> None:
        self.interval = interval
        self.timeout = timeout
        # Connections in the order their next ping is due: every connection
        # has the same interval, so a FIFO stays sorted.
        self._due: collections.deque[tuple[float, _Member]] = collections.deque()
        self._members: dict[Connection, _Member] = {}
        self._watches: dict[Connection, _Watch] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._members)

    def add(self, connection: Connection) -> None:
        """Ping ``connection`` from one ``interval`` from now on."""
        loop = asyncio.get_running_loop()
        member = self._members[connection] = _Member(connection)
        self._due.append((loop.time() + self.interval, member))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="chatfeed-keepalive")

    def remove(self, connection: Connection) -> None:
        """Stop pinging ``connection``, and let go of it."""
        member = self._members.pop(connection, None)
        if member is not None:
            member.connection = None
        watch = self._watches.pop(connection, None)
        if watch is not None and watch.sending is not None:
            watch.sending.cancel()
        # Its entry in _due is skipped when it comes up.

    async def close(self) -> None:
        """Stop the task and every ping in flight, and wait until they have ended."""
        tasks: list[asyncio.Task[Any]] = [watch.sending for watch in self._watches.values() if watch.sending]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        self._watches.clear()
        self._members.clear()
        self._due.clear()
        if tasks:
            await asyncio.wait(tasks)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = self.interval / _TICKS_PER_INTERVAL
        if self.timeout is not None:
            tick = min(tick, self.timeout / 4)
        while self._members:
            await asyncio.sleep(tick)
            now = loop.time()
            self._ping_due(now, loop)
            self._check_pongs(now)

    def _ping_due(self, now: float, loop: asyncio.AbstractEventLoop) -> None:
        due = self._due
        while due and due[0][0] <= now:
            _, member = due.popleft()
            connection = member.connection
            if connection is None:
                continue  # removed
            due.append((now + self.interval, member))
            if connection in self._watches:
                continue  # the last ping's pong is still awaited
            sending = loop.create_task(_ping(connection), name="chatfeed-ping")
            deadline = now + self.timeout if self.timeout is not None else float("inf")
            self._watches[connection] = _Watch(sending, connection.arrivals, deadline)

    def _check_pongs(self, now: float) -> None:
        for connection, watch in list(self._watches.items()):
            sending = watch.sending
            if sending is not None and sending.done():
                watch.sending = None
                if sending.cancelled() or sending.exception() is not None:
                    del self._watches[connection]  # closed meanwhile: its owner will find out
                    continue
                watch.pong = sending.result()
            pong = watch.pong
            if pong is not None and (self.timeout is None or (asyncio.isfuture(pong) and pong.done())):
                del self._watches[connection]  # answered, or nobody waits for the answer
                continue
            if watch.deadline > now:
                continue
            if self.timeout is None:
                continue
            if connection.arrivals == watch.arrivals and connection.reading():
                logger.warning(
                    "no pong within %g s: dropping the connection",
                    self.timeout,
                    extra={**connection.log_extra, "chatfeed_timeout": self.timeout},
                )
                del self._watches[connection]
                self.remove(connection)
                connection.fail(ConnectionLostError(1006, "no pong within ping_timeout", local=True))
            else:
                # Data is still arriving, or the client stopped reading: the
                # pong is queued behind data, not lost.
                watch.arrivals = connection.arrivals
                watch.deadline = now + self.timeout


async def _ping(connection: Connection) -> Any:
    try:
        return await connection.ping()
    except ConnectionClosed:
        raise asyncio.CancelledError from None  # nothing to watch: the connection is gone

"""Ordered concurrency for one handler: parallel across keys, in arrival order within a key.

A handler registered with ``concurrency=N`` gets a `Lanes`: one queue (a
lane) per key that has events queued or running, and at most ``N`` worker
tasks. A worker takes the oldest event of the lane at the head of the ready
queue, calls the handler, and puts the lane back at the tail of the ready
queue if it holds more, so that a busy chat cannot starve the others. A
lane is never in the ready queue while one of its events runs: that is the
whole ordering rule.

At most ``max_pending`` events are held, queued or running. When that many
are, `Lanes.offer` refuses the next one and the receive loop waits on
`Lanes.wait_for_room` before reading another frame: the socket stops being
read and nothing is dropped. Workers are started when there is work and end
when there is none, so an idle client has no task here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from ._logging import log_fields
from .models import Chat, Message

__all__ = ["Lanes", "LanesSnapshot", "by_chat"]

logger = logging.getLogger("chatfeed")

_WORKER_NAME = "chatfeed-handler"

CANCEL_GRACE = 2.0
"""Seconds a cancelled handler call is waited for before it is left running, with a warning."""


def by_chat(event: Any) -> Hashable:
    """Return the chat an event belongs to: a message's ``chat_id``, a new chat's ``id``.

    The default ordering key of a handler registered with ``concurrency``:
    the events of one chat reach it one after another, in the order they
    arrived; those of different chats run in parallel. Events that belong
    to no chat (``error``, unknown types) return ``None``, so they share one
    lane and keep their order among themselves.

    Example:
        >>> from chatfeed import NewMessage
        >>> from chatfeed.testing import make_message
        >>> by_chat(NewMessage(type="new_message", payload=make_message(chat_id="7")))
        '7'
    """
    payload = getattr(event, "payload", None)
    if isinstance(payload, Message):
        return payload.chat_id
    if isinstance(payload, Chat):
        return payload.id
    return None


class LanesSnapshot:
    """The numbers of one concurrent handler at one moment."""

    __slots__ = ("deepest_lane", "oldest_queued_age", "queued", "running")

    def __init__(self, running: int, queued: int, deepest_lane: int, oldest_queued_age: float | None) -> None:
        self.running = running
        self.queued = queued
        self.deepest_lane = deepest_lane
        self.oldest_queued_age = oldest_queued_age


class Lanes:
    """The queued and running calls of one handler registered with ``concurrency > 1``.

    Args:
        call: The handler (an async function of one event).
        report: Awaited with ``(exception, event)`` when a call raises.
        concurrency: The most calls running at once.
        key: The ordering key of an event, or ``None`` for no ordering.
        max_pending: The most events held, queued or running.
    """

    __slots__ = (
        "_call",
        "_idle",
        "_key",
        "_lanes",
        "_ready",
        "_report",
        "_room",
        "_stopping",
        "_workers",
        "concurrency",
        "held",
        "max_pending",
        "running",
    )

    def __init__(
        self,
        call: Callable[[Any], Awaitable[None]],
        report: Callable[[BaseException, Any], Awaitable[None]],
        *,
        concurrency: int,
        key: Callable[[Any], Hashable] | None,
        max_pending: int,
    ) -> None:
        self._call = call
        self._report = report
        self._key = key
        self.concurrency = concurrency
        self.max_pending = max_pending
        # Per key with events queued or running: the queued ones, with the
        # time each arrived. A key is in _ready when it has queued events and
        # none running.
        self._lanes: dict[Hashable, collections.deque[tuple[Any, float]]] = {}
        self._ready: collections.deque[Hashable] = collections.deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._room: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._stopping = False
        self.held = 0  # queued and running
        self.running = 0

    def offer(self, event: Any) -> bool:
        """Queue ``event`` in its key's lane; return False, queuing nothing, when ``max_pending`` are held.

        Raises:
            Exception: What the key function raised; nothing is queued.
        """
        if self.held >= self.max_pending:
            return False
        key = object() if self._key is None else self._key(event)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = collections.deque()
            self._ready.append(key)
        lane.append((event, time.monotonic()))
        self.held += 1
        workers = self._workers
        if len(workers) < self.concurrency and len(workers) < self.running + len(self._ready):
            worker = asyncio.get_running_loop().create_task(self._work(), name=_WORKER_NAME)
            workers.add(worker)
        return True

    def wait_for_room(self) -> asyncio.Future[None]:
        """Return a future done once fewer than ``max_pending`` events are held."""
        if self._room is None or self._room.done():
            self._room = asyncio.get_running_loop().create_future()
            if self.held < self.max_pending:
                self._room.set_result(None)
        return self._room

    @property
    def stopping(self) -> bool:
        """Whether `cancel` was called: a call that lost its cancellation should not go on."""
        return self._stopping

    def runs_in(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` is one of this handler's workers."""
        return task in self._workers

    def snapshot(self) -> LanesSnapshot:
        """Return how many calls run and wait, the deepest lane, and how long the oldest has waited."""
        queued = self.held - self.running
        heads = [lane[0][1] for lane in self._lanes.values() if lane]
        return LanesSnapshot(
            running=self.running,
            queued=queued,
            deepest_lane=max(map(len, self._lanes.values()), default=0),
            oldest_queued_age=time.monotonic() - min(heads) if heads else None,
        )

    async def drain(self, timeout: float, name: str) -> int:
        """Let the held calls run for at most ``timeout`` seconds, then cancel the rest.

        Logs how many were cancelled, naming the handler ``name``, also when
        this wait is itself cancelled (the workers are then cancelled at once).

        Returns:
            How many calls were cancelled, queued or running.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        left = 0
        try:
            while self.held and self._workers:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if self._idle is None or self._idle.done():
                    self._idle = loop.create_future()
                await asyncio.wait([self._idle], timeout=remaining)
        finally:
            left = self.held
            if left:
                logger.warning(
                    "cancelled %d call(s) of handler %s still queued or running %g s after close()",
                    left,
                    name,
                    timeout,
                    extra=log_fields(handler=name, timeout=timeout),
                )
            await self.cancel(name)
        return left

    async def cancel(self, name: str = "") -> None:
        """Cancel every call, queued or running, and wait (a little) until the workers have ended.

        A handler that goes on after being cancelled is waited for
        `CANCEL_GRACE` seconds, then left running, with a warning.
        """
        self._stopping = True
        self._ready.clear()
        self._lanes.clear()
        workers = list(self._workers)
        for worker in workers:
            worker.cancel()
        if workers:
            _, stuck = await asyncio.wait(workers, timeout=CANCEL_GRACE)
            if stuck:
                logger.warning(
                    "%d call(s) of handler %s did not end within %g s of being cancelled; left running",
                    len(stuck),
                    name,
                    CANCEL_GRACE,
                    extra=log_fields(handler=name, timeout=CANCEL_GRACE),
                )
        self.held = self.running = 0
        _wake(self._room)

    async def _work(self) -> None:
        ready = self._ready
        lanes = self._lanes
        try:
            while ready and not self._stopping:
                key = ready.popleft()
                lane = lanes[key]
                event, _ = lane.popleft()
                self.running += 1
                try:
                    await self._call(event)
                except (Exception, asyncio.CancelledError) as exc:
                    if isinstance(exc, asyncio.CancelledError) and self._cancelled_by_us():
                        raise
                    await self._report(exc, event)  # an exception, or a CancelledError of what the handler awaited
                finally:
                    self.running -= 1
                    self.held -= 1
                    if not self._stopping:
                        if lane:
                            ready.append(key)  # at the tail: the other lanes' turn first
                        else:
                            del lanes[key]
                    if self.held < self.max_pending:
                        _wake(self._room)
        finally:
            self._workers.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
            if not self._workers:
                _wake(self._idle)

    def _cancelled_by_us(self) -> bool:
        if self._stopping:
            return True
        if sys.version_info >= (3, 11):
            task = asyncio.current_task()
            return task is not None and task.cancelling() > 0
        return False  # Python 3.10 cannot tell: only our own cancellation (_stopping) counts


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)

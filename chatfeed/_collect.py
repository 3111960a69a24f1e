"""What the exporters share to read their subjects when they are collected: on the subjects' event loop.

A client's or a pool's ``statistics()``, and the dicts an exporter's hooks
write, belong to the event loop's thread. A collection often runs on another:
an OpenTelemetry periodic reader's, prometheus-client's HTTP server's, or the
application's while a ``chatfeed.sync`` client's loop runs in its own. Read
from there, a dict the loop changes meanwhile fails the iteration
(``dictionary changed size during iteration``). So `LoopReader` hands the
reading to the loop and waits for it, with a bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["LoopReader", "closed"]

T = TypeVar("T")


class LoopReader:
    """Calls a reading on the event loop the subjects run on, from whichever thread collects.

    The loop is the last one a hook saw running (`see_loop`): an exporter's
    hooks are called on its subjects' loop.
    """

    __slots__ = ("_loop", "_stuck")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by the loop when it runs a reading that a collection gave up on:
        # until then the loop is blocked, and the next collection does not wait again.
        self._stuck: threading.Event | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the readings run on, once a hook has seen it."""
        return self._loop

    def see_loop(self) -> None:
        """Note the running event loop, if there is one (a subject made outside any loop: a hook tells later)."""
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    def read(self, function: Callable[[], T], *, timeout: float) -> T:
        """Return ``function()``, called on the loop's thread.

        On the loop's own thread, or with no loop running, it is called at
        once. From another thread it is handed to the loop, and waited for up
        to ``timeout`` seconds; once the loop has let a reading wait that long,
        the next ones do not wait until the loop has run it (a loop blocked in
        ``MeterProvider.shutdown()`` would make each of a collection's
        readings wait in turn).

        Raises:
            TimeoutError: The loop did not run it in time; it will not run it.
            Exception: What ``function`` raised.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running() or _running_loop() is loop:
            return function()
        stuck = self._stuck
        if stuck is not None:
            if not stuck.is_set():
                raise TimeoutError("the event loop has not run the last reading yet")
            self._stuck = None
        answer: concurrent.futures.Future[T] = concurrent.futures.Future()
        ran = threading.Event()

        def run() -> None:
            ran.set()
            if not answer.set_running_or_notify_cancel():  # given up on: the collection is over
                return
            try:
                answer.set_result(function())
            except Exception as exc:  # raised again in the collecting thread
                answer.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop closed in between: nothing runs there any more
            return function()
        try:
            return answer.result(timeout)
        except concurrent.futures.TimeoutError:
            if not answer.cancel():  # the loop has just begun it: it ends soon
                return answer.result()
            self._stuck = ran
            raise TimeoutError(f"the event loop did not answer within {timeout} s") from None


def closed(subject: object) -> bool:
    """Whether ``subject`` (a client, pool, bridge or consumer) is closed: then it changes no more."""
    state = getattr(subject, "_state", None)
    return getattr(state, "value", state) == "closed"  # a client's is an enum


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

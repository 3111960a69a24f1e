"""A blocking client, for scripts, Django, Celery workers, notebooks and threads.

```python
from chatfeed.sync import Client

with Client("wss://api.example.com", token=jwt) as client:  # returns once authenticated
    for event in client.events():
        print(event)
```

There is one implementation of the protocol, the reconnection, the keepalive
and the delivery: the async [`chatfeed.Client`][chatfeed.Client]. A
[`Client`][chatfeed.sync.Client] of this module owns one, built with the same
arguments, and drives it on an event loop of its own, in a thread of its own
(a *portal*, as in anyio or websockets' sync client). The thread starts at the
first call that needs it and stops when the client closes. Each blocking call
hands a coroutine to that loop and waits for its outcome: what it returns, or
the exception it raises, unchanged.

Nothing is buffered between the two threads beyond what the async client
buffers itself. An [`EventStream`][chatfeed.sync.EventStream] pulls one event
per ``next()`` from the async client's bounded stream, so a slow reader
stops the socket being read, as in the async client. Handlers registered
with [`on`][chatfeed.sync.Client.on] run in the thread that calls
[`run`][chatfeed.sync.Client.run]: the loop's receive loop hands each call
over and waits until it returns, as it waits for an inline async handler.

The functions that the async client calls itself (a token function, a
backfill function, an expectation's ``where``) run in the client's own
thread: keep them quick, and do not call a blocking method of the client
from them.

A [`Pool`][chatfeed.sync.Pool] is to [`chatfeed.Pool`][chatfeed.Pool] what a
``Client`` is to a ``chatfeed.Client``, with the same portal and the same
hand-over: each of its feeds' receive loops hands its handlers' calls over
and waits for them, and the thread of ``run()`` makes them one at a time, in
the order they came.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import logging
import queue
import signal
import ssl as ssl_module
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

# typing_extensions' overload: get_overloads() finds them on Python 3.10 too.
from typing_extensions import Self, overload

from ._client import Client as AsyncClient
from ._client import ClientStatistics
from ._config import Compression, TokenSource
from ._delivery import Backfill, Dedupe
from ._dispatch import EventName, check_timeout, resolve_event
from ._dispatch import EventStream as AsyncEventStream
from ._dispatch import Expectation as AsyncExpectation
from ._logging import log_fields
from ._observe import Observer
from ._policy import Backoff
from ._pool import Pool as AsyncPool
from ._pool import PoolEventName, PoolStatistics
from ._pool import _resolve as _resolve_pool_event
from .exceptions import ClientClosedError, UsageError
from .models import (
    Connected,
    Disconnected,
    ErrorMessage,
    FeedEvent,
    FeedStopped,
    NewChat,
    NewMessage,
    ServerMessage,
    UnknownMessage,
)

__all__ = ["Client", "EventStream", "Expectation", "Pool", "PoolEventStream"]

logger = logging.getLogger("chatfeed")

T = TypeVar("T")
E_co = TypeVar("E_co", covariant=True)

# A handler of this client is a plain function returning None: an async one
# is a type error here, and a UsageError at registration.
_OnNewMessage = TypeVar("_OnNewMessage", bound=Callable[[NewMessage], None])
_OnNewChat = TypeVar("_OnNewChat", bound=Callable[[NewChat], None])
_OnError = TypeVar("_OnError", bound=Callable[[ErrorMessage], None])
_OnUnknown = TypeVar("_OnUnknown", bound=Callable[[UnknownMessage], None])
_OnConnected = TypeVar("_OnConnected", bound=Callable[[Connected], None])
_OnDisconnected = TypeVar("_OnDisconnected", bound=Callable[[Disconnected], None])
_OnServerMessage = TypeVar("_OnServerMessage", bound=Callable[[ServerMessage], None])
_OnAny = TypeVar("_OnAny", bound=Callable[[Any], None])
_OnErrorHook = TypeVar("_OnErrorHook", bound=Callable[[Exception, Any], None])

_THREAD_NAME = "chatfeed-sync"

_GRACE = 1.0
"""Seconds the portal's loop lets its last tasks finish, once the client has closed, before it cancels them."""

_SIGNAL_POLL = 0.2
"""Seconds a blocking call waits at a time, so that a Ctrl-C that came just before the wait is not held up."""


# The portal


class _PortalClosed(Exception):
    """The portal's loop has stopped: the client is closed."""


class _Reply(Generic[T]):
    """The outcome of a coroutine run on the portal's loop, for threads to wait for.

    Waiting takes no Python-level lock, unlike `concurrent.futures.Future`: in
    the main thread, Ctrl-C can interrupt a wait at any point, and a
    `threading.Condition` it interrupts can be left broken (and the loop's
    thread with it). The loop sets the outcome, then puts a token in a queue
    (C code); a waiter takes the token, for at most ``_SIGNAL_POLL`` at a time
    so that a signal that came just before it began waiting is not held up,
    and passes it on to any other waiter.
    """

    __slots__ = ("_loop", "_on_done", "_outcome", "_task", "_wakeup")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_done: Callable[[], object] | None = None) -> None:
        self._loop = loop
        self._on_done = on_done  # called in the loop's thread once done
        self._outcome: tuple[bool, Any] | None = None  # (True, result) or (False, exception)
        self._task: asyncio.Task[T] | None = None
        self._wakeup: queue.SimpleQueue[None] = queue.SimpleQueue()

    def start(self, coro: Coroutine[Any, Any, T]) -> None:
        """Run ``coro`` as a task (in the loop's thread)."""
        self._task = task = self._loop.create_task(coro)
        task.add_done_callback(self._finish)

    def _finish(self, task: asyncio.Task[T]) -> None:
        if task.cancelled():
            self._outcome = (False, concurrent.futures.CancelledError())
        else:
            error = task.exception()
            self._outcome = (True, task.result()) if error is None else (False, error)
        self._wakeup.put(None)
        if self._on_done is not None:
            self._on_done()

    def done(self) -> bool:
        return self._outcome is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until done, for at most ``timeout`` seconds; return whether it is done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._outcome is None:
            left = _SIGNAL_POLL if deadline is None else min(_SIGNAL_POLL, deadline - time.monotonic())
            if left <= 0:
                return False
            try:
                self._wakeup.get(timeout=left)
            except queue.Empty:
                continue
            self._wakeup.put(None)  # for another thread waiting too
        return True

    def result(self, timeout: float | None = None) -> T:
        """Return what the coroutine returned, or raise what it raised.

        Raises:
            concurrent.futures.TimeoutError: Not done within ``timeout``.
            concurrent.futures.CancelledError: The task was cancelled.
        """
        if not self.wait(timeout):
            raise concurrent.futures.TimeoutError
        assert self._outcome is not None
        ok, value = self._outcome
        if ok:
            result: T = value
            return result
        raise value

    def cancel(self) -> None:
        """Cancel the task, unless it is done; without waiting."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the task has ended
            self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class _Portal:
    """An event loop in a thread of its own, started at first use; runs coroutines for blocking callers."""

    __slots__ = ("_lock", "_loop", "_owner", "_stopped", "_tasks", "_thread", "leftovers")

    def __init__(self, owner: str = "chatfeed.sync.Client") -> None:
        self._owner = owner  # what messages call the object it runs for
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._tasks: set[asyncio.Task[Any]] = set()  # spawned from the loop's own thread
        self.leftovers = 0  # tasks it had to cancel when it stopped: none, unless something is wrong

    @property
    def started(self) -> bool:
        return self._loop is not None

    def in_loop_thread(self) -> bool:
        thread = self._thread
        return thread is not None and thread.ident == threading.get_ident()

    def submit(self, coro: Coroutine[Any, Any, T], on_done: Callable[[], object] | None = None) -> _Reply[T]:
        """Start running ``coro`` on the loop (starting the loop's thread if needed); return its reply.

        ``on_done`` is called in the loop's thread once it is done.

        Raises:
            _PortalClosed: The loop has stopped.
        """
        with self._lock:  # no submission slips in once stop() has begun
            if self._stopped:
                coro.close()
                raise _PortalClosed
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=self._main, args=(loop,), name=_THREAD_NAME, daemon=True)
                self._loop, self._thread = loop, thread
                with _signals_blocked():  # in the new thread, which inherits this one's mask
                    thread.start()
            reply: _Reply[T] = _Reply(self._loop, on_done)
            self._loop.call_soon_threadsafe(reply.start, coro)
            return reply

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its outcome; an interruption (Ctrl-C) cancels it.

        Raises:
            _PortalClosed: The loop has stopped.
            UsageError: Called from the loop's own thread, which would wait for itself.
        """
        if self.in_loop_thread():
            coro.close()
            raise UsageError(
                f"a blocking method of {self._owner} was called from its own thread (in a where test, or a "
                "token or backfill function): it would wait for itself"
            )
        reply = self.submit(coro)
        try:
            return reply.result()
        except BaseException:
            reply.cancel()  # interrupted (Ctrl-C): the work stops too; once done, nothing happens
            raise

    def run_sync(self, function: Callable[[], T]) -> T:
        """Call ``function`` in the loop's thread (at once if not started) and return what it returns."""
        if not self.started or self._stopped or self.in_loop_thread():
            return function()  # no loop runs, or this is its thread

        async def call() -> T:
            return function()

        return self.call(call())

    def call_soon(self, function: Callable[[], object]) -> None:
        """Have ``function`` called in the loop's thread, without waiting; nothing if the loop has stopped.

        Safe from a finalizer, in any thread: it takes no lock.
        """
        if self.in_loop_thread():
            function()
            return
        loop = self._loop
        if loop is not None and not self._stopped:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: what it held has ended
                loop.call_soon_threadsafe(function)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Start ``coro`` as a task, from the loop's own thread; stop() waits for it."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self, *, join: bool = True) -> None:
        """Stop the loop, let its last tasks finish, close it and join its thread. Idempotent."""
        with self._lock:
            self._stopped = True
            loop, thread = self._loop, self._thread
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # closed already
                    loop.call_soon_threadsafe(loop.stop)
        if join and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.run_forever()
        finally:
            try:
                self._finish(loop)
            finally:
                loop.close()

    def _finish(self, loop: asyncio.AbstractEventLoop) -> None:
        # The client has closed: what is left are calls ending with it (a
        # stream's last read, an expectation's wait). Anything still running
        # after the grace is a bug; it is cancelled rather than left behind.
        for _ in range(3):  # a finishing task may start another
            tasks = asyncio.all_tasks(loop)
            if not tasks:
                break
            loop.run_until_complete(asyncio.wait(tasks, timeout=_GRACE))
            stuck = [task for task in tasks if not task.done()]
            if stuck:
                self.leftovers += len(stuck)
                logger.warning("cancelling %d task(s) still running on the sync client's loop", len(stuck))
                for task in stuck:
                    task.cancel()
                loop.run_until_complete(asyncio.wait(stuck))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())


# Signals such as Ctrl-C's are the process's: the kernel hands each to any
# thread that does not block it. Python runs its handlers in the main thread
# only, and one handed to the portal's thread would reach a main thread
# waiting in run() or next() only once its wait ends. So the portal's thread,
# and the executor threads it starts, block them.
_PROCESS_SIGNALS = frozenset(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD", "SIGWINCH")
    if hasattr(signal, name)
)


def _signals_blocked() -> AbstractContextManager[None]:
    """Block the process's signals in this thread for the duration of the block (where the OS can)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: signals do not go to threads there
        return contextlib.nullcontext()
    return _blocking(_PROCESS_SIGNALS)


@contextlib.contextmanager
def _blocking(signals: frozenset[signal.Signals]) -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _take(channel: queue.SimpleQueue[_Call | None], run: _Reply[None]) -> _Call | None:
    """Return the next call of ``channel``, or ``None`` once ``run`` is done and no call is left.

    It waits for at most ``_SIGNAL_POLL`` at a time, as a reply does; and
    as a Ctrl-C may come just after ``get()`` has taken the ``None`` that
    marks the end, it looks at ``run`` too.
    """
    while True:
        try:
            return channel.get(timeout=_SIGNAL_POLL)
        except queue.Empty:
            if run.done():
                return None


# Handlers, called in the thread of run()


class _Call:
    """A call of a handler or a hook, handed by the loop to the thread running ``run()``."""

    __slots__ = ("args", "context", "done", "func", "loop")

    def __init__(self, func: Callable[..., object], args: tuple[Any, ...], loop: asyncio.AbstractEventLoop) -> None:
        self.func = func
        self.args = args
        self.loop = loop
        # The loop task's context, where the call is made: what an observer
        # made current for the handler (a tracing span) is current in it too.
        self.context = contextvars.copy_context()
        # Its outcome is the handler's exception (or None) as a result, so
        # that a call nobody waits for any more leaves no unretrieved error.
        self.done: asyncio.Future[Exception | None] = loop.create_future()

    def invoke(self) -> Exception | None:
        """Call the function in this thread; return the exception it raised, if any.

        A BaseException (KeyboardInterrupt, SystemExit) is not caught: it stops ``run()``.
        """
        try:
            result = self.context.run(self.func, *self.args)
        except Exception as exc:
            return exc
        if inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if close is not None:
                close()  # no "never awaited" warning on top of the error
            return UsageError(
                f"{_name_of(self.func)} returned an awaitable: chatfeed.sync calls handlers in the thread of "
                "run() and never awaits them; make it a plain function, or use chatfeed.Client (async)"
            )
        return None

    def settle(self, error: Exception | None = None) -> None:
        """Hand the outcome back to the loop; idempotent."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self.loop.call_soon_threadsafe(_resolve, self.done, error)


def _resolve(future: asyncio.Future[Exception | None], error: Exception | None) -> None:
    if not future.done():
        future.set_result(error)


def _finalize_in_loop(owner: object, portal: _Portal, method: Callable[[], object]) -> weakref.finalize[Any, Any]:
    """Have ``method``, a bound method, called in the loop's thread once ``owner`` is collected, if its object lives.

    ``weakref.finalize`` keeps what it is given for as long as ``owner``
    lives. The async object must not be among it: what it keeps reaches back
    into the caller's code (the error it raised, whose traceback holds the
    caller's frames; a ``where`` with its closure), and so, often, to
    ``owner``, which would then never be collected, nor the client with it.
    """
    weak = weakref.WeakMethod(method)

    def call() -> None:
        function = weak()
        if function is not None:
            portal.call_soon(function)

    finalizer = weakref.finalize(owner, call)
    finalizer.atexit = False
    return finalizer


def _name_of(func: Callable[..., object]) -> str:
    return getattr(func, "__qualname__", None) or type(func).__qualname__


def _is_async(func: Callable[..., object]) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004  (the method itself, to inspect it)
    )


def _check_sync(func: Callable[..., object], what: str, owner: str = "chatfeed.sync.Client") -> None:
    if not callable(func):
        raise UsageError(f"{what} must be callable, not {func!r}")
    if _is_async(func):
        async_owner = owner.replace("chatfeed.sync.", "chatfeed.", 1)
        raise UsageError(
            f"{what} {_name_of(func)} is async: {owner} calls it in the thread that runs run(). "
            f"Make it a plain `def`, or use {async_owner}, its async counterpart, to run async handlers"
        )


# What a blocking client and a blocking pool share


class _Blocking:
    """The portal, the hand-over of handler calls to the thread of ``run()``, and closing, for Client and Pool.

    A subclass wraps one async object (a client or a pool) and says how to
    run, enter, leave and close it, and how to register handlers on it.
    """

    __slots__ = (
        "__weakref__",
        "_channel",
        "_closed",
        "_closed_by_handler",
        "_closing",
        "_exit_error",
        "_handlers",
        "_held",
        "_holding",
        "_lock",
        "_mode",
        "_outstanding",
        "_portal",
        "_pump_thread",
        "_raised",
        "_run_future",
        "_serving",
        "_stopping",
    )

    _NAME = "client"
    """What messages call it."""

    _HANDLER_CLOSE_ENDS_CALLS = False
    """Whether close() from a handler makes the calls handed over after it skipped (a pool's other feeds)."""

    def _init_blocking(self, owner: str) -> None:
        portal = self._portal = _Portal(owner)
        self._lock = threading.Lock()  # guards _mode
        self._closing = threading.Lock()  # one closer at a time; the others wait for it
        self._closed = False  # the portal has stopped: nothing of it runs any more
        self._mode: Literal["unopened", "with", "run", "closed"] = "unopened"
        self._handlers = 0
        # run(): the channel of calls to the calling thread, and that thread.
        self._channel: queue.SimpleQueue[_Call | None] | None = None
        self._pump_thread: int | None = None
        self._serving = False  # the thread of run() takes calls from the channel
        self._run_future: _Reply[None] | None = None
        # The calls the receive loops wait for (one per feed at most), of the loop's thread.
        self._outstanding: set[_Call] = set()
        self._stopping = False  # close() from elsewhere: the receive loops stop after the calls they wait for
        self._closed_by_handler = False  # close() from a handler: it stops after the event's delivery
        # with: the error leaving the block raises, and the errors events() has raised already.
        self._exit_error: Exception | None = None
        self._raised: list[BaseException] = []
        # with: a stream subscribed as the block starts, for its first call
        # to adopt if it is events() (_held, of the loop's thread), until then.
        self._held: AsyncEventStream[FeedEvent] | None = None
        self._holding = False
        # One dropped without being closed does not leave its thread behind.
        weakref.finalize(self, portal.stop, join=False).atexit = False

    # What a subclass says about the async object it drives (called in the loop's thread)

    def _async_run(self) -> Coroutine[Any, Any, None]:
        raise NotImplementedError

    async def _async_enter(self) -> None:
        raise NotImplementedError

    async def _async_exit(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        raise NotImplementedError

    async def _async_close(self) -> None:
        raise NotImplementedError

    def _stop_unstarted(self) -> None:
        """Close for good, without a loop: it was never started."""
        raise NotImplementedError

    def _subscribe(self, buffer: int) -> AsyncEventStream[FeedEvent]:
        raise NotImplementedError

    def _add_handler(self, cls: type[Any], forward: Callable[..., Awaitable[None]]) -> None:
        raise NotImplementedError

    def _add_error_hook(self, forward: Callable[..., Awaitable[None]]) -> None:
        raise NotImplementedError

    async def _request_stop(self) -> None:
        """Stop run(), once the calls handed over have returned."""
        raise NotImplementedError

    async def _after_call(self) -> None:
        """In a receive loop, once a handler's call has returned (or was skipped)."""
        raise NotImplementedError

    # Registration

    def _register(self, cls: type[Any], func: Callable[..., None], owner: str) -> None:
        _check_sync(func, "handler", owner)
        with self._lock:
            if self._mode == "with":
                raise UsageError(_NO_HANDLERS_IN_WITH)
            if self._mode == "closed":
                raise UsageError(f"the {self._NAME} is closed")
            self._handlers += 1
        forward = self._forwarder(func)
        self._portal.run_sync(lambda: self._add_handler(cls, forward))

    def _register_error_hook(self, hook: Callable[..., None], owner: str) -> None:
        _check_sync(hook, "error hook", owner)
        forward = self._forwarder(hook)
        self._portal.run_sync(lambda: self._add_error_hook(forward))

    def _forwarder(self, func: Callable[..., None]) -> Callable[..., Awaitable[None]]:
        """An async handler for the async object that calls ``func`` in the thread of ``run()``."""

        async def forward(*args: Any) -> None:
            await self._in_caller(func, args)

        forward.__qualname__ = _name_of(func)  # what the log names when it raises
        return forward

    async def _in_caller(self, func: Callable[..., None], args: tuple[Any, ...]) -> None:
        channel = self._channel
        if channel is None:  # an error hook inside `with`: no thread runs run() to call it
            func(*args)
            return
        if not self._stopping:
            # Each receive loop waits for its own call, so that the calls of
            # one feed are made in the order its frames came; the thread of
            # run() makes them one at a time, in the order they were handed over.
            call = _Call(func, args, asyncio.get_running_loop())
            self._outstanding.add(call)
            channel.put(call)
            try:
                error = await call.done
            finally:
                self._outstanding.discard(call)
        else:
            error = None
        await self._after_call()
        if error is not None:
            raise error

    # Running

    def _run(self) -> None:
        channel: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        with self._lock:
            self._check_unopened()
            self._mode = "run"
            self._channel = channel
            self._pump_thread = threading.get_ident()
            # Submitted under the lock: a close() from elsewhere comes after it.
            future = self._run_future = self._portal.submit(self._async_run(), lambda: channel.put(None))
        interruption: BaseException | None = None
        try:
            try:
                self._serve(channel, future)
            except BaseException as exc:  # Ctrl-C, or SystemExit from a handler: stop, then go on
                interruption = exc
                if isinstance(exc, KeyboardInterrupt):
                    logger.info("KeyboardInterrupt: closing the %s", self._NAME)
                self._stopping = True
                self._settle_outstanding()  # the call it interrupted, and any not yet taken
                with contextlib.suppress(_PortalClosed):
                    self._portal.call(self._request_stop())
                self._serve(channel, future)  # until run() ends, taking no more calls
        finally:
            self._pump_thread = None
            # Nobody takes calls any more (a second Ctrl-C got here): a call
            # still pending would hold a receive loop up for ever.
            self._stopping = True
            self._settle_outstanding()
            self._shut_down()
        if interruption is not None:
            if isinstance(interruption, KeyboardInterrupt):
                return
            raise interruption
        with contextlib.suppress(concurrent.futures.CancelledError):  # cut short by the teardown: it is closed
            future.result()

    def _settle_outstanding(self) -> None:
        """Let every receive loop waiting for a call go on (from any thread)."""
        for call in tuple(self._outstanding):  # a copy taken at once, under the GIL
            call.settle()

    def _serve(self, channel: queue.SimpleQueue[_Call | None], run: _Reply[None]) -> None:
        """Make the calls the loop hands over, in this thread, until ``run()`` ends; skip them once stopping."""
        self._serving = True
        try:
            while True:
                call = _take(channel, run)
                if call is None:
                    return
                skip = (
                    self._stopping
                    or call.done.done()  # its receive loop stopped waiting (its feed was removed)
                    or (self._HANDLER_CLOSE_ENDS_CALLS and self._closed_by_handler)
                )
                call.settle(None if skip else call.invoke())
        finally:
            self._serving = False

    def _enter_blocking(self) -> None:
        with self._lock:
            self._check_unopened()
            if self._handlers:
                raise UsageError(_NO_HANDLERS_IN_WITH)
            self._mode = "with"
            future = self._portal.submit(self._enter())
        try:
            future.result()
        except BaseException:
            future.cancel()
            self._shut_down()
            raise

    async def _enter(self) -> None:
        await self._async_enter()
        # In the same step, before the receive loop's first: what the feed
        # sends from now on (one event; then it is not read) is kept for the
        # block's first call, so that `for event in client.events():` on its
        # first line sees every event, as after `async with client:`.
        self._held = self._subscribe(1)
        self._holding = True

    def _let_go(self) -> None:
        """The block's first call is not events(): what was held goes, as nobody asked for it."""
        if self._holding:
            self._holding = False
            self._portal.call_soon(self._drop_held)

    def _drop_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held._unsubscribe()

    def _exit_blocking(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._shut_down(exc_type, exc, traceback)
        error, self._exit_error = self._exit_error, None
        if error is not None and exc is None and not any(error is raised for raised in self._raised):
            raise error

    def _close_blocking(self) -> None:
        portal = self._portal
        if portal.in_loop_thread():  # a where test, a token function: waiting here would wait for itself
            self._stopping = True
            portal.spawn(self._request_stop())
            return
        if threading.get_ident() == self._pump_thread:  # a handler, in run()
            self._closed_by_handler = True
            return
        self._shut_down()

    def _shut_down(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        """Close the async object as the mode requires, then stop the portal; once, whoever calls first."""
        with self._closing:
            if self._closed:
                return
            with self._lock:
                mode, self._mode = self._mode, "closed"
            portal = self._portal
            try:
                if not portal.started:
                    self._stop_unstarted()
                elif mode == "run":
                    self._stopping = True
                    with contextlib.suppress(_PortalClosed):
                        portal.call(self._request_stop())
                    if self._run_future is not None:
                        self._run_future.wait()
                elif mode == "with":
                    try:
                        portal.call(self._async_exit(exc_type, exc, traceback))
                    except _PortalClosed:
                        pass
                    except Exception as error:  # the error that stopped it; for __exit__ to raise
                        self._exit_error = error
                else:
                    with contextlib.suppress(_PortalClosed):
                        portal.call(self._async_close())
            finally:
                portal.stop()
                self._closed = True

    def _check_unopened(self) -> None:
        if self._mode == "closed":
            raise UsageError(f"the {self._NAME} is closed; create a new one")
        if self._mode != "unopened":
            raise UsageError(f"the {self._NAME} is already running")

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return self._portal.call(coro)
        except _PortalClosed:
            raise UsageError(f"the {self._NAME} is closed") from None

    def _refuse_in_handler(self, what: str) -> None:
        if threading.get_ident() == self._pump_thread:
            raise UsageError(
                f"{what} in a handler would wait for ever: the feed is not read while a handler runs. "
                "Do it in another thread, or outside handlers"
            )

    def _events(self, timeout: float | None, buffer: int) -> EventStream[FeedEvent]:
        check_timeout(timeout)
        if self._mode == "closed":
            raise UsageError(f"the {self._NAME} is closed")
        self._holding = False

        async def subscribe() -> AsyncEventStream[FeedEvent]:
            stream = self._subscribe(buffer)
            held, self._held = self._held, None
            if held is None:
                return stream
            if not held.pending():
                held._unsubscribe()  # empty: no delivery waits for it
                return stream
            # The block's first call: the stream made as it began holds what
            # came since, and a delivery may be waiting for room in it.
            stream._unsubscribe()
            held._buffer = buffer
            return held

        return EventStream(self, self._call(subscribe()), timeout)

    def _expect(self, register: Callable[[], AsyncExpectation[Any]]) -> Expectation[Any]:
        if self._mode == "closed":
            raise UsageError(f"the {self._NAME} is closed")
        self._let_go()

        async def call() -> AsyncExpectation[Any]:
            return register()

        return Expectation(self, self._call(call()))


# The client


class Client(_Blocking):
    """A blocking client of the chat feed: the async [`chatfeed.Client`][chatfeed.Client] driven from a thread.

    Takes the same arguments as [`chatfeed.Client`][chatfeed.Client], with the
    same defaults, checked at once. Use it as a context manager and iterate
    over [`events`][chatfeed.sync.Client.events], or register handlers with
    [`on`][chatfeed.sync.Client.on] and call [`run`][chatfeed.sync.Client.run];
    wait for one reply with [`expect`][chatfeed.sync.Client.expect].

    The client's event loop runs in a thread of its own, named
    ``chatfeed-sync``, started by the first call that needs it (``with``,
    ``run()``, ``events()``, ``expect()``) and stopped, and joined, when the
    client closes. Its methods may be called from any thread; the event loop
    of the calling thread, if it runs one (a notebook's), is never used.

    Args:
        url: As for [`chatfeed.Client`][chatfeed.Client].
        token: As for a client; a token function runs in the client's thread.
        reconnect: As for a client.
        auth_timeout: As for a client.
        ping_interval: As for a client.
        ping_timeout: As for a client.
        open_timeout: As for a client.
        close_timeout: As for a client.
        max_size: As for a client.
        ssl: As for a client.
        proxy: As for a client.
        auth_retries: As for a client.
        compression: As for a client.
        backfill: As for a client; a backfill function runs in the client's thread.
        backfill_since: As for a client.
        backfill_timeout: As for a client.
        dedupe: As for a client.
        drain_timeout: As for a client; no handler of this client runs
            concurrently, so close() has none to drain.
        observer: As for a client; its methods are called in the client's thread.

    Raises:
        UsageError: An argument is invalid.

    Example:
        ```python
        from chatfeed.sync import Client

        client = Client("wss://api.example.com", token=jwt)

        @client.on("new_message")
        def show(event: chatfeed.NewMessage) -> None:
            print(event.payload.chat_id, event.payload.content)

        client.run()  # Ctrl-C closes the client and returns
        ```
    """

    __slots__ = ("_client",)

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource,
        reconnect: Backoff | bool = True,
        auth_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        open_timeout: float = 10.0,
        close_timeout: float = 2.0,
        max_size: int = 2**20,
        ssl: ssl_module.SSLContext | None = None,
        proxy: str | bool | None = True,
        auth_retries: int = 1,
        compression: Compression = None,
        backfill: Backfill | None = None,
        backfill_since: datetime | None = None,
        backfill_timeout: float = 30.0,
        dedupe: Dedupe | bool | None = None,
        drain_timeout: float = 5.0,
        observer: Observer | Sequence[Observer] | None = None,
    ) -> None:
        self._client = AsyncClient(
            url,
            token=token,
            reconnect=reconnect,
            auth_timeout=auth_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            max_size=max_size,
            ssl=ssl,
            proxy=proxy,
            auth_retries=auth_retries,
            compression=compression,
            backfill=backfill,
            backfill_since=backfill_since,
            backfill_timeout=backfill_timeout,
            dedupe=dedupe,
            drain_timeout=drain_timeout,
            observer=observer,
        )
        self._init_blocking("chatfeed.sync.Client")

    def __repr__(self) -> str:
        return repr(self._client).replace("<chatfeed.Client", "<chatfeed.sync.Client", 1)

    # Registration

    @overload
    def on(
        self, event: Literal["new_message"] | type[NewMessage], *, concurrency: Literal[1] = ...
    ) -> Callable[[_OnNewMessage], _OnNewMessage]: ...
    @overload
    def on(
        self, event: Literal["new_chat"] | type[NewChat], *, concurrency: Literal[1] = ...
    ) -> Callable[[_OnNewChat], _OnNewChat]: ...
    @overload
    def on(
        self, event: Literal["error"] | type[ErrorMessage], *, concurrency: Literal[1] = ...
    ) -> Callable[[_OnError], _OnError]: ...
    @overload
    def on(
        self, event: Literal["unknown"] | type[UnknownMessage], *, concurrency: Literal[1] = ...
    ) -> Callable[[_OnUnknown], _OnUnknown]: ...
    @overload
    def on(self, event: Literal["connected"] | type[Connected]) -> Callable[[_OnConnected], _OnConnected]: ...
    @overload
    def on(
        self, event: Literal["disconnected"] | type[Disconnected]
    ) -> Callable[[_OnDisconnected], _OnDisconnected]: ...
    @overload
    def on(
        self, event: type[ServerMessage], *, concurrency: Literal[1] = ...
    ) -> Callable[[_OnServerMessage], _OnServerMessage]: ...
    @overload
    def on(self, event: EventName) -> Callable[[_OnAny], _OnAny]: ...

    def on(self, event: EventName | type[Any], *, concurrency: int = 1) -> Callable[[_OnAny], _OnAny]:
        """Register the decorated function as a handler of one kind of event, called by ``run()``.

        Handlers are plain functions. ``run()`` calls them in its own thread,
        one event at a time, in the order the frames arrived, then the next
        handler of the same event in registration order; the feed is not read
        while one runs (nothing is dropped). ``Connected`` and
        ``Disconnected`` events are delivered too. An exception in a handler
        is logged and passed to the [`on_error`][chatfeed.sync.Client.on_error]
        hooks; it stops nothing else.

        Args:
            event: An event name or class, as for [`chatfeed.Client.on`][chatfeed.Client.on].
            concurrency: 1, the only value: handlers of this client run one at
                a time in the thread of ``run()``. For handlers side by side,
                use [`chatfeed.Client`][chatfeed.Client] (async), or hand the
                work to a thread pool of your own from the handler.

        Raises:
            UsageError: ``event`` is not an event chatfeed delivers;
                ``concurrency`` is not 1; the function is async (or not
                callable); the client runs in a ``with`` block, which calls no
                handler; or the client is closed.

        Example:
            ```python
            @client.on("new_message")
            def store(event: chatfeed.NewMessage) -> None:
                Message.objects.create(id=event.payload.id, text=event.payload.content)
            ```
        """
        cls = resolve_event(event)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise UsageError(f"concurrency must be 1 for chatfeed.sync.Client, not {concurrency!r}")
        if concurrency != 1:
            raise UsageError(
                "chatfeed.sync.Client calls handlers one at a time, in the thread that runs run(): concurrency "
                f"{concurrency} needs chatfeed.Client, the async client, whose handlers run side by side; or "
                "hand the work to a thread pool of your own from the handler"
            )

        def register(func: _OnAny) -> _OnAny:
            self._register(cls, func, "chatfeed.sync.Client")
            return func

        return register

    def on_error(self, hook: _OnErrorHook) -> _OnErrorHook:
        """Register a function called with ``(exception, event)`` when a handler raises.

        Use it as a decorator; the hook is a plain function, called in the
        thread of ``run()``. A ``backfill`` that fails is reported here too,
        with its [`Gap`][chatfeed.Gap] in place of the event; inside a
        ``with`` block, where no thread runs ``run()``, the hook is called in
        the client's own thread. An exception in the hook is logged and
        ignored.

        Raises:
            UsageError: The hook is async, or not callable.
        """
        self._register_error_hook(hook, "chatfeed.sync.Client")
        return hook

    def _add_handler(self, cls: type[Any], forward: Callable[..., Awaitable[None]]) -> None:
        add_handler: Callable[[Callable[..., Awaitable[None]]], object] = self._client.on(cls)
        add_handler(forward)

    def _add_error_hook(self, forward: Callable[..., Awaitable[None]]) -> None:
        self._client.on_error(forward)

    async def _after_call(self) -> None:
        if self._stopping or self._closed_by_handler:
            # This is the receive loop's task: closing from here stops it
            # once this delivery is over, as close() from an async handler does.
            await self._client.close()

    # Waiting for one event

    @overload
    def expect(
        self,
        event: Literal["new_message"] | type[NewMessage],
        *,
        where: Callable[[NewMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[NewMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["new_chat"] | type[NewChat],
        *,
        where: Callable[[NewChat], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[NewChat]: ...
    @overload
    def expect(
        self,
        event: Literal["error"] | type[ErrorMessage],
        *,
        where: Callable[[ErrorMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[ErrorMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["unknown"] | type[UnknownMessage],
        *,
        where: Callable[[UnknownMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[UnknownMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["connected"] | type[Connected],
        *,
        where: Callable[[Connected], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[Connected]: ...
    @overload
    def expect(
        self,
        event: Literal["disconnected"] | type[Disconnected],
        *,
        where: Callable[[Disconnected], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[Disconnected]: ...
    @overload
    def expect(
        self,
        event: type[ServerMessage],
        *,
        where: Callable[[ServerMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[ServerMessage]: ...
    @overload
    def expect(self, event: EventName, *, where: None = ..., timeout: float | None = ...) -> Expectation[Any]: ...

    def expect(
        self,
        event: EventName | type[Any],
        *,
        where: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
    ) -> Expectation[Any]:
        """Start waiting for the next event of one kind that passes ``where``; wait for it later.

        As [`chatfeed.Client.expect`][chatfeed.Client.expect]: the expectation
        is registered before this returns, so an event that comes before the
        caller reaches ``wait()`` is not missed. Call it *before* the request
        whose answer it waits for.

        Args:
            event: An event name or class; the result is typed after it.
            where: A sync test of the event, called in the client's thread.
            timeout: Seconds from now after which waiting raises
                `TimeoutError`, or ``None`` for no limit.

        Returns:
            An [`Expectation`][chatfeed.sync.Expectation]: call its
            ``wait(timeout=...)``, or use it in a ``with`` block.

        Raises:
            UsageError: The client is closed, or an argument is wrong.

        Example:
            ```python
            with client.expect("new_message", where=lambda e: e.payload.chat_id == chat_id) as reply:
                requests.post(f"{api}/chats/{chat_id}/messages", json={"content": "hello"})
                event = reply.wait(timeout=30)
            ```
        """
        return self._expect(lambda: self._client.expect(event, where=where, timeout=timeout))

    # Iterating

    def events(self, *, timeout: float | None = None, buffer: int = 64) -> EventStream[FeedEvent]:
        """Return an iterator over server events, from now on.

        As [`chatfeed.Client.events`][chatfeed.Client.events]: each call is a
        separate subscription with a buffer of at most ``buffer`` events, and
        the client stops reading the socket while a buffer is full (nothing
        is dropped). Each ``next()`` takes one event from that buffer, waiting
        for one if it is empty. Iteration ends when the client closes, with
        the error that stopped it, if any, once the buffer is read.

        Args:
            timeout: Seconds each ``next()`` waits for an event before raising
                `TimeoutError`, or ``None`` to wait as long as it takes. The
                iterator stays usable after a timeout: the next ``next()``
                waits again, and no event is lost.
            buffer: The most events held for this iterator.

        Raises:
            UsageError: The client is closed, or an argument is wrong.

        Example:
            ```python
            with Client(url, token=jwt) as client:
                for event in client.events():
                    if isinstance(event, chatfeed.NewMessage):
                        print(event.payload.content)
            ```
        """
        return self._events(timeout, buffer)

    def _subscribe(self, buffer: int) -> AsyncEventStream[FeedEvent]:
        return self._client.events(buffer=buffer)

    # Running

    def run(self) -> None:
        """Connect, and call the handlers in this thread until [`close`][chatfeed.sync.Client.close] is called.

        Blocks. Connection failures and disconnections are retried as
        ``reconnect`` says; errors that a retry would meet again end the run.
        Ctrl-C (`KeyboardInterrupt`) closes the client, after the handler
        running then, and ``run()`` returns normally. When ``run()`` returns,
        the client is closed and its thread has stopped.

        Raises:
            AuthenticationError: The server rejected the token.
            ConnectionFailedError: The feed cannot be reached, or a retry is not
                worth it (a fatal close code, HTTP 4xx), or retries ran out.
            UsageError: The client is already running or closed.
        """
        self._run()

    def _async_run(self) -> Coroutine[Any, Any, None]:
        return self._client.run()

    async def _request_stop(self) -> None:
        """Stop run(): at once, unless a handler's call is pending, which stops it once it returns."""
        self._stopping = True
        outstanding = next(iter(self._outstanding), None)
        if outstanding is None:
            await self._client.close()
        else:
            name = _name_of(outstanding.func)
            logger.debug("closing the client once handler %s returns", name, extra=log_fields(handler=name))

    def __enter__(self) -> Self:
        """Connect; return once the first connection is authenticated.

        Raises:
            AuthenticationError: The server rejected the token.
            ConnectionFailedError: As for [`run`][chatfeed.sync.Client.run].
            UsageError: The client is already running or closed, has handlers
                (which only ``run()`` calls), or was closed (from another
                thread) while connecting.
        """
        self._enter_blocking()
        return self

    async def _async_enter(self) -> None:
        await self._client.__aenter__()

    async def _async_exit(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self._client.__aexit__(exc_type, exc, traceback)

    async def _async_close(self) -> None:
        await self._client.close()

    def _stop_unstarted(self) -> None:
        self._client._stop(None)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Close the client; raise the error that stopped it, unless ``events()`` raised it already.

        An error that stops the client while the block runs ends the block's
        ``events()`` iteration, or its ``wait()``, with that error; otherwise
        (the block was doing something else) it is raised here, unless the
        block raised an exception of its own.
        """
        self._exit_blocking(exc_type, exc, traceback)

    def close(self) -> None:
        """Stop the client: close the connection, end every iterator and every expectation, stop its thread.

        Returns once everything has stopped, the client's thread included: at
        once for a client never started (no thread is started to close it);
        otherwise within about ``close_timeout``, after a handler running in
        ``run()`` has returned (a sync handler cannot be interrupted; no other
        is called). Safe to call more than once, and from any thread: a later
        call waits for the first one. Called from a handler, it returns at
        once: the other handlers of the same event still run, then ``run()``
        returns.
        """
        self._close_blocking()

    # Introspection

    @property
    def connected(self) -> bool:
        """Whether a connection is authenticated right now."""
        self._let_go()
        return self._client.connected

    def statistics(self) -> ClientStatistics:
        """Return a snapshot of the client's counters, as [`chatfeed.Client.statistics`][chatfeed.Client.statistics]."""
        self._let_go()
        try:
            return self._portal.run_sync(self._client.statistics)  # taken in the loop's thread, consistent
        except _PortalClosed:  # closed meanwhile: nothing changes them any more
            return self._client.statistics()


# The pool

# A handler of this pool is a plain function of the event and its feed's key, returning None.
_FeedOnNewMessage = TypeVar("_FeedOnNewMessage", bound=Callable[[NewMessage, str], None])
_FeedOnNewChat = TypeVar("_FeedOnNewChat", bound=Callable[[NewChat, str], None])
_FeedOnError = TypeVar("_FeedOnError", bound=Callable[[ErrorMessage, str], None])
_FeedOnUnknown = TypeVar("_FeedOnUnknown", bound=Callable[[UnknownMessage, str], None])
_FeedOnConnected = TypeVar("_FeedOnConnected", bound=Callable[[Connected, str], None])
_FeedOnDisconnected = TypeVar("_FeedOnDisconnected", bound=Callable[[Disconnected, str], None])
_FeedOnFeedStopped = TypeVar("_FeedOnFeedStopped", bound=Callable[[FeedStopped, str], None])
_FeedOnServerMessage = TypeVar("_FeedOnServerMessage", bound=Callable[[ServerMessage, str], None])
_FeedOnAny = TypeVar("_FeedOnAny", bound=Callable[[Any, str], None])


class Pool(_Blocking):
    """Many feeds, one per key, from blocking code: the async [`chatfeed.Pool`][chatfeed.Pool] driven from a thread.

    Takes the same arguments as [`chatfeed.Pool`][chatfeed.Pool], with the
    same defaults, checked at once. Add feeds with [`add`][chatfeed.sync.Pool.add];
    use it as a context manager and iterate over
    [`events`][chatfeed.sync.Pool.events], which yields ``(key, event)``, or
    register handlers with [`on`][chatfeed.sync.Pool.on] and call
    [`run`][chatfeed.sync.Pool.run]; wait for one event with
    [`expect`][chatfeed.sync.Pool.expect].

    It runs on a portal as [`chatfeed.sync.Client`][chatfeed.sync.Client]
    does: one event loop in one thread, named ``chatfeed-sync``, for every
    feed, started by the first call that needs it and stopped, and joined,
    when the pool closes. Each feed has its own receive loop there; the
    handlers of every feed run in the thread of ``run()``, one call at a
    time, in the order the feeds handed them over (so in the order its
    frames came, for each feed). A feed waits while its call is pending, or
    waiting for its turn; the others go on reading until they have a call
    of their own waiting.

    Args:
        url: As for [`chatfeed.Pool`][chatfeed.Pool].
        connect_rate: As for a pool.
        reconnect: As for a pool.
        auth_timeout: As for a pool.
        ping_interval: As for a pool.
        ping_timeout: As for a pool.
        open_timeout: As for a pool.
        close_timeout: As for a pool.
        max_size: As for a pool.
        ssl: As for a pool.
        proxy: As for a pool.
        auth_retries: As for a pool.
        compression: As for a pool.
        backfill: As for a pool; a backfill function runs in the pool's thread.
        backfill_since: As for a pool.
        backfill_timeout: As for a pool.
        dedupe: As for a pool.
        drain_timeout: As for a pool; no handler of this pool runs
            concurrently, so close() has none to drain.
        observer: As for a pool; its methods are called in the pool's thread.

    Raises:
        UsageError: An argument is invalid.

    Example:
        ```python
        from chatfeed.sync import Pool

        pool = Pool("wss://api.example.com")
        for user, token in tokens.items():
            pool.add(user, token=token)

        @pool.on("new_message")
        def show(event: chatfeed.NewMessage, feed: str) -> None:
            print(feed, event.payload.content)

        pool.run()  # Ctrl-C closes the pool and returns
        ```
    """

    __slots__ = ("_pool",)

    _NAME = "pool"
    _HANDLER_CLOSE_ENDS_CALLS = True

    def __init__(
        self,
        url: str,
        *,
        connect_rate: float = 500.0,
        reconnect: Backoff | bool = True,
        auth_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        open_timeout: float = 10.0,
        close_timeout: float = 2.0,
        max_size: int = 2**20,
        ssl: ssl_module.SSLContext | None = None,
        proxy: str | bool | None = True,
        auth_retries: int = 1,
        compression: Compression = None,
        backfill: Backfill | None = None,
        backfill_since: datetime | None = None,
        backfill_timeout: float = 30.0,
        dedupe: Dedupe | bool | None = None,
        drain_timeout: float = 5.0,
        observer: Observer | Sequence[Observer] | None = None,
    ) -> None:
        self._pool = AsyncPool(
            url,
            connect_rate=connect_rate,
            reconnect=reconnect,
            auth_timeout=auth_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            max_size=max_size,
            ssl=ssl,
            proxy=proxy,
            auth_retries=auth_retries,
            compression=compression,
            backfill=backfill,
            backfill_since=backfill_since,
            backfill_timeout=backfill_timeout,
            dedupe=dedupe,
            drain_timeout=drain_timeout,
            observer=observer,
        )
        self._init_blocking("chatfeed.sync.Pool")

    def __repr__(self) -> str:
        return repr(self._pool).replace("<chatfeed.Pool", "<chatfeed.sync.Pool", 1)

    def __len__(self) -> int:
        return len(self._pool)

    def __contains__(self, key: object) -> bool:
        return key in self._pool

    # Feeds

    def add(self, key: str, *, token: TokenSource, backfill_since: datetime | None = None) -> None:
        """Add a feed: its key (any non-empty str, usually the user's id) and its token.

        As [`chatfeed.Pool.add`][chatfeed.Pool.add]: a feed added while the
        pool runs starts at once, from ``backfill_since`` if given. A token
        function runs in the pool's thread.

        Raises:
            UsageError: The key is not a non-empty str or is taken, the token
                is invalid, ``backfill_since`` is invalid, or the pool is closed.
        """
        try:
            self._portal.run_sync(lambda: self._pool.add(key, token=token, backfill_since=backfill_since))
        except _PortalClosed:
            raise UsageError("the pool is closed") from None

    def remove(self, key: str) -> None:
        """Close one feed and take it out of the pool, and return once it has stopped; the others go on.

        As [`chatfeed.Pool.remove`][chatfeed.Pool.remove]: expectations of
        that feed raise [`ClientClosedError`][chatfeed.ClientClosedError]. A
        call of that feed's handlers waiting for its turn in ``run()`` is not
        made. From a handler, a feed may remove any feed, its own included.

        Raises:
            UsageError: The pool has no such feed, or is closed.
        """
        self._call(self._pool.remove(key))

    def feeds(self) -> list[str]:
        """Return the keys of the feeds, in the order they were added."""
        try:
            return self._portal.run_sync(self._pool.feeds)
        except _PortalClosed:
            return self._pool.feeds()

    # Registration

    @overload
    def on(
        self, event: Literal["new_message"] | type[NewMessage], *, concurrency: Literal[1] = ...
    ) -> Callable[[_FeedOnNewMessage], _FeedOnNewMessage]: ...
    @overload
    def on(
        self, event: Literal["new_chat"] | type[NewChat], *, concurrency: Literal[1] = ...
    ) -> Callable[[_FeedOnNewChat], _FeedOnNewChat]: ...
    @overload
    def on(
        self, event: Literal["error"] | type[ErrorMessage], *, concurrency: Literal[1] = ...
    ) -> Callable[[_FeedOnError], _FeedOnError]: ...
    @overload
    def on(
        self, event: Literal["unknown"] | type[UnknownMessage], *, concurrency: Literal[1] = ...
    ) -> Callable[[_FeedOnUnknown], _FeedOnUnknown]: ...
    @overload
    def on(self, event: Literal["connected"] | type[Connected]) -> Callable[[_FeedOnConnected], _FeedOnConnected]: ...
    @overload
    def on(
        self, event: Literal["disconnected"] | type[Disconnected]
    ) -> Callable[[_FeedOnDisconnected], _FeedOnDisconnected]: ...
    @overload
    def on(
        self, event: Literal["feed_stopped"] | type[FeedStopped]
    ) -> Callable[[_FeedOnFeedStopped], _FeedOnFeedStopped]: ...
    @overload
    def on(
        self, event: type[ServerMessage], *, concurrency: Literal[1] = ...
    ) -> Callable[[_FeedOnServerMessage], _FeedOnServerMessage]: ...
    @overload
    def on(self, event: PoolEventName) -> Callable[[_FeedOnAny], _FeedOnAny]: ...

    def on(self, event: PoolEventName | type[Any], *, concurrency: int = 1) -> Callable[[_FeedOnAny], _FeedOnAny]:
        """Register the decorated function as a handler of one kind of event, of every feed, called by ``run()``.

        As [`chatfeed.sync.Client.on`][chatfeed.sync.Client.on], with the
        differences of [`chatfeed.Pool.on`][chatfeed.Pool.on]: the handler is
        called with the event *and the key of its feed*, and
        ``"feed_stopped"`` ([`FeedStopped`][chatfeed.FeedStopped]) says that
        a feed stopped for good. Calls are made one at a time, in the thread
        of ``run()``; while a feed's call is pending, that feed is not read.

        Args:
            event: An event name or class, as for [`chatfeed.Pool.on`][chatfeed.Pool.on].
            concurrency: 1, the only value: handlers run one at a time in
                the thread of ``run()``. For handlers side by side, use
                [`chatfeed.Pool`][chatfeed.Pool] (async).

        Raises:
            UsageError: As for [`chatfeed.sync.Client.on`][chatfeed.sync.Client.on].

        Example:
            ```python
            @pool.on("new_message")
            def store(event: chatfeed.NewMessage, feed: str) -> None:
                Message.objects.create(user=feed, id=event.payload.id, text=event.payload.content)
            ```
        """
        cls = _resolve_pool_event(event)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise UsageError(f"concurrency must be 1 for chatfeed.sync.Pool, not {concurrency!r}")
        if concurrency != 1:
            raise UsageError(
                "chatfeed.sync.Pool calls handlers one at a time, in the thread that runs run(): concurrency "
                f"{concurrency} needs chatfeed.Pool, the async pool, whose handlers run side by side; or "
                "hand the work to a thread pool of your own from the handler"
            )

        def register(func: _FeedOnAny) -> _FeedOnAny:
            self._register(cls, func, "chatfeed.sync.Pool")
            return func

        return register

    def on_error(self, hook: _OnErrorHook) -> _OnErrorHook:
        """Register a function called with ``(exception, event)`` when a handler raises.

        As [`chatfeed.sync.Client.on_error`][chatfeed.sync.Client.on_error];
        ``event.feed`` is the feed's key.

        Raises:
            UsageError: The hook is async, or not callable.
        """
        self._register_error_hook(hook, "chatfeed.sync.Pool")
        return hook

    def _add_handler(self, cls: type[Any], forward: Callable[..., Awaitable[None]]) -> None:
        add_handler: Callable[[Callable[..., Awaitable[None]]], object] = self._pool.on(cls)
        add_handler(forward)

    def _add_error_hook(self, forward: Callable[..., Awaitable[None]]) -> None:
        self._pool.on_error(forward)

    async def _after_call(self) -> None:
        if self._closed_by_handler and not self._stopping:
            # close() from a handler: the pool closes from a task of its own
            # (this one is a feed's, which it cancels), once the calls
            # handed over meanwhile have been skipped.
            self._stopping = True
            self._portal.spawn(self._request_stop())

    # Waiting for one event

    @overload
    def expect(
        self,
        event: Literal["new_message"] | type[NewMessage],
        *,
        feed: str | None = ...,
        where: Callable[[NewMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[NewMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["new_chat"] | type[NewChat],
        *,
        feed: str | None = ...,
        where: Callable[[NewChat], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[NewChat]: ...
    @overload
    def expect(
        self,
        event: Literal["error"] | type[ErrorMessage],
        *,
        feed: str | None = ...,
        where: Callable[[ErrorMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[ErrorMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["unknown"] | type[UnknownMessage],
        *,
        feed: str | None = ...,
        where: Callable[[UnknownMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[UnknownMessage]: ...
    @overload
    def expect(
        self,
        event: Literal["connected"] | type[Connected],
        *,
        feed: str | None = ...,
        where: Callable[[Connected], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[Connected]: ...
    @overload
    def expect(
        self,
        event: Literal["disconnected"] | type[Disconnected],
        *,
        feed: str | None = ...,
        where: Callable[[Disconnected], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[Disconnected]: ...
    @overload
    def expect(
        self,
        event: Literal["feed_stopped"] | type[FeedStopped],
        *,
        feed: str | None = ...,
        where: Callable[[FeedStopped], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[FeedStopped]: ...
    @overload
    def expect(
        self,
        event: type[ServerMessage],
        *,
        feed: str | None = ...,
        where: Callable[[ServerMessage], bool] | None = ...,
        timeout: float | None = ...,
    ) -> Expectation[ServerMessage]: ...

    def expect(
        self,
        event: PoolEventName | type[Any],
        *,
        feed: str | None = None,
        where: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
    ) -> Expectation[Any]:
        """Start waiting for the next event of one kind, of one feed or any, that passes ``where``.

        As [`chatfeed.Pool.expect`][chatfeed.Pool.expect], registered before
        this returns; wait for it with the
        [`Expectation`][chatfeed.sync.Expectation]'s ``wait(timeout=...)``.
        ``where`` is called in the pool's thread.

        Raises:
            UsageError: The pool is closed, or an argument is wrong (``feed``
                is not a key of the pool, or that feed has stopped).

        Example:
            ```python
            with pool.expect("new_message", feed="alice") as reply:
                requests.post(f"{api}/chats/{chat_id}/messages", json={"content": "hello"})
                event = reply.wait(timeout=30)
            ```
        """
        return self._expect(lambda: self._pool.expect(event, feed=feed, where=where, timeout=timeout))

    # Iterating

    def events(self, *, timeout: float | None = None, buffer: int = 64) -> PoolEventStream:
        """Return an iterator over every feed's server events, as ``(key, event)``, from now on.

        As [`chatfeed.sync.Client.events`][chatfeed.sync.Client.events]: one
        bounded buffer for every feed; while it is full, the feeds are not read.

        Args:
            timeout: Seconds each ``next()`` waits for an event before raising
                `TimeoutError`, or ``None`` to wait as long as it takes.
            buffer: The most events held for this iterator.

        Raises:
            UsageError: The pool is closed, or an argument is wrong.

        Example:
            ```python
            with pool:
                for key, event in pool.events():
                    print(key, event)
            ```
        """
        return PoolEventStream(self._events(timeout, buffer))

    def _subscribe(self, buffer: int) -> AsyncEventStream[FeedEvent]:
        stream: AsyncEventStream[FeedEvent] = self._pool.events(buffer=buffer)._stream
        return stream

    # Running

    def run(self) -> None:
        """Run every feed, and call the handlers in this thread, until [`close`][chatfeed.sync.Pool.close] is called.

        Blocks. As [`chatfeed.Pool.run`][chatfeed.Pool.run]: a feed that
        stops on an error is reported (``FeedStopped``) and does not end the
        run. Ctrl-C (`KeyboardInterrupt`) closes the pool, after the handler
        running then, and ``run()`` returns normally. When ``run()`` returns,
        the pool is closed and its thread has stopped.

        Raises:
            UsageError: The pool is already running or closed.
        """
        self._run()

    def _async_run(self) -> Coroutine[Any, Any, None]:
        return self._pool.run()

    async def _request_stop(self) -> None:
        """Stop run(), once the calls handed over are made (or skipped, as the pool is stopping)."""
        self._stopping = True
        logged = False
        while True:
            pending = [call for call in self._outstanding if not call.done.done()]
            if not pending:
                break
            if not self._serving:  # nobody takes calls any more: they are not made
                for call in pending:
                    _resolve(call.done, None)
                break
            if not logged:
                logged = True
                name = _name_of(pending[0].func)
                logger.debug("closing the pool once handler %s returns", name, extra=log_fields(handler=name))
            await asyncio.wait([call.done for call in pending], timeout=_SIGNAL_POLL)
        await self._pool.close()

    def __enter__(self) -> Self:
        """Start every feed; return once each feed added so far has authenticated or stopped.

        A feed whose token is rejected stops alone (a ``FeedStopped`` event,
        and [`statistics`][chatfeed.sync.Pool.statistics]``().failed``); a feed
        that cannot connect keeps retrying, and keeps this waiting.

        Raises:
            UsageError: The pool is already running or closed, has handlers
                (which only ``run()`` calls), or was closed (from another
                thread) while its feeds were connecting.
        """
        self._enter_blocking()
        return self

    async def _async_enter(self) -> None:
        await self._pool.__aenter__()

    async def _async_exit(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self._pool.__aexit__(exc_type, exc, traceback)

    async def _async_close(self) -> None:
        await self._pool.close()

    def _stop_unstarted(self) -> None:
        self._pool._state = "closed"  # nothing of it ran: closed for good, without a loop

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Close the pool."""
        self._exit_blocking(exc_type, exc, traceback)

    def close(self) -> None:
        """Stop the pool: close every feed, end every iterator and every expectation, stop its thread.

        As [`chatfeed.sync.Client.close`][chatfeed.sync.Client.close]: it
        returns once everything has stopped, after a handler running in
        ``run()`` has returned; no other call is made. Safe to call more than
        once, and from any thread. Called from a handler, it returns at once;
        the calls of the other feeds waiting for their turn are not made, and
        ``run()`` returns.
        """
        self._close_blocking()

    # Introspection

    @overload
    def statistics(self) -> PoolStatistics: ...
    @overload
    def statistics(self, key: str) -> ClientStatistics: ...

    def statistics(self, key: str | None = None) -> PoolStatistics | ClientStatistics:
        """Return a snapshot of the pool, or with ``key`` of that one feed.

        As [`chatfeed.Pool.statistics`][chatfeed.Pool.statistics].

        Raises:
            UsageError: No feed has that key.
        """
        self._let_go()

        def take() -> PoolStatistics | ClientStatistics:
            return self._pool.statistics() if key is None else self._pool.statistics(key)

        try:
            return self._portal.run_sync(take)  # taken in the loop's thread, consistent
        except _PortalClosed:  # closed meanwhile: nothing changes them any more
            return take()


class PoolEventStream(Iterator[tuple[str, FeedEvent]]):
    """The events of every feed of a pool, as ``(key, event)``, through one bounded buffer; a blocking iterator.

    Returned by [`Pool.events`][chatfeed.sync.Pool.events]; it behaves as a
    client's [`EventStream`][chatfeed.sync.EventStream] does (one reader,
    ``timeout``, backpressure on every feed when full, ``close()`` or
    ``with`` to unsubscribe).
    """

    __slots__ = ("_events",)

    def __init__(self, events: EventStream[FeedEvent]) -> None:
        self._events = events

    @property
    def timeout(self) -> float | None:
        """Seconds each ``next()`` waits for an event before raising `TimeoutError`; ``None`` for no limit."""
        return self._events.timeout

    @timeout.setter
    def timeout(self, timeout: float | None) -> None:
        self._events.timeout = timeout

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> tuple[str, FeedEvent]:
        """Return the next ``(key, event)``, waiting for it, as [`EventStream`][chatfeed.sync.EventStream] does."""
        event = next(self._events)
        feed = event.feed
        assert feed is not None  # every event of a pool is marked with its feed
        return feed, event

    def pending(self) -> int:
        """Return how many events wait in the buffer."""
        return self._events.pending()

    def close(self) -> None:
        """Unsubscribe and drop what the buffer holds; a ``next()`` waiting in another thread then ends."""
        self._events.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_NO_HANDLERS_IN_WITH = (
    "handlers registered with on() are called by run(), in its thread; a `with` block calls none. "
    "Use run(), or iterate events() (or wait with expect()) in the block"
)


class EventStream(Iterator[E_co], Generic[E_co]):
    """The events of a client, from subscription on, through a bounded buffer; a blocking iterator.

    Returned by [`Client.events`][chatfeed.sync.Client.events], for one
    reader (one thread) at a time. Each ``next()`` takes one event from the
    async client's [`EventStream`][chatfeed.EventStream], waiting for one if
    need be, up to [`timeout`][chatfeed.sync.EventStream.timeout]. It
    unsubscribes when closed ([`close`][chatfeed.sync.EventStream.close], or
    leaving ``with client.events() as stream:``) or when nothing refers to it
    any more, as when ``for event in client.events():`` is left with
    ``break``. A stream kept in a variable stays subscribed, and once its
    buffer is full the client stops reading the feed: close it.
    """

    def __init__(self, client: _Blocking, stream: AsyncEventStream[E_co], timeout: float | None) -> None:
        self._client = client
        self._stream: AsyncEventStream[E_co] | None = stream
        self._timeout = timeout
        self._pending: _Reply[E_co] | None = None  # a read that timed out, still waiting
        self._reading = threading.Lock()
        # Unsubscribed in the loop's thread, which owns the stream.
        self._finalizer = _finalize_in_loop(self, client._portal, stream._unsubscribe)

    @property
    def timeout(self) -> float | None:
        """Seconds each ``next()`` waits for an event before raising `TimeoutError`; ``None`` for no limit.

        It can be changed between reads.
        """
        return self._timeout

    @timeout.setter
    def timeout(self, timeout: float | None) -> None:
        check_timeout(timeout)
        self._timeout = timeout

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> E_co:
        """Return the next event, waiting for it.

        Raises:
            StopIteration: The client has closed (or this stream has), and
                the buffer is read.
            TimeoutError: No event within ``timeout``; the stream stays usable.
            ChatfeedError: The error that stopped the client, once.
            UsageError: The client was never started; another thread reads
                this stream; or called from a handler, which would wait for ever.
        """
        if not self._reading.acquire(blocking=False):
            raise UsageError("another thread is already reading this stream; call events() once per consumer")
        try:
            return self._next()
        finally:
            self._reading.release()

    def _next(self) -> E_co:
        stream = self._stream
        if stream is None:
            raise StopIteration
        client = self._client
        client._refuse_in_handler("reading events()")
        client._let_go()
        if client._mode == "unopened":
            raise UsageError(
                "events() is read but the client was never started: use `with client:`, or call run() in "
                "another thread first"
            )
        future = self._pending
        if future is None:
            try:
                future = self._pending = client._portal.submit(stream.__anext__())
            except _PortalClosed:
                return self._buffered(stream)
        try:
            event = future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise
            raise TimeoutError(f"no event within {self._timeout} s") from None
        except StopAsyncIteration:
            self._pending = None
            self.close()
            raise StopIteration from None
        except concurrent.futures.CancelledError:  # the client's loop stopped under it
            self._pending = None
            return self._buffered(stream)
        except UsageError:
            self._pending = None
            raise
        except Exception as exc:  # the error that stopped the client: `with` need not raise it again
            self._pending = None
            client._raised.append(exc)
            raise
        self._pending = None
        return event

    def _buffered(self, stream: AsyncEventStream[E_co]) -> E_co:
        """An event the stream still holds once the client's loop has stopped; else the end."""
        if stream.pending():
            # With an event in its buffer, a read completes at its first step,
            # without waiting: it needs no loop.
            read = stream.__anext__()
            try:
                read.send(None)
            except StopIteration as done:
                event: E_co = done.value
                return event
            read.close()  # pragma: no cover  (it would have waited: cannot happen with events buffered)
        self.close()
        raise StopIteration

    def pending(self) -> int:
        """Return how many events wait in the buffer."""
        stream = self._stream
        return 0 if stream is None else stream.pending()

    def close(self) -> None:
        """Unsubscribe and drop what the buffer holds; a ``next()`` waiting in another thread then ends."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        self._finalizer.detach()
        portal = self._client._portal
        if portal.in_loop_thread():
            stream._unsubscribe()
            return
        with contextlib.suppress(_PortalClosed):  # the client has closed: the stream has ended
            portal.run_sync(stream._unsubscribe)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Expectation(Generic[E_co]):
    """The next event of one kind that passes a test, expected from the moment it was asked for.

    Returned by [`Client.expect`][chatfeed.sync.Client.expect]; the blocking
    face of a [`chatfeed.Expectation`][chatfeed.Expectation]. Call
    [`wait`][chatfeed.sync.Expectation.wait]. It is resolved by the first
    matching event delivered after it was made, even before anything waits
    for it. It is meant for one waiter: a wait that times out ends it. Use it
    as a context manager to end it as the block ends:

        with client.expect("new_message", where=is_reply) as reply:
            post_prompt(chat_id, "hello")
            event = reply.wait(timeout=30)
    """

    __slots__ = ("__weakref__", "_client", "_expectation")

    def __init__(self, client: _Blocking, expectation: AsyncExpectation[E_co]) -> None:
        self._client = client
        self._expectation = expectation
        # One dropped without being waited for is forgotten, in the loop's thread.
        _finalize_in_loop(self, client._portal, expectation.cancel)

    def __repr__(self) -> str:
        return repr(self._expectation).replace("<chatfeed.", "<chatfeed.sync.", 1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Cancel the expectation if it is still pending: the block is left, its answer is no longer wanted."""
        self.cancel()

    def wait(self, timeout: float | None = None) -> E_co:
        """Wait for the event and return it.

        Args:
            timeout: Seconds to wait from now, on top of the timeout given to
                ``expect()``; ``None`` for no more limit than that one.

        Raises:
            TimeoutError: No matching event within a timeout; the expectation ends.
            ClientClosedError: The client was closed first.
            ChatfeedError: The error that stopped the client first.
            concurrent.futures.CancelledError: The expectation was cancelled.
            UsageError: Called from a handler, which would wait for ever.
            Exception: What ``where`` raised for an event.
        """
        check_timeout(timeout)
        self._client._refuse_in_handler("waiting for an expectation")
        self._client._let_go()
        expectation = self._expectation
        if not expectation.done():
            try:
                return self._client._portal.call(expectation.wait(timeout))
            except (concurrent.futures.CancelledError, _PortalClosed):
                pass  # cancelled, or the client's loop stopped: the outcome says which
        return _outcome(expectation)

    def done(self) -> bool:
        """Whether it has its event, or has ended without one."""
        return self._expectation.done()

    def cancel(self) -> None:
        """Stop expecting; a ``wait()`` in progress raises `concurrent.futures.CancelledError`."""
        with contextlib.suppress(_PortalClosed):  # the client has closed: the expectation has ended
            self._client._portal.run_sync(self._expectation.cancel)


def _outcome(expectation: AsyncExpectation[T]) -> T:
    """What waiting for an expectation that has ended gives, read without a loop (the client's may be gone)."""
    error = expectation._error
    if isinstance(error, asyncio.CancelledError):
        raise concurrent.futures.CancelledError("the expectation was cancelled")
    if error is not None:
        raise error
    if not expectation.done():  # pragma: no cover  (only an ended expectation gets here)
        raise ClientClosedError("the client closed before the expected event came")
    return expectation._event  # type: ignore[return-value]  # ended without an error: the event

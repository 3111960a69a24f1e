"""The observer core without a socket: which hooks exist, how they are combined, guarded, and how a handler is timed."""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import chatfeed
from chatfeed import _observe
from chatfeed._observe import HOOKS, UNGUARDED, Hooks, _guarded, hooks_of
from chatfeed.exceptions import UsageError

pytestmark = pytest.mark.timeout(10)

EVERY_METHOD = frozenset(name for name in vars(chatfeed.Observer) if not name.startswith("_"))


class Log(chatfeed.Observer):
    """Overrides the given moments only (as a subclass would), recording them into a shared list."""

    def __init__(self, tag: str, log: list[tuple[Any, ...]]) -> None:
        self.tag = tag
        self.log = log


def observer_of(*names: str, tag: str = "o", log: list[tuple[Any, ...]] | None = None) -> chatfeed.Observer:
    """An instance of a new `Observer` subclass that overrides exactly ``names``, each logging its call."""
    shared = [] if log is None else log

    def method(name: str) -> Callable[..., Any]:
        def record(self: Log, *args: Any, **kwargs: Any) -> Any:
            self.log.append((self.tag, name, args, kwargs))
            return (self.tag, "token") if name == "handler_started" else None

        return record

    cls = type(f"Only_{'_'.join(names) or 'nothing'}", (Log,), {name: method(name) for name in names})
    observer: chatfeed.Observer = cls(tag, shared)
    return observer


class Clock:
    """A perf_counter a test moves on by hand: durations are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _first_failures_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    # Which observer methods failed once is remembered for the process: each test starts afresh.
    monkeypatch.setattr(_observe, "_FAILED", set())


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(_observe, "time", types.SimpleNamespace(perf_counter=clock))
    return clock


def event(feed: str | None = "k") -> types.SimpleNamespace:
    return types.SimpleNamespace(feed=feed)


# hooks_of


def test_no_observer_and_an_empty_list_are_no_hooks() -> None:
    assert hooks_of(None) is None
    assert hooks_of([]) is None
    assert hooks_of(()) is None


def test_one_observer_or_several_make_hooks_that_keep_them_in_order() -> None:
    one = observer_of("connected")
    hooks = hooks_of(one)
    assert isinstance(hooks, Hooks)
    assert hooks.observers == (one,)
    two = observer_of("connecting")
    several = hooks_of([one, two])
    assert several is not None
    assert several.observers == (one, two)


@pytest.mark.parametrize(
    "bad",
    [object(), "observer", b"observer", chatfeed.Observer, [chatfeed.Observer(), None], {chatfeed.Observer()}, 1.5],
    ids=["object", "str", "bytes", "a class", "a list with None", "a set", "float"],
)
def test_what_is_not_an_observer_is_a_usage_error(bad: Any) -> None:
    with pytest.raises(UsageError, match="observer"):
        hooks_of(bad)


def test_a_slot_is_set_only_for_a_method_someone_overrides() -> None:
    assert set(HOOKS) | {"attached", "handler_started", "handler_finished"} == EVERY_METHOD
    hooks = hooks_of([observer_of("connected"), observer_of("frame_received", "connected")])
    assert hooks is not None
    set_slots = {name for name in HOOKS if getattr(hooks, name) is not None}
    assert set_slots == {"connected", "frame_received"}
    assert hooks.handler is None
    plain = hooks_of(chatfeed.Observer())
    assert plain is not None
    assert [name for name in HOOKS if getattr(plain, name) is not None] == []
    assert plain.handler is None


@pytest.mark.parametrize("name", ["handler_started", "handler_finished"])
def test_either_handler_method_makes_a_handler_wrapper(name: str) -> None:
    hooks = hooks_of(observer_of(name))
    assert hooks is not None
    assert hooks.handler is not None
    assert [slot for slot in HOOKS if getattr(hooks, slot) is not None] == []


def test_one_overrider_is_called_directly_and_several_in_order() -> None:
    log: list[tuple[Any, ...]] = []
    hooks = hooks_of([observer_of("connected", tag="a", log=log), observer_of("connecting", tag="b", log=log)])
    assert hooks is not None and hooks.connected is not None and hooks.connecting is not None
    hooks.connected("k", is_reconnect=True, downtime=1.5)
    hooks.connecting(None, attempt=3)
    assert log == [
        ("a", "connected", ("k",), {"is_reconnect": True, "downtime": 1.5}),
        ("b", "connecting", (None,), {"attempt": 3}),
    ]
    log.clear()
    both = hooks_of([observer_of("published", tag="a", log=log), observer_of("published", tag="b", log=log)])
    assert both is not None and both.published is not None
    both.published("record", stored=False, duration=0.25)
    assert log == [
        ("a", "published", ("record",), {"stored": False, "duration": 0.25}),
        ("b", "published", ("record",), {"stored": False, "duration": 0.25}),
    ]


def test_attach_tells_only_those_that_override_it_once_each() -> None:
    log: list[tuple[Any, ...]] = []
    watching = observer_of("attached", tag="a", log=log)
    other = observer_of("connected", tag="b", log=log)
    hooks = hooks_of([watching, other])
    assert hooks is not None
    subject = object()
    hooks.attach(subject)
    assert log == [("a", "attached", (subject,), {})]


# _guarded


class Failing(chatfeed.Observer):
    def __init__(self) -> None:
        self.calls = 0

    def connected(self, feed: str | None, *, is_reconnect: bool, downtime: float | None) -> None:
        self.calls += 1
        raise ValueError(f"bug {self.calls}")

    def state_changed(self, feed: str | None, state: chatfeed.ClientState) -> None:
        raise KeyError(state)


def test_a_guarded_method_logs_its_first_failure_at_error_then_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    observer = Failing()
    guarded = _guarded(observer.connected, "connected")
    for _ in range(3):
        assert guarded(None, is_reconnect=False, downtime=None) is None
    assert observer.calls == 3
    records = [record for record in caplog.records if record.name == "chatfeed"]
    assert [record.levelno for record in records] == [logging.ERROR, logging.DEBUG, logging.DEBUG]
    assert {record.getMessage() for record in records} == {
        "observer Failing.connected raised; chatfeed goes on without it"
    }
    assert [str(record.exc_info[1]) for record in records if record.exc_info] == ["bug 1", "bug 2", "bug 3"]


def test_each_method_has_its_own_first_failure(caplog: pytest.LogCaptureFixture) -> None:
    hooks = hooks_of(Failing())
    assert hooks is not None and hooks.connected is not None and hooks.state_changed is not None
    hooks.connected(None, is_reconnect=False, downtime=None)
    hooks.state_changed(None, "open")
    hooks.connected(None, is_reconnect=True, downtime=1.0)
    hooks.state_changed(None, "closed")
    assert [(record.levelno, record.getMessage().split()[1]) for record in caplog.records] == [
        (logging.ERROR, "Failing.connected"),
        (logging.ERROR, "Failing.state_changed"),
        (logging.DEBUG, "Failing.connected"),
        (logging.DEBUG, "Failing.state_changed"),
    ]


def test_a_failing_observer_does_not_stop_the_next_one(caplog: pytest.LogCaptureFixture) -> None:
    log: list[tuple[Any, ...]] = []
    hooks = hooks_of([Failing(), observer_of("connected", log=log)])
    assert hooks is not None and hooks.connected is not None
    hooks.connected("k", is_reconnect=False, downtime=None)
    assert log == [("o", "connected", ("k",), {"is_reconnect": False, "downtime": None})]
    assert [record.levelno for record in caplog.records] == [logging.ERROR]


def test_the_first_failure_is_per_observer_class_not_per_instance(caplog: pytest.LogCaptureFixture) -> None:
    # Thousands of feeds may share one failing observer class: one ERROR, not one per client.
    for _ in range(2):
        hooks = hooks_of(Failing())
        assert hooks is not None and hooks.connected is not None
        hooks.connected(None, is_reconnect=False, downtime=None)
    assert [record.levelno for record in caplog.records] == [logging.ERROR, logging.DEBUG]


def test_the_per_frame_moments_are_left_to_their_callers_to_guard(caplog: pytest.LogCaptureFixture) -> None:
    class Raising(chatfeed.Observer):
        def frame_received(self, feed: str | None, frame: str | bytes) -> None:
            raise RuntimeError("frame")

        def event_received(self, feed: str | None, event: chatfeed.FeedEvent) -> None:
            raise RuntimeError("event")

        def backfilled(self, feed: str | None, *, gap: chatfeed.Gap, events: int, error: Exception | None) -> None:
            raise RuntimeError("backfill")

    assert {"frame_received", "event_received"} == UNGUARDED
    hooks = hooks_of(Raising())
    assert hooks is not None
    assert hooks.frame_received is not None and hooks.event_received is not None and hooks.backfilled is not None
    # One observer's: called as it is (the client calls it within a try of its own) ...
    with pytest.raises(RuntimeError, match="frame"):
        hooks.frame_received(None, "{}")
    with pytest.raises(RuntimeError, match="event"):
        hooks.event_received(None, object())
    # ... every other moment is guarded here.
    gap = chatfeed.Gap(since=None, is_reconnect=True, downtime=1.0)
    assert hooks.backfilled(None, gap=gap, events=0, error=None) is None
    assert [record.levelno for record in caplog.records] == [logging.ERROR]
    # Several observers' are guarded one by one: one failing does not stop the next.
    log: list[tuple[Any, ...]] = []
    several = hooks_of([Raising(), observer_of("frame_received", log=log)])
    assert several is not None and several.frame_received is not None
    several.frame_received("k", "{}")
    assert log == [("o", "frame_received", ("k", "{}"), {})]


def test_a_guarded_method_returns_what_the_method_returns() -> None:
    assert _guarded(lambda value: value * 2, "x")(21) == 42


# The handler wrapper


def timed(*observers: chatfeed.Observer, call: Callable[[Any], Any], is_async: bool) -> Callable[[Any], Any]:
    hooks = hooks_of(list(observers))
    assert hooks is not None and hooks.handler is not None
    return hooks.handler(call, is_async, "my_handler")


def test_a_sync_handler_is_timed_and_its_result_returned(clock: Clock) -> None:
    log: list[tuple[Any, ...]] = []
    observer = observer_of("handler_started", "handler_finished", log=log)
    seen = event()

    def handler(received: Any) -> str:
        assert log == [("o", "handler_started", ("k", seen), {"handler": "my_handler"})]  # before the call
        clock.now += 0.5
        return "result"

    assert timed(observer, call=handler, is_async=False)(seen) == "result"
    assert log[1] == (
        "o",
        "handler_finished",
        ("k", seen),
        {"handler": "my_handler", "duration": 0.5, "error": None, "started": ("o", "token")},
    )


async def test_an_async_handler_is_timed_across_its_awaits(clock: Clock) -> None:
    log: list[tuple[Any, ...]] = []
    observer = observer_of("handler_started", "handler_finished", log=log)
    release = asyncio.Event()

    async def handler(received: Any) -> str:
        await release.wait()
        return "done"

    call = asyncio.ensure_future(timed(observer, call=handler, is_async=True)(event(None)))
    await asyncio.sleep(0)
    assert [entry[1] for entry in log] == ["handler_started"]
    clock.now += 1.25
    release.set()
    assert await call == "done"
    assert [(entry[1], entry[2][0], entry[3].get("duration")) for entry in log] == [
        ("handler_started", None, None),
        ("handler_finished", None, 1.25),
    ]


async def test_a_sync_handler_returning_an_awaitable_is_timed_until_it_is_awaited(clock: Clock) -> None:
    log: list[tuple[Any, ...]] = []
    observer = observer_of("handler_finished", log=log)

    async def rest() -> str:
        clock.now += 2.0
        return "later"

    def handler(received: Any) -> Awaitable[str]:
        return rest()

    seen = event()
    pending = timed(observer, call=handler, is_async=False)(seen)
    assert log == []  # not finished: the awaitable has not run
    assert await pending == "later"
    # started is None: this observer does not override handler_started.
    assert log == [
        (
            "o",
            "handler_finished",
            ("k", seen),
            {"handler": "my_handler", "duration": 2.0, "error": None, "started": None},
        )
    ]


class Boom(Exception):
    pass


@pytest.mark.parametrize("kind", ["sync", "async", "sync returning an awaitable"])
async def test_a_raising_handler_raises_the_same_exception_and_reports_it(clock: Clock, kind: str) -> None:
    log: list[tuple[Any, ...]] = []
    observer = observer_of("handler_started", "handler_finished", log=log)
    error = Boom("no")

    def sync_handler(received: Any) -> None:
        clock.now += 0.125
        raise error

    async def async_handler(received: Any) -> None:
        await asyncio.sleep(0)
        clock.now += 0.125
        raise error

    def returning(received: Any) -> Awaitable[None]:
        return async_handler(received)

    handlers: dict[str, tuple[Callable[[Any], Any], bool]] = {
        "sync": (sync_handler, False),
        "async": (async_handler, True),
        "sync returning an awaitable": (returning, False),
    }
    handler, is_async = handlers[kind]
    wrapped = timed(observer, call=handler, is_async=is_async)

    async def call() -> None:
        result = wrapped(event())
        if kind != "sync":
            await result

    with pytest.raises(Boom) as caught:
        await call()
    assert caught.value is error
    finished = log[-1]
    assert finished[1] == "handler_finished"
    assert finished[3] == {"handler": "my_handler", "duration": 0.125, "error": error, "started": ("o", "token")}


async def test_a_cancelled_handler_reports_the_cancellation_and_is_cancelled() -> None:
    log: list[tuple[Any, ...]] = []
    observer = observer_of("handler_finished", log=log)

    async def handler(received: Any) -> None:
        await asyncio.Event().wait()

    task = asyncio.ensure_future(timed(observer, call=handler, is_async=True)(event()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert isinstance(log[0][3]["error"], asyncio.CancelledError)


def test_several_observers_finish_in_the_reverse_order_of_their_starts(clock: Clock) -> None:
    log: list[tuple[Any, ...]] = []
    observers = [observer_of("handler_started", "handler_finished", tag=tag, log=log) for tag in "abc"]
    only_finish = observer_of("handler_finished", tag="d", log=log)
    only_start = observer_of("handler_started", tag="e", log=log)

    def handler(received: Any) -> None:
        log.append(("handler",))

    timed(*observers, only_finish, only_start, call=handler, is_async=False)(event())
    order = [(entry[0], entry[1]) if len(entry) > 1 else entry for entry in log]
    assert order == [
        ("a", "handler_started"),
        ("b", "handler_started"),
        ("c", "handler_started"),
        ("e", "handler_started"),
        ("handler",),
        ("d", "handler_finished"),
        ("c", "handler_finished"),
        ("b", "handler_finished"),
        ("a", "handler_finished"),
    ]
    # Each gets back what its own start returned (None for the one that does not override it).
    assert [(entry[0], entry[3]["started"]) for entry in log if entry[1:2] == ("handler_finished",)] == [
        ("d", None),
        ("c", ("c", "token")),
        ("b", ("b", "token")),
        ("a", ("a", "token")),
    ]


def test_a_failing_handler_start_or_finish_does_not_stop_the_handler(caplog: pytest.LogCaptureFixture) -> None:
    class Faulty(chatfeed.Observer):
        def handler_started(self, feed: str | None, event: Any, *, handler: str) -> object:
            raise RuntimeError("start")

        def handler_finished(
            self,
            feed: str | None,
            event: Any,
            *,
            handler: str,
            duration: float,
            error: BaseException | None,
            started: object,
        ) -> None:
            raise RuntimeError("finish")

    calls: list[Any] = []

    def handler(received: Any) -> str:
        calls.append(received)
        return "ok"

    assert timed(Faulty(), call=handler, is_async=False)(event()) == "ok"
    assert len(calls) == 1
    assert [record.getMessage().split()[1] for record in caplog.records if record.levelno == logging.ERROR] == [
        "test_a_failing_handler_start_or_finish_does_not_stop_the_handler.<locals>.Faulty.handler_started",
        "test_a_failing_handler_start_or_finish_does_not_stop_the_handler.<locals>.Faulty.handler_finished",
    ]


def test_two_observer_classes_of_the_same_name_each_have_their_first_failure_logged_at_error(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_observe, "_FAILED", set())

    def connected(self: Any, feed: Any, *, is_reconnect: bool, downtime: Any) -> None:
        raise RuntimeError("bug")

    for module in ("vendor_a.metrics", "vendor_b.metrics"):
        cls = type("Metrics", (chatfeed.Observer,), {"connected": connected, "__module__": module})
        hooks = _observe.hooks_of(cls())
        assert hooks is not None and hooks.connected is not None
        hooks.connected(None, is_reconnect=False, downtime=None)
    levels = [record.levelno for record in caplog.records if "observer" in record.getMessage()]
    assert levels == [logging.ERROR, logging.ERROR]

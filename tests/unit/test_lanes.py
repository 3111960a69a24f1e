"""Lanes: at most N calls at once, in arrival order within a key, never more than max_pending held."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatfeed
from chatfeed._dispatch import Dispatcher
from chatfeed._lanes import Lanes, by_chat
from chatfeed.testing import make_chat, make_message


class Calls:
    """A handler whose every call waits until the test finishes it, and what it saw."""

    def __init__(self, key: Any) -> None:
        self.key = key
        self.running: dict[int, asyncio.Future[None]] = {}
        self.started: list[int] = []
        self.finished: list[int] = []
        self.errors: list[tuple[BaseException, Any]] = []
        self.most_running = 0
        self.overlapping_keys = False
        self._events: dict[int, tuple[Hashable, int]] = {}

    async def __call__(self, event: tuple[Hashable, int]) -> None:
        _, number = event
        if any(self.key(event) == self.key(other) for other in self._running_events()):
            self.overlapping_keys = True
        future = asyncio.get_running_loop().create_future()
        self.running[number] = future
        self.started.append(number)
        self.most_running = max(self.most_running, len(self.running))
        self._events[number] = event
        try:
            await future
        finally:
            del self.running[number]
            self.finished.append(number)

    def _running_events(self) -> list[tuple[Hashable, int]]:
        return [self._events[number] for number in self.running]

    async def report(self, exc: BaseException, event: Any) -> None:
        self.errors.append((exc, event))


async def settle() -> None:
    """Let the workers run until nothing moves: a few turns of the loop, no time."""
    for _ in range(10):
        await asyncio.sleep(0)


def first_key(event: tuple[Hashable, int]) -> Hashable:
    return event[0]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    concurrency=st.integers(min_value=1, max_value=4),
    extra_room=st.integers(min_value=0, max_value=5),
    keys=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=40),
    choices=st.lists(st.integers(min_value=0, max_value=1000), min_size=200, max_size=200),
    ordered=st.booleans(),
    stall=st.booleans(),
)
async def test_any_arrivals_and_finishing_orders_keep_every_promise(
    concurrency: int, extra_room: int, keys: list[int], choices: list[int], ordered: bool, stall: bool
) -> None:
    max_pending = concurrency + extra_room
    calls = Calls(first_key if ordered else lambda event: event[1])
    lanes = Lanes(
        calls, calls.report, concurrency=concurrency, key=first_key if ordered else None, max_pending=max_pending
    )
    events = [(key, number) for number, key in enumerate(keys)]
    stalled = 0 if stall else None  # the first event's call hangs until nothing else can finish
    pick = iter(choices * 10)

    def finish_one() -> None:
        candidates = sorted(number for number in calls.running if number != stalled)
        if candidates:
            calls.running[candidates[next(pick) % len(candidates)]].set_result(None)
        elif stalled is not None and stalled in calls.running:
            calls.running[stalled].set_result(None)  # nothing else can finish: the stall ends

    for event in events:
        while not lanes.offer(event):
            assert lanes.held == max_pending, "refused while there was room"
            finish_one()
            await settle()
        assert lanes.held <= max_pending
        await settle()
        assert len(calls.running) <= concurrency
        assert lanes.running == len(calls.running)
        if next(pick) % 3 == 0 and calls.running:
            finish_one()
            await settle()
    while lanes.held:
        finish_one()
        await settle()

    assert sorted(calls.started) == list(range(len(events))), "an event was lost or called twice"
    assert calls.most_running <= concurrency
    assert not calls.errors
    if ordered:
        assert not calls.overlapping_keys, "two calls of one key ran at once"
        for key in set(keys):
            mine = [number for number in calls.started if keys[number] == key]
            assert mine == sorted(mine), f"key {key} ran out of arrival order"
    await lanes.cancel()


async def test_a_failing_call_is_reported_and_its_key_goes_on() -> None:
    seen: list[int] = []
    reported: list[tuple[BaseException, Any]] = []

    async def handler(event: tuple[str, int]) -> None:
        if event[1] == 1:
            raise ValueError("boom")
        seen.append(event[1])

    async def report(exc: BaseException, event: Any) -> None:
        reported.append((exc, event))

    lanes = Lanes(handler, report, concurrency=2, key=first_key, max_pending=8)
    for number in range(4):
        assert lanes.offer(("a", number))
    assert await lanes.drain(5.0, "handler") == 0
    assert seen == [0, 2, 3]
    assert [(type(exc), event) for exc, event in reported] == [(ValueError, ("a", 1))]


async def test_a_handler_cancelled_by_what_it_awaited_is_reported_not_fatal() -> None:
    seen: list[int] = []
    reported: list[BaseException] = []

    async def handler(event: tuple[str, int]) -> None:
        if event[1] == 0:
            inner = asyncio.get_running_loop().create_future()
            inner.cancel()
            await inner  # a CancelledError that is not the worker's own
        seen.append(event[1])

    async def report(exc: BaseException, event: Any) -> None:
        reported.append(exc)

    lanes = Lanes(handler, report, concurrency=2, key=first_key, max_pending=8)
    lanes.offer(("a", 0))
    lanes.offer(("a", 1))
    assert await lanes.drain(5.0, "handler") == 0
    assert seen == [1]
    assert [type(exc) for exc in reported] == [asyncio.CancelledError]


async def test_drain_cancels_what_is_left_after_the_timeout_and_counts_it() -> None:
    release = asyncio.Event()
    finished: list[int] = []
    cancelled: list[int] = []

    async def handler(event: tuple[str, int]) -> None:
        try:
            if event[1] == 0:
                await asyncio.sleep(0)
            else:
                await release.wait()
            finished.append(event[1])
        except asyncio.CancelledError:
            cancelled.append(event[1])
            raise

    async def report(exc: BaseException, event: Any) -> None:
        raise AssertionError(f"nothing is reported when the drain cancels: {exc!r}")

    lanes = Lanes(handler, report, concurrency=2, key=first_key, max_pending=8)
    for number, key in enumerate("abbb"):
        lanes.offer((key, number))
    await settle()
    left = await lanes.drain(0.01, "handler")
    assert left == 3  # b's running call and its two queued ones
    assert finished == [0]
    assert cancelled == [1]
    assert lanes.held == 0 and not lanes.runs_in(None)
    assert lanes.snapshot().running == 0


async def test_workers_exist_only_while_there_is_work() -> None:
    gate = asyncio.Event()

    async def handler(event: tuple[str, int]) -> None:
        await gate.wait()

    async def report(exc: BaseException, event: Any) -> None:
        raise AssertionError

    before = asyncio.all_tasks()
    lanes = Lanes(handler, report, concurrency=3, key=first_key, max_pending=10)
    for number, key in enumerate("aaab"):
        lanes.offer((key, number))
    await settle()
    workers = asyncio.all_tasks() - before
    assert len(workers) == 2  # one per key with work, never more than needed
    assert all(lanes.runs_in(task) for task in workers)
    snapshot = lanes.snapshot()
    assert (snapshot.running, snapshot.queued, snapshot.deepest_lane) == (2, 2, 2)
    assert snapshot.oldest_queued_age is not None and snapshot.oldest_queued_age >= 0
    gate.set()
    assert await lanes.drain(5.0, "handler") == 0
    assert asyncio.all_tasks() - before == set()
    assert lanes.snapshot().oldest_queued_age is None


async def test_wait_for_room_is_done_once_a_call_finishes() -> None:
    gate = asyncio.Event()

    async def handler(event: tuple[str, int]) -> None:
        await gate.wait()

    async def report(exc: BaseException, event: Any) -> None:
        raise AssertionError

    lanes = Lanes(handler, report, concurrency=2, key=None, max_pending=2)
    assert lanes.offer(("a", 0)) and lanes.offer(("a", 1))
    assert not lanes.offer(("a", 2))
    room = lanes.wait_for_room()
    await settle()
    assert not room.done()
    gate.set()
    await asyncio.wait_for(room, 1.0)
    assert lanes.offer(("a", 2))
    await lanes.drain(1.0, "handler")


def test_by_chat_orders_messages_and_chats_by_their_chat() -> None:
    message = chatfeed.NewMessage(type="new_message", payload=make_message(chat_id="7"))
    chat = chatfeed.NewChat(type="new_chat", payload=make_chat(id="7"))
    assert by_chat(message) == by_chat(chat) == "7"
    assert by_chat(chatfeed.ErrorMessage(type="error", message="x")) is None
    assert by_chat(chatfeed.UnknownMessage(type="typing", payload={"chatId": "7"})) is None


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"concurrency": 0}, "concurrency must be a positive int"),
        ({"concurrency": True}, "concurrency must be a positive int"),
        ({"concurrency": 2, "max_pending": 0}, "max_pending must be a positive int"),
        ({"concurrency": 8, "max_pending": 4}, "must be at least concurrency"),
        ({"concurrency": 2, "key": "chat_id"}, "key must be a function"),
        ({"key": None}, "apply to a handler registered with concurrency > 1"),
        ({"max_pending": 10}, "apply to a handler registered with concurrency > 1"),
    ],
)
def test_wrong_concurrency_arguments_are_usage_errors(options: dict[str, Any], complaint: str) -> None:
    client = chatfeed.Client("ws://127.0.0.1:1", token="t")
    with pytest.raises(chatfeed.UsageError, match=complaint):
        client.on("new_message", **options)


def test_concurrency_needs_an_async_handler_of_a_server_event() -> None:
    dispatcher = Dispatcher()

    def sync_handler(event: Any) -> None: ...

    async def async_handler(event: Any) -> None: ...

    with pytest.raises(chatfeed.UsageError, match=r"not async.*asyncio\.to_thread"):
        dispatcher.add_handler("new_message", sync_handler, concurrency=2)
    for lifecycle in ("connected", "disconnected"):
        with pytest.raises(chatfeed.UsageError, match="always run inline"):
            dispatcher.add_handler(lifecycle, async_handler, concurrency=2)
    dispatcher.add_handler(chatfeed.ServerMessage, async_handler, concurrency=2)
    assert len(dispatcher.concurrent) == 1


async def test_dispatch_waits_for_room_and_drops_nothing(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = Dispatcher()
    gate = asyncio.Event()
    seen: list[str] = []

    async def slow(event: chatfeed.NewMessage) -> None:
        await gate.wait()
        seen.append(event.payload.content)

    dispatcher.add_handler("new_message", slow, concurrency=2, max_pending=3)
    events = [chatfeed.NewMessage(type="new_message", payload=make_message(content=str(n))) for n in range(5)]
    for event in events[:3]:
        assert dispatcher.dispatch(event) is None  # taken at once: room
    pending = dispatcher.dispatch(events[3])
    assert pending is not None  # full: the receive loop has to wait
    waiting = asyncio.ensure_future(pending)
    await settle()
    assert not waiting.done()
    gate.set()
    await asyncio.wait_for(waiting, 1.0)
    fifth = dispatcher.dispatch(events[4])
    if fifth is not None:
        await asyncio.wait_for(fifth, 1.0)
    with caplog.at_level(logging.WARNING, logger="chatfeed"):
        await dispatcher.drain(1.0)
    assert sorted(seen) == ["0", "1", "2", "3", "4"]
    assert not caplog.records


async def test_a_key_function_that_raises_is_reported_as_the_handlers_failure() -> None:
    dispatcher = Dispatcher()
    hooked: list[tuple[Exception, Any]] = []
    called: list[Any] = []

    async def handler(event: Any) -> None:
        called.append(event)

    def key(event: chatfeed.NewMessage) -> str:
        raise KeyError("no key")

    dispatcher.add_handler("new_message", handler, concurrency=2, key=key)
    dispatcher.add_error_hook(lambda exc, event: hooked.append((exc, event)))
    event = chatfeed.NewMessage(type="new_message", payload=make_message())
    pending = dispatcher.dispatch(event)
    assert pending is not None
    await pending
    assert [(type(exc), got) for exc, got in hooked] == [(KeyError, event)]
    assert dispatcher.handler_errors == 1
    assert called == []

"""Dispatcher and EventStream: ordered delivery to handlers and to bounded streams."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable
from typing import Any

import pytest

import chatfeed
from chatfeed import Connected, Disconnected, ErrorMessage, NewChat, NewMessage, ServerMessage, UnknownMessage
from chatfeed._dispatch import Dispatcher, EventStream
from chatfeed.models import EVENTS_BY_NAME
from chatfeed.testing import make_chat, make_message
from tests.conftest import MS


async def deliver(dispatcher: Dispatcher, event: Any) -> None:
    """Dispatch ``event`` and wait until it is delivered, as the receive loop does."""
    pending = dispatcher.dispatch(event)
    if pending is not None:
        await pending


WAIT = 1000 * MS
"""How long to wait for something that should happen at once; a guard against hangs, not a delay."""


def new_message(content: str = "hello") -> NewMessage:
    return chatfeed.NewMessage(type="new_message", payload=make_message(content=content))


def new_chat() -> NewChat:
    return NewChat(type="new_chat", payload=make_chat())


def error_message() -> ErrorMessage:
    return ErrorMessage(type="error", message="busy")


def unknown_message() -> UnknownMessage:
    return UnknownMessage(type="typing", payload={"chatId": "1"})


SAMPLES: dict[str, Any] = {
    "new_message": new_message(),
    "new_chat": new_chat(),
    "error": error_message(),
    "unknown": unknown_message(),
    "connected": Connected(is_reconnect=False, downtime=None),
    "disconnected": Disconnected(
        code=1006, reason="", will_retry=True, error=chatfeed.ConnectionLostError(1006), retry_in=1.0
    ),
}


def contents(events: list[Any]) -> list[str]:
    return [event.payload.content for event in events]


async def yield_to_loop(times: int = 5) -> None:
    """Let every ready task run a few steps."""
    for _ in range(times):
        await asyncio.sleep(0)


async def drain(stream: EventStream[Any]) -> list[Any]:
    return [event async for event in stream]


class Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.events.append(event)


# Registration


def test_every_event_name_maps_to_its_class() -> None:
    assert dict(EVENTS_BY_NAME) == {
        "new_message": NewMessage,
        "new_chat": NewChat,
        "error": ErrorMessage,
        "unknown": UnknownMessage,
        "connected": Connected,
        "disconnected": Disconnected,
    }


@pytest.mark.parametrize("name", list(SAMPLES))
async def test_handlers_by_name_and_by_class_are_equivalent(name: str) -> None:
    dispatcher = Dispatcher()
    by_name, by_class = Recorder(), Recorder()
    dispatcher.add_handler(name, by_name)
    dispatcher.add_handler(EVENTS_BY_NAME[name], by_class)

    for event in SAMPLES.values():
        await dispatcher.call_handlers(event)

    assert by_name.events == [SAMPLES[name]]
    assert by_class.events == [SAMPLES[name]]


async def test_dispatch_calls_the_handlers_of_server_events() -> None:
    dispatcher = Dispatcher()
    recorders = {name: Recorder() for name in ("new_message", "new_chat", "error", "unknown")}
    for name, recorder in recorders.items():
        dispatcher.add_handler(name, recorder)

    for name in recorders:
        await deliver(dispatcher, SAMPLES[name])

    assert {name: recorder.events for name, recorder in recorders.items()} == {
        name: [SAMPLES[name]] for name in recorders
    }


def test_unknown_event_name_is_a_usage_error_naming_the_choices() -> None:
    dispatcher = Dispatcher()

    with pytest.raises(chatfeed.UsageError) as excinfo:
        dispatcher.add_handler("new_mesage", Recorder())

    text = str(excinfo.value)
    assert "'new_mesage'" in text
    for name in EVENTS_BY_NAME:
        assert repr(name) in text


@pytest.mark.parametrize("event", [chatfeed.Message, str, object, 42, None], ids=repr)
def test_something_that_is_not_an_event_is_a_usage_error(event: Any) -> None:
    with pytest.raises(chatfeed.UsageError):
        Dispatcher().add_handler(event, Recorder())


@pytest.mark.parametrize("handler", [None, "print", 42], ids=repr)
def test_a_handler_that_is_not_callable_is_a_usage_error(handler: Any) -> None:
    with pytest.raises(chatfeed.UsageError, match="callable"):
        Dispatcher().add_handler("new_message", handler)


def test_an_error_hook_that_is_not_callable_is_a_usage_error() -> None:
    with pytest.raises(chatfeed.UsageError, match="callable"):
        Dispatcher().add_error_hook(None)  # type: ignore[arg-type]


async def test_a_rejected_registration_adds_nothing() -> None:
    dispatcher = Dispatcher()
    with pytest.raises(chatfeed.UsageError):
        dispatcher.add_handler("nope", Recorder())

    await deliver(dispatcher, new_message())

    assert dispatcher.handler_errors == 0


# Calling handlers


async def test_sync_and_async_handlers_run_in_registration_order_for_each_event() -> None:
    dispatcher = Dispatcher()
    calls: list[tuple[str, str]] = []

    def sync_first(event: NewMessage) -> None:
        calls.append(("sync_first", event.payload.content))

    async def async_second(event: NewMessage) -> None:
        await asyncio.sleep(0)
        calls.append(("async_second", event.payload.content))

    def sync_third(event: NewMessage) -> None:
        calls.append(("sync_third", event.payload.content))

    dispatcher.add_handler("new_message", sync_first)
    dispatcher.add_handler(NewMessage, async_second)
    dispatcher.add_handler("new_message", sync_third)

    for content in ("one", "two"):
        await deliver(dispatcher, new_message(content))

    assert calls == [
        ("sync_first", "one"),
        ("async_second", "one"),
        ("sync_third", "one"),
        ("sync_first", "two"),
        ("async_second", "two"),
        ("sync_third", "two"),
    ]


async def test_an_async_handler_finishes_before_the_next_one_starts() -> None:
    dispatcher = Dispatcher()
    calls: list[str] = []
    release = asyncio.Event()

    async def slow(event: NewMessage) -> None:
        calls.append("slow started")
        await release.wait()
        calls.append("slow done")

    dispatcher.add_handler("new_message", slow)
    dispatcher.add_handler("new_message", lambda event: calls.append("next"))

    task = asyncio.create_task(deliver(dispatcher, new_message()))
    await yield_to_loop()
    assert calls == ["slow started"]

    release.set()
    await asyncio.wait_for(task, WAIT)
    assert calls == ["slow started", "slow done", "next"]


async def test_a_sync_callable_returning_an_awaitable_is_awaited() -> None:
    dispatcher = Dispatcher()
    seen: list[str] = []

    async def record(tag: str, event: NewMessage) -> None:
        seen.append(f"{tag}:{event.payload.content}")

    def returns_coroutine(event: NewMessage) -> Awaitable[None]:
        return record("lambda", event)

    dispatcher.add_handler("new_message", returns_coroutine)
    dispatcher.add_handler("new_message", functools.partial(record, "partial"))

    await deliver(dispatcher, new_message("x"))

    assert seen == ["lambda:x", "partial:x"]


async def test_a_server_message_handler_receives_every_server_event() -> None:
    dispatcher = Dispatcher()
    everything = Recorder()
    dispatcher.add_handler(ServerMessage, everything)
    server_events: list[chatfeed.FeedEvent] = [new_message(), new_chat(), error_message(), unknown_message()]

    for event in server_events:
        await deliver(dispatcher, event)
    await dispatcher.call_handlers(SAMPLES["connected"])
    await dispatcher.call_handlers(SAMPLES["disconnected"])

    assert everything.events == server_events


async def test_handlers_for_a_class_and_for_server_message_both_run() -> None:
    dispatcher = Dispatcher()
    specific, general = Recorder(), Recorder()
    dispatcher.add_handler(ServerMessage, general)
    dispatcher.add_handler("new_message", specific)
    event = new_message()

    await deliver(dispatcher, event)

    assert specific.events == [event]
    assert general.events == [event]


async def test_a_handler_added_after_dispatch_began_receives_later_events() -> None:
    dispatcher = Dispatcher()
    first, late = Recorder(), Recorder()
    dispatcher.add_handler("new_message", first)
    await deliver(dispatcher, new_message("one"))

    dispatcher.add_handler("new_message", late)
    await deliver(dispatcher, new_message("two"))

    assert contents(first.events) == ["one", "two"]
    assert contents(late.events) == ["two"]


# Failing handlers


def chatfeed_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "chatfeed" and r.levelno == logging.ERROR]


async def test_a_raising_handler_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = Dispatcher()
    before, after = Recorder(), Recorder()
    boom = ValueError("handler bug")

    async def failing(event: NewMessage) -> None:
        raise boom

    dispatcher.add_handler("new_message", before)
    dispatcher.add_handler("new_message", failing)
    dispatcher.add_handler("new_message", after)
    events = [new_message("one"), new_message("two")]

    for event in events:
        await deliver(dispatcher, event)

    assert before.events == events
    assert after.events == events
    assert dispatcher.handler_errors == 2
    records = chatfeed_errors(caplog)
    assert len(records) == 2
    assert records[0].exc_info is not None
    assert records[0].exc_info[1] is boom
    assert "failing" in records[0].getMessage()
    assert "new_message" in records[0].getMessage()


async def test_a_raising_sync_handler_is_reported_too(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = Dispatcher()

    def failing(event: NewMessage) -> None:
        raise KeyError("missing")

    dispatcher.add_handler("new_message", failing)

    await deliver(dispatcher, new_message())

    assert dispatcher.handler_errors == 1
    (record,) = chatfeed_errors(caplog)
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], KeyError)


async def test_the_failure_log_does_not_include_the_message_content(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = Dispatcher()

    def failing(event: NewMessage) -> None:
        raise RuntimeError("no")

    dispatcher.add_handler("new_message", failing)

    await deliver(dispatcher, new_message("private words"))

    assert "private words" not in caplog.text


async def test_error_hooks_get_the_exception_and_the_event() -> None:
    dispatcher = Dispatcher()
    sync_calls: list[tuple[Exception, Any]] = []
    async_calls: list[tuple[Exception, Any]] = []
    boom = RuntimeError("handler bug")

    def failing(event: NewMessage) -> None:
        raise boom

    def sync_hook(exc: Exception, event: Any) -> None:
        sync_calls.append((exc, event))

    async def async_hook(exc: Exception, event: Any) -> None:
        await asyncio.sleep(0)
        async_calls.append((exc, event))

    dispatcher.add_handler("new_message", failing)
    dispatcher.add_error_hook(sync_hook)
    dispatcher.add_error_hook(async_hook)
    event = new_message()

    await deliver(dispatcher, event)

    assert sync_calls == [(boom, event)]
    assert async_calls == [(boom, event)]


async def test_error_hooks_are_not_called_when_handlers_succeed() -> None:
    dispatcher = Dispatcher()
    calls: list[Any] = []
    dispatcher.add_handler("new_message", Recorder())
    dispatcher.add_error_hook(lambda exc, event: calls.append(exc))

    await deliver(dispatcher, new_message())

    assert calls == []
    assert dispatcher.handler_errors == 0


@pytest.mark.parametrize("hook_is_async", [False, True], ids=["sync", "async"])
async def test_a_raising_error_hook_is_logged_and_does_not_propagate(
    hook_is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = Dispatcher()
    later_hook_calls: list[Exception] = []
    after = Recorder()
    hook_error = LookupError("hook bug")

    def failing(event: NewMessage) -> None:
        raise ValueError("handler bug")

    def sync_bad_hook(exc: Exception, event: Any) -> None:
        raise hook_error

    async def async_bad_hook(exc: Exception, event: Any) -> None:
        raise hook_error

    dispatcher.add_handler("new_message", failing)
    dispatcher.add_handler("new_message", after)
    dispatcher.add_error_hook(async_bad_hook if hook_is_async else sync_bad_hook)
    dispatcher.add_error_hook(lambda exc, event: later_hook_calls.append(exc))
    event = new_message()

    await deliver(dispatcher, event)

    assert after.events == [event]
    assert [str(exc) for exc in later_hook_calls] == ["handler bug"]
    records = chatfeed_errors(caplog)
    assert len(records) == 2
    assert records[1].exc_info is not None
    assert records[1].exc_info[1] is hook_error
    assert "bad_hook" in records[1].getMessage()


async def test_a_failing_handler_does_not_keep_streams_from_getting_the_event() -> None:
    dispatcher = Dispatcher()

    def failing(event: NewMessage) -> None:
        raise ValueError("handler bug")

    dispatcher.add_handler("new_message", failing)
    stream = dispatcher.subscribe(4)
    event = new_message()

    await deliver(dispatcher, event)
    dispatcher.end_streams()

    assert await drain(stream) == [event]


# Streams


async def test_each_subscriber_gets_every_event_from_its_subscription_on() -> None:
    dispatcher = Dispatcher()
    early = dispatcher.subscribe(10)
    await deliver(dispatcher, new_message("one"))
    late = dispatcher.subscribe(10)
    await deliver(dispatcher, new_message("two"))
    await deliver(dispatcher, new_message("three"))

    assert early.pending() == 3
    assert late.pending() == 2
    dispatcher.end_streams()
    assert contents(await drain(early)) == ["one", "two", "three"]
    assert contents(await drain(late)) == ["two", "three"]


async def test_streams_and_handlers_see_the_same_events_in_the_same_order() -> None:
    dispatcher = Dispatcher()
    recorder = Recorder()
    dispatcher.add_handler(ServerMessage, recorder)
    stream = dispatcher.subscribe(10)
    events: list[chatfeed.FeedEvent] = [
        new_message("a"),
        new_chat(),
        error_message(),
        unknown_message(),
        new_message("b"),
    ]

    for event in events:
        await deliver(dispatcher, event)
    dispatcher.end_streams()

    assert await drain(stream) == events
    assert recorder.events == events


async def test_handlers_run_before_the_event_reaches_streams() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(10)
    seen_by_stream_at_handler_time: list[int] = []
    dispatcher.add_handler("new_message", lambda event: seen_by_stream_at_handler_time.append(stream.pending()))

    await deliver(dispatcher, new_message())

    assert seen_by_stream_at_handler_time == [0]
    assert stream.pending() == 1


async def test_a_waiting_reader_gets_the_next_event() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(4)
    reader = asyncio.create_task(anext(stream))
    await yield_to_loop()
    assert not reader.done()

    event = new_message()
    await deliver(dispatcher, event)

    assert await asyncio.wait_for(reader, WAIT) is event


async def test_streams_lists_the_open_streams() -> None:
    dispatcher = Dispatcher()
    assert dispatcher.streams() == []

    first = dispatcher.subscribe(1)
    second = dispatcher.subscribe(1)

    assert dispatcher.streams() == [first, second]


async def test_a_full_buffer_makes_dispatch_wait_for_the_reader() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(2)

    async def dispatch_three() -> None:
        for content in ("one", "two", "three"):
            await deliver(dispatcher, new_message(content))

    producer = asyncio.create_task(dispatch_three())
    await yield_to_loop()
    assert not producer.done()
    assert stream.pending() == 2

    first = await anext(stream)
    await asyncio.wait_for(producer, WAIT)

    assert first.payload.content == "one"
    assert stream.pending() == 2
    dispatcher.end_streams()
    assert contents(await drain(stream)) == ["two", "three"]


async def test_a_full_stream_holds_back_the_other_streams_too() -> None:
    # Delivery stays in order for everyone: the slow reader sets the pace.
    dispatcher = Dispatcher()
    slow = dispatcher.subscribe(1)
    fast = dispatcher.subscribe(10)

    async def dispatch_two() -> None:
        for content in ("one", "two"):
            await deliver(dispatcher, new_message(content))

    producer = asyncio.create_task(dispatch_two())
    await yield_to_loop()
    assert not producer.done()
    assert fast.pending() == 1

    await anext(slow)
    await asyncio.wait_for(producer, WAIT)
    assert fast.pending() == 2


async def test_end_streams_lets_them_drain_then_stop() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(10)
    for content in ("one", "two"):
        await deliver(dispatcher, new_message(content))

    dispatcher.end_streams()

    assert dispatcher.streams() == []
    assert contents(await drain(stream)) == ["one", "two"]
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_end_streams_wakes_a_waiting_reader() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(4)
    reader = asyncio.create_task(drain(stream))
    await yield_to_loop()
    assert not reader.done()

    dispatcher.end_streams()

    assert await asyncio.wait_for(reader, WAIT) == []


async def test_end_streams_with_an_error_raises_it_after_draining() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(10)
    for content in ("one", "two"):
        await deliver(dispatcher, new_message(content))
    fatal = chatfeed.AuthenticationError("Token expired")

    dispatcher.end_streams(fatal)

    received: list[Any] = []

    async def read_all() -> None:
        async for event in stream:
            received.append(event)

    with pytest.raises(chatfeed.AuthenticationError) as excinfo:
        await read_all()
    assert excinfo.value is fatal
    assert contents(received) == ["one", "two"]


async def test_end_streams_with_an_error_wakes_a_waiting_reader_with_it() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(4)
    reader = asyncio.create_task(anext(stream))
    await yield_to_loop()

    dispatcher.end_streams(chatfeed.ConnectionLostError(1008, "policy"))

    with pytest.raises(chatfeed.ConnectionLostError):
        await asyncio.wait_for(reader, WAIT)


async def test_end_streams_unblocks_a_waiting_dispatch() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(1)
    await deliver(dispatcher, new_message("one"))
    producer = asyncio.create_task(deliver(dispatcher, new_message("two")))
    await yield_to_loop()
    assert not producer.done()

    dispatcher.end_streams()

    await asyncio.wait_for(producer, WAIT)
    assert contents(await drain(stream)) == ["one"]


async def test_events_after_end_streams_do_not_reach_the_ended_streams() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(1)
    dispatcher.end_streams()

    await deliver(dispatcher, new_message("after"))
    await deliver(dispatcher, new_message("and again"))

    assert await drain(stream) == []


async def test_aclose_unsubscribes_and_unblocks_a_waiting_dispatch() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(1)
    other = dispatcher.subscribe(10)
    await deliver(dispatcher, new_message("one"))
    producer = asyncio.create_task(deliver(dispatcher, new_message("two")))
    await yield_to_loop()
    assert not producer.done()

    await stream.aclose()

    await asyncio.wait_for(producer, WAIT)
    assert dispatcher.streams() == [other]
    assert await drain(stream) == []
    await deliver(dispatcher, new_message("three"))
    assert stream.pending() == 0
    assert other.pending() == 3


async def test_aclose_twice_is_harmless() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(1)

    await stream.aclose()
    await stream.aclose()

    assert dispatcher.streams() == []


async def test_async_with_unsubscribes_and_unblocks_a_waiting_dispatch() -> None:
    dispatcher = Dispatcher()

    async with dispatcher.subscribe(1) as stream:
        assert dispatcher.streams() == [stream]
        await deliver(dispatcher, new_message("one"))
        producer = asyncio.create_task(deliver(dispatcher, new_message("two")))
        await yield_to_loop()
        assert not producer.done()

    await asyncio.wait_for(producer, WAIT)
    assert dispatcher.streams() == []
    assert await drain(stream) == []


async def test_async_with_unsubscribes_when_the_block_raises() -> None:
    dispatcher = Dispatcher()

    with pytest.raises(KeyError):
        async with dispatcher.subscribe(1):
            raise KeyError("bug in the reader")

    assert dispatcher.streams() == []


async def test_dropping_a_stream_unsubscribes_it_and_unblocks_a_waiting_dispatch() -> None:
    dispatcher = Dispatcher()
    stream = dispatcher.subscribe(1)
    await deliver(dispatcher, new_message("one"))
    producer = asyncio.create_task(deliver(dispatcher, new_message("two")))
    await yield_to_loop()
    assert not producer.done()

    del stream

    await asyncio.wait_for(producer, WAIT)
    assert dispatcher.streams() == []


async def test_breaking_out_of_async_for_unsubscribes_and_unblocks_a_waiting_dispatch() -> None:
    dispatcher = Dispatcher()
    received: list[Any] = []
    may_leave = asyncio.Event()

    async def reader() -> None:
        async for event in dispatcher.subscribe(1):
            received.append(event)
            await may_leave.wait()
            break

    async def dispatch_three() -> None:
        for content in ("one", "two", "three"):
            await deliver(dispatcher, new_message(content))

    reading = asyncio.create_task(reader())
    await yield_to_loop()
    producer = asyncio.create_task(dispatch_three())
    await yield_to_loop()
    # "one" was read, "two" fills the buffer, "three" waits for room.
    assert contents(received) == ["one"]
    assert not producer.done()
    assert len(dispatcher.streams()) == 1

    may_leave.set()

    await asyncio.wait_for(reading, WAIT)
    await asyncio.wait_for(producer, WAIT)
    assert dispatcher.streams() == []

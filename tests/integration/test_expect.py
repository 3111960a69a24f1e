"""expect(): the answer to a request, expected before the request is made, and never missed."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection

import chatfeed
from chatfeed._dispatch import _NO_ROUTES
from chatfeed.testing import FeedServer, make_message

from ..conftest import BAD_TOKEN, MS, TOKEN
from .conftest import (
    WAIT,
    Recorder,
    ThreadedFeedServer,
    content,
    make_client,
    raw_server,
    running,
    unfinished_tasks,
    url_of,
)

pytestmark = pytest.mark.timeout(20)


def in_chat(chat_id: str, role: str = "assistant") -> Callable[[chatfeed.NewMessage], bool]:
    """A ``where`` that picks the message of ``role`` in chat ``chat_id``."""

    def matches(event: chatfeed.NewMessage) -> bool:
        return event.payload.chat_id == chat_id and event.payload.role == role

    return matches


def never(event: object) -> bool:
    return False


def assert_forgotten(client: chatfeed.Client) -> None:
    """No expectation is pending, and a client without handlers is back on the shared no-handler routes."""
    assert client.statistics().expectations == 0
    assert client._dispatcher._routes is _NO_ROUTES, "an ended expectation still costs every frame a route"


# The race the feature exists for


async def test_an_answer_pushed_inside_the_request_resolves_the_expectation_before_anyone_awaits(
    server: FeedServer,
) -> None:
    client = make_client(server.url)
    read = Recorder()  # how the test knows the client has read a frame
    client.on("new_message")(read)

    async def post_prompt(chat_id: str, text: str) -> None:
        # A backend that answers before the REST call returns: the question
        # and the answer are on the feed, and read by the client, by then.
        await server.push_message(chat_id=chat_id, role="user", content=text)
        await server.push_message(chat_id=chat_id, role="assistant", content=f"re: {text}")
        await read.wait_for(2)

    async with client:
        reply = client.expect("new_message", where=in_chat("7"))
        await post_prompt("7", "hello")
        late = client.expect("new_message", where=in_chat("7"))  # made after the answer came
        assert reply.done(), "the answer came before the caller awaited, and was not taken"
        event = await asyncio.wait_for(reply.wait(timeout=WAIT), WAIT)
        assert not late.done(), "an expectation was resolved by an event delivered before it was made"
        late.cancel()
        assert client.statistics().expectations == 0

    assert isinstance(event, chatfeed.NewMessage)
    assert (event.payload.chat_id, event.payload.role, event.payload.content) == ("7", "assistant", "re: hello")
    assert event is read.events[1]  # the event itself, as handlers get it


async def test_a_server_written_by_someone_else_answers_an_expectation() -> None:
    # Not FeedServer: a handler of its own, speaking the protocol as a Node
    # backend would (integer ids, camelCase fields, null for what it lacks).
    requested = asyncio.Event()
    tokens: list[str] = []

    def message(number: int, chat_id: int, role: str, text: str) -> str:
        payload = {
            "id": number,
            "chatId": chat_id,
            "role": role,
            "content": text,
            "precis": None,
            "audioUrl": None,
            "fallbackUsed": False,
            "status": "COMPLETED",
            "createdAt": "2025-10-07T12:00:00.000Z",
        }
        return json.dumps({"type": "new_message", "payload": payload})

    async def handler(ws: ServerConnection) -> None:
        auth = json.loads(await ws.recv())
        assert auth["type"] == "auth"
        tokens.append(auth["token"])
        await ws.send(json.dumps({"type": "auth_success"}))
        await requested.wait()
        await ws.send(message(41, 4, "assistant", "another chat's answer"))
        await ws.send(message(42, 5, "user", "the question, echoed"))
        await ws.send(message(43, 5, "assistant", "the answer"))
        await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server))
        async with client:
            reply = client.expect("new_message", where=in_chat("5"))
            requested.set()  # the request
            event = await asyncio.wait_for(reply, WAIT)

    assert tokens == [TOKEN]
    assert (event.payload.id, event.payload.chat_id, event.payload.content) == ("43", "5", "the answer")
    assert event.payload.status == chatfeed.MessageStatus.COMPLETED


# Matching


async def test_where_receives_each_event_of_the_kind_until_one_passes(server: FeedServer) -> None:
    client = make_client(server.url)
    seen: list[object] = []

    def where(event: chatfeed.NewMessage) -> bool:
        seen.append(event)
        return event.payload.content == "third"

    async with client:
        reply = client.expect("new_message", where=where)
        await server.push_chat()  # another kind: where never sees it
        await server.push_error("not this either")
        for text in ("first", "second", "third", "fourth"):
            await server.push_message(content=text)
        event = await asyncio.wait_for(reply, WAIT)
        after = client.expect("new_message")
        await server.push_message(content="fifth")
        assert content(await asyncio.wait_for(after, WAIT)) == "fifth"

    assert content(event) == "third"
    assert [content(each) for each in seen] == ["first", "second", "third"]
    assert all(isinstance(each, chatfeed.NewMessage) for each in seen)


async def test_awaiting_again_returns_the_same_event(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        reply = client.expect(chatfeed.NewChat)
        chat = await server.push_chat(title="the chat")
        first = await asyncio.wait_for(reply, WAIT)
        assert await reply is first
        assert await reply.wait(timeout=WAIT) is first
    assert first.payload == chat


async def test_an_event_class_or_server_message_can_be_expected(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        anything = client.expect(chatfeed.ServerMessage)
        error = client.expect(chatfeed.ErrorMessage, where=lambda event: "limit" in event.message)
        await server.push_error("try again")
        await server.push_error("rate limit")
        first = await asyncio.wait_for(anything, WAIT)
        limited = await asyncio.wait_for(error, WAIT)
    assert isinstance(first, chatfeed.ErrorMessage) and first.message == "try again"
    assert limited.message == "rate limit"


async def test_many_pending_expectations_each_get_their_event_then_cost_nothing(server: FeedServer) -> None:
    client = make_client(server.url)
    chats = [str(number) for number in range(50)]
    async with client:
        replies = {chat: client.expect("new_message", where=in_chat(chat)) for chat in chats}
        any_one, another = client.expect("new_message"), client.expect("new_message")
        assert client.statistics().expectations == 52
        for chat in reversed(chats):
            await server.push_message(chat_id=chat, content=f"answer {chat}")
        events = await asyncio.wait_for(asyncio.gather(*replies.values()), WAIT)
        assert client.statistics().expectations == 0
        assert_forgotten(client)
        first, second = await any_one, await another

    assert [(event.payload.chat_id, event.payload.content) for event in events] == [
        (chat, f"answer {chat}") for chat in chats
    ]
    assert first is second  # one event resolves every expectation it matches
    assert first.payload.chat_id == chats[-1]


async def test_an_expectation_is_resolved_at_once_even_while_a_handler_holds_the_event(server: FeedServer) -> None:
    client = make_client(server.url)
    release = asyncio.Event()
    handled = Recorder()

    @client.on("new_message")
    async def slow(event: chatfeed.NewMessage) -> None:
        await release.wait()
        handled(event)

    async with client:
        reply = client.expect("new_message")
        await server.push_message(content="slow to handle")
        event = await asyncio.wait_for(reply, WAIT)
        assert handled.events == []  # the handler still holds the receive loop
        release.set()
        await handled.wait_for(1)
    assert handled.events == [event]


async def test_an_expectation_made_by_a_handler_is_resolved_by_the_next_event_not_this_one(
    server: FeedServer,
) -> None:
    client = make_client(server.url)
    made: list[chatfeed.Expectation[chatfeed.NewMessage]] = []
    seen = Recorder()

    @client.on("new_message")
    def expect_the_next(event: chatfeed.NewMessage) -> None:
        if not made:
            made.append(client.expect("new_message"))

    client.on("new_message")(seen)
    async with client:
        await server.push_message(content="first")
        await server.push_message(content="second")
        await seen.wait_for(2)
        [reply] = made
        assert reply.done()
        assert content(await reply) == "second"


# Timeouts


async def test_a_timeout_given_to_expect_counts_from_the_call_and_ends_it_unawaited(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        reply = client.expect("new_message", timeout=50 * MS)
        await asyncio.sleep(100 * MS)  # time passing is what is tested: nobody awaits meanwhile
        assert reply.done()
        assert_forgotten(client)
        await server.push_message()  # too late
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reply, WAIT)


async def test_a_timeout_given_to_wait_raises_timeout_error_and_ends_the_expectation(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        reply = client.expect("new_message")
        with pytest.raises(TimeoutError):
            await reply.wait(timeout=50 * MS)
        assert reply.done()
        assert_forgotten(client)
        with pytest.raises(TimeoutError):
            await reply  # ended, for good


async def test_the_timeout_of_expect_bounds_a_longer_wait(server: FeedServer) -> None:
    client = make_client(server.url)
    loop = asyncio.get_running_loop()
    async with client:
        started = loop.time()
        reply = client.expect("new_message", timeout=50 * MS)
        with pytest.raises(TimeoutError):
            await reply.wait(timeout=WAIT)
        assert loop.time() - started < WAIT
        assert_forgotten(client)


async def test_wait_for_around_an_expectation_ends_it_when_it_times_out(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        reply = client.expect("new_message")
        with pytest.raises(asyncio.TimeoutError):  # wait_for's own: not the builtin before Python 3.11
            await asyncio.wait_for(reply, 50 * MS)
        assert reply.done()
        assert_forgotten(client)


# Cancelling


async def test_cancelling_the_task_that_awaits_ends_the_expectation_cleanly(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        reply = client.expect("new_message")
        waiter = asyncio.ensure_future(reply.wait())
        await asyncio.sleep(0)  # the waiter starts waiting
        assert not waiter.done()
        waiter.cancel()
        await asyncio.wait([waiter], timeout=WAIT)
        assert waiter.cancelled()
        assert reply.done()
        assert_forgotten(client)
        after = client.expect("new_message")
        await server.push_message(content="after")
        assert content(await asyncio.wait_for(after, WAIT)) == "after"
        assert client.connected
    with pytest.raises(asyncio.CancelledError):
        await reply  # cancelled, not resolved by the later event


async def test_cancel_ends_an_expectation_and_stops_whoever_awaits_it(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        unawaited = client.expect("new_message")
        awaited = client.expect("new_chat")
        waiter = asyncio.ensure_future(awaited.wait())
        await asyncio.sleep(0)  # the waiter starts waiting
        unawaited.cancel()
        awaited.cancel()
        assert unawaited.done() and awaited.done()
        await asyncio.wait([waiter], timeout=WAIT)
        assert waiter.cancelled()
        assert_forgotten(client)
        awaited.cancel()  # again: nothing happens
        with pytest.raises(asyncio.CancelledError):
            await unawaited


# The client stops first


async def test_close_ends_pending_expectations_with_client_closed_error(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        unawaited = client.expect("new_message")
        timed = client.expect("new_chat", timeout=WAIT)
        awaited = client.expect("connected", where=lambda event: event.is_reconnect)
        waiter = asyncio.ensure_future(awaited.wait())
        await asyncio.sleep(0)  # the waiter starts waiting
        assert client.statistics().expectations == 3
    with pytest.raises(chatfeed.ClientClosedError):
        await asyncio.wait_for(waiter, WAIT)
    for reply in (unawaited, timed):
        assert reply.done()
        with pytest.raises(chatfeed.ClientClosedError):
            await reply
    assert_forgotten(client)
    with pytest.raises(chatfeed.UsageError, match="closed"):
        client.expect("new_message")


async def test_close_of_a_client_never_started_ends_its_expectations() -> None:
    client = make_client("ws://127.0.0.1:9")
    reply = client.expect("connected")
    await client.close()
    with pytest.raises(chatfeed.ClientClosedError):
        await asyncio.wait_for(reply, WAIT)
    assert_forgotten(client)


async def test_the_error_that_stops_the_client_is_what_await_raises(server: FeedServer) -> None:
    client = make_client(server.url)
    connected = client.expect("connected")
    async with running(client) as run:
        await asyncio.wait_for(connected, WAIT)
        reply = client.expect("new_message")
        server.tokens.discard(TOKEN)  # revoked: the next auth is rejected
        await server.close_connections(1012, "restart")
        with pytest.raises(chatfeed.AuthenticationError) as stopped:
            await asyncio.wait_for(reply, WAIT)
        await asyncio.wait([run], timeout=WAIT)
        assert run.done() and run.exception() is stopped.value
    assert_forgotten(client)
    with pytest.raises(chatfeed.UsageError, match="closed"):
        client.expect("new_message")


async def test_awaiting_in_an_async_with_block_raises_the_error_that_stopped_the_client(server: FeedServer) -> None:
    client = make_client(server.url)

    async def ask() -> chatfeed.NewMessage:
        async with client:
            reply = client.expect("new_message")
            server.tokens.discard(TOKEN)
            await server.close_connections(1012, "restart")
            return await reply

    with pytest.raises(chatfeed.AuthenticationError):
        await asyncio.wait_for(ask(), WAIT)
    assert_forgotten(client)


async def test_an_expectation_made_before_a_start_that_fails_raises_its_error(server: FeedServer) -> None:
    client = make_client(server.url, token=BAD_TOKEN)
    reply = client.expect("connected")
    with pytest.raises(chatfeed.AuthenticationError) as failed:
        async with client:
            pass
    with pytest.raises(chatfeed.AuthenticationError) as raised:
        await asyncio.wait_for(reply, WAIT)
    assert raised.value is failed.value
    assert_forgotten(client)


async def test_where_raising_is_what_await_raises_and_the_client_goes_on(server: FeedServer) -> None:
    client = make_client(server.url)

    def broken(event: chatfeed.NewMessage) -> bool:
        raise LookupError(event.payload.content)

    async with client:
        reply = client.expect("new_message", where=broken)
        await server.push_message(content="boom")
        with pytest.raises(LookupError, match="boom"):
            await asyncio.wait_for(reply, WAIT)
        assert reply.done()
        assert_forgotten(client)
        after = client.expect("new_message")
        await server.push_message(content="after")
        assert content(await asyncio.wait_for(after, WAIT)) == "after"
        assert client.connected


# Lifecycle and backfilled events


async def test_lifecycle_events_can_be_expected(server: FeedServer) -> None:
    client = make_client(server.url)
    first = client.expect("connected")
    async with client:
        assert await asyncio.wait_for(first, WAIT) == chatfeed.Connected(is_reconnect=False, downtime=None)
        lost = client.expect("disconnected")
        back = client.expect("connected", where=lambda event: event.is_reconnect)
        await server.close_connections(4000, "deploy")
        disconnected = await asyncio.wait_for(lost, WAIT)
        connected = await asyncio.wait_for(back, WAIT)
        assert_forgotten(client)
    assert (disconnected.code, disconnected.reason, disconnected.will_retry) == (4000, "deploy", True)
    assert isinstance(connected, chatfeed.Connected)
    assert connected.is_reconnect


async def test_a_reply_that_came_during_a_disconnection_resolves_it_from_the_backfill(server: FeedServer) -> None:
    store: list[chatfeed.Message] = []  # the backend's database, read over its REST API

    def backfill(gap: chatfeed.Gap) -> list[chatfeed.Message]:
        return list(store)

    client = make_client(server.url, backfill=backfill)
    async with client:
        reply = client.expect("new_message", where=in_chat("9"))
        lost = client.expect("disconnected")
        await server.stop()
        await asyncio.wait_for(lost, WAIT)
        # The answer is written while the client is away: no connection carries it.
        store.append(make_message(chat_id="9", role="assistant", content="answered while you were away"))
        assert not reply.done()
        await server.start()
        event = await asyncio.wait_for(reply, WAIT)
        assert client.statistics().backfilled_events == 1
    assert event.source == "backfill"
    assert event.payload == store[0]


# What is left behind


@pytest.fixture
def feed() -> Iterator[ThreadedFeedServer]:
    with ThreadedFeedServer(tokens=[TOKEN]) as feed:
        yield feed


async def test_close_with_pending_expectations_leaves_no_task(feed: ThreadedFeedServer) -> None:
    before = asyncio.all_tasks()
    client = make_client(feed.server.url)
    connected = client.expect("connected")
    run = asyncio.create_task(client.run())
    await asyncio.wait_for(connected, WAIT)
    replies: list[chatfeed.Expectation[Any]] = [
        client.expect("new_message"),
        client.expect("new_chat", timeout=WAIT),
        client.expect("disconnected", where=never),
    ]
    waiter = asyncio.ensure_future(replies[0].wait())
    await asyncio.sleep(0)  # the waiter starts waiting
    await asyncio.wait_for(client.close(), 1000 * MS)
    await asyncio.wait_for(run, WAIT)
    await asyncio.wait([waiter], timeout=WAIT)
    assert isinstance(waiter.exception(), chatfeed.ClientClosedError)
    assert all(reply.done() for reply in replies)
    assert unfinished_tasks(before) == []
    assert_forgotten(client)


async def test_expectations_nobody_awaits_end_on_errors_without_noise(
    server: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: object) -> bool:
        raise LookupError("where failed")

    client = make_client(server.url)
    async with client:
        timed_out = client.expect("new_message", where=never, timeout=10 * MS)
        raising = client.expect("new_message", where=broken)
        cancelled = client.expect("new_chat")
        cancelled.cancel()
        closed = client.expect("error")
        await server.push_message()
        await asyncio.wait_for(client.expect("new_message"), WAIT)  # the same event reached `raising` first
    rejected = make_client(server.url, token=BAD_TOKEN)
    stopped = rejected.expect("new_message")
    with pytest.raises(chatfeed.AuthenticationError):
        async with rejected:
            pass
    await asyncio.sleep(20 * MS)  # time passing is what is tested: the timeout of `timed_out` is over
    ended: list[chatfeed.Expectation[Any]] = [timed_out, raising, cancelled, closed, stopped]
    assert all(reply.done() for reply in ended)
    del timed_out, raising, cancelled, closed, stopped, ended
    gc.collect()
    await asyncio.sleep(0)
    noise = [
        record.getMessage()
        for record in caplog.records
        if record.name == "asyncio" and record.levelno >= logging.WARNING
    ]
    assert noise == []


# Mistakes


@pytest.mark.parametrize(
    "options",
    [
        {"where": "assistant"},
        {"timeout": "5"},
        {"timeout": True},
        {"timeout": float("nan")},
        {"timeout": -1},
    ],
    ids=["where-not-callable", "timeout-str", "timeout-bool", "timeout-nan", "timeout-negative"],
)
async def test_bad_arguments_are_usage_errors(options: dict[str, Any]) -> None:
    client = make_client("ws://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError):
        client.expect("new_message", **options)
    assert_forgotten(client)


async def test_an_async_where_is_a_usage_error() -> None:
    # A coroutine is truthy: the first event would match, and the coroutine never run.
    client = make_client("ws://127.0.0.1:9")

    async def is_answer(event: chatfeed.NewMessage) -> bool:
        return event.payload.role == "assistant"

    with pytest.raises(chatfeed.UsageError, match="where"):
        client.expect("new_message", where=is_answer)  # type: ignore[call-overload]
    assert_forgotten(client)


async def test_unknown_events_are_usage_errors() -> None:
    client = make_client("ws://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError, match="did you mean 'new_message'"):
        client.expect("new_mesage")  # type: ignore[call-overload]
    with pytest.raises(chatfeed.UsageError, match=r"register chatfeed\.NewMessage"):
        client.expect(chatfeed.Message)  # type: ignore[arg-type]
    assert_forgotten(client)


def test_expect_outside_a_running_event_loop_is_a_usage_error() -> None:
    client = make_client("ws://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError, match="running event loop"):
        client.expect("new_message")
    assert_forgotten(client)


async def test_expect_on_a_closed_client_is_a_usage_error(server: FeedServer) -> None:
    client = make_client(server.url)
    async with running(client):
        await asyncio.wait_for(client.expect("connected"), WAIT)
    with pytest.raises(chatfeed.UsageError, match="closed"):
        client.expect("new_message")
    assert_forgotten(client)


async def test_an_expectation_dropped_unawaited_is_forgotten(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:

        async def post_that_fails() -> None:
            raise ConnectionError("the REST call failed")

        for _ in range(10):
            reply = client.expect("new_message", where=lambda event: False)
            with pytest.raises(ConnectionError):
                await post_that_fails()
            del reply
        gc.collect()
        assert client.statistics().expectations == 0
        with client.expect("new_message") as scoped:
            assert client.statistics().expectations == 1
        assert scoped.done()
        assert client.statistics().expectations == 0


async def test_awaiting_an_expectation_in_an_inline_handler_is_a_usage_error(server: FeedServer) -> None:
    client = make_client(server.url)
    failures: list[Exception] = []
    reported = asyncio.Event()

    @client.on("new_message")
    async def waits_for_the_reply(event: chatfeed.NewMessage) -> None:
        await client.expect("new_message").wait(timeout=WAIT)

    @client.on_error
    def report(exc: Exception, event: Any) -> None:
        failures.append(exc)
        reported.set()

    async with client:
        await server.push_message(content="question")
        await asyncio.wait_for(reported.wait(), WAIT)
    assert isinstance(failures[0], chatfeed.UsageError)
    assert "concurrency" in str(failures[0])

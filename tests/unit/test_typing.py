"""What a type checker sees (checked by mypy --strict in CI).

Decorators keep the type of what they decorate; an expectation, its ``where``
and a concurrent handler's ``key`` are typed after the event they are for. A
pool's handlers take the event and the feed's key, and its ``events()`` yields
``(key, event)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest
from typing_extensions import assert_type

import chatfeed
import chatfeed.sync
from chatfeed.testing import make_chat, make_message

client = chatfeed.Client("wss://api.example.com", token="t")
shown: list[str] = []


@client.on("new_message")
async def show(event: chatfeed.NewMessage) -> None:
    shown.append(event.payload.content)


@client.on(chatfeed.NewChat)
def count(event: chatfeed.NewChat) -> None:
    pass


@client.on_error
def report(exc: Exception, event: Any) -> None:
    pass


async def test_decorated_handlers_can_still_be_called_as_written() -> None:
    await show(chatfeed.NewMessage(type="new_message", payload=make_message(content="direct")))
    assert shown == ["direct"]


def test_an_event_name_held_in_a_variable_is_accepted() -> None:
    name: chatfeed.EventName = "new_chat"
    client.on(name)(count)


def test_a_misspelt_event_name_is_a_type_error_and_a_usage_error() -> None:
    # mypy --strict (warn_unused_ignores) fails CI if this line type-checks.
    with pytest.raises(chatfeed.UsageError, match="did you mean 'new_message'"):
        client.on("new_mesage")  # type: ignore[call-overload]


def test_a_payload_class_is_a_type_error_with_a_hint_at_its_event() -> None:
    with pytest.raises(chatfeed.UsageError, match=r"register chatfeed\.NewMessage"):
        client.on(chatfeed.Message)  # type: ignore[arg-type]
    with pytest.raises(chatfeed.UsageError, match=r"register chatfeed\.NewChat"):
        client.on(chatfeed.Chat)  # type: ignore[arg-type]


# expect(): the expectation, and the event its where= gets, are typed after the event named.


async def test_expect_is_typed_after_the_event_name_or_class() -> None:
    replies: list[chatfeed.Expectation[Any]] = [
        assert_type(client.expect("new_message"), chatfeed.Expectation[chatfeed.NewMessage]),
        assert_type(client.expect(chatfeed.NewMessage), chatfeed.Expectation[chatfeed.NewMessage]),
        assert_type(client.expect("new_chat", timeout=1.0), chatfeed.Expectation[chatfeed.NewChat]),
        assert_type(client.expect("error"), chatfeed.Expectation[chatfeed.ErrorMessage]),
        assert_type(client.expect("unknown"), chatfeed.Expectation[chatfeed.UnknownMessage]),
        assert_type(client.expect("connected"), chatfeed.Expectation[chatfeed.Connected]),
        assert_type(client.expect("disconnected"), chatfeed.Expectation[chatfeed.Disconnected]),
        assert_type(client.expect(chatfeed.ServerMessage), chatfeed.Expectation[chatfeed.ServerMessage]),
    ]
    name: chatfeed.EventName = "new_chat"
    replies.append(assert_type(client.expect(name), chatfeed.Expectation[Any]))
    for reply in replies:
        reply.cancel()


async def test_awaiting_an_expectation_gives_its_event_type() -> None:
    reply = client.expect("new_message", timeout=1.0)
    reply.cancel()
    with pytest.raises(asyncio.CancelledError):
        assert_type(await reply, chatfeed.NewMessage)
    with pytest.raises(asyncio.CancelledError):
        assert_type(await reply.wait(timeout=1.0), chatfeed.NewMessage)


def is_answer(event: chatfeed.NewMessage) -> bool:
    return event.payload.role == "assistant"


def is_titled(event: chatfeed.NewChat) -> bool:
    return bool(event.payload.title)


async def test_where_gets_the_event_named() -> None:
    replies: list[chatfeed.Expectation[Any]] = [
        assert_type(client.expect("new_message", where=is_answer), chatfeed.Expectation[chatfeed.NewMessage]),
        # A lambda is checked against the event too, and leaves the result typed.
        assert_type(
            client.expect("new_message", where=lambda e: e.payload.role == "assistant"),
            chatfeed.Expectation[chatfeed.NewMessage],
        ),
        assert_type(
            client.expect("connected", where=lambda e: e.is_reconnect), chatfeed.Expectation[chatfeed.Connected]
        ),
        assert_type(
            client.expect(chatfeed.NewChat, where=lambda e: e.payload.title == ""),
            chatfeed.Expectation[chatfeed.NewChat],
        ),
    ]
    for reply in replies:
        reply.cancel()


async def test_a_where_for_another_event_is_a_type_error() -> None:
    # mypy --strict (warn_unused_ignores) fails CI if these lines type-check.
    replies: list[chatfeed.Expectation[Any]] = [
        client.expect("new_message", where=is_titled),  # type: ignore[call-overload]
        client.expect("new_message", where=lambda e: e.payload.title == ""),  # type: ignore[call-overload]
        client.expect(chatfeed.NewMessage, where=is_titled),  # type: ignore[arg-type]
    ]
    for reply in replies:
        reply.cancel()


def test_expect_of_a_misspelt_name_or_a_payload_class_is_a_type_error() -> None:
    # Outside a running loop: a UsageError either way, once the type checker has had its say.
    with pytest.raises(chatfeed.UsageError):
        client.expect("new_mesage")  # type: ignore[call-overload]
    with pytest.raises(chatfeed.UsageError):
        client.expect(chatfeed.Message)  # type: ignore[arg-type]


# on(..., concurrency=...): key is a function of the event named.


concurrent = chatfeed.Client("wss://api.example.com", token="t")


@concurrent.on("new_message", concurrency=8, key=lambda e: e.payload.role)
async def answer(event: chatfeed.NewMessage) -> None:
    pass


def role_of(event: chatfeed.NewMessage) -> str:
    return event.payload.role


async def test_a_concurrent_handler_keeps_its_type_and_its_key_is_typed_by_the_event() -> None:
    assert_type(await answer(chatfeed.NewMessage(type="new_message", payload=make_message())), None)
    concurrent.on("new_message", concurrency=8, key=role_of, max_pending=64)(answer)
    concurrent.on(chatfeed.NewMessage, concurrency=8, key=lambda e: e.payload.chat_id)(answer)
    concurrent.on("new_message", concurrency=8, key=None)(answer)


def test_a_key_for_another_event_is_a_type_error() -> None:
    # mypy --strict (warn_unused_ignores) fails CI if these lines type-check.
    concurrent.on("new_chat", concurrency=8, key=lambda e: e.payload.role)  # type: ignore[call-overload]
    concurrent.on("new_chat", concurrency=8, key=role_of)  # type: ignore[call-overload]
    concurrent.on(chatfeed.NewChat, concurrency=8, key=role_of)  # type: ignore[arg-type]


def test_concurrency_for_a_lifecycle_event_is_a_type_error_and_a_usage_error() -> None:
    async def on_connect(event: chatfeed.Connected) -> None:
        pass

    async def on_disconnect(event: chatfeed.Disconnected) -> None:
        pass

    # Registered through Any: what a type checker rejects, the run time rejects too.
    on_connected: Any = concurrent.on("connected", concurrency=2)  # type: ignore[call-overload]
    with pytest.raises(chatfeed.UsageError, match="inline"):
        on_connected(on_connect)
    on_disconnected: Any = concurrent.on(chatfeed.Disconnected, concurrency=2)  # type: ignore[arg-type]
    with pytest.raises(chatfeed.UsageError, match="inline"):
        on_disconnected(on_disconnect)


# Pool: a handler takes the event and its feed's key; events() yields (key, event); statistics() by key or not.


pool = chatfeed.Pool("wss://api.example.com")
pool.add("user-17", token="t")  # expect(feed=...) refuses a feed the pool does not have
moderated: list[tuple[str, str]] = []


@pool.on("new_message")
async def moderate(event: chatfeed.NewMessage, feed: str) -> None:
    moderated.append((feed, event.payload.content))


@pool.on(chatfeed.NewChat)
def count_chat(event: chatfeed.NewChat, feed: str) -> None:
    pass


@pool.on("feed_stopped")
def stopped(event: chatfeed.FeedStopped, feed: str) -> None:
    pass


@pool.on("new_message", concurrency=8, key=lambda e: e.payload.chat_id)
async def answer_in_pool(event: chatfeed.NewMessage, feed: str) -> None:
    pass


async def test_a_pool_handler_keeps_its_type_and_can_still_be_called_as_written() -> None:
    message = chatfeed.NewMessage(type="new_message", payload=make_message(content="direct"))
    assert_type(await moderate(message, "user-17"), None)
    assert moderated == [("user-17", "direct")]
    assert_type(count_chat(chatfeed.NewChat(type="new_chat", payload=make_chat()), "user-17"), None)
    assert_type(await answer_in_pool(message, "user-17"), None)
    pool.on("connected")(lambda event, feed: None)
    pool.on(chatfeed.ServerMessage)(lambda event, feed: None)
    name: chatfeed.PoolEventName = "feed_stopped"
    pool.on(name)(stopped)


def test_a_pool_handler_without_the_feed_or_for_another_event_is_a_type_error() -> None:
    # mypy --strict (warn_unused_ignores) fails CI if these lines type-check.
    pool.on("new_message")(show)  # type: ignore[type-var]
    pool.on("new_chat")(moderate)  # type: ignore[type-var]
    pool.on("feed_stopped")(moderate)  # type: ignore[type-var]
    pool.on("new_message", concurrency=8, key=lambda e: e.payload.title)  # type: ignore[call-overload]
    with pytest.raises(chatfeed.UsageError, match="did you mean 'new_message'"):
        pool.on("new_mesage")  # type: ignore[call-overload]


async def test_pool_expect_is_typed_after_the_event_name_or_class() -> None:
    replies: list[chatfeed.Expectation[Any]] = [
        assert_type(pool.expect("new_message"), chatfeed.Expectation[chatfeed.NewMessage]),
        assert_type(pool.expect("new_message", feed="user-17"), chatfeed.Expectation[chatfeed.NewMessage]),
        assert_type(pool.expect(chatfeed.NewChat, timeout=1.0), chatfeed.Expectation[chatfeed.NewChat]),
        assert_type(pool.expect("error"), chatfeed.Expectation[chatfeed.ErrorMessage]),
        assert_type(pool.expect("unknown"), chatfeed.Expectation[chatfeed.UnknownMessage]),
        assert_type(pool.expect("connected", feed="user-17"), chatfeed.Expectation[chatfeed.Connected]),
        assert_type(pool.expect("disconnected"), chatfeed.Expectation[chatfeed.Disconnected]),
        assert_type(pool.expect("feed_stopped", feed="user-17"), chatfeed.Expectation[chatfeed.FeedStopped]),
        assert_type(pool.expect(chatfeed.ServerMessage), chatfeed.Expectation[chatfeed.ServerMessage]),
        assert_type(
            pool.expect("new_message", feed="user-17", where=lambda e: e.payload.role == "assistant"),
            chatfeed.Expectation[chatfeed.NewMessage],
        ),
        assert_type(
            pool.expect("feed_stopped", where=lambda e: e.feed == "x"), chatfeed.Expectation[chatfeed.FeedStopped]
        ),
    ]
    for reply in replies:
        reply.cancel()
    reply = pool.expect("new_message", feed="user-17", timeout=1.0)
    reply.cancel()
    with pytest.raises(asyncio.CancelledError):
        assert_type(await reply, chatfeed.NewMessage)
    with pytest.raises(asyncio.CancelledError):
        assert_type(await reply.wait(timeout=1.0), chatfeed.NewMessage)


async def test_a_pool_expect_with_a_where_for_another_event_or_a_bad_feed_is_a_type_error() -> None:
    # mypy --strict (warn_unused_ignores) fails CI if these lines type-check.
    replies: list[chatfeed.Expectation[Any]] = [
        pool.expect("new_message", where=is_titled),  # type: ignore[call-overload]
        pool.expect("new_message", where=lambda e: e.payload.title == ""),  # type: ignore[call-overload]
    ]
    for reply in replies:
        reply.cancel()
    with pytest.raises(chatfeed.UsageError, match="feed"):
        pool.expect("new_message", feed=17)  # type: ignore[call-overload]


async def test_pool_events_yield_the_key_and_the_event() -> None:
    unopened = chatfeed.Pool("wss://api.example.com")
    stream = assert_type(unopened.events(), chatfeed.PoolEventStream)
    with pytest.raises(chatfeed.UsageError, match="never started"):
        # A pool never started has no events to wait for; the type is what matters here.
        assert_type(await anext(stream), tuple[str, chatfeed.FeedEvent])
    await stream.aclose()


async def keys_of(running: chatfeed.Pool) -> list[str]:
    # Type-checked, not run: unpacking an item of events() in a loop.
    keys = []
    async for feed, event in running.events():
        assert_type(feed, str)
        assert_type(event, chatfeed.FeedEvent)
        keys.append(feed)
    return keys


def test_pool_statistics_are_typed_by_whether_a_key_is_given() -> None:
    typed = chatfeed.Pool("wss://api.example.com")
    typed.add("user-17", token="t")
    assert_type(typed.statistics(), chatfeed.PoolStatistics)
    assert_type(typed.statistics("user-17"), chatfeed.ClientStatistics)
    assert typed.statistics().feeds == 1
    assert typed.statistics("user-17").state == "unopened"
    with pytest.raises(chatfeed.UsageError, match="no feed"):
        typed.statistics(17)  # type: ignore[call-overload]


# chatfeed.sync: typed as the async client, with plain functions as handlers.


blocking = chatfeed.sync.Client("wss://api.example.com", token="t")
shown_in_thread: list[str] = []


@blocking.on("new_message")
def show_in_thread(event: chatfeed.NewMessage) -> None:
    shown_in_thread.append(event.payload.content)


@blocking.on(chatfeed.Disconnected)
def lost(event: chatfeed.Disconnected) -> None:
    pass


@blocking.on_error
def report_in_thread(exc: Exception, event: Any) -> None:
    pass


def test_a_sync_client_handler_keeps_its_type_and_can_still_be_called_as_written() -> None:
    message = chatfeed.NewMessage(type="new_message", payload=make_message(content="direct"))
    assert_type(show_in_thread(message), None)
    assert shown_in_thread == ["direct"]
    blocking.on(chatfeed.ServerMessage)(lambda event: None)
    blocking.on("new_message", concurrency=1)(show_in_thread)
    name: chatfeed.EventName = "new_chat"
    blocking.on(name)(count)


def test_an_async_handler_or_one_for_another_event_or_concurrency_is_a_type_error_for_the_sync_client() -> None:
    # mypy --strict (warn_unused_ignores) fails CI if these lines type-check.
    with pytest.raises(chatfeed.UsageError, match="is async"):
        blocking.on("new_message")(show)  # type: ignore[type-var]
    with pytest.raises(chatfeed.UsageError, match="is async"):
        blocking.on_error(show)  # type: ignore[type-var]
    blocking.on("new_chat")(show_in_thread)  # type: ignore[type-var]
    with pytest.raises(chatfeed.UsageError, match="one at a time"):
        blocking.on("new_message", concurrency=8)  # type: ignore[call-overload]
    with pytest.raises(chatfeed.UsageError, match="did you mean 'new_message'"):
        blocking.on("new_mesage")  # type: ignore[call-overload]

    def answer(event: chatfeed.NewMessage) -> str:
        return "a handler's result goes nowhere"

    blocking.on("new_message")(answer)  # type: ignore[type-var]


def test_sync_expect_is_typed_after_the_event_name_or_class() -> None:
    expecting = chatfeed.sync.Client("wss://api.example.com", token="t")
    try:
        replies: list[chatfeed.sync.Expectation[Any]] = [
            assert_type(expecting.expect("new_message"), chatfeed.sync.Expectation[chatfeed.NewMessage]),
            assert_type(expecting.expect(chatfeed.NewMessage), chatfeed.sync.Expectation[chatfeed.NewMessage]),
            assert_type(expecting.expect("new_chat", timeout=1.0), chatfeed.sync.Expectation[chatfeed.NewChat]),
            assert_type(expecting.expect("error"), chatfeed.sync.Expectation[chatfeed.ErrorMessage]),
            assert_type(expecting.expect("unknown"), chatfeed.sync.Expectation[chatfeed.UnknownMessage]),
            assert_type(expecting.expect("connected"), chatfeed.sync.Expectation[chatfeed.Connected]),
            assert_type(expecting.expect("disconnected"), chatfeed.sync.Expectation[chatfeed.Disconnected]),
            assert_type(expecting.expect(chatfeed.ServerMessage), chatfeed.sync.Expectation[chatfeed.ServerMessage]),
            assert_type(
                expecting.expect("new_message", where=lambda e: e.payload.role == "assistant"),
                chatfeed.sync.Expectation[chatfeed.NewMessage],
            ),
            assert_type(
                expecting.expect("new_message", where=is_answer), chatfeed.sync.Expectation[chatfeed.NewMessage]
            ),
            # mypy --strict (warn_unused_ignores) fails CI if these lines type-check.
            expecting.expect("new_message", where=is_titled),  # type: ignore[call-overload]
            expecting.expect("new_message", where=lambda e: e.payload.title == ""),  # type: ignore[call-overload]
        ]
        name: chatfeed.EventName = "new_chat"
        replies.append(assert_type(expecting.expect(name), chatfeed.sync.Expectation[Any]))
        for reply in replies:
            reply.cancel()
        reply = expecting.expect("new_message", timeout=1.0)
        with reply:
            pass
        with pytest.raises(futures.CancelledError):
            assert_type(reply.wait(timeout=1.0), chatfeed.NewMessage)
    finally:
        expecting.close()


def test_sync_events_is_an_iterator_of_feed_events() -> None:
    unopened = chatfeed.sync.Client("wss://api.example.com", token="t")
    try:
        stream = assert_type(unopened.events(timeout=1.0), chatfeed.sync.EventStream[chatfeed.FeedEvent])
        events: Iterator[chatfeed.FeedEvent] = stream
        with pytest.raises(chatfeed.UsageError, match="never started"):
            # A client never started has no events to wait for; the type is what matters here.
            assert_type(next(events), chatfeed.FeedEvent)
        assert_type(stream.timeout, float | None)
        stream.close()
    finally:
        unopened.close()


def contents_of(running: chatfeed.sync.Client) -> list[str]:
    # Type-checked, not run: a with block, its events, run().
    contents = []
    with running as entered:
        assert_type(entered, chatfeed.sync.Client)
        with running.events(timeout=5.0) as stream:
            for event in stream:
                assert_type(event, chatfeed.FeedEvent)
                if isinstance(event, chatfeed.NewMessage):
                    contents.append(event.payload.content)
    assert_type(running.run(), None)
    return contents


def test_sync_client_introspection_is_typed_as_the_async_clients() -> None:
    assert_type(blocking.statistics(), chatfeed.ClientStatistics)
    assert_type(blocking.connected, bool)
    closing = chatfeed.sync.Client("wss://api.example.com", token="t")
    assert_type(closing.close(), None)

"""FeedServer's history: what it pushed, for a client to backfill from after a gap."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import chatfeed
from chatfeed.testing import FeedServer, make_chat, make_message

from ..conftest import MS, TOKEN
from .conftest import Recorder, content, make_client, running

pytestmark = pytest.mark.timeout(20)

T0 = datetime(2025, 10, 7, 12, 0, tzinfo=timezone.utc)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def test_pushes_are_recorded_with_and_without_a_connected_client(server: FeedServer) -> None:
    client = make_client(server.url)
    received = Recorder()
    client.on("new_message")(received)
    chat = await server.push_chat(id="c1")  # before any client
    async with running(client):
        await server.wait_for_clients()
        live = await server.push_message(chat_id="c1", content="live")
        await received.wait_for(1)
        lost_at = datetime.now(timezone.utc)
        await server.stop()  # a deploy: the client retries
        missed = await server.push_message(chat_id="c1", content="pushed while down")
        await server.start()
        await server.wait_for_clients()
        again = await server.push_message(chat_id="c1", content="live again")
        await received.wait_for(2)

    assert [content(event) for event in received.events] == ["live", "live again"]
    assert server.history() == [chat, live, missed, again]
    assert server.history(since=lost_at) == [missed, again]


async def test_play_records_the_messages_and_chats_it_plays(server: FeedServer) -> None:
    chat = make_chat(created_at=at(0))
    message = make_message(chat_id=chat.id, created_at=at(1))
    events: list[chatfeed.ServerMessage] = [
        chatfeed.NewChat(type="new_chat", payload=chat),
        chatfeed.ErrorMessage(type="error", message="rate limited"),
        chatfeed.NewMessage(type="new_message", payload=message),
    ]
    await server.play(events, rate=1 / MS)
    assert server.history() == [chat, message]


async def test_since_is_inclusive(server: FeedServer) -> None:
    early, middle, late = [await server.push_message(created_at=at(seconds)) for seconds in (0, 1, 2)]
    assert server.history(since=at(1)) == [middle, late]
    assert server.history(since=at(1) + timedelta(microseconds=1)) == [late]
    # The same instant in another zone.
    assert server.history(since=at(1).astimezone(timezone(timedelta(hours=5)))) == [middle, late]
    assert server.history(since=at(3)) == []
    assert server.history() == [early, middle, late]


async def test_oldest_first_and_ties_keep_push_order(server: FeedServer) -> None:
    late = await server.push_message(created_at=at(2))
    tied_message = await server.push_message(created_at=at(1))
    tied_chat = await server.push_chat(created_at=at(1))
    tied_last = await server.push_message(created_at=at(1))
    early = await server.push_chat(created_at=at(0))
    assert server.history() == [early, tied_message, tied_chat, tied_last, late]
    assert server.history(since=at(1)) == [tied_message, tied_chat, tied_last, late]


async def test_user_id_keeps_the_users_chats_and_their_messages(server: FeedServer) -> None:
    mine = await server.push_chat(id="c1", user_id="u1", created_at=at(0))
    theirs = await server.push_chat(id="c2", user_id="u2", created_at=at(1))
    in_mine = await server.push_message(chat_id="c1", created_at=at(2))
    await server.push_message(chat_id="c2", created_at=at(3))
    await server.push_message(chat_id="unknown", created_at=at(4))
    also_in_mine = await server.push_message(chat_id="c1", created_at=at(5))

    assert server.history(user_id="u1") == [mine, in_mine, also_in_mine]
    assert server.history(user_id="u2")[0] == theirs
    # A message after `since` counts even when its chat was created before.
    assert server.history(since=at(2), user_id="u1") == [in_mine, also_in_mine]
    assert server.history(user_id="nobody") == []


async def test_history_keeps_the_last_history_size_items() -> None:
    async with FeedServer(tokens=[TOKEN], history_size=3) as server:
        pushed = [await server.push_message(content=str(index)) for index in range(5)]
        assert server.history() == pushed[-3:]
        await server.push_chat()
        assert len(server.history()) == 3


async def test_clear_history_forgets_what_was_pushed(server: FeedServer) -> None:
    await server.push_chat()
    await server.push_message()
    server.clear_history()
    assert server.history() == []
    after = await server.push_message()
    assert server.history() == [after]


async def test_naive_since_is_a_usage_error(server: FeedServer) -> None:
    await server.push_message()
    with pytest.raises(chatfeed.UsageError, match="since"):
        server.history(since=datetime(2025, 10, 7, 12, 0))


@pytest.mark.parametrize("history_size", [0, -1, 1.5, True, "10", None])
async def test_bad_history_size_is_a_usage_error(history_size: Any) -> None:
    with pytest.raises(chatfeed.UsageError, match="history_size"):
        FeedServer(tokens=[TOKEN], history_size=history_size)


async def test_send_raw_is_not_recorded(server: FeedServer) -> None:
    client = make_client(server.url)
    received = Recorder()
    client.on("new_message")(received)
    message = chatfeed.NewMessage(type="new_message", payload=make_message(content="raw"))
    chat = {"type": "new_chat", "payload": make_chat().model_dump(mode="json", by_alias=True)}
    async with running(client):
        await server.wait_for_clients()
        assert await server.send_raw(message.model_dump_json(by_alias=True)) == 1
        assert await server.send_raw(json.dumps(chat).encode()) == 1
        await received.wait_for(1)
    assert content(received.events[0]) == "raw"
    assert server.history() == []

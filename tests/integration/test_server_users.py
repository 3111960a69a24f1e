"""FeedServer's users: a token per user, and pushes to one user's connections only."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

import chatfeed
from chatfeed.testing import FeedServer, make_chat, make_message, synthetic_conversation

from ..conftest import BAD_TOKEN, MS, OTHER_TOKEN, SECRET, TOKEN
from .conftest import WAIT, make_client

pytestmark = pytest.mark.timeout(20)

THIRD_TOKEN = f"eyJhbGciOiJIUzI1NiJ9.{SECRET}-user-3.c2lnbmF0dXJl"

USERS = {TOKEN: "u1", OTHER_TOKEN: "u2"}


@pytest.fixture
async def server() -> AsyncIterator[FeedServer]:
    async with FeedServer(users=USERS) as server:
        yield server


class Listener:
    """A client of the server, with the stream of its events."""

    def __init__(self, client: chatfeed.Client) -> None:
        self.client = client
        self.stream = client.events()

    async def next(self) -> chatfeed.FeedEvent:
        return await asyncio.wait_for(anext(self.stream), WAIT)


@pytest.fixture
async def listeners() -> AsyncIterator[Any]:
    """Open a listener per token given, each authenticated once returned; close them all at the end."""
    opened: list[chatfeed.Client] = []

    async def open_listeners(server: FeedServer, *tokens: str) -> list[Listener]:
        result = []
        for token in tokens:
            client = make_client(server.url, token=token)
            opened.append(client)
            await client.__aenter__()
            result.append(Listener(client))
        await server.wait_for_clients(len(opened), timeout=WAIT)
        return result

    yield open_listeners
    for client in opened:
        await client.close()


def content(event: chatfeed.FeedEvent) -> str:
    assert isinstance(event, chatfeed.NewMessage)
    return event.payload.content


async def test_a_users_token_is_accepted_and_others_are_not(server: FeedServer) -> None:
    async with make_client(server.url, token=OTHER_TOKEN) as client:
        assert client.connected
    with pytest.raises(chatfeed.AuthenticationError):
        await asyncio.wait_for(make_client(server.url, token=BAD_TOKEN, reconnect=False).run(), WAIT)


async def test_with_users_the_default_test_token_is_not_accepted(server: FeedServer) -> None:
    assert server.tokens == set()
    with pytest.raises(chatfeed.AuthenticationError):
        await asyncio.wait_for(make_client(server.url, token="test-token", reconnect=False).run(), WAIT)


async def test_without_users_the_default_test_token_is_still_accepted() -> None:
    async with FeedServer() as server, make_client(server.url, token="test-token") as client:
        assert client.connected
        assert server.users == {}


async def test_push_message_with_user_id_reaches_only_that_users_connections(
    server: FeedServer, listeners: Any
) -> None:
    first, second = await listeners(server, TOKEN, OTHER_TOKEN)
    await server.push_message(content="for u1", user_id="u1")
    await server.push_message(content="for u2", user_id="u2")
    await server.push_message(content="for everyone")
    # Frames of one connection arrive in order: what comes first is all that was sent before.
    assert [content(await first.next()), content(await first.next())] == ["for u1", "for everyone"]
    assert [content(await second.next()), content(await second.next())] == ["for u2", "for everyone"]


async def test_every_connection_of_the_user_gets_it(server: FeedServer, listeners: Any) -> None:
    laptop, phone, other = await listeners(server, TOKEN, TOKEN, OTHER_TOKEN)
    assert await server.send_raw('{"type": "ping"}', user_id="u1") == 2
    assert (await laptop.next()).type == "ping"
    assert (await phone.next()).type == "ping"
    await server.push_error("for everyone")
    assert (await other.next()).type == "error"


async def test_a_connection_of_tokens_is_no_users_and_gets_every_push(listeners: Any) -> None:
    async with FeedServer(tokens=[THIRD_TOKEN], users=USERS) as server:
        watcher, first = await listeners(server, THIRD_TOKEN, TOKEN)
        await server.push_message(content="for u2", user_id="u2")
        await server.push_message(content="for u1", user_id="u1")
        assert [content(await watcher.next()), content(await watcher.next())] == ["for u2", "for u1"]
        assert content(await first.next()) == "for u1"


async def test_a_token_in_both_tokens_and_users_is_its_users() -> None:
    async with FeedServer(tokens=[TOKEN], users=USERS) as server, make_client(server.url, token=TOKEN):
        await server.wait_for_clients()
        assert await server.send_raw('{"type": "ping"}', user_id="u1") == 1
        assert await server.send_raw('{"type": "ping"}', user_id="u2") == 0


async def test_push_chat_with_user_id_makes_a_chat_of_that_user_and_sends_it_to_them(
    server: FeedServer, listeners: Any
) -> None:
    first, second = await listeners(server, TOKEN, OTHER_TOKEN)
    made = await server.push_chat(user_id="u2")
    given = await server.push_chat(make_chat(user_id="someone"), user_id="u1")
    assert made.user_id == "u2"
    assert given.user_id == "someone"  # a chat given is sent as it is
    event = await second.next()
    assert isinstance(event, chatfeed.NewChat)
    assert event.payload == made
    event = await first.next()
    assert isinstance(event, chatfeed.NewChat)
    assert event.payload == given


async def test_push_chat_user_id_without_users_still_names_the_chats_user_and_goes_to_every_client(
    listeners: Any,
) -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        (listener,) = await listeners(server, TOKEN)
        chat = await server.push_chat(id="c1", user_id="7")
        event = await listener.next()
        assert isinstance(event, chatfeed.NewChat)
        assert event.payload == chat
        assert chat.user_id == "7"


async def test_send_raw_counts_the_connections_it_reached(server: FeedServer, listeners: Any) -> None:
    await listeners(server, TOKEN, OTHER_TOKEN)
    assert await server.send_raw('{"type": "ping"}', user_id="u1") == 1
    assert await server.send_raw('{"type": "ping"}', user_id="nobody") == 0
    assert await server.send_raw('{"type": "ping"}') == 2


async def test_a_closed_connection_is_forgotten(server: FeedServer, listeners: Any) -> None:
    first, _ = await listeners(server, TOKEN, OTHER_TOKEN)
    await first.client.close()
    await server._wait_until(lambda: server.clients == 1, WAIT)
    assert await server.send_raw('{"type": "ping"}', user_id="u1") == 0
    assert await server.send_raw('{"type": "ping"}', user_id="u2") == 1


async def test_dropped_connections_are_forgotten_at_once(server: FeedServer, listeners: Any) -> None:
    await listeners(server, TOKEN, OTHER_TOKEN)
    server.drop_connections()
    assert await server.send_raw('{"type": "ping"}', user_id="u1") == 0
    assert await server.send_raw('{"type": "ping"}') == 0


async def test_a_users_token_removed_from_users_is_rejected(server: FeedServer) -> None:
    del server.users[OTHER_TOKEN]
    with pytest.raises(chatfeed.AuthenticationError):
        await asyncio.wait_for(make_client(server.url, token=OTHER_TOKEN, reconnect=False).run(), WAIT)


async def test_play_per_user_gives_each_user_its_own_conversation(server: FeedServer, listeners: Any) -> None:
    first, second = await listeners(server, TOKEN, OTHER_TOKEN)
    chat_ids = itertools.count(1)

    def conversation(user_id: str) -> list[chatfeed.ServerMessage]:
        chat = make_chat(id=f"c{next(chat_ids)}", user_id=user_id)
        return [
            chatfeed.NewChat(type="new_chat", payload=chat),
            chatfeed.NewMessage(type="new_message", payload=make_message(chat_id=chat.id, content=user_id)),
        ]

    await asyncio.gather(
        server.play(conversation("u1"), rate=1 / MS, user_id="u1"),
        server.play(conversation("u2"), rate=1 / MS, user_id="u2"),
    )
    for listener, user_id in ((first, "u1"), (second, "u2")):
        chat, message = await listener.next(), await listener.next()
        assert isinstance(chat, chatfeed.NewChat)
        assert chat.payload.user_id == user_id
        assert content(message) == user_id
    await server.push_error("end")  # nothing else came before it
    assert (await first.next()).type == "error"
    assert (await second.next()).type == "error"
    # Recorded as before: each user's history is its own.
    for user_id in ("u1", "u2"):
        chat, message = server.history(user_id=user_id)
        assert isinstance(chat, chatfeed.Chat)
        assert chat.user_id == user_id
        assert isinstance(message, chatfeed.Message)
        assert message.content == user_id


async def test_play_of_a_synthetic_conversation_for_one_user(server: FeedServer, listeners: Any) -> None:
    first, second = await listeners(server, TOKEN, OTHER_TOKEN)
    await server.play(itertools.islice(synthetic_conversation(seed=1, user_id="u2"), 3), rate=1 / MS, user_id="u2")
    await server.push_error("end")
    assert (await first.next()).type == "error"
    received = [await second.next() for _ in range(3)]
    assert isinstance(received[0], chatfeed.NewChat)
    assert received[0].payload.user_id == "u2"
    assert (await second.next()).type == "error"


@pytest.mark.parametrize(
    "users",
    [
        [(TOKEN, "u1")],
        {TOKEN: ""},
        {"": "u1"},
        {TOKEN: 1},
    ],
)
def test_users_must_map_tokens_to_user_ids(users: Any) -> None:
    with pytest.raises(chatfeed.UsageError, match="users must map") as caught:
        FeedServer(users=users)
    assert SECRET not in str(caught.value)

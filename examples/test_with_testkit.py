"""Testing your own application with ``chatfeed.testing.FeedServer``, in pytest.

``UnreadCounter`` stands for your application. The tests run it against a real
feed server on loopback (no mocks), which pushes messages and restarts on
request. They are async, run by pytest-asyncio: the async fixture is declared
with ``@pytest_asyncio.fixture`` and the tests are marked with
``pytest.mark.asyncio``, so they pass in pytest-asyncio's default strict mode
as well as with ``asyncio_mode = auto``.

Run it with ``pytest examples/test_with_testkit.py``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import chatfeed
from chatfeed.testing import FeedServer

pytestmark = pytest.mark.asyncio  # every test in this module; redundant, and harmless, in auto mode

TOKEN = "test-token"


class UnreadCounter:
    def __init__(self, client: chatfeed.Client) -> None:
        self.unread: Counter[str] = Counter()
        client.on("new_message")(self.on_message)

    def on_message(self, event: chatfeed.NewMessage) -> None:
        if event.payload.role == chatfeed.Role.ASSISTANT:
            self.unread[event.payload.chat_id] += 1


@pytest_asyncio.fixture  # a plain @pytest.fixture is not run by pytest-asyncio in strict mode
async def server() -> AsyncIterator[FeedServer]:
    async with FeedServer(tokens=[TOKEN]) as server:
        yield server


def handled(client: chatfeed.Client) -> asyncio.Queue[chatfeed.NewMessage]:
    """Return a queue of the messages the application has handled."""
    queue: asyncio.Queue[chatfeed.NewMessage] = asyncio.Queue()
    # Handlers run in registration order: when this one runs, the application's has.
    client.on("new_message")(queue.put_nowait)
    return queue


async def test_counts_assistant_messages_per_chat(server: FeedServer) -> None:
    client = chatfeed.Client(server.url, token=TOKEN)
    app = UnreadCounter(client)
    done = handled(client)
    async with client:
        for chat_id, role in [("1", "user"), ("1", "assistant"), ("2", "assistant"), ("1", "assistant")]:
            await server.push_message(chat_id=chat_id, role=role)
        for _ in range(4):
            await done.get()
    assert app.unread == {"1": 2, "2": 1}


async def test_keeps_counting_after_a_server_restart(server: FeedServer) -> None:
    client = chatfeed.Client(server.url, token=TOKEN, reconnect=chatfeed.Backoff(initial=0.05, maximum=0.2))
    app = UnreadCounter(client)
    done = handled(client)
    async with client:
        await server.restart()
        await server.wait_for_clients()
        await server.push_message(chat_id="7", role="assistant")
        await done.get()
    assert app.unread == {"7": 1}


async def test_rejected_token_is_reported(server: FeedServer) -> None:
    with pytest.raises(chatfeed.AuthenticationError):
        async with chatfeed.Client(server.url, token="expired"):
            pass

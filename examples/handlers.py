"""Handlers: sync and async, registered by name or by class, run in order.

Handlers of an event run one after the other, in registration order, each
once the previous one has returned (an async one included). An exception in
a handler stops neither the other handlers nor the client: it goes to the
``@client.on_error`` hooks, and to the ``chatfeed`` logger (hence a traceback
on stderr).

Starts its own FeedServer on a free loopback port, pushes a chat and three
messages, prints what each handler does, and exits. Run it with
``python examples/handlers.py``.
"""

from __future__ import annotations

import asyncio
import sys

import chatfeed
from chatfeed.testing import FeedServer

TOKEN = "dev-token"
MESSAGES = 3


async def main() -> int:
    handled = 0
    all_handled = asyncio.Event()

    async with FeedServer(tokens=[TOKEN]) as server:
        client = chatfeed.Client(server.url, token=TOKEN)

        @client.on("new_chat")
        def show_chat(event: chatfeed.NewChat) -> None:
            print(f"chat {event.payload.id}: {event.payload.title}")

        @client.on("new_message")
        def show(event: chatfeed.NewMessage) -> None:
            print(f"  1 show   {event.payload.role}: {event.payload.content}")

        @client.on(chatfeed.NewMessage)
        async def store(event: chatfeed.NewMessage) -> None:
            await asyncio.sleep(0.05)  # stands for a database write: the next handler waits for it
            print(f"  2 store  saved message {event.payload.id}")

        @client.on("new_message")
        def summarise(event: chatfeed.NewMessage) -> None:
            if event.payload.precis is None:
                raise ValueError(f"message {event.payload.id} has no precis")
            print(f"  3 precis {event.payload.precis}")

        @client.on("new_message")
        def count(event: chatfeed.NewMessage) -> None:
            nonlocal handled
            handled += 1
            print(f"  4 count  {handled} message(s) handled")
            if handled == MESSAGES:
                all_handled.set()

        @client.on_error
        def report(exc: Exception, event: object) -> None:
            print(f"  on_error {type(exc).__name__}: {exc}")

        async with client:
            chat = await server.push_chat(title="Basil on a windowsill")
            await server.push_message(chat_id=chat.id, role="user", content="Why is my basil wilting?", precis=None)
            await server.push_message(chat_id=chat.id, content="Too much sun at noon.", precis="Too much sun.")
            await server.push_message(chat_id=chat.id, content="Move it back a little.", precis="Move it back.")
            await asyncio.wait_for(all_handled.wait(), timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

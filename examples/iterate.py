"""Iterate: ``async for event in client.events()``, with ``match`` on the event class.

``async with client:`` returns once the client is authenticated; a stream
opened right after it sees every event from then on. The loop stops after
``COUNT`` events, and leaving the ``async with`` block closes the client.

Starts its own FeedServer on a free loopback port, which sends a short
synthetic conversation, a server error and an event type this version of
chatfeed does not know; prints each event and exits.

Run it with ``python examples/iterate.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import chatfeed
from chatfeed.testing import FeedServer, synthetic_conversation

TOKEN = "dev-token"
COUNT = 7


async def feed(server: FeedServer) -> None:
    await server.play(itertools.islice(synthetic_conversation(seed=3), COUNT - 2), rate=50)
    await server.push_error("rate limit reached for chat 1")
    # A newer backend may send types this client does not know: they arrive, not crash it.
    await server.send_raw('{"type": "typing", "payload": {"chatId": "1"}}')


async def main() -> int:
    async with FeedServer(tokens=[TOKEN]) as server, chatfeed.Client(server.url, token=TOKEN) as client:
        feeder = asyncio.create_task(feed(server))
        seen = 0
        async for event in client.events():
            match event:
                case chatfeed.NewChat(payload=chat):
                    print(f"new chat {chat.id}: {chat.title}")
                case chatfeed.NewMessage(payload=message):
                    print(f"  [chat {message.chat_id}] {message.role}: {message.content}")
                case chatfeed.ErrorMessage(message=text):
                    print(f"server error: {text}")
                case chatfeed.UnknownMessage(type=kind):
                    print(f"unknown event type {kind!r}, skipped")
            seen += 1
            if seen == COUNT:
                break
        await feeder
    print(f"done after {seen} events")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

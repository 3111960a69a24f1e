"""A feed and a client in one process: watch events arrive, and a reconnect.

Starts a FeedServer on a free loopback port, connects a chatfeed.Client to it,
pushes a short conversation, restarts the server half-way (the client
reconnects by itself), and prints a one-line summary.

Run it with ``python examples/demo.py``.
"""

from __future__ import annotations

import asyncio
import secrets
import sys

import chatfeed
from chatfeed.testing import FeedServer

CONVERSATION = [
    ("user", "What is the tallest mountain in Europe?"),
    ("assistant", "Mount Elbrus, in the Caucasus, at 5,642 metres."),
    ("user", "And in the Alps?"),
    ("assistant", "Mont Blanc, at about 4,806 metres."),
]


async def main() -> int:
    token = secrets.token_urlsafe(16)
    received = 0
    everything_received = asyncio.Event()
    reconnects = 0
    away = 0.0

    async with FeedServer(tokens=[token]) as server:
        client = chatfeed.Client(server.url, token=token, reconnect=chatfeed.Backoff(initial=0.2, maximum=1.0))

        @client.on("connected")
        def on_connected(event: chatfeed.Connected) -> None:
            nonlocal reconnects, away
            if event.is_reconnect:
                reconnects += 1
                away += event.downtime or 0.0
                print(f"-- reconnected after {event.downtime:.2f} s away (re-fetch over REST here)")
            else:
                print(f"-- connected to {server.url}")

        @client.on("disconnected")
        def on_disconnected(event: chatfeed.Disconnected) -> None:
            print(f"-- disconnected: code {event.code}, retrying in {event.retry_in or 0:.2f} s")

        @client.on("new_chat")
        def on_chat(event: chatfeed.NewChat) -> None:
            nonlocal received
            received += 1
            print(f"new chat {event.payload.id}: {event.payload.title}")

        @client.on("new_message")
        async def on_message(event: chatfeed.NewMessage) -> None:
            nonlocal received
            received += 1
            message = event.payload
            print(f"[chat {message.chat_id}] {message.role}: {message.content}")
            if message.content == CONVERSATION[-1][1]:
                everything_received.set()

        async with client:
            chat = await server.push_chat(title=CONVERSATION[0][1])
            for index, (role, content) in enumerate(CONVERSATION):
                if index == 2:
                    await server.restart()
                    await server.wait_for_clients()
                await server.push_message(chat_id=chat.id, role=role, content=content, precis=content[:24])
            await asyncio.wait_for(everything_received.wait(), timeout=10)

    print(f"summary: {received} events received, {reconnects} reconnect(s), {away:.2f} s away")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""Backfill: after a reconnect, fetch over REST what the feed pushed during the gap.

The feed has no replay: what is pushed while the client is disconnected never
arrives over the WebSocket. This program keeps a local view of the messages
and, on ``Connected`` with ``is_reconnect=True``, re-fetches what was created
since the connection was lost from the backend's REST API (here, a function
over the list of messages the server pushed).

Starts its own FeedServer on a free loopback port, stops it (a deploy) and
pushes two messages while it is down; all messages end up in the view. Run it
with ``python examples/backfill.py``.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timedelta, timezone

import chatfeed
from chatfeed.testing import FeedServer

TOKEN = "dev-token"
# The client learns of the loss a moment after the backend, and clocks differ:
# fetch from a little earlier; the view is keyed by id, so an overlap is harmless.
MARGIN = timedelta(seconds=1)


async def main() -> int:
    history: list[chatfeed.Message] = []  # the backend's database: everything it pushed
    view: dict[str, chatfeed.Message] = {}
    changed = asyncio.Condition()

    def rest_messages_since(since: datetime) -> list[chatfeed.Message]:
        return [message for message in history if message.created_at >= since]  # GET /messages?since=...

    async def add(messages: list[chatfeed.Message]) -> int:
        async with changed:
            new = [message for message in messages if message.id not in view]
            view.update((message.id, message) for message in new)
            changed.notify_all()
        return len(new)

    async def until_view_has(count: int) -> None:
        async with changed:
            await asyncio.wait_for(changed.wait_for(lambda: len(view) >= count), timeout=10)

    async with FeedServer(tokens=[TOKEN]) as server:
        client = chatfeed.Client(server.url, token=TOKEN, reconnect=chatfeed.Backoff(initial=0.1, maximum=0.5))

        @client.on("new_message")
        async def live(event: chatfeed.NewMessage) -> None:
            await add([event.payload])

        # Handlers run before the new connection delivers anything, so the gap is filled first.
        @client.on("connected")
        async def backfill(event: chatfeed.Connected) -> None:
            if event.is_reconnect and event.downtime is not None:
                lost_at = datetime.now(timezone.utc) - timedelta(seconds=event.downtime)
                recovered = await add(rest_messages_since(lost_at - MARGIN))
                print(f"-- reconnected after {event.downtime:.2f} s: {recovered} message(s) recovered over REST")

        async def push(*contents: str) -> None:
            for content in contents:
                history.append(await server.push_message(chat_id="1", role="user", content=content))

        async with client:
            await push("1: live", "2: live")
            await until_view_has(2)
            await server.stop()  # the client sees 1001 (going away) and retries with backoff
            await push("3: pushed while disconnected", "4: pushed while disconnected")
            await server.start()
            await until_view_has(4)
            await push("5: live again", "6: live again")
            await until_view_has(6)

    for message in sorted(view.values(), key=lambda message: message.created_at):
        print(f"view: {message.content}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

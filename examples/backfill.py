"""Backfill: after a reconnect, what the feed pushed during the gap is delivered first, and only once.

The feed has no replay: what is pushed while the client is disconnected never
arrives over the WebSocket. ``backfill=`` gives the client a function that
fetches it from the backend's REST API (here, from the server's history).
After every reconnect, the client calls it with the gap, delivers what it
returns to the handlers, oldest first, with ``event.source == "backfill"``,
and only then reads the new connection. It fetches from a little before the
gap, to be safe; ``dedupe=True`` drops what was delivered already.

Starts its own FeedServer on a free loopback port, stops it (a deploy) and
pushes two messages while it is down; every message is delivered once. Run it
with ``python examples/backfill.py``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import timedelta

import chatfeed
from chatfeed.testing import FeedServer

TOKEN = "dev-token"
# The client learns of the loss a moment after the backend, and clocks differ:
# fetch from a little earlier; dedupe drops the overlap.
MARGIN = timedelta(seconds=1)


async def main() -> int:
    delivered: list[chatfeed.Message] = []
    changed = asyncio.Condition()

    async def until_delivered(count: int) -> None:
        async with changed:
            await asyncio.wait_for(changed.wait_for(lambda: len(delivered) >= count), timeout=10)

    async with FeedServer(tokens=[TOKEN]) as server:

        async def fetch_missed(gap: chatfeed.Gap) -> AsyncIterator[chatfeed.Message | chatfeed.Chat]:
            """GET /messages?since=...: what was created since the last message delivered, and a little before."""
            since = None if gap.since is None else gap.since - MARGIN
            print(f"-- reconnected after {gap.downtime or 0.0:.2f} s: backfilling")
            for item in server.history(since=since):
                yield item

        client = chatfeed.Client(
            server.url,
            token=TOKEN,
            reconnect=chatfeed.Backoff(initial=0.1, maximum=0.5),
            backfill=fetch_missed,
            dedupe=True,
        )

        @client.on("new_message")
        async def store(event: chatfeed.NewMessage) -> None:
            async with changed:
                delivered.append(event.payload)
                changed.notify_all()
            print(f"{event.source:<8}  {event.payload.content}")

        async def push(*contents: str) -> None:
            for content in contents:
                await server.push_message(chat_id="1", role="user", content=content)

        async with client:
            await push("1: live", "2: live")
            await until_delivered(2)
            await server.stop()  # the client sees 1001 (going away) and retries with backoff
            await push("3: pushed while disconnected", "4: pushed while disconnected")
            await server.start()
            await until_delivered(4)
            await push("5: live again", "6: live again")
            await until_delivered(6)
            statistics = client.statistics()

    ids = [message.id for message in delivered]
    once = "each once" if len(set(ids)) == len(ids) else "SOME TWICE"
    print(
        f"summary: {len(ids)} messages delivered, {once}; {statistics.backfilled_events} from backfill, "
        f"{statistics.duplicates_dropped} duplicate(s) dropped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

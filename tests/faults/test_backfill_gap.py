"""A two-second outage of the network path, healed by backfill and dedupe: every message once, each chat in order.

The feed server sits behind a :class:`~tests.faults.proxy.FaultProxy` that
drops every byte for about two seconds (a dead path: the client learns of it
from its keepalive) while the server goes on pushing, as a live backend does,
and records what it pushes in its history: the client's backfill source.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import pytest

import chatfeed
from chatfeed.testing import FeedServer, make_message

from ..conftest import MS
from ..integration.conftest import Recorder, make_client, running
from .proxy import FaultProxy

T0 = datetime(2025, 10, 7, 12, 0, tzinfo=timezone.utc)
TOTAL = 500
CHATS = 20
BEFORE = 50
"""Messages pushed, and delivered, before the path goes dead."""
DURING = 400
"""Messages pushed while it is dead, spread over the outage."""
OUTAGE = 2000 * MS
"""How long the path stays dead: the scenario, not a wait for something."""


@pytest.mark.timeout(60)
async def test_a_two_second_outage_is_backfilled_every_message_once_and_each_chat_in_order(
    server: FeedServer, proxy: FaultProxy
) -> None:
    rng = random.Random(TOTAL)
    messages = [
        make_message(
            id=f"m{index}",
            chat_id=f"chat-{rng.randrange(CHATS)}",
            content=str(index),
            created_at=T0 + timedelta(milliseconds=index),
        )
        for index in range(TOTAL)
    ]
    during = messages[BEFORE : BEFORE + DURING]
    after = messages[BEFORE + DURING :]
    ping = 100 * MS
    client = make_client(
        proxy.url,
        ping_interval=ping,
        ping_timeout=ping,
        # Attempts made while the path is dead hang until this, then retry.
        open_timeout=300 * MS,
        backfill=lambda gap: server.history(since=gap.since),
        dedupe=True,
    )
    received = Recorder()
    client.on("new_message")(received)
    connected = Recorder()
    client.on("connected")(connected)
    loop = asyncio.get_running_loop()

    async with running(client):
        await connected.wait_for(1)
        for message in messages[:BEFORE]:
            await server.push_message(message)
        await received.wait_for(BEFORE)

        proxy.blackhole()
        cut_at = loop.time()
        for index, message in enumerate(during, start=1):
            await server.push_message(message)
            # Paced across the outage: the server does not wait for anyone.
            await asyncio.sleep(max(cut_at + OUTAGE * index / DURING - loop.time(), 0))
        proxy.pass_through()

        # Half while the client is still reconnecting, half once it is back.
        for message in after[: len(after) // 2]:
            await server.push_message(message)
        await connected.wait_for(2)
        for message in after[len(after) // 2 :]:
            await server.push_message(message)
        await received.wait_for(TOTAL)
        # Behind everything else on the live connection: once it is here, any
        # duplicate would have been delivered already.
        sentinel = await server.push_message(
            chat_id="chat-0", content="sentinel", created_at=T0 + timedelta(milliseconds=TOTAL)
        )
        await received.wait_for(TOTAL + 1)
        statistics = client.statistics()

    events = received.events
    assert isinstance(events[-1], chatfeed.NewMessage)
    assert events[-1].payload == sentinel
    payloads = [event.payload for event in events[:-1]]
    ids = [payload.id for payload in payloads]
    assert len(ids) == len(set(ids)), "a message was delivered twice"
    assert sorted(ids) == sorted(message.id for message in messages), "a message was lost"
    by_chat: dict[str, list[int]] = defaultdict(list)
    for payload in payloads:
        by_chat[payload.chat_id].append(int(payload.content))
    assert len(by_chat) == CHATS
    for chat_id, order in by_chat.items():
        assert order == sorted(order), f"{chat_id} out of order"
    # Created in the order they were pushed, so the whole feed is in order too.
    assert [int(payload.content) for payload in payloads] == list(range(TOTAL))

    sources = {event.payload.id: event.source for event in events}
    assert all(sources[message.id] == "live" for message in messages[:BEFORE])
    assert all(sources[message.id] == "backfill" for message in during), "pushed while the path was dead"
    backfilled = sum(source == "backfill" for source in sources.values())
    assert statistics.backfilled_events == backfilled > 0
    assert statistics.backfill_errors == 0
    assert statistics.duplicates_dropped >= 1  # at least the newest message before the cut, fetched again
    assert statistics.connections >= 2
    assert all(event.is_reconnect for event in connected.events[1:])

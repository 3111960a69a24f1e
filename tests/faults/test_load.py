"""A slow consumer of a large feed, and frames that inflate past max_size."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tracemalloc

import pytest
from websockets.asyncio.server import ServerConnection

from chatfeed.testing import FeedServer

from ..conftest import MS
from ..integration.conftest import Recorder, content, make_client, raw_server, running, url_of

TOTAL = 100_000
PAUSE = 1000 * MS
"""How long the consumer stops reading: the "slow" in slow consumer, not a synchronisation."""


@pytest.mark.timeout(120)
async def test_slow_consumer_of_100000_messages_gets_each_once_in_order_in_bounded_memory(
    server: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # not 400,000 frame records at DEBUG
    client = make_client(server.url)
    # Incompressible content, about 1 KiB a frame: together far more than the
    # kernel's socket buffers (tens of MiB) can absorb for the client.
    template = json.dumps(
        {
            "type": "new_message",
            "payload": {
                "id": "%d",
                "chatId": "1",
                "role": "assistant",
                "content": "%d",
                "precis": "%s",
                "createdAt": "2025-10-07T12:00:00.000Z",
            },
        }
    )

    async def push_all() -> None:
        for index in range(TOTAL):
            await server.send_raw(template % (index, index, os.urandom(500).hex()))

    async with client:
        stream = client.events(buffer=100)
        pusher = asyncio.create_task(push_all())
        received = [content(await anext(stream)) for _ in range(1000)]

        # The consumer stops reading while the server keeps pushing: what the
        # client holds meanwhile must not grow with what the server sends.
        tracemalloc.start()
        try:
            await asyncio.sleep(PAUSE)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        buffered = client.statistics().buffered_events
        assert not pusher.done(), "the server was never held back"

        async for event in stream:
            received.append(content(event))
            if len(received) == TOTAL:
                break
        await asyncio.wait_for(pusher, 10_000 * MS)

    assert received == [str(index) for index in range(TOTAL)]
    assert buffered <= 100
    # Unbounded buffering of the ~99,000 messages still to come would hold
    # well over 100 MB (raw frames plus models); bounded, it is the stream's
    # buffer, websockets' queue and the socket buffers.
    assert held < 16 * 2**20, f"{held / 2**20:.1f} MiB allocated while the consumer paused"


async def test_compressed_frame_that_inflates_past_max_size_closes_the_connection() -> None:
    negotiated: list[bool] = []

    async def handler(ws: ServerConnection) -> None:
        negotiated.append(bool(ws.protocol.extensions))
        await ws.recv()
        await ws.send(json.dumps({"type": "auth_success"}))
        if len(negotiated) == 1:
            # 4 MiB of one letter: a few kilobytes once deflated.
            await ws.send(json.dumps({"type": "error", "message": "a" * (4 * 2**20)}))
        else:
            await ws.send(json.dumps({"type": "error", "message": "small"}))
        await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server), compression="deflate")
        errors, lifecycle = Recorder(), Recorder()
        client.on("error")(errors)
        client.on("disconnected")(lifecycle)
        async with running(client):
            [event] = await errors.wait_for(1)
    assert negotiated[0], "permessage-deflate was not negotiated; the test proves nothing"
    assert event.message == "small"
    [lost] = lifecycle.events
    assert (lost.code, lost.will_retry) == (1009, True)
    assert lost.error.local

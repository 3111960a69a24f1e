"""Delivery: slow handlers inline against ordered concurrency, and what the duplicate window costs.

- ``concurrency``: a FeedServer on loopback pushes ``events`` new_message
  frames spread over ``chats`` chats; each handler call does ``work``
  seconds of (awaited) work, as a call to a model or a database would. The
  time from the first push to the last call finished, inline
  (``concurrency=1``) and with ``concurrency=8``; the order within each chat
  is checked on the way.
- ``dedupe``: the time ``dispatch`` takes per event through the duplicate
  window against without it, and the memory of a full window, in-process
  (no socket: it is the window's own cost).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import time
import tracemalloc
from datetime import datetime, timezone
from typing import Any

import chatfeed
from chatfeed._delivery import Delivery
from chatfeed.testing import FeedServer

TOKEN = "benchmark-token"


async def _handle_all(events: int, chats: int, work: float, concurrency: int) -> float:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = chatfeed.Client(server.url, token=TOKEN)
        seen: dict[str, list[int]] = collections.defaultdict(list)
        finished = asyncio.Event()
        options: dict[str, Any] = {"concurrency": concurrency} if concurrency > 1 else {}

        @client.on("new_message", **options)
        async def handle(event: chatfeed.NewMessage) -> None:
            await asyncio.sleep(work)
            message = event.payload
            seen[message.chat_id].append(int(message.content))
            if sum(map(len, seen.values())) == events:
                finished.set()

        async with client:
            started = time.perf_counter()
            for number in range(events):
                await server.push_message(chat_id=str(number % chats), content=str(number))
            await finished.wait()
            elapsed = time.perf_counter() - started
        for numbers in seen.values():
            assert numbers == sorted(numbers), "order within a chat was lost"
        return elapsed


def measure_concurrency(events: int, chats: int, work: float) -> dict[str, float]:
    """Seconds to handle ``events`` slow calls over ``chats`` chats, inline and with ``concurrency=8``."""
    inline = asyncio.run(_handle_all(events, chats, work, concurrency=1))
    concurrent = asyncio.run(_handle_all(events, chats, work, concurrency=8))
    return {
        "events": events,
        "chats": chats,
        "work_ms": work * 1000,
        "inline_seconds": inline,
        "concurrency_8_seconds": concurrent,
        "speedup": inline / concurrent,
    }


_MESSAGE = chatfeed.Message(
    id="0", chat_id="1", role="assistant", created_at=datetime(2025, 10, 7, tzinfo=timezone.utc)
)


def _event(number: int) -> chatfeed.NewMessage:
    payload = _MESSAGE.model_copy(update={"id": str(number)})
    return chatfeed.NewMessage.model_construct(type="new_message", payload=payload)


def measure_dedupe(events: int) -> dict[str, float]:
    """Microseconds per event through ``dispatch`` with and without the window; KiB of a full window."""

    def nothing(event: Any) -> None:
        return None

    batch = [_event(number) for number in range(events)]
    timings: dict[str, list[float]] = {"plain": [], "dedupe": []}
    for _ in range(3):
        for name in timings:
            dispatch = nothing if name == "plain" else Delivery(nothing, chatfeed.Dedupe(max_ids=10_000), None).dispatch
            started = time.perf_counter()
            for event in batch:
                dispatch(event)
            timings[name].append((time.perf_counter() - started) / events * 1e6)
    del batch
    # Events made and dropped one by one, as the feed does: what stays is the window's.
    window = chatfeed.Dedupe()
    gc.collect()
    tracemalloc.start()
    delivery = Delivery(nothing, window, None)
    before = tracemalloc.get_traced_memory()[0]
    for number in range(window.max_ids):
        delivery.dispatch(_event(number))
    full = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {
        "plain_us_per_event": min(timings["plain"]),
        "dedupe_us_per_event": min(timings["dedupe"]),
        "window_ids": window.max_ids,
        "window_kib": full / 1024,
        "bytes_per_id": full / window.max_ids,
    }

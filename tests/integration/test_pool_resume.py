"""Pool.add(..., backfill_since=): each feed resumes from its own time after its first connection."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

import chatfeed
from chatfeed import Gap
from chatfeed.testing import FeedServer

from .conftest import WAIT

USERS = {"token-a": "a", "token-b": "b", "token-c": "c"}


async def test_each_feed_backfills_from_its_own_time_and_the_others_from_the_pools() -> None:
    gaps: dict[str | None, Gap] = {}
    every_gap = asyncio.Event()

    def backfill(gap: Gap) -> list[chatfeed.Message]:
        gaps[gap.feed] = gap
        if len(gaps) == 2:
            every_gap.set()
        return []

    since_a = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    since_b = datetime(2026, 6, 1, tzinfo=timezone(timedelta(hours=2)))
    async with FeedServer(users=USERS) as server:
        pool = chatfeed.Pool(server.url, backfill=backfill)
        pool.add("a", token="token-a", backfill_since=since_a)
        pool.add("b", token="token-b", backfill_since=since_b)
        pool.add("c", token="token-c")  # the pool has no backfill_since: no first backfill for it
        async with pool:
            await asyncio.wait_for(every_gap.wait(), WAIT)
    assert set(gaps) == {"a", "b"}
    assert (gaps["a"].since, gaps["a"].is_reconnect, gaps["a"].downtime) == (since_a, False, None)
    assert gaps["b"].since == since_b


async def test_backfill_since_needs_an_aware_time_and_the_pools_backfill() -> None:
    pool = chatfeed.Pool("ws://127.0.0.1:9")
    with pytest.raises(chatfeed.UsageError, match="needs backfill"):
        pool.add("a", token="t", backfill_since=datetime.now(timezone.utc))
    with_backfill = chatfeed.Pool("ws://127.0.0.1:9", backfill=lambda gap: [])
    with pytest.raises(chatfeed.UsageError, match="timezone-aware"):
        with_backfill.add("a", token="t", backfill_since=datetime(2026, 1, 1))
    with pytest.raises(chatfeed.UsageError, match="timezone-aware"):
        with_backfill.add("a", token="t", backfill_since="2026-01-01")  # type: ignore[arg-type]
    assert "a" not in with_backfill

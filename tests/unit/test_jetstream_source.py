"""The JetStream source's reading of nats-py's answers, without a server."""

from __future__ import annotations

import asyncio

import pytest

from chatfeed.bridge import JetStreamSource


class _Subscription:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def fetch(self, count: int, timeout: float) -> list[object]:
        raise self.error


@pytest.mark.parametrize("error", [asyncio.TimeoutError(), "nats"], ids=["asyncio", "nats"])
async def test_a_fetch_that_times_out_either_way_is_nothing_new_not_a_broker_failure(error: object) -> None:
    # nats-py's fetch raises its own TimeoutError, or asyncio's when its deadline runs out first:
    # the second once made an idle consumer warn that fetching failed and mark the broker down.
    if error == "nats":
        import nats.errors

        error = nats.errors.TimeoutError()
    assert isinstance(error, BaseException)
    source = JetStreamSource("nats://127.0.0.1:9", "idle")
    source._subscription = _Subscription(error)
    assert await source.fetch(10) == []


async def test_a_fetch_that_fails_otherwise_raises() -> None:
    source = JetStreamSource("nats://127.0.0.1:9", "idle")
    source._subscription = _Subscription(ConnectionError("gone"))
    with pytest.raises(ConnectionError):
        await source.fetch(10)

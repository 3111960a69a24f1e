"""A broker's URL is checked before any connection, and what a closing bridge says of what it could not publish."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import pytest

import chatfeed
from chatfeed.bridge import (
    Bridge,
    BrokerUnavailableError,
    JetStreamCoordinator,
    JetStreamSink,
    JetStreamSource,
    Record,
    RedisCoordinator,
    RedisStreamSink,
    RedisStreamSource,
)
from chatfeed.bridge.testing import RedisServer
from chatfeed.exceptions import UsageError
from chatfeed.testing import FeedServer

from ..conftest import TOKEN
from ..integration.conftest import WAIT, free_port

OPENERS: dict[str, Callable[[Any], Any]] = {
    "redis sink": lambda url: RedisStreamSink(url),
    "redis source": lambda url: RedisStreamSource(url, "durable"),
    "redis group": lambda url: RedisCoordinator(url, "g"),
    "nats sink": lambda url: JetStreamSink(url),
    "nats source": lambda url: JetStreamSource(url, "durable"),
    "nats group": lambda url: JetStreamCoordinator(url, "g"),
}

PORT = free_port()  # nothing listens there: a URL that got through would be retried as a broker away

BAD_URLS = {
    "redis": {
        f"redis://:hunter2pw@127.0.0.1:{PORT}/abc": "its database, after the port, is not a number",
        f"redis://127.0.0.1:{PORT}/0/1": "its database, after the port, is not a number",
        "redis://127.0.0.1:notaport/0": "its port is not a number from 1 to 65535",
        "redis://127.0.0.1:99999/0": "its port is not a number from 1 to 65535",
        "redis://127.0.0.1:0/0": "its port is not a number from 1 to 65535",
        "redis:///0": "it has no host",
        "redis://[::1/0": "its host cannot be read",
        "REDIS://127.0.0.1/0": "its scheme must be lowercase",
        f"http://127.0.0.1:{PORT}": "it starts with redis://, rediss:// or unix://",
        "unix://": "it has no socket path",
    },
    "nats": {
        "nats://": "it has no host",
        "nats://user:hunter2pw@127.0.0.1:notaport": "its port is not a number from 1 to 65535",
        "nats://127.0.0.1:65536": "its port is not a number from 1 to 65535",
        "tls://[::1": "its host cannot be read",
        "Nats://127.0.0.1": "its scheme must be lowercase",
        f"127.0.0.1:{PORT}": "it starts with nats://, tls://, ws:// or wss://",
    },
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("opener", sorted(OPENERS))
async def test_a_malformed_url_is_a_usage_error_before_any_connection(opener: str) -> None:
    kind = opener.split()[0]
    for url, problem in BAD_URLS[kind].items():
        subject = OPENERS[opener](url)
        with pytest.raises(UsageError) as raised:
            await asyncio.wait_for(subject.open(), 1.0)  # not retried for a broker away
        assert problem in str(raised.value), (url, raised.value)
        assert "hunter2pw" not in str(raised.value)
        assert len(str(raised.value).splitlines()) == 1
    if kind == "nats":
        with pytest.raises(UsageError, match=r"^a NATS URL names one server, not a comma-separated list$"):
            await OPENERS[opener](f"nats://u:hunter2pw@127.0.0.1:{PORT},nats://u:pw@127.0.0.1:1").open()
    with pytest.raises(UsageError, match="is a str, not int"):
        await OPENERS[opener](4222).open()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("opener", sorted(OPENERS))
async def test_a_well_formed_url_of_no_broker_is_a_broker_away(opener: str) -> None:
    kind = opener.split()[0]
    good = {"redis": f"redis://127.0.0.1:{PORT}", "nats": f"nats://127.0.0.1:{PORT}"}[kind]
    for url in (good, good + ("/3" if kind == "redis" else "/"), good.replace("127.0.0.1", "[::1]")):
        with pytest.raises(BrokerUnavailableError):
            await OPENERS[opener](url).open()


@pytest.mark.timeout(10)
async def test_a_redis_url_with_a_database_that_is_not_a_number_is_refused_not_read_as_database_0(
    redis_session: RedisServer,
) -> None:
    sink = RedisStreamSink(redis_session.url.rsplit("/", 1)[0] + "/abc")  # redis-py alone connects to database 0
    try:
        with pytest.raises(UsageError, match="its database, after the port, is not a number"):
            await sink.open()
    finally:
        await sink.close()


class _StuckSink:
    """A broker that never acknowledges a publish."""

    async def open(self) -> None:
        pass

    async def publish(self, record: Record) -> bool:
        await asyncio.get_running_loop().create_future()
        raise AssertionError("never acknowledged")

    async def load_watermarks(self, feeds: Sequence[str]) -> dict[str, datetime]:
        return {}

    async def save_watermarks(self, marks: Mapping[str, datetime]) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.mark.timeout(10)
@pytest.mark.parametrize("backfill", [True, False])
async def test_closing_with_unpublished_events_says_whether_a_restart_fetches_them(
    backfill: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async with FeedServer(users={TOKEN: "u1"}) as server:

        def fetch(gap: chatfeed.Gap) -> list[chatfeed.Message | chatfeed.Chat]:
            return server.history(gap.since, user_id=gap.feed)

        pool = chatfeed.Pool(server.url, backfill=fetch if backfill else None)
        pool.add("one", token=TOKEN)
        bridge = Bridge(pool, _StuckSink(), drain_timeout=0.05)
        await bridge.start()
        await server.push_message(id="m1", chat_id="c1", user_id="u1")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while not bridge.statistics().held:  # the bridge's own counter: no event to wait on
            assert loop.time() < deadline, "the event never reached the bridge"
            await asyncio.sleep(0.005)
        with caplog.at_level(logging.WARNING, logger="chatfeed.bridge"):
            await bridge.close()
    [said] = [record.getMessage() for record in caplog.records if "were not published" in record.getMessage()]
    assert said.startswith("1 event(s) were not published before the bridge closed; the saved watermarks are older")
    if backfill:
        assert said.endswith("so a bridge started again backfills them")
    else:
        assert said.endswith("so a bridge started again with a backfill function fetches them (this one has none)")

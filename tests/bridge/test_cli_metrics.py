"""``chatfeed bridge --metrics`` and ``chatfeed consume --metrics``: real processes, a real broker, real scrapes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from chatfeed.bridge.testing import NatsServer, RedisServer
from chatfeed.testing import FeedServer

from ..conftest import MS, OTHER_TOKEN, SECRET, TOKEN
from ..integration._probe import CLI_WAIT, Response, command, http_get, poll
from ..integration.test_cli import write_tokens

pytestmark = pytest.mark.timeout(60)

POLL = 20 * MS
"""How often a test asks another process's metrics server: it is polled."""


@pytest.fixture
async def users_server() -> AsyncIterator[FeedServer]:
    async with FeedServer(users={TOKEN: "u1", OTHER_TOKEN: "u2"}) as server:
        yield server


def has(*lines: str) -> Callable[[Response], bool]:
    """An answer's condition: a 200 whose body has each of ``lines``."""

    def holds(answer: Response) -> bool:
        return answer.status == 200 and all(line in answer.text.splitlines() for line in lines)

    return holds


@pytest.mark.parametrize("kind", ["nats", "redis"])
async def test_bridge_and_consume_serve_metrics_and_readiness(
    kind: str, users_server: FeedServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    tag = secrets.token_hex(4)
    if kind == "nats":
        nats: NatsServer = request.getfixturevalue("nats_session")
        url, options = nats.url, ["--stream", f"M_{tag}", "--prefix", f"m{tag}"]
    else:
        redis: RedisServer = request.getfixturevalue("redis_session")
        url, options = redis.url, ["--prefix", f"m{tag}", "--partitions", "2"]
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"first": TOKEN, "second": OTHER_TOKEN})
    bridge_args = ["bridge", users_server.url, "--tokens", str(tokens), "--to", url, *options]
    async with command(*bridge_args, "--metrics", "127.0.0.1:0") as bridge:
        port = await bridge.metrics_port()
        ready = await poll(port, "/readyz", lambda answer: answer.status == 200, every=POLL, timeout=CLI_WAIT)
        assert ready.text == "ready: 2 of 2 feeds up (need 90%)\n"
        assert (await http_get(port, "/healthz")).status == 200
        await users_server.push_message(content="for the log", user_id="u1")
        metrics = await poll(
            port,
            "/metrics",
            has('chatfeed_bridge_published_total{stored="true"} 1.0', "chatfeed_bridge_broker_up 1.0"),
            every=POLL,
            timeout=CLI_WAIT,
        )
        assert 'chatfeed_feeds{state="open"} 2.0' in metrics.text
        assert 'chatfeed_events_received_total{type="new_message"} 1.0' in metrics.text
        # A bridge's feeds may be thousands: no series per feed.
        assert "chatfeed_last_event_age_seconds " in metrics.text
        assert 'feed="' not in metrics.text

        async with command("consume", url, "--durable", f"d{tag}", *options, "--metrics", ":0") as consume:
            consumer_port = await consume.metrics_port()
            ready = await poll(
                consumer_port, "/readyz", lambda answer: answer.status == 200, every=POLL, timeout=CLI_WAIT
            )
            assert ready.text == "ready: consuming\n"
            consumed = await poll(
                consumer_port,
                "/metrics",
                has("chatfeed_consumer_acknowledged_total 1.0", "chatfeed_consumer_in_flight 0.0"),
                every=POLL,
                timeout=CLI_WAIT,
            )
            assert 'chatfeed_events_received_total{type="new_message"} 1.0' in consumed.text
            status, consume_err = await consume.stop()
        assert status == 0, consume_err
        status, bridge_err = await bridge.stop()
    assert status == 0, bridge_err
    assert SECRET not in bridge_err + consume_err + metrics.text

"""Reconnection: what is retried, what is final, and how long the client waits."""

from __future__ import annotations

import asyncio
import re

import pytest

import chatfeed
from chatfeed._policy import TRY_AGAIN_LATER_DELAY
from chatfeed.testing import FeedServer

from ..conftest import FAST, MS, TOKEN
from .conftest import WAIT, Recorder, free_port, make_client, running, watch_log


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012, 1014, 3000, 4000, 4499])
async def test_retryable_close_codes_reconnect(server: FeedServer, code: int) -> None:
    client = make_client(server.url)
    lifecycle = Recorder()
    client.on("connected")(lifecycle)
    client.on("disconnected")(lifecycle)
    async with running(client):
        await lifecycle.wait_for(1)
        await server.close_connections(code, "bye")
        await lifecycle.wait_for(3)
    lost = lifecycle.events[1]
    assert (lost.code, lost.reason, lost.will_retry) == (code, "bye", True)
    assert lifecycle.events[2].is_reconnect


@pytest.mark.parametrize("code", [1002, 1003, 1007, 1008, 1009, 1010, 3500, 4500, 4999])
async def test_fatal_close_codes_stop_with_a_typed_error(server: FeedServer, code: int) -> None:
    client = make_client(server.url)
    lifecycle = Recorder()
    client.on("disconnected")(lifecycle)
    async with running(client) as task:
        await server.wait_for_clients()
        await server.close_connections(code, "go away")
        with pytest.raises(chatfeed.ConnectionLostError) as caught:
            await asyncio.wait_for(asyncio.shield(task), WAIT)
    assert (caught.value.code, caught.value.reason, caught.value.local) == (code, "go away", False)
    [lost] = lifecycle.events
    assert (lost.code, lost.will_retry, lost.retry_in) == (code, False, None)
    assert server.handshakes == 1


async def test_try_again_later_waits_at_least_a_few_seconds(server: FeedServer) -> None:
    client = make_client(server.url)
    lifecycle = Recorder()
    client.on("disconnected")(lifecycle)
    async with running(client):
        await server.wait_for_clients()
        await server.close_connections(1013, "overloaded")
        [lost] = await lifecycle.wait_for(1)
    assert lost.will_retry
    assert lost.retry_in >= TRY_AGAIN_LATER_DELAY


async def test_server_down_at_start_up_is_retried_after_refused_connections() -> None:
    port = free_port()
    client = make_client(f"ws://127.0.0.1:{port}")
    connected = Recorder()
    client.on("connected")(connected)
    with watch_log("reconnecting in") as retries:
        async with running(client) as task:
            await retries.counter.wait_for(2)  # two refused attempts, for sure
            assert not task.done()
            async with FeedServer(tokens=[TOKEN], port=port) as server:
                [first] = await connected.wait_for(1)
                assert server.clients == 1
    assert all("could not connect" in message for message in retries.messages[:2])
    assert first == chatfeed.Connected(is_reconnect=False, downtime=None)


async def test_without_reconnect_the_first_failure_raises() -> None:
    client = make_client(f"ws://127.0.0.1:{free_port()}", reconnect=False)
    with pytest.raises(chatfeed.ConnectError, match="could not connect"):
        await asyncio.wait_for(client.run(), WAIT)


async def test_without_reconnect_a_lost_connection_ends_run(server: FeedServer) -> None:
    client = make_client(server.url, reconnect=False)
    async with running(client) as task:
        await server.wait_for_clients()
        server.drop_connections()
        with pytest.raises(chatfeed.ConnectionLostError) as caught:
            await asyncio.wait_for(asyncio.shield(task), WAIT)
    assert caught.value.code == 1006
    assert server.handshakes == 1


async def test_max_attempts_counts_failed_attempts_not_quick_restarts(server: FeedServer) -> None:
    # A rolling deploy: the server takes each connection and drops it soon
    # after, more times than max_attempts. Each of those connections did
    # authenticate, so none is a failed attempt and the client goes on.
    backoff = chatfeed.Backoff(initial=MS, maximum=5 * MS, reset_after=1000 * MS, max_attempts=2)
    client = make_client(server.url, reconnect=backoff)
    connected = Recorder()
    client.on("connected")(connected)
    task = asyncio.create_task(client.run())
    try:
        for restart in range(1, 5):
            await connected.wait_for(restart)
            await server.close_connections(1012, "restarting")
        await connected.wait_for(5)
        assert not task.done()
        # Now the server is gone: two failed attempts in a row end the run.
        await server.stop()
        with pytest.raises(chatfeed.ConnectError):
            await asyncio.wait_for(task, WAIT)
    finally:
        await client.close()


async def test_max_attempts_gives_up_with_the_last_error() -> None:
    client = make_client(
        f"ws://127.0.0.1:{free_port()}", reconnect=chatfeed.Backoff(initial=MS, maximum=MS, max_attempts=3)
    )
    with pytest.raises(chatfeed.ConnectError):
        await asyncio.wait_for(client.run(), WAIT)


async def test_http_5xx_is_retried(server: FeedServer) -> None:
    server.reject_handshakes(503, times=2)
    client = make_client(server.url)
    async with client:
        assert client.connected
    assert server.handshakes == 1  # the two rejected ones never became WebSocket connections


async def test_http_429_honours_retry_after(server: FeedServer, caplog: pytest.LogCaptureFixture) -> None:
    server.reject_handshakes(429, headers={"Retry-After": "1"})
    client = make_client(server.url)
    async with client:
        assert client.connected
    delays = [float(match) for match in re.findall(r"reconnecting in ([0-9.]+) s", caplog.text)]
    assert delays == [1.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_http_4xx_is_final(server: FeedServer, status: int) -> None:
    server.reject_handshakes(status)
    client = make_client(server.url)
    with pytest.raises(chatfeed.HandshakeError) as caught:
        await asyncio.wait_for(client.run(), WAIT)
    assert caught.value.status_code == status


def attempts_logged(text: str) -> list[int]:
    return [int(match) for match in re.findall(r"\(attempt (\d+)\)", text)]


@pytest.mark.parametrize(
    ("reset_after", "attempts"),
    [(60_000 * MS, [1, 2, 3, 4]), (0.0, [1, 1, 1, 1])],
    ids=["drops-at-once-keep-growing", "stable-connections-reset"],
)
async def test_backoff_resets_only_after_a_stable_connection(
    server: FeedServer, caplog: pytest.LogCaptureFixture, reset_after: float, attempts: list[int]
) -> None:
    # A server that accepts, authenticates, then drops at once, over and over.
    client = make_client(server.url, reconnect=chatfeed.Backoff(initial=MS, maximum=5 * MS, reset_after=reset_after))

    @client.on("connected")
    def drop_at_once(event: chatfeed.Connected) -> None:
        server.drop_connections()

    connected = Recorder()
    client.on("connected")(connected)
    async with running(client):
        await connected.wait_for(5)
    assert attempts_logged(caplog.text)[:4] == attempts


async def test_dead_peer_is_detected_by_ping_and_replaced(server: FeedServer) -> None:
    # A close_timeout far beyond the ping budget: if the client waited for the
    # dead peer's closing handshake, the reconnect would come too late.
    ping = 100 * MS
    client = make_client(server.url, ping_interval=ping, ping_timeout=ping, close_timeout=10_000 * MS)
    lifecycle = Recorder()
    client.on("connected")(lifecycle)
    client.on("disconnected")(lifecycle)
    loop = asyncio.get_running_loop()
    async with running(client):
        await lifecycle.wait_for(1)
        server.freeze_connections()
        frozen_at = loop.time()
        await lifecycle.wait_for(3)
        back_after = loop.time() - frozen_at
    lost = lifecycle.events[1]
    assert lost.code == 1006
    assert lost.error.local
    assert "pong" in lost.reason
    assert back_after < 2 * ping + 1000 * MS


async def test_keepalive_leaves_a_live_connection_alone(server: FeedServer) -> None:
    ping = 50 * MS
    client = make_client(server.url, ping_interval=ping, ping_timeout=ping)
    lifecycle = Recorder()
    client.on("disconnected")(lifecycle)
    seen = Recorder()
    client.on("new_message")(seen)
    async with running(client):
        await server.wait_for_clients()
        for _ in range(20):
            await server.push_message()
            await asyncio.sleep(ping / 2)  # a paced feed spanning several ping periods
        await seen.wait_for(20)
    assert lifecycle.events == []
    assert server.handshakes == 1


async def test_reconnect_logs_each_retry_at_info_with_its_delay(
    server: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(server.url, reconnect=FAST)
    connected = Recorder()
    client.on("connected")(connected)
    async with running(client):
        await connected.wait_for(1)
        server.drop_connections()
        await connected.wait_for(2)
    [record] = [r for r in caplog.records if r.name == "chatfeed" and "reconnecting in" in r.getMessage()]
    assert record.levelname == "INFO"

"""Starting, closing and cancelling: prompt, and nothing left behind."""

from __future__ import annotations

import asyncio
import logging

import pytest

import chatfeed
from chatfeed.testing import FeedServer

from ..conftest import SECRET, TOKEN
from .conftest import WAIT, Recorder, chatfeed_tasks, make_client, running, tcp_server


async def close_promptly(client: chatfeed.Client) -> None:
    await asyncio.wait_for(client.close(), 1.0)
    assert chatfeed_tasks() == []
    assert client.statistics().state == "closed"


async def test_close_while_opening_the_connection() -> None:
    async with tcp_server(lambda writer: None) as (url, accepted):
        client = make_client(url, open_timeout=30.0)
        async with running(client):
            await accepted.wait_for(1)  # the client is now stuck in the WebSocket handshake
            await close_promptly(client)


async def test_close_while_authenticating(server: FeedServer) -> None:
    server.silent = True
    client = make_client(server.url, auth_timeout=30.0)
    async with running(client):
        await server.wait_for_auth_frames(1)  # the client now waits for the answer
        await close_promptly(client)


async def test_close_while_backing_off(server: FeedServer) -> None:
    client = make_client(server.url)
    lifecycle = Recorder()
    client.on("disconnected")(lifecycle)
    async with running(client):
        await server.wait_for_clients()
        await server.close_connections(1013, "overloaded")  # a wait of at least 5 s
        [lost] = await lifecycle.wait_for(1)
        assert lost.will_retry
        await close_promptly(client)


async def test_close_while_a_handler_is_running(server: FeedServer) -> None:
    client = make_client(server.url)
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    @client.on("new_message")
    async def slow(event: chatfeed.NewMessage) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with running(client):
        await server.wait_for_clients()
        await server.push_message()
        await asyncio.wait_for(entered.wait(), WAIT)
        await close_promptly(client)
    assert cancelled.is_set()


async def test_close_from_inside_a_handler(server: FeedServer) -> None:
    client = make_client(server.url)

    @client.on("new_message")
    async def stop(event: chatfeed.NewMessage) -> None:
        await client.close()

    async with running(client) as task:
        await server.wait_for_clients()
        await server.push_message()
        await asyncio.wait_for(asyncio.shield(task), WAIT)
    assert task.result() is None
    assert chatfeed_tasks() == []


async def test_close_ends_every_iterator(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        streams = [client.events() for _ in range(3)]

        async def drain(stream: chatfeed.EventStream[chatfeed.FeedEvent]) -> int:
            return len([event async for event in stream])

        consumers = [asyncio.create_task(drain(stream)) for stream in streams]
        await asyncio.sleep(0)
        await client.close()
        assert await asyncio.wait_for(asyncio.gather(*consumers), WAIT) == [0, 0, 0]


async def test_fatal_error_ends_iterators_with_that_error(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        stream = client.events()
        await server.close_connections(1008, "policy")
        with pytest.raises(chatfeed.ConnectionLostError):
            await asyncio.wait_for(anext(stream), WAIT)


async def test_cancelling_run_closes_the_client(server: FeedServer) -> None:
    client = make_client(server.url)
    task = asyncio.create_task(client.run())
    await server.wait_for_clients()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert chatfeed_tasks() == []
    assert client.statistics().state == "closed"
    await server.wait_for_clients(0)


async def test_cancelling_async_with_while_connecting_closes_the_client(server: FeedServer) -> None:
    server.silent = True
    client = make_client(server.url, auth_timeout=30.0)

    async def enter() -> None:
        async with client:
            pytest.fail("never authenticated")

    task = asyncio.create_task(enter())
    await server.wait_for_auth_frames(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert chatfeed_tasks() == []


async def test_close_is_idempotent_and_works_before_start() -> None:
    client = make_client("ws://127.0.0.1:9")
    await client.close()
    await client.close()
    with pytest.raises(chatfeed.UsageError, match="closed"):
        await client.run()


async def test_running_twice_is_a_usage_error(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        with pytest.raises(chatfeed.UsageError, match="already running"):
            await client.run()


async def test_statistics_and_repr_never_show_the_token(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        await server.push_message()
        stats = client.statistics()
        assert SECRET not in repr(client)
        assert SECRET not in repr(stats)
    assert stats.connected
    assert stats.connections == 1


def test_repr_hides_url_credentials() -> None:
    client = chatfeed.Client(f"wss://user:{SECRET}@feed.example.com/ws?token={SECRET}", token=TOKEN)
    assert SECRET not in repr(client)
    assert "feed.example.com" in repr(client)


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("http://localhost", {}, "ws:// or wss://"),
        ("ws://", {}, "ws:// or wss://"),
        ("ws://localhost:99999", {}, "invalid url"),
        ("ws://localhost", {"token": ""}, "token must not be empty"),
        ("ws://localhost", {"token": 42}, "token must be a str"),
        ("ws://localhost", {"auth_timeout": 0}, "auth_timeout"),
        ("ws://localhost", {"ping_interval": -1}, "ping_interval"),
        ("ws://localhost", {"max_size": 0}, "max_size"),
        ("ws://localhost", {"reconnect": "yes"}, "reconnect"),
        ("ws://localhost", {"auth_retries": -1}, "auth_retries"),
        ("ws://localhost", {"ssl": "strict"}, "ssl"),
    ],
)
def test_bad_arguments_are_usage_errors(url: str, options: dict[str, object], message: str) -> None:
    options.setdefault("token", TOKEN)
    with pytest.raises(chatfeed.UsageError, match=message):
        chatfeed.Client(url, **options)  # type: ignore[arg-type]


def test_unknown_event_name_is_an_error_at_registration() -> None:
    client = chatfeed.Client("ws://localhost", token=TOKEN)
    with pytest.raises(chatfeed.UsageError, match="new_message"):
        client.on("new_mesage")


def test_plain_ws_to_a_remote_host_warns(caplog: pytest.LogCaptureFixture) -> None:
    chatfeed.Client("ws://feed.example.com", token=TOKEN)
    chatfeed.Client("ws://127.0.0.1:3001", token=TOKEN)
    chatfeed.Client("wss://feed.example.com", token=TOKEN)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "in clear" in r.getMessage()]
    assert len(warnings) == 1
    assert "feed.example.com" in warnings[0].getMessage()

"""The auth handshake: what is sent, what is dispatched, what a rejection does."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

import chatfeed
from chatfeed.testing import FeedServer

from ..conftest import BAD_TOKEN, FAST, MS, TOKEN
from .conftest import WAIT, Recorder, make_client, raw_server, running, url_of


async def test_auth_frame_is_the_first_and_only_frame_sent() -> None:
    received: list[str | bytes] = []
    closed = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        received.append(await ws.recv())
        await ws.send(json.dumps({"type": "auth_success"}))
        await ws.send(json.dumps({"type": "error", "message": "ping"}))
        try:
            async for frame in ws:
                received.append(frame)
        except ConnectionClosed:
            pass
        closed.set()

    async with raw_server(handler) as server:
        client = make_client(url_of(server))
        seen = Recorder()
        client.on("error")(seen)
        async with client:
            await seen.wait_for(1)
        await asyncio.wait_for(closed.wait(), WAIT)
    assert len(received) == 1
    assert json.loads(received[0]) == {"type": "auth", "token": TOKEN}


async def test_nothing_is_dispatched_before_auth_success() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps({"type": "error", "message": "too early"}))
        await ws.send(json.dumps({"type": "auth_success", "payload": {"userId": 1}, "future": True}))
        await ws.send(json.dumps({"type": "error", "message": "in time"}))
        await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server))
        seen = Recorder()
        client.on("error")(seen)
        async with running(client):
            await seen.wait_for(1)
            assert client.connected
    assert [event.message for event in seen.events] == ["in time"]


async def test_no_answer_to_auth_is_a_failed_attempt_and_retried(server: FeedServer) -> None:
    server.silent = True
    client = make_client(server.url, auth_timeout=50 * MS)
    async with running(client) as task:
        await server.wait_for_handshakes(3)
        assert not task.done()
        assert not client.connected


async def test_no_answer_to_auth_without_reconnect_raises(server: FeedServer) -> None:
    server.silent = True
    client = make_client(server.url, auth_timeout=50 * MS, reconnect=False)
    with pytest.raises(chatfeed.AuthTimeoutError) as caught:
        await asyncio.wait_for(client.run(), WAIT)
    assert caught.value.timeout == 50 * MS
    assert server.handshakes == 1


async def test_auth_error_with_static_token_is_final(server: FeedServer) -> None:
    client = make_client(server.url, token=BAD_TOKEN)
    with pytest.raises(chatfeed.AuthenticationError) as caught:
        await asyncio.wait_for(client.run(), WAIT)
    assert caught.value.message == "Invalid token"
    assert server.handshakes == 1
    assert server.received_tokens == [BAD_TOKEN]
    with pytest.raises(chatfeed.UsageError, match="closed"):
        await client.run()


async def test_auth_error_makes_the_client_close_a_connection_the_server_leaves_open() -> None:
    closed = asyncio.Event()
    handshakes = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal handshakes
        handshakes += 1
        await ws.recv()
        await ws.send(json.dumps({"type": "auth_error", "message": "Invalid token"}))
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
        closed.set()

    async with raw_server(handler) as server:
        client = make_client(url_of(server), token=BAD_TOKEN)
        with pytest.raises(chatfeed.AuthenticationError) as caught:
            await asyncio.wait_for(client.run(), WAIT)
        # Still inside the server's context: only the client can have closed it.
        await asyncio.wait_for(closed.wait(), WAIT)
    assert caught.value.message == "Invalid token"
    assert handshakes == 1


async def test_auth_error_on_async_with_raises_and_closes(server: FeedServer) -> None:
    client = make_client(server.url, token=BAD_TOKEN)
    with pytest.raises(chatfeed.AuthenticationError):
        async with client:
            pytest.fail("the body must not run")
    assert client.statistics().state == "closed"
    assert server.handshakes == 1


async def test_token_function_is_asked_for_a_fresh_token_after_auth_error(server: FeedServer) -> None:
    tokens = iter([BAD_TOKEN, TOKEN])
    client = make_client(server.url, token=lambda: next(tokens))
    async with client:
        assert client.connected
    assert server.received_tokens == [BAD_TOKEN, TOKEN]


async def test_async_token_function_is_called_before_every_attempt(server: FeedServer) -> None:
    calls = 0

    async def fetch_token() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        return TOKEN

    client = make_client(server.url, token=fetch_token)
    connected = Recorder()
    client.on("connected")(connected)
    async with running(client):
        await connected.wait_for(1)
        server.drop_connections()
        await connected.wait_for(2)
    assert calls == 2
    assert server.received_tokens == [TOKEN, TOKEN]


@pytest.mark.parametrize("auth_retries", [None, 0, 1, 3], ids=["default", "0", "1", "3"])
async def test_auth_retries_with_a_token_function_are_bounded(server: FeedServer, auth_retries: int | None) -> None:
    calls = 0

    def always_bad() -> str:
        nonlocal calls
        calls += 1
        return BAD_TOKEN

    options = {} if auth_retries is None else {"auth_retries": auth_retries}
    client = make_client(server.url, token=always_bad, **options)
    with pytest.raises(chatfeed.AuthenticationError):
        await asyncio.wait_for(client.run(), WAIT)
    retries = 1 if auth_retries is None else auth_retries  # the default is one retry
    assert calls == retries + 1
    assert server.received_tokens == [BAD_TOKEN] * (retries + 1)


async def test_token_revoked_mid_session_stops_a_static_token_client(server: FeedServer) -> None:
    client = make_client(server.url)
    lifecycle = Recorder()
    client.on("disconnected")(lifecycle)
    async with running(client) as task:
        await server.wait_for_clients()
        server.tokens.clear()
        server.drop_connections()
        with pytest.raises(chatfeed.AuthenticationError):
            await asyncio.wait_for(asyncio.shield(task), WAIT)
    [lost] = lifecycle.events
    assert lost.will_retry  # the drop is retried; the rejection that follows is final
    assert server.received_tokens == [TOKEN, TOKEN]


async def test_failing_token_function_is_retried_with_backoff(server: FeedServer) -> None:
    attempts = 0

    def flaky_token() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise OSError("identity provider unreachable")
        return TOKEN

    client = make_client(server.url, token=flaky_token, reconnect=FAST)
    async with client:
        assert client.connected
    assert attempts == 3


async def test_token_function_returning_a_non_string_is_a_usage_error(server: FeedServer) -> None:
    client = make_client(server.url, token=lambda: None)
    with pytest.raises(chatfeed.UsageError, match="token function"):
        await asyncio.wait_for(client.run(), WAIT)


async def test_auth_error_quoting_the_token_does_not_repeat_it() -> None:
    async def handler(ws: ServerConnection) -> None:
        frame = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "auth_error", "message": f"expired token {frame['token']}"}))
        await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server))
        with pytest.raises(chatfeed.AuthenticationError) as caught:
            await asyncio.wait_for(client.run(), WAIT)
    assert caught.value.message == "expired token ***"
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ('{"type": "auth_error", "message": null}', ""),
        ('{"type": "auth_error"}', ""),
        (
            '{"type": "auth_error", "message": {"name": "JsonWebTokenError", "message": "jwt malformed"}}',
            "jwt malformed",
        ),
        ('{"type": "auth_error", "message": {}}', ""),
        ('{"type": "auth_error", "payload": {"message": "jwt expired"}}', "jwt expired"),
        ('{"type": "auth_error", "message": 401, "payload": "x", "extra": [1]}', "401"),
    ],
    ids=["null", "absent", "error-object", "empty-object", "under-payload", "number"],
)
async def test_any_auth_error_frame_is_a_rejection_not_a_timeout(frame: str, message: str) -> None:
    # A frame dropped as unparseable would leave the handshake to time out,
    # and a timeout is retried: forever, with a static token.
    auth_frames = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal auth_frames
        await ws.recv()
        auth_frames += 1
        await ws.send(frame)
        await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server), auth_timeout=WAIT * 2)
        with pytest.raises(chatfeed.AuthenticationError) as caught:
            await asyncio.wait_for(client.run(), WAIT)
    assert caught.value.message == message
    assert auth_frames == 1


async def test_auth_success_with_an_unexpected_message_authenticates() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send('{"type": "auth_success", "message": {"userId": 1}, "payload": [1, 2]}')
        await ws.send('{"type": "error", "message": "after auth"}')
        await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server))
        seen = Recorder()
        client.on("error")(seen)
        async with client:
            [event] = await seen.wait_for(1)
    assert event.message == "after auth"


@pytest.mark.parametrize(
    ("value", "message"),
    [("", "returned an empty string"), (b"jwt", "must return a str, not a bytes"), (None, "not a NoneType")],
)
async def test_a_token_function_returning_a_bad_value_says_what_was_wrong(value: object, message: str) -> None:
    client = make_client("ws://127.0.0.1:9", token=lambda: value)
    with pytest.raises(chatfeed.UsageError, match=message):
        await asyncio.wait_for(client.run(), WAIT)

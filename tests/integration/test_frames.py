"""Bad and unusual frames: reported, never fatal to the receive loop."""

from __future__ import annotations

import datetime
import json
import logging

import pytest
from websockets.asyncio.server import ServerConnection

import chatfeed
from chatfeed.testing import FeedServer

from .conftest import Recorder, make_client, raw_server, running, url_of

MARKER = "user-content-7f3a"
"""Inside every bad frame: frames hold user content, which must not reach the logs."""


@pytest.mark.parametrize(
    "frame",
    [
        f"not json {MARKER}",
        f'["{MARKER}"]',
        "null",
        "42",
        f'{{"payload": "{MARKER}"}}',
        f'{{"type": 7, "message": "{MARKER}"}}',
        f'{{"type": "new_message", "payload": {{"id": "1", "content": "{MARKER}"}}}}',
        f'{{"type": "new_chat", "payload": {{"id": "1", "userId": "2", "title": "{MARKER}",'
        ' "createdAt": "yesterday", "updatedAt": "today"}}',
        "[" * 200_000,
    ],
    ids=["text", "array", "null", "number", "no-type", "int-type", "short-message", "bad-dates", "deep-nesting"],
)
async def test_bad_frame_is_reported_and_the_connection_goes_on(
    server: FeedServer, caplog: pytest.LogCaptureFixture, frame: str
) -> None:
    client = make_client(server.url)
    seen = Recorder()
    client.on("new_message")(seen)
    async with running(client):
        await server.wait_for_clients()
        await server.send_raw(frame)
        await server.push_message(content="after")
        [event] = await seen.wait_for(1)
        assert client.statistics().protocol_errors == 1
    assert event.payload.content == "after"
    reports = [r for r in caplog.records if r.name == "chatfeed" and r.levelno == logging.WARNING]
    assert len(reports) == 1
    assert "does not fit the protocol" in reports[0].getMessage()
    assert MARKER not in caplog.text
    assert server.handshakes == 1


async def test_binary_frame_with_json_is_accepted(server: FeedServer) -> None:
    client = make_client(server.url)
    seen = Recorder()
    client.on("error")(seen)
    async with running(client):
        await server.wait_for_clients()
        await server.send_raw(json.dumps({"type": "error", "message": "binary"}).encode())
        [event] = await seen.wait_for(1)
    assert event.message == "binary"


async def test_unknown_role_and_status_are_delivered_not_dropped(server: FeedServer) -> None:
    client = make_client(server.url)
    seen = Recorder()
    client.on("new_message")(seen)
    async with running(client):
        await server.wait_for_clients()
        frame = {
            "type": "new_message",
            "payload": {
                "id": 5,
                "chatId": 9,
                "role": "tool",
                "content": "result",
                "status": "STREAMING",
                "createdAt": "2025-10-07T12:00:00.000Z",
                "tokens": 12,
            },
        }
        await server.send_raw(json.dumps(frame))
        [event] = await seen.wait_for(1)
    message = event.payload
    assert (message.id, message.chat_id, message.role, message.status) == ("5", "9", "tool", "STREAMING")
    assert message.model_extra == {"tokens": 12}


@pytest.mark.parametrize(("option", "max_size"), [(4096, 4096), (None, 2**20)], ids=["4096", "default-1-MiB"])
async def test_frame_up_to_max_size_is_accepted_and_a_larger_one_closes_the_connection(
    server: FeedServer, caplog: pytest.LogCaptureFixture, option: int | None, max_size: int
) -> None:
    client = make_client(server.url) if option is None else make_client(server.url, max_size=option)
    seen, lifecycle = Recorder(), Recorder()
    client.on("error")(seen)
    client.on("connected")(lifecycle)
    client.on("disconnected")(lifecycle)

    def error_frame(size: int) -> str:
        empty = json.dumps({"type": "error", "message": ""})
        frame = json.dumps({"type": "error", "message": "x" * (size - len(empty))})
        assert len(frame.encode()) == size
        return frame

    async with running(client):
        await lifecycle.wait_for(1)
        await server.send_raw(error_frame(max_size))
        await seen.wait_for(1)
        await server.send_raw(error_frame(max_size + 1))
        await lifecycle.wait_for(3)  # disconnected, then connected again
    [accepted] = seen.events
    assert len(accepted.message) > max_size - 40
    lost = lifecycle.events[1]
    assert (lost.code, lost.will_retry) == (1009, True)
    assert lost.error.local
    assert lifecycle.events[2].is_reconnect
    assert "1009" in caplog.text


async def test_invalid_utf8_closes_the_connection_and_the_client_reconnects() -> None:
    connections = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.recv()
        await ws.send(json.dumps({"type": "auth_success"}))
        if connections == 1:
            ws.protocol.send_text(b"\xff\xfe not utf-8")
            ws.send_data()
        else:
            await ws.send(json.dumps({"type": "error", "message": "fine"}))
        await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server))
        seen, lifecycle = Recorder(), Recorder()
        client.on("error")(seen)
        client.on("disconnected")(lifecycle)
        async with running(client):
            await seen.wait_for(1)
    [lost] = lifecycle.events
    assert (lost.code, lost.will_retry) == (1007, True)


async def test_auth_error_after_authentication_is_handled_as_a_rejection(server: FeedServer) -> None:
    client = make_client(server.url)
    async with running(client) as task:
        await server.wait_for_clients()
        await server.send_raw(json.dumps({"type": "auth_error", "message": "token expired"}))
        with pytest.raises(chatfeed.AuthenticationError, match="token expired"):
            await task


async def test_frames_from_a_javascript_backend_are_kept_whole(server: FeedServer) -> None:
    # What a Node backend may send: a string cut mid-emoji (a lone surrogate
    # escape, which JSON.parse accepts), an hours-only offset, nulls where the
    # client can do without a value, error text in an object.
    frames = [
        '{"type": "new_message", "payload": {"id": 1, "chatId": 2, "role": "assistant", "content": "cut \\ud83d",'
        ' "precis": null, "audioUrl": null, "fallbackUsed": null, "status": null,'
        ' "createdAt": "2025-10-07T12:00:00+05"}}',
        '{"type": "new_message", "payload": {"id": "3", "chatId": "2", "role": "user", "content": null,'
        ' "createdAt": "2025-10-07T12:00:00.000+00"}}',
        '{"type": "new_chat", "payload": {"id": 4, "userId": 1, "title": null, "createdAt": "2025-10-07T12:00:00Z"}}',
        '{"type": "error", "message": {"message": "rate limited", "code": 429}}',
    ]
    client = make_client(server.url)
    seen = Recorder()
    client.on(chatfeed.ServerMessage)(seen)
    async with client:
        for frame in frames:
            await server.send_raw(frame)
        first, second, chat, error = await seen.wait_for(4)

    assert isinstance(first, chatfeed.NewMessage) and isinstance(second, chatfeed.NewMessage)
    assert first.payload.content == "cut \ufffd"
    assert first.payload.created_at.utcoffset() == datetime.timedelta(hours=5)
    assert (first.payload.fallback_used, first.payload.precis, first.payload.status) == (False, None, None)
    assert second.payload.content == ""
    assert isinstance(chat, chatfeed.NewChat)
    assert (chat.payload.title, chat.payload.updated_at) == ("", chat.payload.created_at)
    assert isinstance(error, chatfeed.ErrorMessage) and error.message == "rate limited"
    assert client.statistics().protocol_errors == 0

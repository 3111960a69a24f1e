"""Events reach handlers and iterators: all of them, once, in order."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

import chatfeed
from chatfeed.testing import FeedServer

from ..conftest import MS
from .conftest import WAIT, Recorder, content, make_client, raw_server, running, url_of


async def test_handlers_receive_typed_events(server: FeedServer) -> None:
    client = make_client(server.url)
    messages, chats, errors, unknown = Recorder(), Recorder(), Recorder(), Recorder()
    client.on("new_message")(messages)
    client.on(chatfeed.NewChat)(chats)
    client.on("error")(errors)
    client.on("unknown")(unknown)

    async with running(client):
        await server.wait_for_clients()
        sent = await server.push_message(content="hello", chat_id=17)
        chat = await server.push_chat(title="First chat")
        await server.push_error("rate limited")
        await server.send_raw(json.dumps({"type": "typing", "payload": {"chatId": "17"}, "extra": 1}))
        await unknown.wait_for(1)

    [event] = messages.events
    assert isinstance(event, chatfeed.NewMessage)
    assert event.payload == sent
    assert event.payload.chat_id == "17"
    assert event.payload.content == "hello"
    assert chats.events[0].payload == chat
    assert errors.events[0].message == "rate limited"
    assert unknown.events[0].type == "typing"
    assert unknown.events[0].payload == {"chatId": "17"}
    assert unknown.events[0].model_extra == {"extra": 1}


async def test_sync_and_async_handlers_run_in_order_of_registration_and_arrival(server: FeedServer) -> None:
    client = make_client(server.url)
    calls: list[tuple[str, str]] = []

    @client.on("new_message")
    async def first(event: chatfeed.NewMessage) -> None:
        await asyncio.sleep(0)
        calls.append(("first", event.payload.content))

    @client.on("new_message")
    def second(event: chatfeed.NewMessage) -> None:
        calls.append(("second", event.payload.content))

    done = Recorder()
    client.on("new_message")(done)
    async with running(client):
        await server.wait_for_clients()
        for index in range(20):
            await server.push_message(content=str(index))
        await done.wait_for(20)

    expected = [(name, str(index)) for index in range(20) for name in ("first", "second")]
    assert calls == expected


async def test_handler_for_server_message_sees_every_server_event(server: FeedServer) -> None:
    client = make_client(server.url)
    everything = Recorder()
    client.on(chatfeed.ServerMessage)(everything)
    async with running(client):
        await server.wait_for_clients()
        await server.push_message()
        await server.push_chat()
        await server.push_error("x")
        await everything.wait_for(3)
    assert [event.type for event in everything.events] == ["new_message", "new_chat", "error"]


async def test_failing_handler_stops_nothing_else(server: FeedServer, caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(server.url)
    seen = Recorder()
    hook_calls: list[tuple[Exception, Any]] = []

    @client.on("connected")
    async def broken_on_connect(event: chatfeed.Connected) -> None:
        raise RuntimeError("handler bug")

    @client.on("new_message")
    def flaky(event: chatfeed.NewMessage) -> None:
        if int(event.payload.content) % 3 == 0:
            raise ValueError("handler bug")

    client.on("new_message")(seen)

    @client.on_error
    async def hook(exc: Exception, event: Any) -> None:
        hook_calls.append((exc, event))

    async with client:
        stream = client.events()
        for index in range(9):
            await server.push_message(content=str(index))
        received = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(9)]
        await seen.wait_for(9)
        assert client.statistics().handler_errors == 4
        assert client.connected

    assert [content(event) for event in received] == [str(index) for index in range(9)]
    assert [event.payload.content for event in seen.events] == [str(index) for index in range(9)]
    (connect_error, connected), *message_failures = hook_calls
    assert isinstance(connect_error, RuntimeError)
    assert isinstance(connected, chatfeed.Connected)
    assert [event.payload.content for _, event in message_failures] == ["0", "3", "6"]
    assert all(isinstance(exc, ValueError) for exc, _ in message_failures)
    errors = [record for record in caplog.records if record.name == "chatfeed" and record.levelname == "ERROR"]
    assert [record.exc_info[0] if record.exc_info else None for record in errors] == [RuntimeError] + [ValueError] * 3
    assert server.handshakes == 1


async def test_async_with_then_events_sees_frames_sent_with_auth_success() -> None:
    # The server writes auth_success and two events in one TCP write: they
    # arrive before `async with` has even returned.
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        for frame in (
            {"type": "auth_success"},
            {"type": "error", "message": "first"},
            {"type": "error", "message": "second"},
        ):
            ws.protocol.send_text(json.dumps(frame).encode())
        ws.send_data()
        await ws.wait_closed()

    async def first_two(client: chatfeed.Client) -> list[str]:
        received: list[str] = []
        # Written as an application would: `async for` straight after `async with`, no stream variable.
        async with client:
            async for event in client.events():
                assert isinstance(event, chatfeed.ErrorMessage)
                received.append(event.message)
                if len(received) == 2:
                    break
        return received

    async with raw_server(handler) as server:
        received = await asyncio.wait_for(first_two(make_client(url_of(server))), WAIT)
    assert received == ["first", "second"]


async def test_several_iterators_each_get_everything_in_order(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        streams = [client.events(buffer=4) for _ in range(3)]

        async def consume(stream: chatfeed.EventStream[chatfeed.FeedEvent]) -> list[str]:
            contents = []
            async for event in stream:
                assert isinstance(event, chatfeed.NewMessage)
                contents.append(event.payload.content)
                if len(contents) == 50:
                    break
            return contents

        consumers = [asyncio.create_task(consume(stream)) for stream in streams]
        for index in range(50):
            await server.push_message(content=str(index))
        results = await asyncio.wait_for(asyncio.gather(*consumers), WAIT)
    assert results == [[str(index) for index in range(50)]] * 3


async def test_unread_stream_stops_the_client_reading_the_socket_and_loses_nothing() -> None:
    # The server sends many large frames, then a ping. While nobody reads the
    # stream, the client must neither take frames off the connection (beyond
    # the stream's buffer and the one being delivered) nor read as far as the
    # ping; once the stream is read, everything arrives, in order, and the
    # pong goes back. A client that buffered without bound would do both.
    count = 100
    # Incompressible: with permessage-deflate, repetitive text would shrink the
    # whole feed into one TCP read, which websockets parses in one go.
    fillers = [base64.b64encode(os.urandom(48 * 1024)).decode() for _ in range(count)]
    pong_received = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps({"type": "auth_success"}))
        for index in range(count):
            await ws.send(json.dumps({"type": "error", "message": f"{index}:{fillers[index]}"}))
        pong = await ws.ping()
        with contextlib.suppress(ConnectionClosed):
            await pong
            pong_received.set()
            await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server), ping_interval=None)
        async with client:
            stream = client.events(buffer=1)
            observe = asyncio.create_task(pong_received.wait())
            # The observation window: on a slow machine it can only make the
            # assertions easier to meet, never fail a correct client.
            done, _ = await asyncio.wait([observe], timeout=500 * MS)
            stalled_frames = client.statistics().frames_received
            assert not done, "the client read the whole feed although nobody read its events() stream"
            # auth_success, the event in the buffer, the event waiting for room
            assert stalled_frames <= 3, f"the client took {stalled_frames} frames off a connection nobody reads"
            received = []
            async for event in stream:
                assert isinstance(event, chatfeed.ErrorMessage)
                received.append(int(event.message.partition(":")[0]))
                if len(received) == count:
                    break
            await asyncio.wait_for(observe, WAIT)
    assert received == list(range(count))


async def test_handlers_only_client_never_blocks(server: FeedServer) -> None:
    client = make_client(server.url)
    seen = Recorder()
    client.on("new_message")(seen)
    async with client:
        for index in range(300):
            await server.push_message(content=str(index))
        await seen.wait_for(300)
    assert [event.payload.content for event in seen.events] == [str(index) for index in range(300)]


async def test_leaving_async_for_early_unsubscribes(server: FeedServer) -> None:
    client = make_client(server.url)
    seen = Recorder()
    client.on("new_message")(seen)
    async with client:
        stream = client.events(buffer=1)
        await server.push_message()
        async for _ in stream:
            break
        del stream  # the loop's reference went at `break`; this was the test's own
        assert client.statistics().event_streams == 0
        # Each would wait on the abandoned buffer if it were still subscribed.
        for _ in range(3):
            await server.push_message()
        await seen.wait_for(4)


async def test_breaking_out_of_events_loop_unsubscribes(server: FeedServer) -> None:
    client = make_client(server.url)
    seen = Recorder()
    client.on("new_message")(seen)

    async def push(count: int) -> None:
        for _ in range(count):
            await server.push_message()

    async with client:
        pusher = asyncio.create_task(push(5))
        async for _ in client.events(buffer=1):
            break
        await asyncio.wait_for(pusher, WAIT)
        await seen.wait_for(5)
        assert client.statistics().event_streams == 0


async def test_events_end_when_client_closes(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        stream = client.events()
        await server.push_message(content="last")
        # Give the receive loop the frame before closing.
        first = await asyncio.wait_for(anext(stream), WAIT)
    assert content(first) == "last"
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), WAIT)
    with pytest.raises(chatfeed.UsageError, match="closed"):
        client.events()


async def test_connected_event_then_disconnected_event(server: FeedServer) -> None:
    client = make_client(server.url)
    lifecycle = Recorder()
    client.on("connected")(lifecycle)
    client.on(chatfeed.Disconnected)(lifecycle)
    async with running(client):
        await server.wait_for_clients()
        await lifecycle.wait_for(1)
        await server.close_connections(4000, "deploy")
        await lifecycle.wait_for(3)
    first, lost, again = lifecycle.events[:3]
    assert first == chatfeed.Connected(is_reconnect=False, downtime=None)
    assert isinstance(lost, chatfeed.Disconnected)
    assert (lost.code, lost.reason, lost.will_retry) == (4000, "deploy", True)
    assert lost.retry_in is not None
    assert isinstance(lost.error, chatfeed.ConnectionLostError)
    assert isinstance(again, chatfeed.Connected)
    assert again.is_reconnect
    assert again.downtime is not None
    assert again.downtime > 0


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_a_feed_is_delivered_whole_and_in_order_with_and_without_compression(
    server: FeedServer, compression: chatfeed.Compression
) -> None:
    # Without compression the fast frame path reads the frames; with it, websockets does.
    client = make_client(server.url, compression=compression)
    async with client:
        stream = client.events()
        sent = [await server.push_message(content=f"{index} " + "x" * index) for index in range(300)]
        await server.send_raw(b'{"type": "error", "message": "binary frame"}')
        await server.push_message(content="last")
        received = [content(await asyncio.wait_for(anext(stream), WAIT)) for _ in range(300)]
        error = await asyncio.wait_for(anext(stream), WAIT)
        last = await asyncio.wait_for(anext(stream), WAIT)
    assert received == [message.content for message in sent]
    assert isinstance(error, chatfeed.ErrorMessage) and error.message == "binary frame"
    assert content(last) == "last"


async def test_a_lone_handler_that_cannot_be_called_is_reported_like_any_other(server: FeedServer) -> None:
    client = make_client(server.url)
    reported: list[str] = []
    both = asyncio.Event()

    @client.on("new_message")  # type: ignore[type-var]  # a type checker sees the mistake; at run time:
    async def wrong(event: chatfeed.NewMessage, extra: int) -> None:
        pass

    @client.on_error
    def report(exc: Exception, event: object) -> None:
        reported.append(type(exc).__name__)
        if len(reported) == 2:
            both.set()

    async with client:
        await server.push_message()
        await server.push_message()
        await asyncio.wait_for(both.wait(), WAIT)
        assert client.connected
    assert reported == ["TypeError", "TypeError"]


async def test_a_lone_handler_that_adds_a_handler_then_raises_is_reported(server: FeedServer) -> None:
    client = make_client(server.url)
    reported: list[str] = []
    later = Recorder()

    @client.on("new_message")
    async def adds_then_raises(event: chatfeed.NewMessage) -> None:
        client.on("new_chat")(later)
        raise ValueError("after registering")

    @client.on_error
    def report(exc: Exception, event: object) -> None:
        reported.append(type(exc).__name__)

    async with client:
        await server.push_message()
        await server.push_chat()
        await later.wait_for(1)
        assert reported == ["ValueError"]
        assert client.connected

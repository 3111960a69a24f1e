"""Regression tests for defects found in review: each failed before its fix."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

import chatfeed
import chatfeed._dispatch
from chatfeed.testing import FeedServer, make_message

from ..conftest import MS, SECRET, TOKEN
from .conftest import (
    WAIT,
    Recorder,
    chatfeed_tasks,
    content,
    make_client,
    raw_server,
    running,
    url_of,
    watch_log,
)


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def message_frame(content: str) -> str:
    return chatfeed.NewMessage(type="new_message", payload=make_message(content=content)).model_dump_json(by_alias=True)


@contextlib.asynccontextmanager
async def mute_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never says a word."""
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        yield f"{host}:{port}"
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


# close() from another task while `async with` is entering


async def test_close_while_async_with_is_entering_does_not_leak_cancelled_error(server: FeedServer) -> None:
    server.silent = True
    client = make_client(server.url, auth_timeout=30_000 * MS)
    entering = asyncio.create_task(client.__aenter__())
    await server.wait_for_handshakes(1)
    await asyncio.wait_for(client.close(), WAIT)
    await asyncio.wait([entering], timeout=WAIT)
    assert entering.done()
    # The task that entered was never cancelled: it must not end as if it had been.
    assert not entering.cancelled(), "__aenter__ raised CancelledError into a task nobody cancelled"
    assert isinstance(entering.exception(), chatfeed.ChatfeedError)


# close() from a handler, then the owner's close() (async with exit): the socket is never closed


async def test_close_from_handler_then_exiting_async_with_closes_the_socket() -> None:
    closed = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(frame(type="auth_success"))
        await ws.send(frame(type="error", message="stop now"))
        await ws.wait_closed()
        closed.set()

    async with raw_server(handler) as server:
        client = make_client(url_of(server))  # default ping_interval: a keepalive task runs
        stop = asyncio.Event()

        @client.on("error")
        async def stop_from_handler(event: chatfeed.ErrorMessage) -> None:
            stop.set()
            await client.close()

        async with client:
            await asyncio.wait_for(stop.wait(), WAIT)
        assert chatfeed_tasks() == []
        # The server must see the connection end.
        await asyncio.wait_for(closed.wait(), WAIT)


# Backpressure longer than the ping budget: the keepalive drops the connection and frames are lost


async def test_slow_consumer_loses_nothing_when_keepalive_is_on() -> None:
    count = 200
    connections = 0
    closed = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.recv()
        await ws.send(frame(type="auth_success"))
        for index in range(count):
            await ws.send(message_frame(str(index)))
        with contextlib.suppress(ConnectionClosed):
            await ws.wait_closed()
        closed.set()

    async with raw_server(handler) as server:
        ping = 50 * MS
        client = make_client(url_of(server), ping_interval=ping, ping_timeout=ping)
        async with client:
            stream = client.events(buffer=1)
            # A consumer busy elsewhere for many ping periods; the feed backs up meanwhile.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(closed.wait(), 10 * ping)
            # It did back up: the client stopped taking frames off the connection (so the
            # server's pongs, queued behind them, went unread) for longer than the ping budget.
            stalled_frames = client.statistics().frames_received
            assert stalled_frames <= 3, f"the client took {stalled_frames} frames while its reader was busy"
            received = [content(await asyncio.wait_for(anext(stream), WAIT)) for _ in range(count)]
            assert not closed.is_set(), "the client dropped a live connection because its reader was slow"
    assert received == [str(index) for index in range(count)]
    assert connections == 1


# Two tasks reading one stream: close() must end both


async def test_a_second_reader_of_one_stream_is_a_usage_error_and_close_ends_the_first(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        stream = client.events()
        first = asyncio.create_task(anext(stream, None))
        await asyncio.sleep(0)  # a yield, not a timed wait: lets the first reader start waiting
        with pytest.raises(chatfeed.UsageError, match="once per consumer"):
            await anext(stream)
        await client.close()
        assert await asyncio.wait_for(first, WAIT) is None


# Closing from a Disconnected handler swallows the fatal error


async def test_close_in_disconnected_handler_does_not_swallow_the_fatal_error(server: FeedServer) -> None:
    client = make_client(server.url)

    @client.on("disconnected")
    async def give_up(event: chatfeed.Disconnected) -> None:
        if not event.will_retry:
            await client.close()

    async with running(client) as task:
        await server.wait_for_clients()
        await server.close_connections(1008, "policy")
        await asyncio.wait([task], timeout=WAIT)
        assert task.done()
        assert not task.cancelled()
        assert isinstance(task.exception(), chatfeed.ConnectionLostError)


# Open timeout (TCP accepted, no HTTP answer): translated and retried on every supported Python.
# Passes on 3.11+; fails on 3.10 (requires-python >= 3.10), where websockets raises
# asyncio.TimeoutError, which is not the builtin TimeoutError that _connection.py catches.


async def test_open_timeout_is_a_connect_error() -> None:
    async with mute_server() as address:
        client = make_client(f"ws://{address}", open_timeout=100 * MS, reconnect=False)
        with pytest.raises(chatfeed.ConnectError, match="timed out"):
            await asyncio.wait_for(client.run(), WAIT)


# Secrets in the URL


# chatfeed redacts URL credentials and query values in its own logs and repr (redact_url), but
# websockets logs the request line and every request header at DEBUG through chatfeed's adapter.


def client_log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        r.getMessage() for r in caplog.get_records("call") if r.name.startswith(("chatfeed", "websockets.client"))
    )


async def test_query_token_in_url_never_reaches_websockets_debug_logs(
    server: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(f"{server.url}/feed?access_token={SECRET}")
    async with client:
        assert client.connected
    assert SECRET not in client_log_text(caplog)


async def test_a_jwt_in_the_url_path_never_reaches_the_logs_or_the_repr(
    server: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    jwt = f"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxNyJ9.{SECRET}"
    client = make_client(f"{server.url}/ws/{jwt}/feed")
    async with client:
        assert client.connected
        assert "/ws/***/feed" in repr(client)
    text = client_log_text(caplog)
    assert "/ws/***/feed" in text
    assert SECRET not in text


async def test_url_credentials_never_reach_websockets_debug_logs(
    server: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(server.url.replace("ws://", f"ws://user:{SECRET}@"))
    async with client:
        assert client.connected
    basic = base64.b64encode(f"user:{SECRET}".encode()).decode()
    assert basic not in client_log_text(caplog)


def test_url_with_a_fragment_is_refused_without_quoting_it() -> None:
    with pytest.raises(chatfeed.UsageError, match="fragment") as caught:
        make_client(f"ws://127.0.0.1:9/feed?access_token={SECRET}#frag")
    assert SECRET not in str(caught.value)


# The suite's own guard against token leaks checked only the teardown phase's records


def test_no_secret_in_logs_fixture_catches_a_token_logged_in_the_test_body(tmp_path: Path) -> None:
    tests = Path(__file__).resolve().parents[1]
    (tmp_path / "conftest.py").write_text((tests / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text(
        textwrap.dedent(
            f"""
            import logging

            def test_logs_a_token() -> None:
                logging.getLogger("chatfeed").debug("auth with %s", "{TOKEN}")
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
        check=False,
    )
    assert "a token appeared in a log record (call)" in result.stdout
    assert result.returncode == 1


# A handler that awaits a cancelled task


async def test_cancelled_error_from_a_handler_does_not_stop_the_client(
    server: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(server.url)
    seen = Recorder()

    @client.on("new_message")
    async def awaits_a_cancelled_task(event: chatfeed.NewMessage) -> None:
        if event.payload.content == "first":
            job = asyncio.create_task(asyncio.sleep(WAIT))
            job.cancel()
            await job  # raises CancelledError: the job's, not the client's

    client.on("new_message")(seen)
    async with running(client) as task:
        await server.wait_for_clients()
        await server.push_message(content="first")
        await server.push_message(content="second")
        both_seen = asyncio.create_task(seen.wait_for(2))
        await asyncio.wait([task, both_seen], timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        both_seen.cancel()
        if sys.version_info >= (3, 11):
            assert not task.done(), "run() ended (as if closed) because a handler's await was cancelled"
            assert [event.payload.content for event in seen.events] == ["first", "second"]
        else:
            # Python 3.10 cannot tell this from a cancellation of the client
            # (no Task.cancelling()): the client stops, and its log says why.
            assert task.done()
            assert task.cancelled()
            assert any("on Python 3.10" in record.getMessage() for record in caplog.records)


# close() while the feed is backpressured waits for close_timeout


async def test_close_while_backpressured_is_prompt(server: FeedServer) -> None:
    client = make_client(server.url, close_timeout=5000 * MS)
    seen = Recorder()
    client.on("new_message")(seen)
    async with client:
        stream = client.events(buffer=1)  # never read: the feed backs up behind it
        for index in range(100):
            await server.push_message(content=str(index))
        # Once a handler has seen the second event, the first fills the buffer and
        # the receive loop waits for room; the frames behind it pile up in websockets,
        # which then stops reading the socket.
        await seen.wait_for(2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(client.close(), 10_000 * MS)
        took = loop.time() - started
        assert stream.pending() == 1
    assert took < 1000 * MS, f"close() took {took:.2f} s"


# A stream kept in a variable after `break` stays subscribed (Python gives no hook on `break`):
# `async with` closes it, and a stalled stream is reported


async def test_stream_closed_by_async_with_unsubscribes_after_break(server: FeedServer) -> None:
    client = make_client(server.url)
    seen = Recorder()
    client.on("new_message")(seen)
    async with client:
        async with client.events(buffer=1) as stream:
            await server.push_message()
            async for _ in stream:
                break
        for _ in range(3):
            await server.push_message()
        await seen.wait_for(4)
        assert client.statistics().event_streams == 0


async def test_a_stream_nobody_reads_is_reported(server: FeedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chatfeed._dispatch, "STALL_WARNING_AFTER", 50 * MS)
    with watch_log("has not been read for") as reports:
        client = make_client(server.url)
        async with client:
            stream = client.events(buffer=1)
            for _ in range(2):
                await server.push_message()
            await reports.counter.wait_for(1)
            await stream.aclose()
            await server.push_message()

"""Network faults, injected for real: dead paths, latency, resets, cut replies, peers that are no WebSocket server.

The feed server sits behind a :class:`~tests.faults.proxy.FaultProxy`, or is
replaced by a bare TCP or WebSocket server that misbehaves. Tests wait on
events (lifecycle events, log records, connection counts); the only timed
waits are the observation windows of the tests whose assertion is that
something does *not* happen, or happens only so often.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator

import pytest
from websockets.asyncio.server import ServerConnection

import chatfeed
from chatfeed.testing import FeedServer

from ..conftest import MS
from ..integration.conftest import WAIT, Recorder, content, make_client, raw_server, running, url_of
from .conftest import tcp_server
from .proxy import FaultProxy, abort_with_reset


def lifecycle(client: chatfeed.Client) -> Recorder:
    """Record the client's Connected and Disconnected events, in order."""
    events = Recorder()
    client.on("connected")(events)
    client.on("disconnected")(events)
    return events


def retries_logged(caplog: pytest.LogCaptureFixture) -> list[tuple[int, float, str]]:
    """The (attempt, delay, error) of every "reconnecting in" record of chatfeed's logger, in order."""
    retries = []
    for record in caplog.get_records("call"):
        message = record.getMessage()
        match = re.fullmatch(r"reconnecting in ([0-9.]+) s \(attempt (\d+)\): (.*)", message)
        if record.name == "chatfeed" and match:
            assert record.levelno == logging.INFO
            retries.append((int(match[2]), float(match[1]), match[3]))
    return retries


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its ``__cause__``, that one's, and so on."""
    cause: BaseException | None = exc
    while cause is not None:
        yield cause
        cause = cause.__cause__


class KeepaliveLog(logging.Handler):
    """Watches websockets' frame log on the client side for keepalive pings and pongs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.pings: list[float] = []
        self.pongs = Recorder()  # events are the monotonic times the pongs arrived

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("> PING"):
            self.pings.append(time.monotonic())
        elif message.startswith("< PONG"):
            self.pongs(time.monotonic())

    def round_trips(self) -> list[float]:
        """Seconds from each ping to its pong (the keepalive has one ping in flight at most)."""
        return [pong - ping for ping, pong in zip(self.pings, self.pongs.events, strict=False)]


@contextlib.contextmanager
def watch_keepalive() -> Iterator[KeepaliveLog]:
    websockets_logger = logging.getLogger("websockets.client")
    handler = KeepaliveLog()
    level = websockets_logger.level
    # websockets decides whether to log frames when a connection opens.
    websockets_logger.setLevel(logging.DEBUG)
    websockets_logger.addHandler(handler)
    try:
        yield handler
    finally:
        websockets_logger.removeHandler(handler)
        websockets_logger.setLevel(level)


# A dead path and a slow one


async def test_half_open_connection_is_detected_within_the_ping_budget_and_replaced(
    server: FeedServer, proxy: FaultProxy
) -> None:
    ping = 100 * MS
    # A close_timeout far beyond the ping budget: waiting for the closing
    # handshake of a peer that cannot hear it would show in the timing.
    client = make_client(proxy.url, ping_interval=ping, ping_timeout=ping, close_timeout=10_000 * MS)
    events = lifecycle(client)
    messages = Recorder()
    client.on("new_message")(messages)
    loop = asyncio.get_running_loop()
    async with running(client):
        await events.wait_for(1)
        proxy.blackhole()
        dead_at = loop.time()
        await events.wait_for(2)
        detected_after = loop.time() - dead_at
        proxy.pass_through()
        await events.wait_for(3)
        await server.push_message(content="still there")
        await messages.wait_for(1)
    _, lost, back = events.events
    assert isinstance(lost, chatfeed.Disconnected)
    assert isinstance(lost.error, chatfeed.ConnectionLostError)
    assert (lost.code, lost.error.local, lost.will_retry) == (1006, True, True)
    assert "pong" in lost.reason
    # The next ping goes out within ping_interval; its pong is given up on ping_timeout later.
    assert detected_after < 1.5 * (ping + ping)
    assert isinstance(back, chatfeed.Connected)
    assert back.is_reconnect
    assert [content(event) for event in messages.events] == ["still there"]


async def test_latency_just_under_ping_timeout_causes_no_false_disconnect(
    server: FeedServer, proxy: FaultProxy
) -> None:
    ping = 200 * MS
    one_way = 70 * MS  # a round trip of 140 ms against a ping_timeout of 200 ms
    proxy.latency(one_way)
    with watch_keepalive() as keepalive:
        client = make_client(proxy.url, ping_interval=ping, ping_timeout=ping)
        events = lifecycle(client)
        async with running(client):
            await events.wait_for(1)
            await keepalive.pongs.wait_for(4)  # four ping periods, each answered late
        round_trips = keepalive.round_trips()
    assert [type(event) for event in events.events] == [chatfeed.Connected]
    assert server.handshakes == 1
    assert proxy.connections == 1
    # The latency was really there: every pong came back after 2 x 70 ms, and before ping_timeout.
    assert len(round_trips) >= 4
    assert all(2 * one_way * 0.9 <= rtt < ping for rtt in round_trips), round_trips


# Connections broken mid-stream or mid-handshake


async def test_tcp_reset_mid_stream_is_retried_and_the_feed_resumes(server: FeedServer, proxy: FaultProxy) -> None:
    client = make_client(proxy.url)
    events = lifecycle(client)
    messages = Recorder()
    client.on("new_message")(messages)
    async with running(client):
        await events.wait_for(1)
        await server.push_message(content="before")
        await messages.wait_for(1)
        proxy.reset()
        await events.wait_for(3)
        await server.push_message(content="after")
        await messages.wait_for(2)
    lost, back = events.events[1:]
    assert isinstance(lost, chatfeed.Disconnected)
    assert isinstance(lost.error, chatfeed.ConnectionLostError)
    assert (lost.code, lost.error.local, lost.will_retry) == (1006, False, True)
    assert any(isinstance(exc, ConnectionResetError) for exc in causes(lost.error)), "not a TCP reset"
    assert isinstance(back, chatfeed.Connected)
    assert back.is_reconnect
    assert [content(event) for event in messages.events] == ["before", "after"]
    assert proxy.connections == 2


async def test_reply_cut_during_the_handshake_is_retried_until_the_path_heals(
    server: FeedServer, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.cut_after(20)  # "HTTP/1.1 101 Switchi", then FIN
    client = make_client(proxy.url)
    events = lifecycle(client)
    async with running(client) as task:
        await proxy.wait_for_connections(3)
        assert not task.done()
        assert events.events == []
        proxy.pass_through()
        [connected] = await events.wait_for(1)
    assert isinstance(connected, chatfeed.Connected)
    assert not connected.is_reconnect
    retries = retries_logged(caplog)
    assert len(retries) >= 2
    assert [attempt for attempt, _, _ in retries] == list(range(1, len(retries) + 1))
    assert all("closed the connection during the WebSocket handshake" in error for _, _, error in retries[:2])


async def test_connections_reset_during_the_handshake_are_retried(caplog: pytest.LogCaptureFixture) -> None:
    async with tcp_server(abort_with_reset) as resetting:
        client = make_client(resetting.url)
        async with running(client) as task:
            await resetting.wait_for_accepted(3)
            assert not task.done()
            assert not client.connected
    retries = retries_logged(caplog)
    assert len(retries) >= 2
    assert [attempt for attempt, _, _ in retries] == list(range(1, len(retries) + 1))
    assert all("closed the connection during the WebSocket handshake" in error for _, _, error in retries)


# Peers that are no WebSocket server


async def test_server_that_never_completes_the_handshake_times_out_each_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with tcp_server(lambda transport: None) as mute:
        client = make_client(
            mute.url,
            open_timeout=50 * MS,
            reconnect=chatfeed.Backoff(initial=5 * MS, maximum=20 * MS, max_attempts=3),
        )
        with pytest.raises(chatfeed.ConnectError, match="timed out"):
            await asyncio.wait_for(client.run(), WAIT)
        assert mute.accepted == 3
    retries = retries_logged(caplog)
    assert [attempt for attempt, _, _ in retries] == [1, 2]
    assert all("timed out" in error for _, _, error in retries)


async def test_server_that_never_completes_the_handshake_without_reconnect_raises_after_open_timeout() -> None:
    open_timeout = 100 * MS
    loop = asyncio.get_running_loop()
    async with tcp_server(lambda transport: None) as mute:
        client = make_client(mute.url, open_timeout=open_timeout, reconnect=False)
        started = loop.time()
        with pytest.raises(chatfeed.ConnectError, match="timed out") as caught:
            await asyncio.wait_for(client.run(), WAIT)
        elapsed = loop.time() - started
        assert mute.accepted == 1
    assert isinstance(caught.value.__cause__, (TimeoutError, asyncio.TimeoutError))
    assert open_timeout <= elapsed < open_timeout + 1000 * MS


def reply(junk: bytes, *, then_close: bool) -> Callable[[asyncio.Transport], None]:
    def on_accept(transport: asyncio.Transport) -> None:
        transport.write(junk)
        if then_close:
            transport.close()

    return on_accept


_RANDOM_LINE = random.Random(4).randbytes(256).replace(b"\n", b"") + b"\r\n"


@pytest.mark.parametrize(
    "on_accept",
    [
        pytest.param(reply(b"SSH-2.0-OpenSSH_9.6\r\n", then_close=True), id="ssh-banner-then-close"),
        pytest.param(reply(b"SSH-2.0-OpenSSH_9.6\r\n", then_close=False), id="ssh-banner-kept-open"),
        pytest.param(reply(_RANDOM_LINE, then_close=True), id="random-line-then-close"),
        pytest.param(reply(_RANDOM_LINE, then_close=False), id="random-line-kept-open"),
        pytest.param(reply(b"x" * 65536, then_close=True), id="overlong-line-then-close"),
    ],
)
async def test_junk_instead_of_an_http_reply_is_final_at_once(on_accept: Callable[[asyncio.Transport], None]) -> None:
    open_timeout = 500 * MS
    loop = asyncio.get_running_loop()
    async with tcp_server(on_accept) as junk_server:
        # Not a WebSocket server: retrying would meet the same peer again. A
        # second attempt, if any, ends the run (with its own error) rather than
        # retrying for ever.
        backoff = chatfeed.Backoff(initial=5 * MS, maximum=20 * MS, max_attempts=2)
        client = make_client(junk_server.url, open_timeout=open_timeout, reconnect=backoff)
        started = loop.time()
        with pytest.raises(chatfeed.HandshakeError) as caught:
            await asyncio.wait_for(client.run(), WAIT)
        elapsed = loop.time() - started
        assert junk_server.accepted == 1
    assert caught.value.status_code is None
    assert elapsed < open_timeout, "the client waited for a timeout on a reply it had already rejected"


# A server that accepts and closes, over and over


@pytest.mark.parametrize("closes", ["before-auth", "after-auth-success"])
async def test_server_that_closes_every_connection_at_once_gets_ever_slower_retries(
    caplog: pytest.LogCaptureFixture, closes: str
) -> None:
    handshakes = 0

    async def close_at_once(ws: ServerConnection) -> None:
        nonlocal handshakes
        handshakes += 1
        if closes == "after-auth-success":
            await ws.recv()
            await ws.send(json.dumps({"type": "auth_success"}))
        # Returning closes the connection with 1000, a code worth retrying.

    initial, maximum = 10 * MS, 1000 * MS
    async with raw_server(close_at_once) as server:
        client = make_client(url_of(server), reconnect=chatfeed.Backoff(initial=initial, maximum=maximum))
        async with running(client) as task:
            await asyncio.sleep(1000 * MS)  # the observation window is the assertion
            attempts = handshakes
            assert not task.done()
    # A hot loop would make hundreds; full jitter over 10, 20, 40... ms makes about eight.
    assert 3 <= attempts < 15
    retries = retries_logged(caplog)
    assert len(retries) >= attempts - 1
    assert [attempt for attempt, _, _ in retries] == list(range(1, len(retries) + 1)), "the backoff was reset"
    for attempt, delay, _ in retries:
        assert delay <= min(initial * 2 ** (attempt - 1), maximum) + 0.0005  # logged to the millisecond

"""FeedServer's ``backlog`` and ``compression`` options, as a client and the kernel see them."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from typing import Any

import pytest
from websockets.asyncio.client import connect

import chatfeed
from chatfeed.testing import FeedServer

from ..conftest import TOKEN
from .conftest import WAIT, Recorder, make_client, running

pytestmark = pytest.mark.timeout(20)

_DEFLATE = "permessage-deflate"

RAW_TOKEN = "raw-client"
"""The token of the raw websockets client, which logs its frames: not a secret of the suite's."""


async def _extensions_negotiated(server: FeedServer, *, offered: chatfeed.Compression) -> str | None:
    """Connect with websockets, offering ``offered``; return the server's Sec-WebSocket-Extensions."""
    async with connect(server.url, compression=offered) as ws:
        assert ws.response is not None
        # Still a working feed, whatever was negotiated.
        await ws.send(json.dumps({"type": "auth", "token": RAW_TOKEN}))
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == {"type": "auth_success"}
        return ws.response.headers.get("Sec-WebSocket-Extensions")


async def test_accepts_deflate_by_default() -> None:
    async with FeedServer(tokens=[RAW_TOKEN]) as server:
        extensions = await _extensions_negotiated(server, offered="deflate")
    assert extensions is not None
    assert extensions.startswith(_DEFLATE)


async def test_compression_none_declines_deflate() -> None:
    async with FeedServer(tokens=[RAW_TOKEN], compression=None) as server:
        assert await _extensions_negotiated(server, offered="deflate") is None


async def test_compression_none_serves_a_client_that_offers_deflate() -> None:
    async with FeedServer(tokens=[TOKEN], compression=None) as server:
        client = make_client(server.url, compression="deflate")
        received = Recorder()
        client.on("new_message")(received)
        async with running(client):
            await server.wait_for_clients()
            sent = await server.push_message(content="not compressed")
            (event,) = await received.wait_for(1)
    assert event.payload == sent


@pytest.mark.parametrize("compression", ["deflate", None])
async def test_compression_survives_a_restart(compression: chatfeed.Compression) -> None:
    async with FeedServer(tokens=[RAW_TOKEN], compression=compression) as server:
        await server.restart()
        extensions = await _extensions_negotiated(server, offered="deflate")
    assert (extensions is not None) == (compression == "deflate")


@pytest.mark.parametrize("compression", ["gzip", "", "Deflate", True, 0])
def test_rejects_an_unknown_compression(compression: Any) -> None:
    with pytest.raises(chatfeed.UsageError, match="compression"):
        FeedServer(compression=compression)


# The backlog


@pytest.fixture
async def listeners(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.Server]:
    """Record the listening servers asyncio creates, to look at their sockets."""
    created: list[asyncio.Server] = []
    loop = asyncio.get_running_loop()
    create_server = loop.create_server

    async def recording(*args: Any, **kwargs: Any) -> asyncio.Server:
        listener = await create_server(*args, **kwargs)
        created.append(listener)
        return listener

    monkeypatch.setattr(loop, "create_server", recording)
    return created


def _listen_queue_size(sock: socket.socket) -> int:
    """Return the kernel's limit of a listening socket's accept queue (Linux: TCP_INFO's tcpi_sacked)."""
    # For a listening socket, Linux reports the backlog in use as tcpi_sacked:
    # 8 one-byte fields, then rto, ato, snd_mss, rcv_mss, unacked, sacked.
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    (sacked,) = struct.unpack_from("I", info, 28)
    return int(sacked)


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn", encoding="ascii") as limit:
        return int(limit.read())


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's TCP_INFO")


@linux_only
@pytest.mark.parametrize(("backlog", "expected"), [(None, 100), (1, 1), (1000, 1000)])
async def test_backlog_sizes_the_listen_queue(
    listeners: list[asyncio.Server], backlog: int | None, expected: int
) -> None:
    server = FeedServer(tokens=[TOKEN]) if backlog is None else FeedServer(tokens=[TOKEN], backlog=backlog)
    async with server:
        (listener,) = listeners
        assert [_listen_queue_size(sock) for sock in listener.sockets] == [min(expected, _somaxconn())]
        # And it serves, of course.
        client = make_client(server.url)
        async with running(client):
            await server.wait_for_clients(timeout=WAIT)


@linux_only
async def test_backlog_survives_a_restart(listeners: list[asyncio.Server]) -> None:
    async with FeedServer(tokens=[TOKEN], backlog=1000) as server:
        await server.restart()
        assert [_listen_queue_size(sock) for sock in listeners[-1].sockets] == [min(1000, _somaxconn())]


@pytest.mark.parametrize("backlog", [0, -1, 1.5, "100", True, None])
def test_rejects_a_backlog_that_is_not_a_positive_int(backlog: Any) -> None:
    with pytest.raises(chatfeed.UsageError, match="backlog"):
        FeedServer(backlog=backlog)

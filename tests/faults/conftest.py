"""Fixtures for the fault-injection tests: the proxy, bare TCP servers, and a check that nothing is left running."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from chatfeed.testing import FeedServer

from ..integration.conftest import WAIT, chatfeed_tasks
from .proxy import FaultProxy


@pytest.fixture
async def proxy(server: FeedServer) -> AsyncIterator[FaultProxy]:
    """A pass-through :class:`FaultProxy` in front of the ``server`` fixture."""
    async with FaultProxy(server.port) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
async def _nothing_left_running() -> AsyncIterator[None]:
    """Fail a test that leaves a task of chatfeed's or of the proxy's behind."""
    yield
    assert chatfeed_tasks() == []
    assert [task for task in asyncio.all_tasks() if task.get_name().startswith("fault-proxy")] == []


class TcpServer:
    """A bare TCP server on loopback for peers that are no WebSocket server at all.

    It reads and discards what it receives, never closes a connection on its
    own (not even when the client half-closes), and calls ``on_accept`` with
    each new connection's transport, which may write to it or close it.

    Attributes:
        accepted: Connections accepted so far.
    """

    def __init__(self, on_accept: Callable[[asyncio.Transport], None]) -> None:
        self.accepted = 0
        self._on_accept = on_accept
        self._transports: set[asyncio.Transport] = set()
        self._server: asyncio.Server | None = None
        self._changed: asyncio.Event = asyncio.Event()

    @property
    def url(self) -> str:
        """Its address as a WebSocket URL."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def wait_for_accepted(self, count: int, *, timeout: float = WAIT) -> None:
        """Wait until ``count`` connections have been accepted in all."""
        await asyncio.wait_for(self._wait_until(lambda: self.accepted >= count), timeout)

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    def _protocol(self) -> asyncio.Protocol:
        server = self

        class Peer(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport
                server._transports.add(transport)
                server.accepted += 1
                server._changed.set()
                server._on_accept(transport)

            def eof_received(self) -> bool:
                return True  # a half-close by the client does not make this server close

            def connection_lost(self, exc: Exception | None) -> None:
                server._transports.discard(self.transport)
                server._changed.set()

        return Peer()

    async def __aenter__(self) -> TcpServer:
        self._server = await asyncio.get_running_loop().create_server(self._protocol, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for transport in list(self._transports):
            transport.abort()
        # Sockets close when their transports report connection_lost, a turn later.
        await asyncio.wait_for(self._wait_until(lambda: not self._transports), WAIT)
        await self._server.wait_closed()


@contextlib.asynccontextmanager
async def tcp_server(on_accept: Callable[[asyncio.Transport], None]) -> AsyncIterator[TcpServer]:
    """Run a :class:`TcpServer` for the duration of the block."""
    async with TcpServer(on_accept) as server:
        yield server

"""A TCP proxy on loopback that injects network faults between a client and a server.

:class:`FaultProxy` relays bytes between every client that connects to it and
an upstream server, and misbehaves on demand, like a network path would:

- pass-through (the default): bytes are relayed as they come;
- :meth:`~FaultProxy.blackhole`: nothing is relayed in either direction and
  both sockets stay open, a dead path (a cable pulled, a NAT entry expired);
  what arrives meanwhile is held, as TCP would keep retransmitting it, and
  relayed if the path comes back;
- :meth:`~FaultProxy.latency`: every chunk is delayed, in both directions,
  order kept;
- :meth:`~FaultProxy.cut_after`: each new connection relays that many bytes
  from the server, then both sides are closed;
- :meth:`~FaultProxy.reset`: every current connection is aborted with a TCP
  RST, on both sides.

Modes apply at once to current and new connections. End-of-stream and resets
travel through the proxy in order with the data, so a connection that one side
drops while the path is blackholed stays open on the other side, half-open,
until the path comes back.

Example:
    ```python
    async with FeedServer() as server, FaultProxy(server.port) as proxy:
        client = chatfeed.Client(proxy.url, token=...)
        ...
        proxy.blackhole()
    ```
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import socket
import struct
from collections.abc import Callable

from typing_extensions import Self

from ..integration.conftest import WAIT

__all__ = ["FaultProxy", "abort_with_reset"]

_LINGER_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, with a zero timeout: closing the socket sends RST, not FIN."""


class _Signal(enum.Enum):
    EOF = "eof"
    RESET = "reset"


_Item = tuple[float, bytes | _Signal]


class _Mode(enum.Enum):
    PASS = "pass-through"
    BLACKHOLE = "blackhole"
    LATENCY = "latency"


def abort_with_reset(transport: asyncio.Transport) -> None:
    """Close ``transport`` with a TCP RST rather than a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.is_closing():
        with contextlib.suppress(OSError):  # already disconnected: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _Side(asyncio.Protocol):
    """One of the two TCP connections of a proxied pair."""

    def __init__(self, pipe: _Pipe, name: str) -> None:
        self.pipe = pipe
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.pipe.side_made(self)

    def data_received(self, data: bytes) -> None:
        self.pipe.flow_from(self).push(data)

    def eof_received(self) -> bool:
        self.pipe.flow_from(self).push(_Signal.EOF)
        return True  # keep writing to this side until the other one is done too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pipe.side_lost(self, exc)

    def pause_writing(self) -> None:
        # Backpressure crosses the proxy: stop reading what we cannot write.
        other = self.pipe.other(self).transport
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.pipe.other(self).transport
        if other is not None:
            other.resume_reading()

    def writable(self) -> asyncio.Transport | None:
        """Return the transport if it can still be written to."""
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return None
        return transport


class _Flow:
    """One direction of a proxied pair: what one side sent, on its way to the other."""

    def __init__(self, proxy: FaultProxy, pipe: _Pipe, dest: _Side, limit: int | None) -> None:
        self._proxy = proxy
        self._pipe = pipe
        self._dest = dest
        self._limit = limit
        self._sent = 0
        self._queue: collections.deque[_Item] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self.ended = False  # the end of the stream has been delivered
        self.end_queued = False

    def push(self, item: bytes | _Signal) -> None:
        """Queue bytes or the end of the stream, then deliver what the mode allows."""
        if self.end_queued:
            return
        if isinstance(item, _Signal):
            self.end_queued = True
        self._queue.append((self._proxy._loop.time(), item))
        self.pump()

    def pump(self) -> None:
        """Deliver every queued item that is due under the current mode; schedule the rest."""
        self.stop_timer()
        if self._dest.transport is None or self._pipe.closed:
            return  # upstream not connected yet, or nothing left to deliver to
        proxy = self._proxy
        if proxy._mode is _Mode.BLACKHOLE:
            return
        loop = proxy._loop
        now = loop.time()
        while self._queue and not self._pipe.closed:
            arrived, item = self._queue[0]
            due = max(arrived, proxy._released_at) + proxy._delay
            if due > now:
                self._timer = loop.call_at(due, self.pump)
                return
            self._queue.popleft()
            self._deliver(item)

    def stop_timer(self) -> None:
        """Cancel the pending delivery, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def clear(self) -> None:
        """Forget everything queued."""
        self.stop_timer()
        self._queue.clear()

    def _deliver(self, item: bytes | _Signal) -> None:
        if item is _Signal.RESET:
            self.ended = True
            self._pipe.close(reset=True)
            return
        if item is _Signal.EOF:
            self.ended = True
            self._pipe.flow_ended(self._dest)
            return
        assert isinstance(item, bytes)
        transport = self._dest.writable()
        if transport is None:
            return
        if self._limit is None:
            transport.write(item)
            return
        chunk = item[: self._limit - self._sent]
        transport.write(chunk)
        self._sent += len(chunk)
        if self._sent >= self._limit:
            self._pipe.close(reset=False)


class _Pipe:
    """A client connection, its upstream connection, and the two flows between them."""

    def __init__(self, proxy: FaultProxy, cut_after: int | None) -> None:
        self.proxy = proxy
        self.client = _Side(self, "client")
        self.upstream = _Side(self, "upstream")
        self.to_upstream = _Flow(proxy, self, self.upstream, None)
        self.to_client = _Flow(proxy, self, self.client, cut_after)
        self.closed = False

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    def flow_from(self, side: _Side) -> _Flow:
        return self.to_upstream if side is self.client else self.to_client

    def flows(self) -> tuple[_Flow, _Flow]:
        return self.to_upstream, self.to_client

    def side_made(self, side: _Side) -> None:
        assert side.transport is not None
        self.proxy._sides.add(side)
        if self.closed:
            side.transport.abort()  # connected after the pair was torn down
            return
        if side is self.upstream:
            self.to_upstream.pump()  # what the client sent while we were connecting

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        self.proxy._side_gone(side)
        if not self.closed:
            self.flow_from(side).push(_Signal.EOF if exc is None else _Signal.RESET)
        self.check_done()

    def check_done(self) -> None:
        """Forget this pair once neither of its sockets is open nor can be any more."""
        upstream_done = self.upstream.lost or (self.upstream.transport is None and self not in self.proxy._connecting)
        if self.client.lost and upstream_done:
            self.close(reset=False)
            self.proxy._pipe_gone(self)

    def flow_ended(self, dest: _Side) -> None:
        transport = dest.writable()
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
        if self.to_upstream.ended and self.to_client.ended:
            self.close(reset=False)

    def close(self, *, reset: bool) -> None:
        """Close both sides: politely (pending bytes flushed, then FIN) or with a RST."""
        if self.closed:
            return
        self.closed = True
        for flow in self.flows():
            flow.clear()
        for side in (self.client, self.upstream):
            if side.transport is None:
                continue
            if reset:
                abort_with_reset(side.transport)
            else:
                side.transport.close()
        self.proxy._cancel_connect(self)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_host:upstream_port``, with faults on demand.

    Use it as an async context manager; on exit every connection is aborted
    and every task it started has finished.

    Args:
        upstream_port: The port of the server to relay to.
        upstream_host: Its address.

    Attributes:
        connections: Client connections accepted so far.
    """

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self._upstream = (upstream_host, upstream_port)
        self.connections = 0
        self._mode = _Mode.PASS
        self._delay = 0.0
        self._released_at = 0.0  # when the last blackhole ended
        self._cut_after: int | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._sides: set[_Side] = set()
        self._connecting: dict[_Pipe, asyncio.Task[None]] = {}
        self._changed: asyncio.Future[None] | None = None
        self._loop_or_none: asyncio.AbstractEventLoop | None = None

    # Life cycle

    async def start(self) -> Self:
        """Start listening on a free port of 127.0.0.1."""
        self._loop_or_none = asyncio.get_running_loop()
        self._server = await self._loop.create_server(self._accept, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        """Stop listening, abort every connection and wait until all is closed."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connecting.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for side in list(self._sides):
            if side.transport is not None:
                side.transport.abort()
        # Transports report connection_lost (and close their sockets) on a
        # later turn of the loop; wait for it, or the sockets would leak.
        await self._wait_until(lambda: not self._sides, timeout=WAIT)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The address clients connect to instead of the upstream: ``ws://127.0.0.1:PORT``."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        """The port it listens on."""
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def open_connections(self) -> int:
        """How many proxied connections are not fully closed yet."""
        return len(self._pipes)

    # Faults

    def pass_through(self) -> None:
        """Relay everything as it comes, to current and new connections; undo every fault."""
        self._cut_after = None
        self._set_mode(_Mode.PASS, 0.0)

    def blackhole(self) -> None:
        """Relay nothing in either direction and keep every socket open: a dead path.

        Bytes and closes that arrive meanwhile are held, and relayed in order
        if the path comes back (:meth:`pass_through` or :meth:`latency`).
        """
        self._set_mode(_Mode.BLACKHOLE, 0.0)

    def latency(self, seconds: float) -> None:
        """Delay every chunk by ``seconds`` in each direction, keeping their order."""
        if not seconds >= 0:
            raise ValueError(f"latency must be a non-negative number of seconds, not {seconds!r}")
        self._set_mode(_Mode.LATENCY, float(seconds))

    def cut_after(self, n_bytes: int) -> None:
        """Relay only ``n_bytes`` from the server on each new connection, then close both sides.

        Connections already open are not affected; :meth:`pass_through` ends it.
        """
        if n_bytes < 0:
            raise ValueError(f"n_bytes must not be negative, not {n_bytes!r}")
        self._cut_after = n_bytes

    def reset(self) -> None:
        """Abort every current connection, both sides, with a TCP RST. New ones are relayed."""
        for pipe in list(self._pipes):
            pipe.close(reset=True)

    # Waiting

    async def wait_for_connections(self, count: int, *, timeout: float = WAIT) -> None:
        """Wait until ``count`` client connections have been accepted in all.

        Raises:
            TimeoutError: Not within ``timeout`` seconds.
        """
        await self._wait_until(lambda: self.connections >= count, timeout=timeout)

    # Internals

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        if self._loop_or_none is None:
            raise RuntimeError("the proxy is not running")
        return self._loop_or_none

    def _set_mode(self, mode: _Mode, delay: float) -> None:
        if self._mode is _Mode.BLACKHOLE and mode is not _Mode.BLACKHOLE:
            self._released_at = self._loop.time()
        self._mode = mode
        self._delay = delay
        for pipe in list(self._pipes):
            for flow in pipe.flows():
                flow.pump()

    def _accept(self) -> asyncio.Protocol:
        self.connections += 1
        self._notify()
        pipe = _Pipe(self, self._cut_after)
        self._pipes.add(pipe)
        self._connecting[pipe] = self._loop.create_task(self._connect(pipe), name="fault-proxy-connect")
        return pipe.client

    async def _connect(self, pipe: _Pipe) -> None:
        try:
            await self._loop.create_connection(lambda: pipe.upstream, *self._upstream)
        except OSError:
            # The upstream refused: so does the proxy, as far as it can.
            pipe.close(reset=True)
        finally:
            self._connecting.pop(pipe, None)
            pipe.check_done()

    def _cancel_connect(self, pipe: _Pipe) -> None:
        task = self._connecting.get(pipe)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _side_gone(self, side: _Side) -> None:
        self._sides.discard(side)
        self._notify()

    def _pipe_gone(self, pipe: _Pipe) -> None:
        self._pipes.discard(pipe)
        self._notify()

    async def _wait_until(self, predicate: Callable[[], bool], *, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"FaultProxy: condition not met within {timeout} s")
            if self._changed is None or self._changed.done():
                self._changed = loop.create_future()
            await asyncio.wait([self._changed], timeout=remaining)

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

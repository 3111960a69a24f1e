"""Scale benchmark: thousands of authenticated feeds in one process.

For each connection count N, this measures, against one
:class:`chatfeed.testing.FeedServer` per run:

- resident memory per connection, for N ``chatfeed.Client`` objects and for N
  bare ``websockets`` connections with one reader task each (the thirty lines
  a user would otherwise write);
- the CPU that chatfeed's N idle connections use (keepalive pings at their
  defaults);
- after the server drops every connection at once, how long until all N
  clients are back, and how their reconnects spread over the backoff's jitter
  window (a thundering herd would put them all at its very start).

A reconnect delay, as measured, is the backoff's random wait plus the
connect and auth exchange plus any wait for the client process's CPU, which
thousands of handshakes in one window can saturate; the waits the backoff drew
are reported too (``details["scheduled_histogram"]``), to tell the policy's
spread from the machine's.

Servers and clients each run in a process of their own, started from this
file, so that one side's CPU and memory never count for the other; they talk
to the parent by JSON lines on stdout and commands on stdin. Every wait is
bounded and every child is killed on any failure, and each child also arms
``SIGALRM`` so that it cannot outlive a parent that died.

``pool.py`` measures a ``chatfeed.Pool`` with the same server, the same bare
client (opened at the pool's rate) and the same child-process plumbing.

Usage:
    ``python benchmarks/scale.py`` (100, 1,000 and 2,000 connections, 30 s
    idle) or ``python benchmarks/scale.py --smoke`` (10 connections, 0.5 s
    idle). From Python: ``run_scale([100, 1000], idle_seconds=30.0)``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import logging
import math
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

    import chatfeed

__all__ = ["run_scale"]

FULL_COUNTS = [100, 1000, 2000]
FULL_IDLE_SECONDS = 30.0
SMOKE_COUNTS = [10]
SMOKE_IDLE_SECONDS = 0.5

BACKOFF_INITIAL = 2.0
"""Upper bound of the first retry's wait: the jitter window is [0, BACKOFF_INITIAL]."""
BACKOFF_MAXIMUM = 10.0
HISTOGRAM_BUCKETS = 10

_SCRIPT = os.path.abspath(__file__)
_HOST = "127.0.0.1"


# Limits, in seconds. Connecting grows with N because one core does every
# handshake of a process; the rest does not depend on N much.
def _connect_timeout(count: int) -> float:
    return 30.0 + count * 0.03


def _reconnect_timeout(count: int) -> float:
    # Clients land past the window when the process's CPU is the queue (about
    # a second late at 2,000 on two cores) or when an attempt failed and they
    # waited again (up to 2 * initial): this leaves room for both.
    return 30.0 + BACKOFF_MAXIMUM + count * 0.01


_START_TIMEOUT = 20.0
_COMMAND_TIMEOUT = 15.0
_CLOSE_TIMEOUT = 30.0


def _child_deadline(count: int, idle_seconds: float) -> float:
    """Seconds after which a child kills itself, whatever happens."""
    return (
        _START_TIMEOUT
        + _connect_timeout(count)
        + idle_seconds
        + _reconnect_timeout(count)
        + _COMMAND_TIMEOUT
        + _CLOSE_TIMEOUT
        + 30.0
    )


# Measurements inside a child


def _raise_fd_limit() -> None:
    # Each connection is one descriptor in the client and one in the server;
    # the usual soft limit of 1,024 would stop well short of 2,000.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_kib() -> int:
    """Return this process's resident set size in KiB (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _settled_rss_kib() -> int:
    # Garbage left by the handshakes would otherwise count as per-connection memory.
    gc.collect()
    return _rss_kib()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class _GcPauses:
    """Times the garbage collector's pauses while installed.

    With thousands of clients alive, a full collection walks every one of
    their objects and holds the event loop meanwhile: a reconnect storm that
    allocates enough to trigger one stalls every reconnect behind it.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self._started = 0.0

    def __enter__(self) -> _GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.total += pause
        self.longest = max(self.longest, pause)


def _other_tasks() -> int:
    return len([task for task in asyncio.all_tasks() if task is not asyncio.current_task()])


def _object_counts() -> collections.Counter[str]:
    """Count the objects the garbage collector tracks, by type: what a full collection walks."""
    gc.collect()
    return collections.Counter(type(item).__qualname__ for item in gc.get_objects())


def _objects_per_item(
    before: collections.Counter[str], after: collections.Counter[str], count: int, *, top: int = 12
) -> dict[str, float]:
    """Return the tracked objects added per item (connection or feed): the total, then the commonest types."""
    grown = after - before
    per_item = {"total": round(grown.total() / count, 2)}
    per_item.update((name, round(number / count, 2)) for name, number in grown.most_common(top))
    return per_item


# The server process


LISTEN_BACKLOG = 4096
"""The server's listen queue. asyncio's default of 100 overflows when thousands
of clients come back within two seconds; the kernel then drops their SYNs and
each waits a one-second retransmission, a delay of the test server (production
servers listen with 511 to 4096) that would be charged to the client."""


class _AcceptCounter:
    """Counts the TCP connections the server process accepts, whatever becomes of them.

    Installed on the event loop before the server starts listening: it wraps
    the protocol factory that websockets gives ``loop.create_server``, which
    asyncio calls once per accepted connection. Accepted connections that never
    complete the WebSocket handshake are the server's failed handshakes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.accepted = 0
        create_server = loop.create_server

        async def create_counting_server(protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
            def counting_factory() -> Any:
                self.accepted += 1
                return protocol_factory()

            return await create_server(counting_factory, *args, **kwargs)

        loop.create_server = create_counting_server  # type: ignore[method-assign]


class _ErrorCounter(logging.Handler):
    """Counts the warnings and errors websockets' server logs (a failed handshake is one)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def _serve(count: int) -> None:
    from chatfeed.testing import FeedServer

    loop = asyncio.get_running_loop()
    accepts = _AcceptCounter(loop)
    errors = _ErrorCounter()
    logging.getLogger("websockets.server").addHandler(errors)
    # No compression: none of the clients measured offers it either.
    server = FeedServer(
        tokens=[f"token-{i}" for i in range(count)], host=_HOST, port=0, backlog=LISTEN_BACKLOG, compression=None
    )
    await server.start()
    try:
        _emit("listening", port=server.port)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:  # the parent is gone or done
                return
            command = line.decode().strip()
            if command == "drop":
                clients = server.clients
                cpu = _cpu_seconds()
                server.drop_connections()
                _emit("dropped", clients=clients, cpu_seconds=cpu)
            elif command == "cpu":
                _emit("cpu", cpu_seconds=_cpu_seconds())
            elif command == "stats":
                _emit(
                    "stats",
                    accepted=accepts.accepted,
                    handshakes=server.handshakes,
                    auth_frames=len(server.received_tokens),
                    clients=server.clients,
                    logged_errors=errors.count,
                    cpu_seconds=_cpu_seconds(),
                )
            elif command == "quit":
                return
            else:
                _emit("error", message=f"unknown command {command!r}")
    finally:
        await server.stop()


# The chatfeed client process


class _Tracker:
    """Counts connections and timestamps each client's drop and return.

    Handlers are plain functions: chatfeed calls them inline in each client's
    receive loop, so the timestamps are taken when the client itself sees the
    event, with no task hop in between.
    """

    def __init__(self, count: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.count = count
        self.connected = 0
        self.back = 0
        self.armed = False
        self.stopping = False
        self.early_disconnects = 0
        self.lost_at: list[float | None] = [None] * count
        self.back_at: list[float | None] = [None] * count
        self.retry_in: list[float | None] = [None] * count
        self.all_connected: asyncio.Future[None] = self.loop.create_future()
        self.all_back: asyncio.Future[None] = self.loop.create_future()
        self.failed: asyncio.Future[None] = self.loop.create_future()

    def attach(self, client: chatfeed.Client, index: int) -> None:
        @client.on("connected")
        def on_connected(event: chatfeed.Connected) -> None:
            if not event.is_reconnect:
                self.connected += 1
                if self.connected == self.count:
                    self.all_connected.set_result(None)
            elif self.lost_at[index] is not None and self.back_at[index] is None:
                self.back_at[index] = self.loop.time()
                self.back += 1
                if self.back == self.count:
                    self.all_back.set_result(None)

        @client.on("disconnected")
        def on_disconnected(event: chatfeed.Disconnected) -> None:
            if not self.armed:
                # Dropped before the benchmark's own drop: reported, not timed.
                self.early_disconnects += 1
            elif self.lost_at[index] is None:
                self.lost_at[index] = self.loop.time()
                self.retry_in[index] = event.retry_in

    def task_done(self, task: asyncio.Task[None]) -> None:
        # run() returns only after close(); anything else stopped a client
        # for good, and waiting for it to come back would only time out.
        if self.stopping or self.failed.done():
            return
        error = None if task.cancelled() else task.exception()
        self.failed.set_exception(RuntimeError(f"a client stopped: {error!r}"))

    async def wait(self, goal: asyncio.Future[None], timeout: float, what: str) -> None:
        done, _ = await asyncio.wait([goal, self.failed], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self.failed in done:
            self.failed.result()
        if goal not in done:
            raise TimeoutError(f"not {what} within {timeout:g} s (connected {self.connected}, back {self.back})")


async def _measure_chatfeed(port: int, count: int, idle_seconds: float) -> None:
    import chatfeed

    url = f"ws://{_HOST}:{port}"
    loop = asyncio.get_running_loop()
    backoff = chatfeed.Backoff(initial=BACKOFF_INITIAL, maximum=BACKOFF_MAXIMUM)

    # One connection first, so that lazy imports and caches filled on first
    # use are in the baseline and not charged to the N connections.
    async with chatfeed.Client(url, token="token-0", reconnect=False):
        pass
    rss_before = _settled_rss_kib()

    tracker = _Tracker(count)
    clients = [chatfeed.Client(url, token=f"token-{i}", reconnect=backoff) for i in range(count)]
    started = loop.time()
    tasks = [loop.create_task(client.run()) for client in clients]
    for task in tasks:
        task.add_done_callback(tracker.task_done)
    try:
        # Connected is watched by polling, not by handlers, so that the
        # memory measured is chatfeed's, not this benchmark's closures per
        # client (the bare side has none either). They come after.
        deadline = started + _connect_timeout(count)
        while not all(client.connected for client in clients):
            if tracker.failed.done():
                tracker.failed.result()  # raises what stopped a client
            if loop.time() > deadline:
                raise TimeoutError(f"not all connected within {_connect_timeout(count):g} s")
            await asyncio.sleep(0.05)
        connect_seconds = loop.time() - started
        rss_after = _settled_rss_kib()
        for index, client in enumerate(clients):
            tracker.attach(client, index)
        _emit("connected", rss_before_kib=rss_before, rss_after_kib=rss_after, connect_seconds=connect_seconds)

        cpu_start, wall_start = _cpu_seconds(), time.monotonic()
        await asyncio.sleep(idle_seconds)
        idle_cpu, idle_wall = _cpu_seconds() - cpu_start, time.monotonic() - wall_start
        tracker.armed = True
        cpu_start = _cpu_seconds()
        _emit(
            "ready",
            idle_cpu_seconds=idle_cpu,
            idle_wall_seconds=idle_wall,
            early_disconnects=tracker.early_disconnects,
        )

        with _GcPauses() as gc_pauses:
            await tracker.wait(tracker.all_back, _reconnect_timeout(count), "all back")
        lost = [at for at in tracker.lost_at if at is not None]
        back = [at for at in tracker.back_at if at is not None]
        pairs = zip(tracker.lost_at, tracker.back_at, strict=True)
        delays = [end - start for start, end in pairs if start is not None and end is not None]
        scheduled = [delay for delay in tracker.retry_in if delay is not None]
        _emit(
            "reconnected",
            cpu_seconds=_cpu_seconds() - cpu_start,
            gc_seconds=gc_pauses.total,
            gc_longest_pause_seconds=gc_pauses.longest,
            all_back_seconds=max(back) - min(lost),
            delays=delays,
            scheduled_delays=scheduled,
        )
    finally:
        tracker.stopping = True
        await asyncio.gather(*(client.close() for client in clients))
        if tasks:
            await asyncio.wait(tasks)
    _emit("done", leftover_tasks=_other_tasks())


# The bare websockets client process


async def _measure_bare(port: int, count: int, rate: float | None = None) -> None:
    from websockets.asyncio.client import connect

    url = f"ws://{_HOST}:{port}"
    loop = asyncio.get_running_loop()

    async def consume(ws: ClientConnection) -> None:
        async for _ in ws:
            pass

    async def open_one(index: int, at: float | None = None) -> tuple[ClientConnection, asyncio.Task[None]]:
        if at is not None:
            await asyncio.sleep(at - loop.time())
        ws = await connect(url, compression=None)  # as chatfeed's default: no per-connection zlib state
        try:
            await ws.send(json.dumps({"type": "auth", "token": f"token-{index}"}))
            reply = json.loads(await ws.recv())
            if reply.get("type") != "auth_success":
                raise RuntimeError(f"token-{index} was not accepted: {reply!r}")
        except BaseException:
            await ws.close()
            raise
        return ws, loop.create_task(consume(ws))

    # As for chatfeed: first use is paid before the baseline.
    ws, reader = await open_one(0)
    await ws.close()
    await reader
    rss_before = _settled_rss_kib()
    objects_before = _object_counts()

    started = loop.time()
    # All at once, or ``rate`` per second as a pool's ramp opens them.
    opening = [loop.create_task(open_one(i, None if rate is None else started + i / rate)) for i in range(count)]
    done, pending = await asyncio.wait(opening, timeout=_connect_timeout(count) + (0 if rate is None else count / rate))
    try:
        if pending:
            raise TimeoutError(f"{len(pending)} of {count} bare connections not open in time")
        for task in done:
            task.result()  # raises a failure, if any
        connect_seconds = loop.time() - started
        rss_after = _settled_rss_kib()
        _emit(
            "connected",
            rss_before_kib=rss_before,
            rss_after_kib=rss_after,
            connect_seconds=connect_seconds,
            objects_per_connection=_objects_per_item(objects_before, _object_counts(), count),
            tasks_per_connection=_other_tasks() / count,
        )
    finally:
        for task in pending:
            task.cancel()
        await asyncio.wait(opening)
        opened = [task.result() for task in opening if not task.cancelled() and task.exception() is None]
        await asyncio.gather(*(ws.close() for ws, _ in opened))
        readers = [reader for _, reader in opened]
        if readers:
            await asyncio.wait(readers)
    _emit("done", leftover_tasks=_other_tasks())


# The parent


class _Child:
    """A child process of this script, spoken to by JSON lines.

    Its stderr goes to a temporary file, quoted in the error when it fails.
    """

    def __init__(self, python: str, name: str, args: list[str], script: str = _SCRIPT) -> None:
        self.name = name
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115  (it outlives this method; kill() closes it)
        self._process = subprocess.Popen(
            [python, script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self._process.stdout is not None
        self._stdout = self._process.stdout
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stdout, selectors.EVENT_READ)
        self._buffer = b""

    def read(self, expected: str, timeout: float) -> dict[str, Any]:
        """Return the next message, which must be the ``expected`` event.

        Raises:
            RuntimeError: The child reported an error, sent something else,
                exited, or said nothing within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                raise self._failure(f"no {expected!r} within {timeout:g} s")
            chunk = os.read(self._stdout.fileno(), 1 << 16)
            if not chunk:
                raise self._failure(f"exited (code {self._process.wait()}) before {expected!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        if message.get("event") != expected:
            raise self._failure(f"sent {message!r} instead of {expected!r}")
        return message

    def send(self, command: str) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(f"{command}\n".encode())
        self._process.stdin.flush()

    def finish(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        """Close its stdin and wait for it to exit on its own, successfully."""
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._failure(f"did not exit within {timeout:g} s") from None
        if code != 0:
            raise self._failure(f"exited with code {code}")

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._selector.close()
        for stream in (self._process.stdin, self._stdout, self._stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _failure(self, what: str) -> RuntimeError:
        self._stderr.seek(0)
        tail = self._stderr.read()[-4000:].decode(errors="replace").strip()
        return RuntimeError(f"{self.name} {what}" + (f"; its stderr:\n{tail}" if tail else ""))


class _Start(Protocol):
    def __call__(self, python: str, name: str, args: list[str], script: str = ...) -> _Child: ...


@contextlib.contextmanager
def _children() -> Iterator[_Start]:
    """Yield a function starting children; every one of them is killed on the way out."""
    started: list[_Child] = []

    def start(python: str, name: str, args: list[str], script: str = _SCRIPT) -> _Child:
        child = _Child(python, name, args, script)
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in started:
            child.kill()


def _start_server(start: _Start, python: str, count: int, deadline: float) -> tuple[_Child, int]:
    server = start(python, f"server for {count}", ["--serve", str(count), "--deadline", f"{deadline:g}"])
    port = int(server.read("listening", _START_TIMEOUT)["port"])
    return server, port


def _client_args(
    kind: str, port: int, count: int, idle_seconds: float, deadline: float, rate: float | None = None
) -> list[str]:
    return [
        *([] if rate is None else ["--rate", f"{rate:g}"]),
        "--client",
        kind,
        "--port",
        str(port),
        "--count",
        str(count),
        "--idle",
        f"{idle_seconds:g}",
        "--deadline",
        f"{deadline:g}",
    ]


def _histogram(delays: list[float], window: float = BACKOFF_INITIAL) -> list[int]:
    buckets = [0] * HISTOGRAM_BUCKETS
    for delay in delays:
        # Late clients (CPU queueing, or a failed first attempt) are kept in
        # the last bucket so that the counts add up to N; details say how many.
        index = min(max(int(delay / window * HISTOGRAM_BUCKETS), 0), HISTOGRAM_BUCKETS - 1)
        buckets[index] += 1
    return buckets


def _run_chatfeed(start: _Start, python: str, count: int, idle_seconds: float) -> dict[str, Any]:
    deadline = _child_deadline(count, idle_seconds)
    server, port = _start_server(start, python, count, deadline)
    client = start(python, f"chatfeed client of {count}", _client_args("chatfeed", port, count, idle_seconds, deadline))
    connected = client.read("connected", _START_TIMEOUT + _connect_timeout(count))
    ready = client.read("ready", idle_seconds + _COMMAND_TIMEOUT)
    server.send("drop")
    dropped = server.read("dropped", _COMMAND_TIMEOUT)
    reconnected = client.read("reconnected", _reconnect_timeout(count) + _COMMAND_TIMEOUT)
    server.send("cpu")
    server_cpu = server.read("cpu", _COMMAND_TIMEOUT)["cpu_seconds"] - dropped["cpu_seconds"]
    done = client.read("done", _CLOSE_TIMEOUT)
    client.finish()
    server.send("quit")
    server.finish()
    return {
        "connected": connected,
        "ready": ready,
        "dropped": dropped["clients"],
        "reconnected": reconnected,
        "server_reconnect_cpu_seconds": server_cpu,
        "leftover_tasks": done["leftover_tasks"],
    }


def _run_bare(start: _Start, python: str, count: int, rate: float | None = None) -> dict[str, Any]:
    """Measure ``count`` bare websockets connections, opened at once or ``rate`` per second."""
    ramp = 0.0 if rate is None else count / rate
    deadline = _child_deadline(count, 0.0) + ramp
    server, port = _start_server(start, python, count, deadline)
    client = start(python, f"bare client of {count}", _client_args("bare", port, count, 0.0, deadline, rate))
    connected = client.read("connected", _START_TIMEOUT + _connect_timeout(count) + ramp)
    done = client.read("done", _CLOSE_TIMEOUT)
    client.finish()
    server.send("quit")
    server.finish()
    return {"connected": connected, "leftover_tasks": done["leftover_tasks"]}


def _per_connection_kib(connected: dict[str, Any], count: int) -> float:
    return float(connected["rss_after_kib"] - connected["rss_before_kib"]) / count


def run_scale(counts: list[int], idle_seconds: float, *, python: str = sys.executable) -> list[dict[str, object]]:
    """Measure memory, idle CPU and reconnection of ``counts`` connections in one process.

    For each count, a fresh server and client process measure chatfeed, then
    another fresh pair measures bare websockets connections.

    Args:
        counts: Connection counts to measure, e.g. ``[100, 1000, 2000]``.
        idle_seconds: How long chatfeed's connections idle while their CPU is measured.
        python: The interpreter for the child processes; it must import chatfeed.

    Returns:
        One dict per count, in order: ``connections``,
        ``chatfeed_rss_per_connection_kib``, ``bare_rss_per_connection_kib``,
        ``rss_ratio`` (chatfeed / bare; None if bare grew nothing), ``idle_cpu_seconds``,
        ``idle_cpu_percent`` (of one core), ``all_back_seconds`` (first drop
        seen to last client back), ``reconnect_spread`` ((latest - earliest
        reconnect delay) / the jitter window), ``reconnect_histogram`` (10
        counts of reconnect delays over [0, window]; the last bucket also holds
        any later ones) and ``details`` (raw numbers behind them).

    Raises:
        RuntimeError: A child failed, or did not answer in time; all are killed.
    """
    results: list[dict[str, object]] = []
    for count in counts:
        if count < 1:
            raise ValueError(f"connection counts must be positive, not {count}")
        with _children() as start:
            print(f"scale: {count} connections, chatfeed...", file=sys.stderr, flush=True)
            feed = _run_chatfeed(start, python, count, idle_seconds)
            print(f"scale: {count} connections, bare websockets...", file=sys.stderr, flush=True)
            bare = _run_bare(start, python, count)
        feed_kib = _per_connection_kib(feed["connected"], count)
        bare_kib = _per_connection_kib(bare["connected"], count)
        ready, reconnected = feed["ready"], feed["reconnected"]
        delays: list[float] = reconnected["delays"]
        scheduled: list[float] = reconnected["scheduled_delays"]
        idle_wall = float(ready["idle_wall_seconds"])
        results.append(
            {
                "connections": count,
                "chatfeed_rss_per_connection_kib": round(feed_kib, 2),
                "bare_rss_per_connection_kib": round(bare_kib, 2),
                "rss_ratio": round(feed_kib / bare_kib, 3) if bare_kib > 0 else None,
                "idle_cpu_seconds": round(float(ready["idle_cpu_seconds"]), 4),
                "idle_cpu_percent": round(100.0 * float(ready["idle_cpu_seconds"]) / idle_wall, 3),
                "all_back_seconds": round(float(reconnected["all_back_seconds"]), 3),
                "reconnect_spread": round((max(delays) - min(delays)) / BACKOFF_INITIAL, 3),
                "reconnect_histogram": _histogram(delays),
                "details": {
                    "backoff_initial_seconds": BACKOFF_INITIAL,
                    "idle_wall_seconds": round(idle_wall, 3),
                    "chatfeed_connect_seconds": round(float(feed["connected"]["connect_seconds"]), 3),
                    "bare_connect_seconds": round(float(bare["connected"]["connect_seconds"]), 3),
                    "chatfeed_rss_kib": [feed["connected"]["rss_before_kib"], feed["connected"]["rss_after_kib"]],
                    "bare_rss_kib": [bare["connected"]["rss_before_kib"], bare["connected"]["rss_after_kib"]],
                    "dropped_by_server": feed["dropped"],
                    "disconnects_before_drop": ready["early_disconnects"],
                    "reconnect_delay_min_seconds": round(min(delays), 4),
                    "reconnect_delay_max_seconds": round(max(delays), 4),
                    "reconnects_past_window": sum(delay > BACKOFF_INITIAL for delay in delays),
                    "scheduled_spread": round((max(scheduled) - min(scheduled)) / BACKOFF_INITIAL, 3),
                    "scheduled_histogram": _histogram(scheduled),
                    "client_reconnect_cpu_seconds": round(float(reconnected["cpu_seconds"]), 3),
                    "client_reconnect_gc_seconds": round(float(reconnected["gc_seconds"]), 3),
                    "client_reconnect_gc_longest_pause_seconds": round(reconnected["gc_longest_pause_seconds"], 3),
                    "server_reconnect_cpu_seconds": round(float(feed["server_reconnect_cpu_seconds"]), 3),
                    "leftover_tasks": {"chatfeed": feed["leftover_tasks"], "bare": bare["leftover_tasks"]},
                },
            }
        )
    return results


def _table(results: list[dict[str, object]]) -> str:
    header = (
        f"{'N':>6} {'chatfeed KiB/conn':>18} {'bare KiB/conn':>14} {'ratio':>6} {'idle CPU s':>11} "
        f"{'idle CPU %':>11} {'all back s':>11} {'spread':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in results:
        lines.append(
            f"{row['connections']:>6} {row['chatfeed_rss_per_connection_kib']:>18} "
            f"{row['bare_rss_per_connection_kib']:>14} {row['rss_ratio']:>6} {row['idle_cpu_seconds']:>11} "
            f"{row['idle_cpu_percent']:>11} {row['all_back_seconds']:>11} {row['reconnect_spread']:>7}"
        )
    lines.append("")
    window = f"[0, {BACKOFF_INITIAL:g}] s"
    lines.append(f"Reconnect delays, {HISTOGRAM_BUCKETS} buckets over {window} (later ones in the last):")
    for row in results:
        details = row["details"]
        assert isinstance(details, dict)
        lines.append(
            f"{row['connections']:>6} seen {row['reconnect_histogram']}, {details['reconnects_past_window']} past the "
            f"window; backoff drew {details['scheduled_histogram']}"
        )
    return "\n".join(lines)


def _child_main(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    # The last resort against a parent that died without killing us.
    signal.alarm(max(1, math.ceil(args.deadline)))
    try:
        if args.serve is not None:
            asyncio.run(_serve(args.serve))
        elif args.client == "chatfeed":
            asyncio.run(_measure_chatfeed(args.port, args.count, args.idle))
        else:
            asyncio.run(_measure_bare(args.port, args.count, args.rate))
    except Exception as exc:
        _emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line; also the entry point of its child processes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="10 connections, 0.5 s idle: a quick check")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    # The child processes' options.
    parser.add_argument("--serve", type=int, metavar="N", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=["chatfeed", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--idle", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve is not None or args.client is not None:
        return _child_main(args)

    _raise_fd_limit()
    counts, idle_seconds = (SMOKE_COUNTS, SMOKE_IDLE_SECONDS) if args.smoke else (FULL_COUNTS, FULL_IDLE_SECONDS)
    started = time.monotonic()
    results = run_scale(counts, idle_seconds)
    elapsed = time.monotonic() - started
    print(_table(results))
    print(f"(idle {idle_seconds:g} s per count; backoff window [0, {BACKOFF_INITIAL:g}] s; took {elapsed:.1f} s)")
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

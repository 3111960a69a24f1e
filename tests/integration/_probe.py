"""Speaking to a metrics server as Prometheus and Kubernetes do, and running a command that serves one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable

from ..conftest import MS

CLI_WAIT = 20_000 * MS
"""How long a command may take to do something: starting Python and importing is part of it."""

METRICS_LINE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics, health on /healthz and /readyz")
"""What a command says on stderr when it serves its metrics."""


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


async def http_request(port: int, request: bytes, *, half_close: bool = False, timeout: float = CLI_WAIT) -> Response:
    """Send ``request`` as is to 127.0.0.1:``port`` (then end the stream); read the answer until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        if half_close:
            writer.write_eof()
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(status_line.split(" ")[1]), headers, body)


async def http_get(port: int, path: str, *, method: str = "GET", timeout: float = CLI_WAIT) -> Response:
    """Ask 127.0.0.1:``port`` for ``path``, as a probe does."""
    return await http_request(
        port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(), timeout=timeout
    )


class Command:
    """A running ``python -m chatfeed ...``; its output is read as it comes, stderr kept line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.err: list[str] = []
        self._changed = asyncio.Event()
        assert process.stdout is not None and process.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._read(process.stdout, [])),
            asyncio.ensure_future(self._read(process.stderr, self.err)),
        ]

    async def _read(self, stream: asyncio.StreamReader, lines: list[str]) -> None:
        while raw := await stream.readline():
            lines.append(raw.decode().rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def stderr_matching(self, pattern: str | re.Pattern[str]) -> re.Match[str]:
        """Wait for a line of stderr matching ``pattern``; return its match."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLI_WAIT
        while True:
            for line in self.err:
                match = re.search(pattern, line)
                if match:
                    return match
            if all(reader.done() for reader in self._readers):
                raise AssertionError(f"the command ended before a line matching {pattern!r}: {self.err}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {CLI_WAIT:g} s: {self.err}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def metrics_port(self) -> int:
        """The port the command serves its metrics on, as it said on stderr."""
        return int((await self.stderr_matching(METRICS_LINE))[1])

    async def stop(self) -> tuple[int, str]:
        """Interrupt the command (Ctrl-C); return its exit status and stderr."""
        self.process.send_signal(signal.SIGINT)
        return await self.finish()

    async def finish(self) -> tuple[int, str]:
        """Wait until the command exits; return its exit status and stderr."""
        status = await asyncio.wait_for(self.process.wait(), CLI_WAIT)
        await asyncio.wait_for(asyncio.gather(*self._readers), CLI_WAIT)
        return status, "\n".join(self.err)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def command(*args: str) -> AsyncIterator[Command]:
    """Run ``python -m chatfeed *args`` for the block; kill it if the block leaves it running."""
    environment = {key: value for key, value in os.environ.items() if key not in ("CHATFEED_TOKEN", "NO_COLOR")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatfeed",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    running = Command(process)
    try:
        yield running
    finally:
        await running.kill()


async def poll(port: int, path: str, until: Callable[[Response], bool], *, every: float, timeout: float) -> Response:
    """Ask for ``path`` every ``every`` seconds until the answer satisfies ``until``; return that answer.

    Raises:
        AssertionError: Not within ``timeout`` seconds; it says the last answer.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        answer = await http_get(port, path)
        if until(answer):
            return answer
        if loop.time() > deadline:
            raise AssertionError(f"{path} did not answer as expected within {timeout:g} s: {answer}")
        await asyncio.sleep(every)  # another process's state: polled

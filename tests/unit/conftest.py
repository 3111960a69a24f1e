"""Unit tests run without the network: any attempt to connect or listen fails the test."""

from __future__ import annotations

import socket
from typing import NoReturn

import pytest


def _no_network(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError("a unit test tried to open a network connection")


@pytest.fixture(autouse=True)
def _no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only connect and bind: asyncio's event loop needs its internal socketpair.
    for name in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, name, _no_network)

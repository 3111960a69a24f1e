"""Fixtures shared by every test.

Time constants in tests are multiples of ``MS``; set CHATFEED_TEST_TIME_FACTOR
to stretch them all on a slow machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from chatfeed import Backoff
from chatfeed.testing import FeedServer

TIME_FACTOR = float(os.environ.get("CHATFEED_TEST_TIME_FACTOR", "1"))
"""How much to stretch every time constant of the suite, pytest-timeout's included."""

MS = 0.001 * TIME_FACTOR
"""One millisecond, stretched: every timeout, delay and time window in a test is a multiple of it."""

SECRET = "sekrit"
"""Every token used in tests contains this; no log record may."""

SIGNATURE = "c2lnbmF0dXJl"
"""The end of every test token: a log that elides the middle of a frame still shows it."""

TOKEN = f"eyJhbGciOiJIUzI1NiJ9.{SECRET}-user-1.{SIGNATURE}"
OTHER_TOKEN = f"eyJhbGciOiJIUzI1NiJ9.{SECRET}-user-2.{SIGNATURE}"
BAD_TOKEN = f"eyJhbGciOiJIUzI1NiJ9.{SECRET}-expired.{SIGNATURE}"

FAST = Backoff(initial=5 * MS, maximum=20 * MS, reset_after=1000 * MS)
"""A backoff short enough to go through in tests instead of sleeping it out."""

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "ws_proxy", "wss_proxy", "no_proxy")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stretch each test's pytest-timeout limit, its own marker's or the configured one, by TIME_FACTOR."""
    if TIME_FACTOR == 1:
        return
    configured = config.getoption("timeout", None) or os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout")
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is None:
            seconds, args, kwargs = configured, (), {}
        else:
            kwargs = dict(marker.kwargs)
            seconds = kwargs.pop("timeout", None) or (marker.args[0] if marker.args else None)
            args = marker.args[1:]
        if seconds:  # none, or 0, means no limit: nothing to stretch
            # Prepended, so that it is the closest marker, ahead of the test's own.
            item.add_marker(pytest.mark.timeout(float(seconds) * TIME_FACTOR, *args, **kwargs), append=False)


@pytest.fixture(autouse=True)
def _no_proxy_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(autouse=True)
def _no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture every logger at DEBUG and fail the test if a token shows up."""
    caplog.set_level(logging.DEBUG)
    yield
    for phase in ("setup", "call", "teardown"):
        for record in caplog.get_records(phase):
            text = caplog.handler.format(record)
            assert SECRET not in text, f"a token appeared in a log record ({phase})"
            assert SIGNATURE not in text, f"part of a token appeared in a log record ({phase})"


@pytest.fixture
async def server() -> AsyncIterator[FeedServer]:
    async with FeedServer(tokens=[TOKEN, OTHER_TOKEN]) as server:
        yield server

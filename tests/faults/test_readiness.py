"""``/readyz`` of ``chatfeed listen --metrics`` through a dead network path: 503 in time, 200 after.

The command runs as a user runs it, a separate process, its feed behind a
:class:`~tests.faults.proxy.FaultProxy`; the test asks ``/readyz`` as a
Kubernetes probe does, every `POLL`, straight to the command (the proxy is
only on the feed's path).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from chatfeed.testing import FeedServer

from ..conftest import BAD_TOKEN, MS, OTHER_TOKEN, SECRET, TOKEN
from ..integration._probe import CLI_WAIT, Command, command, http_get, poll
from ..integration.test_cli import write_tokens
from .proxy import FaultProxy

pytestmark = pytest.mark.timeout(60)

PING = 500 * MS
"""The command's --ping-interval and --ping-timeout: a lone client, and each feed of a pool, finds a dead
path within PING + PING."""

POLL = 50 * MS
"""How often the test asks /readyz."""

MARGIN = 300 * MS
"""What the measured time may exceed PING + PING by: one POLL, the answer's round trip, the
keepalive's scheduling (a pool checks its connections every PING / 20), and a busy machine."""


def ready(answer: object) -> bool:
    return getattr(answer, "status", None) == 200


def not_ready(answer: object) -> bool:
    return getattr(answer, "status", None) == 503


async def blackhole_and_recover(listen: Command, proxy: FaultProxy) -> tuple[float, str]:
    """Blackhole the feed's path once /readyz says ready; return how long until it said not, and why.

    Then let the path through again and wait until /readyz says ready again.
    """
    port = await listen.metrics_port()
    await poll(port, "/readyz", ready, every=POLL, timeout=CLI_WAIT)
    loop = asyncio.get_running_loop()
    proxy.blackhole()
    dead_at = loop.time()
    answer = await poll(port, "/readyz", not_ready, every=POLL, timeout=CLI_WAIT)
    detected_after = loop.time() - dead_at
    proxy.pass_through()
    await poll(port, "/readyz", ready, every=POLL, timeout=CLI_WAIT)
    assert (await http_get(port, "/healthz")).status == 200
    return detected_after, answer.text


async def test_listen_readyz_is_503_within_ping_interval_plus_timeout_of_a_dead_path_and_200_after(
    server: FeedServer, proxy: FaultProxy
) -> None:
    async with command(
        "listen", proxy.url, "--token", TOKEN, "--metrics", "127.0.0.1:0",
        "--ping-interval", f"{PING:g}", "--ping-timeout", f"{PING:g}",
    ) as listen:  # fmt: skip
        detected_after, why = await blackhole_and_recover(listen, proxy)
        port = await listen.metrics_port()
        metrics = (await http_get(port, "/metrics")).text
        status, err = await listen.stop()
    assert detected_after <= PING + PING + MARGIN, detected_after
    assert re.fullmatch(r"not ready: the client is (backing_off|connecting|authenticating)\n", why), why
    # The dead path closed nothing: 1006, the code of a connection dropped without a closing handshake.
    assert 'chatfeed_reconnects_total{code="1006"} 1.0' in metrics
    assert status == 0
    assert SECRET not in err + metrics


async def test_listen_to_a_pool_readyz_follows_the_fraction_of_feeds_up(
    server: FeedServer, proxy: FaultProxy, tmp_path: Path
) -> None:
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"first": TOKEN, "second": OTHER_TOKEN, "rejected": BAD_TOKEN})
    async with command(
        "listen", proxy.url, "--tokens", str(tokens), "--metrics", "127.0.0.1:0", "--ready-fraction", "0.5",
        "--ping-interval", f"{PING:g}", "--ping-timeout", f"{PING:g}",
    ) as listen:  # fmt: skip
        port = await listen.metrics_port()
        # Two of three feeds up (the third's token is rejected) is ready at 50 %.
        answer = await poll(port, "/readyz", lambda answer: "2 of 3" in answer.text, every=POLL, timeout=CLI_WAIT)
        assert (answer.status, answer.text) == (200, "ready: 2 of 3 feeds up (need 50%)\n")
        detected_after, why = await blackhole_and_recover(listen, proxy)
        metrics = (await http_get(port, "/metrics")).text
        status, err = await listen.stop()
    # A pool's feeds share one keepalive, which pings each once per interval, as a lone client's does.
    assert detected_after <= PING + PING + MARGIN, detected_after
    assert re.fullmatch(r"not ready: [01] of 3 feeds up \(need 50%\)\n", why), why
    assert 'chatfeed_feeds{state="failed"} 1.0' in metrics
    assert 'chatfeed_feeds{state="open"} 2.0' in metrics
    assert status == 0
    assert SECRET not in err + metrics

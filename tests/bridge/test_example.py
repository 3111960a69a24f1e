"""examples/broker_bridge.py runs, as a user runs it: a program, with its own brokers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatfeed.bridge.testing import nats_server_binary, redis_server_binary

from .conftest import NATS_INSTALL, REDIS_INSTALL, require_binary

EXAMPLE = Path(__file__).parents[2] / "examples" / "broker_bridge.py"


@pytest.mark.parametrize("broker", ["nats", "redis"])
def test_the_bridge_example_loses_nothing_through_a_broker_outage(broker: str) -> None:
    if broker == "nats":
        require_binary("nats-server", nats_server_binary, NATS_INSTALL)
    else:
        require_binary("redis-server", redis_server_binary, REDIS_INSTALL)
    args = [sys.executable, str(EXAMPLE), *(["--redis"] if broker == "redis" else [])]
    result = subprocess.run(args, capture_output=True, text=True, timeout=18, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"bridging 20 feeds into {broker}"
    assert "held while the broker was away: 64" in lines  # the window, full: the feeds stopped being read
    assert lines[-1] == "consumer: 200 messages, 10 from each of 20 users"
    bridged = next(line for line in lines if line.startswith("bridge: "))
    # Each event once: read after the last acknowledgement, the bridge's counts agree with the consumer's.
    assert re.fullmatch(r"bridge: 200 received, 200 published, \d+ duplicate\(s\) dropped by the broker", bridged)
    assert "the broker is back" in result.stderr

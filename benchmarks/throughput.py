"""Throughput, latency and import time: chatfeed against the loop a user would write by hand.

The consumers, each reading frames from the firehose server (another process):

- ``hand``: a websockets receive loop, ``json.loads`` and an ``if`` on ``type``;
- ``bare``: ``await ws.recv()`` and nothing else, the ceiling for any client built on websockets;
- ``handler``: chatfeed with one async handler;
- ``events``: chatfeed's ``events()`` iterator;
- ``metered``: ``handler``, with an observer that counts every event and times every handler call.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

import chatfeed

FIREHOSE = Path(__file__).with_name("firehose.py")


@contextmanager
def firehose_server() -> Iterator[str]:
    """Start the firehose server process; yield its URL."""
    process = subprocess.Popen(
        [sys.executable, str(FIREHOSE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"ws://127.0.0.1:{port}"
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The consumers. Each reads `count` new_message frames sent with `token`.


async def hand(url: str, token: str, count: int, on_frame: Callable[[Any], None] | None = None) -> None:
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        json.loads(await ws.recv())
        received = 0
        while received < count:
            message = json.loads(await ws.recv())
            if message["type"] == "new_message":
                received += 1
                if on_frame is not None:
                    on_frame(message["payload"]["content"])


async def bare(url: str, token: str, count: int) -> None:
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        await ws.recv()
        for _ in range(count):
            await ws.recv()


async def handler(url: str, token: str, count: int, on_frame: Callable[[Any], None] | None = None) -> None:
    client = chatfeed.Client(url, token=token, reconnect=False)
    done = asyncio.Event()
    received = 0

    @client.on("new_message")
    async def count_it(event: chatfeed.NewMessage) -> None:
        nonlocal received
        received += 1
        if on_frame is not None:
            on_frame(event.payload.content)
        if received == count:
            done.set()

    async with client:
        await done.wait()


class Meter(chatfeed.Observer):
    """What a metrics exporter does per event: count it, and time each handler call."""

    def __init__(self) -> None:
        self.events = 0
        self.calls = 0
        self.handling = 0.0

    def event_received(self, feed: str | None, event: chatfeed.FeedEvent) -> None:
        self.events += 1

    def handler_finished(
        self, feed: str | None, event: Any, *, handler: str, duration: float, error: Any, started: object
    ) -> None:
        self.calls += 1
        self.handling += duration


async def metered(url: str, token: str, count: int) -> None:
    """``handler``, observed by a `Meter`: the cost of observing every event and handler call."""
    client = chatfeed.Client(url, token=token, reconnect=False, observer=Meter())
    done = asyncio.Event()
    received = 0

    @client.on("new_message")
    async def count_it(event: chatfeed.NewMessage) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    async with client:
        await done.wait()


async def events(url: str, token: str, count: int) -> None:
    client = chatfeed.Client(url, token=token, reconnect=False)
    async with client:
        received = 0
        async for _ in client.events():
            received += 1
            if received == count:
                break


CONSUMERS: dict[str, Callable[[str, str, int], Coroutine[Any, Any, None]]] = {
    "hand": hand,
    "bare": bare,
    "handler": handler,
    "events": events,
    "metered": metered,
}


def measure_throughput(url: str, frames: int, rounds: int) -> dict[str, dict[str, float]]:
    """Run every consumer ``rounds`` times, alternating; return medians per consumer."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in CONSUMERS}
    for _ in range(rounds):
        for name, consumer in CONSUMERS.items():
            started, cpu = time.perf_counter(), cpu_seconds()
            asyncio.run(consumer(url, f"firehose:{frames}", frames))
            elapsed, used = time.perf_counter() - started, cpu_seconds() - cpu
            samples[name].append((frames / elapsed, used / frames * 1e6))
    return {
        name: {
            "frames_per_second": statistics.median(rate for rate, _ in values),
            "cpu_us_per_frame": statistics.median(cpu for _, cpu in values),
        }
        for name, values in samples.items()
    }


def measure_latency(url: str, rate: float, seconds: float) -> dict[str, dict[str, float]]:
    """Send-to-handler delay percentiles, in microseconds, for the hand loop and chatfeed."""
    results = {}
    count = int(rate * seconds)
    for name, consumer in (("hand", hand), ("handler", handler)):
        delays: list[int] = []

        def record(content: str, delays: list[int] = delays) -> None:
            delays.append(time.monotonic_ns() - int(content))

        asyncio.run(consumer(url, f"paced:{rate}:{seconds}", count, record))
        delays.sort()
        results[name] = {
            f"p{label}": delays[min(int(len(delays) * fraction), len(delays) - 1)] / 1000
            for label, fraction in (("50", 0.50), ("99", 0.99), ("99.9", 0.999))
        }
    return results


# The honest baseline: chatfeed's dependencies, with pydantic's BaseModel and
# Field loaded, as any program that defines a pydantic model has them (a bare
# ``import pydantic`` is lazy and loads neither).
DEPENDENCIES = (
    "import websockets.asyncio.client, tenacity, typing_extensions; from pydantic import BaseModel, Field, TypeAdapter"
)

_FIRST_EVENT_CHATFEED = """
import asyncio, sys, chatfeed
async def main():
    async with chatfeed.Client(sys.argv[1], token="firehose:1", reconnect=False) as client:
        async for event in client.events():
            return
asyncio.run(main())
"""

_FIRST_EVENT_HAND = """
import asyncio, json, sys
from websockets.asyncio.client import connect
async def main():
    async with connect(sys.argv[1], compression=None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": "firehose:1"}))
        json.loads(await ws.recv())
        message = json.loads(await ws.recv())
        assert message["type"] == "new_message"
asyncio.run(main())
"""


def measure_import(runs: int, url: str) -> dict[str, float]:
    """Median wall times of fresh interpreters: importing chatfeed, its dependencies, and up to a first event.

    ``first_event_*`` is a whole program: start, import, connect, authenticate
    and receive one ``new_message``, with chatfeed and with the hand-written loop.
    """
    programs = {
        "chatfeed": ["-c", "import chatfeed"],
        "dependencies": ["-c", DEPENDENCIES],
        "first_event_chatfeed": ["-c", _FIRST_EVENT_CHATFEED, url],
        "first_event_hand": ["-c", _FIRST_EVENT_HAND, url],
    }
    # As installed: from bytecode. A first run of each writes it, even where
    # PYTHONDONTWRITEBYTECODE is set (then every run would compile chatfeed).
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    for arguments in programs.values():
        subprocess.run([sys.executable, *arguments], check=True, env=environment)
    samples: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(runs):
        for name, arguments in programs.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, *arguments], check=True, env=environment)
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}
